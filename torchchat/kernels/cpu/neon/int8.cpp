// int8 weights: int8 -> fp32 + FMLA on fp32 activations, per-row or per-group scales.
#include <algorithm>

#include "vec.h"

namespace torchchat::cpu::neon {
namespace {

// out[m] = sum_k w[k] s(k) x[m][k] for one int8 weight row w, s(k) its scale: scales[0] for the
// whole row (group 0, applied after the sum) or scales[k >> log2(group)] (group a power of two
// >= 16, applied to each 8 weights as they are converted, as the reference does). K is a
// multiple of 16; x is fp32, zero-padded to K by the caller. 8 weights (two vectors) a step, U
// steps unrolled: 8 accumulators, as float_rows.h.
template <int M, typename S>
void int8_row(const float* x, int64_t K, const int8_t* w, const S* scales, int64_t group,
              float* out) {
  constexpr int U = M == 1 ? 4 : M == 2 ? 2 : 1;
  const int shift = group ? __builtin_ctzll(group) : 0;
  float32x4_t acc[M][2 * U];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 16
    for (int u = 0; u < 2 * U; ++u) acc[m][u] = vdupq_n_f32(0.0f);
  // acc[m][2j], acc[m][2j + 1] += the 8 weights from k times x[m][k..k+8)
  auto step = [&](int64_t k, int j) {
    float32x4_t wv[2];
    int8x8_to_f32(w + k, wv);
    if (group) {
      const float s = (float)scales[k >> shift];
      wv[0] = vmulq_n_f32(wv[0], s);
      wv[1] = vmulq_n_f32(wv[1], s);
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      acc[m][2 * j] = vfmaq_f32(acc[m][2 * j], wv[0], vld1q_f32(x + m * K + k));
      acc[m][2 * j + 1] = vfmaq_f32(acc[m][2 * j + 1], wv[1], vld1q_f32(x + m * K + k + 4));
    }
  };
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U)
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) step(k + 8 * u, u);
  for (; k < K; k += 8) step(k, 0);  // K % 16 == 0
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    float32x4_t t = acc[m][0];
#pragma GCC unroll 16
    for (int u = 1; u < 2 * U; ++u) t = vaddq_f32(t, acc[m][u]);
    out[m] = vaddvq_f32(t) * (group ? 1.0f : (float)scales[0]);
  }
}

template <typename S>  // scales: fp32 or bf16, read as they are stored
void int8_rows(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a, int64_t n0,
               int64_t n1) {
  const int64_t G = group ? K / group : 1;
  const int8_t* w = static_cast<const int8_t*>(a.w);
  const S* scales = static_cast<const S*>(a.s);
  few_rows(x, M, K, a, n0, n1, [&](auto rows, const float* xm, int64_t n, float* out) {
    int8_row<decltype(rows)::value, S>(xm, K, w + n * a.ld, scales + n * G, group, out);
  });
}

}  // namespace

void linear_int8_f32s(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a,
                      int64_t n0, int64_t n1) {
  int8_rows<float>(x, M, K, group, a, n0, n1);
}

void linear_int8_bf16s(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a,
                       int64_t n0, int64_t n1) {
  int8_rows<bf16_t>(x, M, K, group, a, n0, n1);
}

}  // namespace torchchat::cpu::neon
