// aoti_run: runs a torchchat AOT Inductor package (.pt2) with the libtorch of the torch wheel.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <filesystem>

#include "errors.h"
#include "generate.h"

namespace {

class AOTIModel : public runner::Model {
 public:
  explicit AOTIModel(const std::string& path) {
    // The loader unzips the package and dlopens its .so; check the file first so a typo
    // gets a plain message rather than a zip-library one.
    if (!std::filesystem::is_regular_file(path))
      throw runner::RunnerError("AOTI package not found: " + path);
    try {
      loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
    } catch (const std::exception& e) {
      std::string msg = e.what();
      throw runner::RunnerError("cannot load AOTI package " + path + ": " +
                                msg.substr(0, msg.find('\n')).substr(0, 200));
    }
  }

  std::vector<float> forward(const std::vector<int64_t>& tokens, int64_t start_pos) override {
    c10::InferenceMode guard;
    const int64_t n = static_cast<int64_t>(tokens.size());
    at::Tensor ids = at::empty({1, n}, at::kLong);
    std::copy(tokens.begin(), tokens.end(), ids.data_ptr<int64_t>());
    at::Tensor pos = at::arange(start_pos, start_pos + n, at::kLong);
    std::vector<at::Tensor> out = loader_->run({ids, pos});
    if (out.empty() || out[0].dim() != 3)
      throw runner::RunnerError("the package's forward did not return logits [1, S, vocab]");
    at::Tensor last = out[0][0][n - 1].to(at::kFloat).contiguous();
    const float* p = last.data_ptr<float>();
    return std::vector<float>(p, p + last.numel());
  }

  std::map<std::string, std::string> metadata() override {
    auto m = loader_->get_metadata();
    return {m.begin(), m.end()};
  }

 private:
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

}  // namespace

int main(int argc, char** argv) {
  return runner::runner_main(argc, argv, ".pt2", [](const std::string& path) {
    return std::make_unique<AOTIModel>(path);
  });
}
