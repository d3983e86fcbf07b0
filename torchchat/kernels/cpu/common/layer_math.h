// The model's per-row arithmetic outside the linears, as the eager modules compute it in fp32
// and round it to the activation dtype T: RMSNorm and RoPE. Shared by the fused decode step and
// the prefill ops that replace the modules' chains of aten ops (ops.cpp). Header-only with
// internal linkage, plain C++ (no SIMD flags).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace torchchat::cpu {
namespace {

// Activations rounded to T and kept as float, as the eager modules hand them on.
template <typename T>
inline float round_to(float v) {
  return (float)T(v);
}

// out = RMSNorm(x) * w as the eager module: fp32 mean of squares (8 running sums, as the
// compiler can keep them in vector lanes: one sum's chain of adds took 3x as long on 64 rows of
// 768), normalized value rounded to T, times the weight, rounded to T.
template <typename T>
void rms_norm_row(const float* x, const T* w, int64_t D, float eps, float* out) {
  float part[8] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) part[j] += x[d + j] * x[d + j];
  for (; d < D; ++d) part[d % 8] += x[d] * x[d];
  const float ss = ((part[0] + part[4]) + (part[1] + part[5])) +
                   ((part[2] + part[6]) + (part[3] + part[7]));
  const float r = 1.0f / std::sqrt(ss / (float)D + eps);
  for (d = 0; d < D; ++d) out[d] = round_to<T>(round_to<T>(x[d] * r) * (float)w[d]);
}

// Rotates the interleaved pairs of n heads of D values by one position's (cos, sin) table.
template <typename T>
void rope_row(float* x, int64_t heads, int64_t D, const float* f) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < D / 2; ++i) {
      float* p = x + h * D + 2 * i;
      const float a = p[0], b = p[1], c = f[2 * i], s = f[2 * i + 1];
      p[0] = round_to<T>(a * c - b * s);
      p[1] = round_to<T>(b * c + a * s);
    }
}

}  // namespace
}  // namespace torchchat::cpu
