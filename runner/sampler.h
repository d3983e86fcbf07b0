#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace runner {

// Picks the next token from fp32 logits the way torchchat's SamplingOptions do:
// temperature 0 is greedy (argmax, first maximum wins like torch.argmax); otherwise the
// logits are scaled by 1/temperature, cut to the top_k largest (0 = no cut), then to the
// smallest set whose probability reaches top_p (1 = no cut), and one is drawn with a
// seeded generator. Random draws are reproducible for a seed but are not torch's stream.
class Sampler {
 public:
  Sampler(float temperature, int top_k, float top_p, uint64_t seed)
      : temperature_(temperature), top_k_(top_k), top_p_(top_p), rng_(seed) {}
  int sample(std::vector<float>& logits);

 private:
  float temperature_;
  int top_k_;
  float top_p_;
  std::mt19937_64 rng_;
};

}  // namespace runner
