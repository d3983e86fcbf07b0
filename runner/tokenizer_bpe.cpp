// llama2.c's tokenizer.bin: int32 max_token_length, then per token a float score, an int32
// length and the piece bytes (sentencepiece's "\u2581" already turned into ' ').
// Encoding follows run.c: dummy-prefix space, one token per UTF-8 character (bytes as
// <0xXX> fallback), then greedily merge the adjacent pair whose merge scores highest --
// which is what sentencepiece's BPE does, so ids match the Python tokenizer.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>

#include "errors.h"
#include "tokenizer.h"

namespace runner {
namespace {

class Llama2cTokenizer : public Tokenizer {
 public:
  explicit Llama2cTokenizer(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw RunnerError("cannot open tokenizer " + path);
    int32_t max_len = 0;
    if (!f.read(reinterpret_cast<char*>(&max_len), 4) || max_len <= 0 || max_len > (1 << 16))
      throw RunnerError("not a llama2.c tokenizer.bin: " + path);
    while (true) {
      float score;
      int32_t len;
      if (!f.read(reinterpret_cast<char*>(&score), 4)) break;  // clean end of file
      if (!f.read(reinterpret_cast<char*>(&len), 4) || len < 0 || len > max_len)
        throw RunnerError("truncated or malformed tokenizer.bin: " + path);
      std::string s(static_cast<size_t>(len), '\0');
      if (len && !f.read(&s[0], len))
        throw RunnerError("truncated or malformed tokenizer.bin: " + path);
      lookup_.emplace(s, static_cast<int>(vocab_.size()));  // first id wins on duplicates
      vocab_.push_back(std::move(s));
      scores_.push_back(score);
    }
    vocab_size = static_cast<int>(vocab_.size());
    if (vocab_size < 3) throw RunnerError("tokenizer.bin has no vocabulary: " + path);
    // llama2.c's tokenizer.py writes BOS/EOS as "\n<s>\n" and "\n</s>\n" (run.c fixes them
    // at ids 1 and 2 anyway).
    bos_id = find_or("\n<s>\n", find_or("<s>", 1));
    eos_id = find_or("\n</s>\n", find_or("</s>", 2));
    stop_ids.insert(eos_id);
    for (const char* eot : {"<|eot_id|>", "<|im_end|>", "<end_of_turn>"}) {
      int id = special_id(eot);
      if (id >= 0) stop_ids.insert(id);
    }
    strips_leading_space = true;
    // Byte pieces "<0xXX>": run.c assumes they sit at ids 3..258; look them up instead.
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      byte_ids_[b] = find_or(name, -1);
    }
  }

  std::vector<int> encode(const std::string& text, bool bos) const override {
    std::vector<int> ids;
    if (bos) ids.push_back(bos_id);
    if (text.empty()) return ids;
    size_t first = ids.size();
    int space = find_or(" ", -1);
    if (space >= 0) ids.push_back(space);  // sentencepiece's dummy prefix
    for (size_t i = 0; i < text.size();) {
      size_t n = 1;  // bytes in this UTF-8 character (continuation bytes 10xxxxxx)
      while (i + n < text.size() && n < 4 && (static_cast<unsigned char>(text[i + n]) & 0xC0) == 0x80) ++n;
      auto it = lookup_.find(text.substr(i, n));
      if (it != lookup_.end()) {
        ids.push_back(it->second);
      } else {
        for (size_t k = 0; k < n; ++k) {
          int id = byte_ids_[static_cast<unsigned char>(text[i + k])];
          ids.push_back(id >= 0 ? id : 0);  // no byte piece: <unk>
        }
      }
      i += n;
    }
    // Merge the best-scoring adjacent pair until no pair forms a known piece.
    while (true) {
      float best = -std::numeric_limits<float>::infinity();
      int best_id = -1;
      size_t best_i = 0;
      for (size_t i = first; i + 1 < ids.size(); ++i) {
        auto it = lookup_.find(vocab_[ids[i]] + vocab_[ids[i + 1]]);
        if (it != lookup_.end() && scores_[it->second] > best) {
          best = scores_[it->second];
          best_id = it->second;
          best_i = i;
        }
      }
      if (best_id < 0) break;
      ids[best_i] = best_id;
      ids.erase(ids.begin() + static_cast<long>(best_i) + 1);
    }
    return ids;
  }

  std::string piece(int id) const override {
    if (id < 0 || id >= vocab_size) return "";
    if (id == bos_id || id == eos_id) return "";
    const std::string& p = vocab_[id];
    unsigned int byte;
    if (p.size() == 6 && std::sscanf(p.c_str(), "<0x%02X>", &byte) == 1)
      return std::string(1, static_cast<char>(byte));
    if (id == 0 && p == "<unk>") return " \xE2\x81\x87 ";  // what sentencepiece prints: " ⁇ "
    return p;
  }

  int special_id(const std::string& name) const override {
    if (name == "<s>") return bos_id;
    if (name == "</s>") return eos_id;
    return find_or(name, -1);
  }

 private:
  int find_or(const std::string& s, int fallback) const {
    auto it = lookup_.find(s);
    return it == lookup_.end() ? fallback : it->second;
  }

  std::vector<std::string> vocab_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> lookup_;
  int byte_ids_[256];
};

}  // namespace

std::unique_ptr<Tokenizer> load_llama2c_tokenizer(const std::string& path) {
  return std::make_unique<Llama2cTokenizer>(path);
}

}  // namespace runner
