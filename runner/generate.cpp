#include "generate.h"

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "chat.h"
#include "errors.h"
#include "sampler.h"
#include "tokenizer.h"

namespace runner {

// ---------------------------------------------------------------------------------------------
// UTF-8

std::string Utf8Stream::take(bool final) {
  static const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD
  std::string out;
  size_t i = 0;
  const size_t n = buf_.size();
  while (i < n) {
    const unsigned char c = buf_[i];
    if (c < 0x80) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    // Sequence length and the allowed range of the second byte (Unicode table 3-7), which
    // rules out overlong forms, surrogates and code points past U+10FFFF.
    int len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    if (len == 0) {  // a byte that cannot start a character
      out += kReplacement;
      ++i;
      continue;
    }
    int k = 1;
    bool bad = false;
    for (; k < len; ++k) {
      if (i + k >= n) break;  // incomplete: wait for more bytes
      const unsigned char b = buf_[i + k];
      if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) { bad = true; break; }
    }
    if (bad) {  // Python replaces the maximal valid prefix with one U+FFFD
      out += kReplacement;
      i += k;
    } else if (k < len) {
      if (!final) break;
      out += kReplacement;
      i = n;
    } else {
      out.append(buf_, i, len);
      i += len;
    }
  }
  buf_.erase(0, i);
  return out;
}

namespace {

// ---------------------------------------------------------------------------------------------
// Flags

struct Options {
  std::string model_path, tokenizer_path, prompt, system_prompt, mode = "generate";
  bool has_prompt = false;
  int steps = 256;
  float temperature = 0.8f;  // torchchat's defaults
  int top_k = 200;
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool has_seed = false;
};

std::string usage(const std::string& prog, const std::string& artifact) {
  return "usage: " + prog + " MODEL" + artifact + " -z TOKENIZER [options]\n"
         "  -z PATH   tokenizer: llama2.c tokenizer.bin (sentencepiece models) or tiktoken file\n"
         "            (write one with `torchchat export ... --output-tokenizer-path`)\n"
         "  -i TEXT   prompt (generate) or first user message (chat)   default \"\"\n"
         "  -n INT    max new tokens (per turn in chat)                 default 256\n"
         "  -t FLOAT  temperature, 0 = greedy                           default 0.8\n"
         "  -k INT    top-k, 0 = off                                    default 200\n"
         "  -p FLOAT  top-p in (0, 1], 1 = off                          default 1\n"
         "  -s INT    random seed                                       default: time\n"
         "  -m MODE   generate | chat                                   default generate\n"
         "  -y TEXT   system prompt (chat)\n"
         "Max sequence length and tokenizer kind come from the artifact's metadata.\n";
}

long parse_int(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0)
    throw RunnerError("flag " + flag + " expects an integer, got '" + v + "'", kExitUsage);
  return x;
}

float parse_float(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  float x = std::strtof(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !std::isfinite(x))
    throw RunnerError("flag " + flag + " expects a number, got '" + v + "'", kExitUsage);
  return x;
}

Options parse_args(int argc, char** argv, const std::string& artifact) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "-h" || a == "--help") {
      std::cout << usage(argv[0], artifact);
      std::exit(0);
    }
    if (a.size() == 2 && a[0] == '-') {
      if (i + 1 >= args.size()) throw RunnerError("flag " + a + " needs a value", kExitUsage);
      const std::string& v = args[++i];
      switch (a[1]) {
        case 'z': o.tokenizer_path = v; break;
        case 'i': o.prompt = v; o.has_prompt = true; break;
        case 'n': {
          long n = parse_int(a, v);
          if (n < 1 || n > 1000000) throw RunnerError("-n must be at least 1", kExitUsage);
          o.steps = static_cast<int>(n);
          break;
        }
        case 't':
          o.temperature = parse_float(a, v);
          if (o.temperature < 0) throw RunnerError("-t must be >= 0", kExitUsage);
          break;
        case 'k': {
          long k = parse_int(a, v);
          if (k < 0 || k > (1L << 30)) throw RunnerError("-k must be >= 0", kExitUsage);
          o.top_k = static_cast<int>(k);
          break;
        }
        case 'p':
          o.top_p = parse_float(a, v);
          if (!(o.top_p > 0 && o.top_p <= 1)) throw RunnerError("-p must be in (0, 1]", kExitUsage);
          break;
        case 's': o.seed = static_cast<uint64_t>(parse_int(a, v)); o.has_seed = true; break;
        case 'm':
          if (v != "generate" && v != "chat")
            throw RunnerError("-m must be generate or chat, got '" + v + "'", kExitUsage);
          o.mode = v;
          break;
        case 'y': o.system_prompt = v; break;
        default: throw RunnerError("unknown flag " + a + "\n" + usage(argv[0], artifact), kExitUsage);
      }
    } else if (!a.empty() && a[0] == '-') {
      throw RunnerError("unknown flag " + a + "\n" + usage(argv[0], artifact), kExitUsage);
    } else if (o.model_path.empty()) {
      o.model_path = a;
    } else {
      throw RunnerError("unexpected argument '" + a + "'", kExitUsage);
    }
  }
  if (o.model_path.empty())
    throw RunnerError("no model given\n" + usage(argv[0], artifact), kExitUsage);
  if (o.tokenizer_path.empty())
    throw RunnerError("no tokenizer given: pass -z TOKENIZER\n" + usage(argv[0], artifact), kExitUsage);
  if (!o.has_seed)
    o.seed = static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
  return o;
}

// ---------------------------------------------------------------------------------------------
// Generation

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

struct Session {
  Model& model;
  Tokenizer& tok;
  Sampler& sampler;
  int64_t max_seq_len;
  int64_t pos = 0;  // next cache position to fill
};

struct TurnResult {
  int last_token = -1;  // sampled but not fed to the model
  bool stopped = false;  // ended on a stop token rather than the length limit
};

// Prefill `prompt` in one call at s.pos, then decode one token per call, streaming text to
// stdout, like torchchat's Generator.stream: stop tokens end the turn and are not printed.
TurnResult generate(Session& s, const std::vector<int>& prompt, int max_new_tokens) {
  const int64_t n_prompt = static_cast<int64_t>(prompt.size());
  if (n_prompt == 0) throw RunnerError("empty prompt: nothing to condition on");
  const int64_t room = s.max_seq_len - s.pos - n_prompt;
  if (room <= 0) {
    throw RunnerError("prompt of " + std::to_string(n_prompt) + " tokens (at position " +
                      std::to_string(s.pos) + ") does not fit the context of " +
                      std::to_string(s.max_seq_len) + " tokens");
  }
  const int64_t max_new = std::min<int64_t>(max_new_tokens, room + 1);  // last token needs no slot
  for (int id : prompt)
    if (id < 0) throw RunnerError("tokenizer produced an invalid id");

  Utf8Stream utf8;
  // sentencepiece's dummy-prefix space is dropped only right after BOS (like run.c).
  bool strip_space = s.tok.strips_leading_space && prompt.back() == s.tok.bos_id;
  auto t0 = Clock::now();
  std::vector<int64_t> ids(prompt.begin(), prompt.end());
  std::vector<float> logits = s.model.forward(ids, s.pos);
  if (static_cast<int>(logits.size()) < s.tok.vocab_size)
    throw RunnerError("the tokenizer has " + std::to_string(s.tok.vocab_size) +
                      " tokens but the model only " + std::to_string(logits.size()));
  s.pos += n_prompt;
  int token = s.sampler.sample(logits);
  const double prefill_s = seconds_since(t0);

  TurnResult r;
  int64_t generated = 0;
  auto t1 = Clock::now();
  while (true) {
    if (s.tok.stop_ids.count(token)) {
      r.stopped = true;
      break;
    }
    ++generated;
    std::string bytes = s.tok.piece(token);
    if (strip_space && !bytes.empty()) {
      strip_space = false;
      if (bytes[0] == ' ') bytes.erase(0, 1);
    }
    std::string text = utf8.push(bytes);
    if (!text.empty()) {
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::fflush(stdout);
    }
    if (generated >= max_new) break;
    logits = s.model.forward({static_cast<int64_t>(token)}, s.pos);
    token = s.sampler.sample(logits);
    s.pos += 1;
  }
  const double decode_s = seconds_since(t1);
  std::string rest = utf8.flush();
  std::fwrite(rest.data(), 1, rest.size(), stdout);
  std::fflush(stdout);
  r.last_token = token;
  // Same definition as torchchat's metrics: decode speed counts the tokens after the first.
  const double tps = generated > 1 && decode_s > 0 ? (generated - 1) / decode_s : 0.0;
  std::fprintf(stderr,
               "\n[%lld prompt tokens, prefill %.3f s (%.1f tokens/s); %lld new tokens, "
               "decode %.2f tokens/s]\n",
               static_cast<long long>(n_prompt), prefill_s, n_prompt / std::max(prefill_s, 1e-9),
               static_cast<long long>(generated), tps);
  return r;
}

int run(const Options& o, const std::string& artifact, const ModelLoader& load) {
  std::unique_ptr<Model> model = load(o.model_path);
  std::map<std::string, std::string> meta = model->metadata();
  if (!meta.count("max_seq_len") || !meta.count("tokenizer_kind"))
    throw RunnerError(o.model_path + " carries no torchchat metadata: export it with `torchchat export`");
  long max_seq_len = parse_int("max_seq_len metadata", meta["max_seq_len"]);
  std::unique_ptr<Tokenizer> tok = load_tokenizer(o.tokenizer_path, meta["tokenizer_kind"]);
  Sampler sampler(o.temperature, o.top_k, o.top_p, o.seed);
  Session s{*model, *tok, sampler, max_seq_len};

  if (o.mode == "generate") {
    generate(s, tok->encode(o.prompt, /*bos=*/true), o.steps);
    std::fputs("\n", stdout);
    return 0;
  }

  // Chat: the first user message is -i (if given), then one per line of stdin until EOF.
  ChatTemplate tmpl(*tok);
  const bool interactive = isatty(0);
  bool first = true, pending_prompt = o.has_prompt;
  int prev_stop = -1;
  while (true) {
    std::string user;
    if (pending_prompt) {
      user = o.prompt;
      pending_prompt = false;
    } else {
      if (interactive) std::fputs("User: ", stderr);
      if (!std::getline(std::cin, user)) break;
    }
    if (strip(user).empty()) continue;
    TurnResult r = generate(s, tmpl.turn(o.system_prompt, user, first, prev_stop), o.steps);
    std::fputs("\n", stdout);
    std::fflush(stdout);
    first = false;
    // An answer cut by -n leaves no stop token; the template's closing one is still due.
    prev_stop = r.stopped ? r.last_token : tmpl.end_of_answer();
  }
  return 0;
}

}  // namespace

int runner_main(int argc, char** argv, const std::string& artifact, const ModelLoader& load) {
  try {
    Options o = parse_args(argc, argv, artifact);
    return run(o, artifact, load);
  } catch (const RunnerError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return e.exit_code;
  } catch (const std::exception& e) {
    // A runtime's own exception (c10::Error, bad_alloc, ...): keep its first line.
    std::string msg = e.what();
    std::fprintf(stderr, "error: %s\n", msg.substr(0, msg.find('\n')).c_str());
    return kExitFailure;
  }
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path, const std::string& kind) {
  if (kind == "sentencepiece") return load_llama2c_tokenizer(path);
  if (kind == "tiktoken") return load_tiktoken_tokenizer(path);
  throw RunnerError("the model's tokenizer kind '" + kind +
                    "' has no C++ tokenizer (supported: sentencepiece, tiktoken)");
}

}  // namespace runner
