// int8 decode in integers (kInt8Q8): int8 weight rows against activations quantized by
// quantize_rows_q8 (8-bit codes, an fp32 scale d per 32 values) with SDOT, as llama.cpp's
// Q8_0 x Q8_0: signed codes times signed codes, so every code (-128 too) is exact. Four blocks'
// sums become floats together and take their d (times the group's weight scale) in one FMLA.
#include "vec.h"

namespace torchchat::cpu::neon {
namespace {

// The weight scales of blocks b..b + 3 (lane i: block b + i's group), per = blocks a group (a
// power of two; b a multiple of 4, so 4 or more blocks a group is one scale).
template <typename S>
inline float32x4_t block_scales(const S* s, int64_t b, int64_t per) {
  if (per >= 4) return vdupq_n_f32((float)s[b / per]);
  float t[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) t[i] = (float)s[(b + i) / per];
  return vld1q_f32(t);
}

// The exact sums of blocks 0..3 of w against x, lane i block i.
inline int32x4_t sums4(const int8_t* w, const int8_t* x) {
  int32x4_t s[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const int32x4_t lo = vdotq_s32(vdupq_n_s32(0), vld1q_s8(w + 32 * i), vld1q_s8(x + 32 * i));
    s[i] = vdotq_s32(lo, vld1q_s8(w + 32 * i + 16), vld1q_s8(x + 32 * i + 16));
  }
  return vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
}

// One weight row w (nb blocks, its scales s: one, or one a group of `per` blocks) against one
// activation row (codes x, block scales d).
template <typename S>
float row_dot(const int8_t* w, const S* s, int64_t per, const int8_t* x, const float* d,
              int64_t nb) {
  float32x4_t acc[2] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8)
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) {
      const int64_t bj = b + 4 * j;
      float32x4_t scale = vld1q_f32(d + bj);
      if (per) scale = vmulq_f32(scale, block_scales(s, bj, per));
      acc[j] = vfmaq_f32(acc[j], vcvtq_f32_s32(sums4(w + 32 * bj, x + 32 * bj)), scale);
    }
  float t = vaddvq_f32(vaddq_f32(acc[0], acc[1]));
  for (; b < nb; ++b) {
    const int32x4_t lo = vdotq_s32(vdupq_n_s32(0), vld1q_s8(w + 32 * b), vld1q_s8(x + 32 * b));
    const int32_t sum =
        vaddvq_s32(vdotq_s32(lo, vld1q_s8(w + 32 * b + 16), vld1q_s8(x + 32 * b + 16)));
    t += (per ? d[b] * (float)s[b / per] : d[b]) * (float)sum;
  }
  return per ? t : t * (float)s[0];
}

}  // namespace

void linear_int8_q8(const int8_t* q, const float* d, int64_t M, int64_t K, int64_t group,
                    bool bf16_scales, const Matrix& a, int64_t n0, int64_t n1) {
  int8_q8_rows(q, d, M, K, group, bf16_scales, a, n0, n1, [](auto... v) { return row_dot(v...); });
}

}  // namespace torchchat::cpu::neon
