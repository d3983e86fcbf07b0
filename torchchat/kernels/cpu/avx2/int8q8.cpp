// int8 decode in integers (kInt8Q8): int8 weight rows against activations quantized by
// quantize_rows_q8 (8-bit codes and an fp32 scale d per 32 values), as llama.cpp's Q8_0 x Q8_0.
// A block's sum of code products is exact (signed_sums8: |w| times x with w's sign, so a -128
// code is exact too); 8 blocks' sums become floats together and take their d (times the group's
// weight scale) in one FMA. Against widening every weight to fp32 (int8.cpp: 3 operations per 8
// weights) this takes ~9 per 32.
#include "vec.h"

namespace torchchat::cpu::avx2 {
namespace {

inline float scale_of(float s) { return s; }
inline float scale_of(bf16_t s) { return scalar_bf16(s); }

// The weight scales of blocks b..b + 7 (lane l: block b + l's group), per = blocks a group (a
// power of two; b a multiple of 8, so 8 or more blocks a group is one scale).
template <typename S>
inline __m256 block_scales(const S* s, int64_t b, int64_t per) {
  if (per >= 8) return _mm256_set1_ps(scale_of(s[b / per]));
  if (per == 1) {
    if constexpr (std::is_same_v<S, float>)
      return _mm256_loadu_ps(s + b);
    else
      return bf16x8_to_f32(_mm_loadu_si128((const __m128i*)(s + b)));
  }
  alignas(32) float t[8];
  for (int l = 0; l < 8; ++l) t[l] = scale_of(s[(b + l) / per]);
  return _mm256_load_ps(t);
}

// The exact sum of one block's code products (the last nb % 8 blocks).
inline int32_t block_sum(const int8_t* w, const int8_t* x) {
  const __m256i wv = _mm256_loadu_si256((const __m256i*)w);
  const __m256i xv = _mm256_loadu_si256((const __m256i*)x);
  const __m256i p = _mm256_madd_epi16(
      _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)), _mm256_set1_epi16(1));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}

// One weight row w (nb blocks, its scales s: one, or one a group of `per` blocks) against one
// activation row (codes x, block scales d).
template <typename S>
float row_dot(const int8_t* w, const S* s, int64_t per, const int8_t* x, const float* d,
              int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    const int8_t* wb = w + 32 * b;
    __m256i c[8];
    for (int i = 0; i < 8; ++i) {
      if (i % 2 == 0) _mm_prefetch((const char*)(wb + 32 * i) + kPrefetch, _MM_HINT_T0);
      c[i] = _mm256_loadu_si256((const __m256i*)(wb + 32 * i));
    }
    const __m256i sums = signed_sums8(c, x + 32 * b, 32);
    __m256 scale = _mm256_loadu_ps(d + b);
    if (per) scale = _mm256_mul_ps(scale, block_scales(s, b, per));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
  }
  float t = hsum(acc);
  for (; b < nb; ++b) {
    const float scale = per ? d[b] * scale_of(s[b / per]) : d[b];
    t += scale * (float)block_sum(w + 32 * b, x + 32 * b);
  }
  return per ? t : t * scale_of(s[0]);
}

}  // namespace

void linear_int8_q8(const int8_t* q, const float* d, int64_t M, int64_t K, int64_t group,
                    bool bf16_scales, const Matrix& a, int64_t n0, int64_t n1) {
  int8_q8_rows(q, d, M, K, group, bf16_scales, a, n0, n1, [](auto... v) { return row_dot(v...); });
}

}  // namespace torchchat::cpu::avx2
