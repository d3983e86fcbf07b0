// Helpers of the AVX2 kernels (with FMA and F16C): horizontal sums, bf16 <-> fp32, loads of 8
// fp32/fp16/bf16 values as fp32. Everything here has internal linkage, and the kernels use no
// library templates that could be emitted out of line (std::vector) nor kernels.h's inline
// bf16_t/fp16_t conversions (scalar_bf16, scalar_to_bf16 and to_bf16_bits stand in): the linker
// could keep a copy compiled with this folder's flags for the portable code, which must run on
// any x86-64.
#pragma once

#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "../common/rows.h"

namespace torchchat::cpu::avx2 {
namespace {

constexpr int64_t kPrefetch = 2048;  // bytes ahead in the weight stream

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// Lanes [0, n) all ones (maskload/blend masks); n < 0 is none, n > 8 all.
inline __m256i lanes(int64_t n) {
  const int c = (int)(n < 0 ? 0 : n > 8 ? 8 : n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float scalar_bf16(bf16_t b) {  // bf16 -> fp32: the bits in the high half
  const uint32_t u = (uint32_t)b.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16_t scalar_to_bf16(float f) {  // as bf16_t's constructor
  uint32_t u;
  std::memcpy(&u, &f, 4);
  bf16_t b;
  b.bits = f != f ? 0x7FC0 : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  return b;
}

// 8 bf16 (as 16-bit lanes) -> fp32.
inline __m256 bf16x8_to_f32(__m128i v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// fp32 -> bf16 bits in the low half of each 32-bit lane, rounded to nearest even exactly as
// bf16_t's constructor: (u + 0x7FFF + ((u >> 16) & 1)) >> 16, NaN -> 0x7FC0.
inline __m256i to_bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

// 16 fp32 (a, then b) -> 16 bf16 stored at dst.
inline void store_bf16x16(bf16_t* dst, __m256 a, __m256 b) {
  // packus interleaves 128-bit halves (a0-3 b0-3 a4-7 b4-7); the permute puts them in order
  const __m256i p = _mm256_packus_epi32(to_bf16_bits(a), to_bf16_bits(b));
  _mm256_storeu_si256((__m256i*)dst, _mm256_permute4x64_epi64(p, 0xD8));
}

// Folds of two vectors within 128-bit halves, by 32-bit units ([a0+a2 a1+a3 b0+b2 b1+b3] a half,
// so 16-bit lanes of a, a, b, b, a, a, b, b) or 64-bit ones ([a0+a1 b0+b1]), the sums 16- or
// 32-bit. (Horizontal adds fold the same way at several times the cost on Zen 4.)
inline __m256i fold32(__m256i a, __m256i b, bool wide) {
  return wide ? _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b))
              : _mm256_add_epi16(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
}
inline __m256i fold64(__m256i a, __m256i b, bool wide) {
  return wide ? _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b))
              : _mm256_add_epi16(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
}

// The exact sums of 8 blocks of 32 signed 8-bit codes, w[i] against the codes at x + i * stride,
// lane l block l: the sign trick (|w| times x with w's sign; |w| <= 128 and |x| <= 127: no pair
// saturates in 16 bits), each block widened to 32 bits, folded, the halves added at the end.
inline __m256i signed_sums8(const __m256i* w, const int8_t* x, int64_t stride) {
  __m256i p[8], f[4];
  for (int i = 0; i < 8; ++i) {
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + i * stride));
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w[i]), _mm256_sign_epi8(xv, w[i]));
    p[i] = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
  }
  for (int i = 0; i < 4; ++i) f[i] = fold32(p[2 * i], p[2 * i + 1], true);  // [2i 2i+1 ..]
  const __m256i lo = fold64(f[0], f[1], true), hi = fold64(f[2], f[3], true);  // [0 1 2 3]
  return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20),
                          _mm256_permute2x128_si256(lo, hi, 0x31));
}

// The fp16 number stored at p (any alignment) as fp32, exactly (F16C; kernels.h's fp16_t is
// kept out of this folder, see above).
inline float half_at(const void* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// 8 weights or activations as fp32: at(p) reads 8, part(p, n) reads n < 8 and zeros the rest
// (the 16-bit types through a zeroed copy: AVX2 has no 16-bit masked load).
template <typename T>
struct Load;

template <>
struct Load<float> {
  static __m256 at(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 part(const float* p, int64_t n) { return _mm256_maskload_ps(p, lanes(n)); }
};

template <>
struct Load<fp16_t> {
  static __m256 at(const fp16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static __m256 part(const fp16_t* p, int64_t n) {
    alignas(16) uint16_t b[8] = {};
    std::memcpy(b, p, n * 2);
    return _mm256_cvtph_ps(_mm_load_si128((const __m128i*)b));
  }
};

template <>
struct Load<bf16_t> {
  static __m256 at(const bf16_t* p) { return bf16x8_to_f32(_mm_loadu_si128((const __m128i*)p)); }
  static __m256 part(const bf16_t* p, int64_t n) {
    alignas(16) uint16_t b[8] = {};
    std::memcpy(b, p, n * 2);
    return bf16x8_to_f32(_mm_load_si128((const __m128i*)b));
  }
};

}  // namespace

// The kernels of this folder (the table in table.cpp).
void linear_f32(const float* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1);
void linear_bf16(const bf16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1);
void linear_f16(const fp16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1);
void linear_int8_f32s(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a,
                      int64_t n0, int64_t n1);
void linear_int8_bf16s(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a,
                       int64_t n0, int64_t n1);
void linear_int4(const bf16_t* x, const float* xsum, int64_t M, int64_t K, int64_t group,
                 const Matrix& a, int64_t b0, int64_t b1);
void attend_f32(const float* q, const float* k, const float* v, CacheRows rows, const bool* m,
                int64_t lo, int64_t hi, int64_t D, float scale, float* out, float* p);
void attend_bf16(const bf16_t* q, const bf16_t* k, const bf16_t* v, CacheRows rows, const bool* m,
                 int64_t lo, int64_t hi, int64_t D, float scale, bf16_t* out, float* p);
void attend_f16(const fp16_t* q, const fp16_t* k, const fp16_t* v, CacheRows rows, const bool* m,
                int64_t lo, int64_t hi, int64_t D, float scale, fp16_t* out, float* p);
void silu(const float* x, int64_t n, float* out);
void int4_dequantize_block_t(const uint8_t* w, const bf16_t* sz, int64_t N, int64_t K,
                             int64_t group, int64_t n0, bf16_t* out, int64_t ldo);
void int8_to_bf16(const int8_t* src, int64_t K, bf16_t* dst);
void quantize_rows_8da4w(const float* x, int64_t Kx, int64_t K, uint8_t* u, float* sa, float* za,
                         int64_t m0, int64_t m1);
void gemm_8da4w(const uint8_t* u, int64_t M, int64_t K, const float* sa, const float* za,
                const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                int64_t b0, int64_t b1, const Buffers8da4w& buf);
void quantize_rows_q8(const float* x, int64_t Kx, int64_t K, int8_t* q, float* d, float* e,
                      int64_t m0, int64_t m1);
void gemm_int4_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                  int64_t b0, int64_t b1, const Buffers8da4w& buf);
void linear_int4_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                    int64_t group, const Matrix& a, int64_t b0, int64_t b1);
void linear_8da4w(const uint8_t* u, const float* sa, const float* za, int64_t M, int64_t K,
                  int64_t group, const Matrix& a, int64_t b0, int64_t b1);
void linear_int8_q8(const int8_t* q, const float* d, int64_t M, int64_t K, int64_t group,
                    bool bf16_scales, const Matrix& a, int64_t n0, int64_t n1);
void gemm_ggml_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const Matrix& a, int64_t b0, int64_t b1, const Buffers8da4w& buf);
// GGUF blocks (ggml.cpp: blocks of 32 and the table's entries; ggml_k.cpp: the K-quants).
void linear_ggml(const void* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a, int64_t n0,
                 int64_t n1);
void ggml_dequantize(int32_t type, const void* w, int64_t ld, int64_t K, int64_t r0, int64_t r1,
                     float* out);
void linear_ggml_k(const uint8_t* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a,
                   int64_t n0, int64_t n1);
void gemm_f32(const float* xp, int64_t M, int64_t K, const float* w, int64_t ldw, int64_t N,
              float* y, int64_t ldy);
void dequantize_ggml_k(int32_t type, const uint8_t* w, int64_t ld, int64_t K, int64_t r0,
                       int64_t r1, float* out);
// Prefill's integer GEMM on Q5_K and Q6_K (ggml_k.cpp).
void gemm_ggml_k(const GgmlGemmActs& x, int64_t K, const Matrix& a, int64_t n0, int64_t n1);

}  // namespace torchchat::cpu::avx2
