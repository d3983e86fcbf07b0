// et_run: runs a torchchat ExecuTorch program (.pte) with the runtime, XNNPACK delegate and
// kernels shipped inside the executorch wheel.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>

#include <cstdio>

#include <filesystem>

#include "errors.h"
#include "generate.h"

using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

std::string error_name(Error e) {
  return executorch::runtime::to_string(e);  // "Error::InvalidProgram", ...
}

// ExecuTorch's default log prints Info lines (CPU probing, ...) on every start; keep only
// errors, so stderr carries the runner's own messages and the real failures.
void quiet_log(et_timestamp_t, et_pal_log_level_t level, const char* filename, const char*,
               size_t line, const char* message, size_t) {
  if (level == kError || level == kFatal)
    std::fprintf(stderr, "executorch %s:%zu: %s\n", filename, line, message);
}

class ETModel : public runner::Model {
 public:
  explicit ETModel(const std::string& path) : path_(path) {
    if (!std::filesystem::is_regular_file(path))
      throw runner::RunnerError("ExecuTorch program not found: " + path);
    // Mmap: the weights are paged in from the file instead of copied onto the heap.
    module_ = std::make_unique<Module>(path, Module::LoadMode::Mmap);
    Error err = module_->load();
    if (err != Error::Ok)
      throw runner::RunnerError("cannot load ExecuTorch program " + path + " (" + error_name(err) +
                                "; is it a .pte file?)");
    err = module_->load_method("forward");
    if (err != Error::Ok)
      throw runner::RunnerError("cannot load the forward method of " + path + " (" +
                                error_name(err) + ")");
  }

  std::vector<float> forward(const std::vector<int64_t>& tokens, int64_t start_pos) override {
    const auto n = static_cast<executorch::aten::SizesType>(tokens.size());
    std::vector<int64_t> ids(tokens), pos(tokens.size());
    for (size_t i = 0; i < pos.size(); ++i) pos[i] = start_pos + static_cast<int64_t>(i);
    // The program was exported with a dynamic sequence length: shape the inputs to this call.
    auto ids_t = executorch::extension::make_tensor_ptr({1, n}, std::move(ids));
    auto pos_t = executorch::extension::make_tensor_ptr({n}, std::move(pos));
    auto out = module_->forward({EValue(ids_t), EValue(pos_t)});
    if (!out.ok())
      throw runner::RunnerError("forward failed (" + error_name(out.error()) + ")");
    if (out->empty() || !(*out)[0].isTensor())
      throw runner::RunnerError("the program's forward did not return logits");
    const auto& logits = (*out)[0].toTensor();
    if (logits.dim() != 3 || logits.scalar_type() != executorch::aten::ScalarType::Float)
      throw runner::RunnerError("the program's forward did not return fp32 logits [1, S, vocab]");
    const int64_t vocab = logits.size(2);
    const float* last = logits.const_data_ptr<float>() + (logits.size(1) - 1) * vocab;
    return std::vector<float>(last, last + vocab);
  }

  // torchchat stores its metadata as constant methods returning strings.
  std::map<std::string, std::string> metadata() override {
    std::map<std::string, std::string> meta;
    auto names = module_->method_names();
    if (!names.ok()) return meta;
    for (const std::string& name : *names) {
      if (name == "forward") continue;
      auto r = module_->execute(name);
      if (r.ok() && !r->empty() && (*r)[0].isString()) meta[name] = std::string((*r)[0].toString());
    }
    return meta;
  }

 private:
  std::string path_;
  std::unique_ptr<Module> module_;
};

}  // namespace

int main(int argc, char** argv) {
  executorch::runtime::register_pal(executorch::runtime::PalImpl::create(quiet_log, __FILE__));
  return runner::runner_main(argc, argv, ".pte", [](const std::string& path) {
    return std::make_unique<ETModel>(path);
  });
}
