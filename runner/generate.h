// What aoti_run and et_run share: flags, the generation loop, chat templates. Each runner only
// supplies a Model that runs its artifact; nothing here depends on libtorch or ExecuTorch, so
// the two runtimes (which both carry c10) never meet in one binary.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace runner {

// An exported torchchat program: forward(tokens [1, S], input_pos [S]) with the KV cache inside.
class Model {
 public:
  virtual ~Model() = default;
  // Feeds `tokens` at positions start_pos.. and returns the fp32 logits of the last one.
  virtual std::vector<float> forward(const std::vector<int64_t>& tokens, int64_t start_pos) = 0;
  // The string metadata torchchat stored in the artifact (model_args, max_seq_len, ...).
  virtual std::map<std::string, std::string> metadata() = 0;
};

using ModelLoader = std::function<std::unique_ptr<Model>(const std::string& path)>;

// The whole program: parses argv, loads model and tokenizer, generates or chats. Returns the
// exit code; every failure is reported on stderr as "error: ..." (see errors.h for codes).
int runner_main(int argc, char** argv, const std::string& artifact, const ModelLoader& load);

// Incremental UTF-8 clean-up matching Python's "replace" decoder, so the runner prints the
// same text as torchchat even when a token ends mid-character or bytes are invalid.
class Utf8Stream {
 public:
  std::string push(const std::string& bytes) { buf_ += bytes; return take(false); }
  std::string flush() { return take(true); }

 private:
  std::string take(bool final);
  std::string buf_;
};

}  // namespace runner
