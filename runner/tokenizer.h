// Tokenizers the runners read without Python: llama2.c's tokenizer.bin (sentencepiece-style
// BPE, for "sentencepiece" models) and tiktoken rank files (Llama 3).
#pragma once

#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace runner {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Ids for plain text (special-token strings in it are ordinary text), BOS first if asked.
  virtual std::vector<int> encode(const std::string& text, bool bos) const = 0;
  // The bytes one token stands for; control tokens give "".
  virtual std::string piece(int id) const = 0;
  // Id of a special token such as "<|eot_id|>" or "<s>", -1 if the vocabulary lacks it.
  virtual int special_id(const std::string& name) const = 0;

  int vocab_size = 0;
  int bos_id = -1;
  int eos_id = -1;
  std::set<int> stop_ids;  // EOS plus any end-of-turn token of this vocabulary
  // sentencepiece adds a dummy-prefix space when encoding and drops it after BOS when decoding.
  bool strips_leading_space = false;
};

// kind is the artifact's `tokenizer_kind` metadata: "sentencepiece" reads a llama2.c
// tokenizer.bin, "tiktoken" a base64 rank file. Throws RunnerError on a bad file.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path, const std::string& kind);

std::unique_ptr<Tokenizer> load_llama2c_tokenizer(const std::string& path);
std::unique_ptr<Tokenizer> load_tiktoken_tokenizer(const std::string& path);

}  // namespace runner
