// The Llama 3 tiktoken tokenizer: a rank file of "<base64 bytes> <rank>" lines, Meta's 256
// special tokens after the ranks, and Meta's pre-tokenizer regex
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//    ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// implemented as a hand-written scanner over code points (std::regex has no \p{L}), followed
// by tiktoken's byte-pair merge (lowest rank first) inside each piece.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <fstream>
#include <sstream>

#include "errors.h"
#include "tokenizer.h"
#include "unicode_tables.h"

namespace runner {
namespace {

template <size_t N>
bool in_table(const unicode::CodeRange (&table)[N], uint32_t cp) {
  auto it = std::upper_bound(std::begin(table), std::end(table), cp,
                             [](uint32_t c, const unicode::CodeRange& r) { return c < r.first; });
  return it != std::begin(table) && cp <= (it - 1)->last;
}

bool is_letter(uint32_t cp) { return in_table(unicode::kLetters, cp); }
bool is_number(uint32_t cp) { return in_table(unicode::kNumbers, cp); }
bool is_space(uint32_t cp) { return in_table(unicode::kWhiteSpace, cp); }
bool is_newline(uint32_t cp) { return cp == '\r' || cp == '\n'; }

// One decoded character and where its bytes are in the text.
struct Char {
  uint32_t cp;
  size_t begin, end;
};

// Lenient UTF-8 decoding: a malformed byte becomes U+FFFD (a symbol) but keeps its bytes.
std::vector<Char> decode_utf8(const std::string& s) {
  std::vector<Char> out;
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    bool ok = len > 0 && i + len <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      const unsigned char b = s[i + k];
      ok = (b & 0xC0) == 0x80;
      cp = (cp << 6) | (b & 0x3F);
    }
    if (!ok) {
      out.push_back({0xFFFD, i, i + 1});
      ++i;
    } else {
      out.push_back({cp, i, i + len});
      i += len;
    }
  }
  return out;
}

// Length (in characters) of the pre-tokenizer match at position i; alternatives are tried in
// the regex's order, and the first that matches wins, as in a backtracking regex engine.
size_t match_at(const std::vector<Char>& t, size_t i) {
  const size_t n = t.size();
  auto cp = [&](size_t k) { return t[k].cp; };
  auto lower = [](uint32_t c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; };
  // (?i:'s|'t|'re|'ve|'m|'ll|'d)
  if (cp(i) == '\'' && i + 1 < n) {
    const uint32_t a = lower(cp(i + 1));
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 < n) {
      const uint32_t b = lower(cp(i + 2));
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
  }
  // [^\r\n\p{L}\p{N}]?\p{L}+
  {
    size_t j = i;
    if (!is_letter(cp(j)) && !is_newline(cp(j)) && !is_number(cp(j))) ++j;
    if (j < n && is_letter(cp(j))) {
      while (j < n && is_letter(cp(j))) ++j;
      return j - i;
    }
  }
  // \p{N}{1,3}
  if (is_number(cp(i))) {
    size_t j = i;
    while (j < n && j - i < 3 && is_number(cp(j))) ++j;
    return j - i;
  }
  // " ?[^\s\p{L}\p{N}]+[\r\n]*"
  {
    size_t j = i;
    if (cp(j) == ' ') ++j;
    auto symbol = [&](size_t k) { return !is_space(cp(k)) && !is_letter(cp(k)) && !is_number(cp(k)); };
    if (j < n && symbol(j)) {
      while (j < n && symbol(j)) ++j;
      while (j < n && is_newline(cp(j))) ++j;
      return j - i;
    }
  }
  if (is_space(cp(i))) {
    size_t end = i;
    while (end < n && is_space(cp(end))) ++end;
    // \s*[\r\n]+ : the greedy \s* backs off to the last newline of the whitespace run.
    for (size_t k = end; k > i; --k)
      if (is_newline(cp(k - 1))) return k - i;
    // \s+(?!\S) : the whole run at the end of text, else all but its last character
    // (which the next piece, e.g. " word", takes).
    if (end == n) return end - i;
    if (end - i > 1) return end - i - 1;
    // \s+
    return end - i;
  }
  return 1;  // unreachable: every character is a letter, number, space or symbol
}

class TiktokenTokenizer : public Tokenizer {
 public:
  explicit TiktokenTokenizer(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw RunnerError("cannot open tokenizer " + path);
    std::string line;
    int number = 0;
    while (std::getline(f, line)) {
      ++number;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) continue;
      const size_t sp = line.find(' ');
      std::string bytes;
      long rank = -1;
      if (sp != std::string::npos && base64_decode(line.substr(0, sp), bytes)) {
        char* end = nullptr;
        rank = std::strtol(line.c_str() + sp + 1, &end, 10);
        if (*end != '\0' || rank < 0 || rank > (1L << 24)) rank = -1;
      }
      if (rank < 0)
        throw RunnerError("cannot read tokenizer " + path + ": line " + std::to_string(number) +
                          " is not '<base64> <rank>'");
      if (static_cast<size_t>(rank) >= tokens_.size()) tokens_.resize(rank + 1);
      tokens_[rank] = bytes;
      ranks_[bytes] = static_cast<int>(rank);
    }
    if (ranks_.empty()) throw RunnerError("cannot read tokenizer " + path + ": no BPE ranks");
    const int base = static_cast<int>(tokens_.size());
    // Meta's table: ten named tokens, then reserved ones numbered on from 5; 256 in all.
    const char* named[] = {"<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                           "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                           "<|reserved_special_token_3|>", "<|start_header_id|>",
                           "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"};
    for (const char* name : named) add_special(name);
    for (int i = 5; i < 256 - 5; ++i)
      add_special("<|reserved_special_token_" + std::to_string(i) + "|>");
    // Llama 3.1 names for some reserved ids (lookups only; decoding keeps the 3.0 names).
    specials_["<|finetune_right_pad_id|>"] = base + 4;
    specials_["<|eom_id|>"] = base + 8;
    specials_["<|python_tag|>"] = base + 10;
    vocab_size = static_cast<int>(tokens_.size());
    bos_id = specials_["<|begin_of_text|>"];
    eos_id = specials_["<|end_of_text|>"];
    stop_ids = {eos_id, specials_["<|eot_id|>"], specials_["<|eom_id|>"]};
  }

  std::vector<int> encode(const std::string& text, bool bos) const override {
    std::vector<int> ids;
    if (bos) ids.push_back(bos_id);
    const std::vector<Char> chars = decode_utf8(text);
    for (size_t i = 0; i < chars.size();) {
      const size_t len = match_at(chars, i);
      const size_t b = chars[i].begin, e = chars[i + len - 1].end;
      bpe(text.substr(b, e - b), ids);
      i += len;
    }
    return ids;
  }

  std::string piece(int id) const override {
    return id >= 0 && id < vocab_size ? tokens_[id] : std::string();
  }

  int special_id(const std::string& name) const override {
    auto it = specials_.find(name);
    return it == specials_.end() ? -1 : it->second;
  }

 private:
  void add_special(const std::string& name) {
    specials_[name] = static_cast<int>(tokens_.size());  // ids follow the ranks (base on)
    tokens_.push_back(name);
  }

  int rank_of(const std::string& s) const {
    auto it = ranks_.find(s);
    return it == ranks_.end() ? INT_MAX : it->second;
  }

  // tiktoken's byte_pair_merge: start from single bytes, repeatedly merge the adjacent pair
  // whose concatenation has the lowest rank (leftmost on ties) until none is in the table.
  void bpe(const std::string& piece, std::vector<int>& out) const {
    auto whole = ranks_.find(piece);
    if (whole != ranks_.end()) {
      out.push_back(whole->second);
      return;
    }
    std::vector<std::string> parts;
    for (char c : piece) parts.emplace_back(1, c);
    while (parts.size() > 1) {
      int best = INT_MAX;
      size_t at = 0;
      for (size_t i = 0; i + 1 < parts.size(); ++i) {
        const int r = rank_of(parts[i] + parts[i + 1]);
        if (r < best) best = r, at = i;
      }
      if (best == INT_MAX) break;
      parts[at] += parts[at + 1];
      parts.erase(parts.begin() + static_cast<long>(at) + 1);
    }
    for (const std::string& p : parts) {
      const int r = rank_of(p);
      if (r == INT_MAX) throw RunnerError("tokenizer has no token for a single byte");
      out.push_back(r);
    }
  }

  static bool base64_decode(const std::string& in, std::string& out) {
    auto value = [](char c) -> int {
      if (c >= 'A' && c <= 'Z') return c - 'A';
      if (c >= 'a' && c <= 'z') return c - 'a' + 26;
      if (c >= '0' && c <= '9') return c - '0' + 52;
      if (c == '+') return 62;
      if (c == '/') return 63;
      return -1;
    };
    if (in.empty() || in.size() % 4 != 0) return false;
    out.clear();
    for (size_t i = 0; i < in.size(); i += 4) {
      int v[4];
      int pad = 0;
      for (int k = 0; k < 4; ++k) {
        const char c = in[i + k];
        if (c == '=' && i + 4 == in.size() && k >= 2) {
          v[k] = 0;
          ++pad;
        } else if (pad || (v[k] = value(c)) < 0) {
          return false;
        }
      }
      const uint32_t w = (v[0] << 18) | (v[1] << 12) | (v[2] << 6) | v[3];
      out += static_cast<char>(w >> 16);
      if (pad < 2) out += static_cast<char>((w >> 8) & 0xFF);
      if (pad < 1) out += static_cast<char>(w & 0xFF);
    }
    return true;
  }

  std::vector<std::string> tokens_;  // id -> bytes (ranks, then special-token names)
  std::unordered_map<std::string, int> ranks_;
  std::unordered_map<std::string, int> specials_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_tiktoken_tokenizer(const std::string& path) {
  return std::make_unique<TiktokenTokenizer>(path);
}

}  // namespace runner
