#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace runner {

int Sampler::sample(std::vector<float>& logits) {
  const int n = static_cast<int>(logits.size());
  if (temperature_ <= 0.0f) {
    return static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  for (float& x : logits) x /= temperature_;
  if (top_k_ > 0 && top_k_ < n) {
    std::vector<float> sorted(logits);
    std::nth_element(sorted.begin(), sorted.begin() + (top_k_ - 1), sorted.end(), std::greater<float>());
    const float kth = sorted[top_k_ - 1];
    for (float& x : logits)
      if (x < kth) x = -INFINITY;
  }
  // Softmax in double: the subtraction of the max keeps exp() finite.
  const float mx = *std::max_element(logits.begin(), logits.end());
  std::vector<double> probs(n);
  double sum = 0.0;
  for (int i = 0; i < n; ++i) sum += probs[i] = std::exp(static_cast<double>(logits[i] - mx));
  for (double& p : probs) p /= sum;
  if (top_p_ > 0.0f && top_p_ < 1.0f) {
    // Keep the most probable tokens until their mass reaches top_p (the one crossing it too).
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return probs[a] > probs[b]; });
    double mass = 0.0;
    size_t keep = 0;
    while (keep < order.size() && mass < top_p_) mass += probs[order[keep++]];
    for (size_t i = keep; i < order.size(); ++i) probs[order[i]] = 0.0;
    for (double& p : probs) p /= mass;
  }
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  double r = uniform(rng_), cdf = 0.0;
  int last = 0;
  for (int i = 0; i < n; ++i) {
    if (probs[i] <= 0.0) continue;
    last = i;
    cdf += probs[i];
    if (r < cdf) return i;
  }
  return last;  // rounding left r just above the total
}

}  // namespace runner
