// fp32, bf16 and fp16 weights: dot products of a few activation rows with each weight row.
// Included by float.cpp (conversions + FMLA) and float_bf16.cpp (+ FEAT_BF16, whose BFDOT sums
// 8 bf16 products per instruction). As on AVX-512, each thread reads its rows one after another:
// the weights are one sequential stream per thread.
#pragma once

#include <algorithm>

#include "vec.h"

namespace torchchat::cpu::neon {
namespace {

// out[m] = dot(w row, x row m) for M activation rows (ldx apart) by FMLA on fp32 lanes: 8
// values a step (two vectors), U steps unrolled with their own accumulators: 8 independent FMA
// chains (4-cycle latency, 2 pipes on Cortex-A76 / Neoverse N1; more registers would spill).
// K % 8 values go through a scalar tail.
template <typename T, int M>
struct FmaRow {
  static void dot(const T* x, int64_t ldx, const T* w, int64_t K, float* out) {
    constexpr int U = M == 1 ? 4 : M == 2 ? 2 : 1;
    float32x4_t acc[M][2 * U];
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 16
      for (int u = 0; u < 2 * U; ++u) acc[m][u] = vdupq_n_f32(0.0f);
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U)
#pragma GCC unroll 16
      for (int u = 0; u < U; ++u) {
        float32x4_t w0, w1, x0, x1;
        Load8<T>::at(w + k + 8 * u, w0, w1);
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) {
          Load8<T>::at(x + m * ldx + k + 8 * u, x0, x1);
          acc[m][2 * u] = vfmaq_f32(acc[m][2 * u], w0, x0);
          acc[m][2 * u + 1] = vfmaq_f32(acc[m][2 * u + 1], w1, x1);
        }
      }
    for (; k + 8 <= K; k += 8) {
      float32x4_t w0, w1, x0, x1;
      Load8<T>::at(w + k, w0, w1);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        Load8<T>::at(x + m * ldx + k, x0, x1);
        acc[m][0] = vfmaq_f32(acc[m][0], w0, x0);
        acc[m][1] = vfmaq_f32(acc[m][1], w1, x1);
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      float32x4_t t = acc[m][0];
#pragma GCC unroll 16
      for (int u = 1; u < 2 * U; ++u) t = vaddq_f32(t, acc[m][u]);
      float tail = 0.0f;
      for (int64_t j = k; j < K; ++j) tail += (float)w[j] * (float)x[m * ldx + j];
      out[m] = vaddvq_f32(t) + tail;
    }
  }
};

// Rows [n0, n1) of one matrix; up to 4 activation rows share each weight load, more go 4 at a
// time.
template <template <typename, int> class Row, typename T>
void float_rows(const T* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  const T* w = static_cast<const T*>(a.w);
  few_rows(x, M, K, a, n0, n1, [&](auto rows, const T* xm, int64_t n, float* out) {
    Row<T, decltype(rows)::value>::dot(xm, K, w + n * a.ld, K, out);
  });
}

}  // namespace
}  // namespace torchchat::cpu::neon
