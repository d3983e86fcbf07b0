// Helpers of the AVX-512 kernels: masks, loads of 16 fp32/fp16/bf16 values as fp32. Everything
// here has internal linkage: files of this folder are compiled with different sub-feature flags
// (AVX512-BF16, -VNNI), and one instantiation must never stand in for another's. For the same
// reason the kernels use no library templates that could be emitted out of line (std::vector):
// the linker could keep an AVX-512 copy for the portable code.
#pragma once

#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "../common/rows.h"

namespace torchchat::cpu::avx512 {
namespace {

constexpr int64_t kPrefetch = 2048;  // bytes ahead in the weight stream (int4: 2048 > 1024 > 512)

inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}

// bf16 bits (16 lanes) -> fp32.
inline __m512 bf16x16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// 16 weights or activations as fp32.
template <typename T>
struct Load;

template <>
struct Load<float> {
  static __m512 at(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};

template <>
struct Load<fp16_t> {
  static __m512 at(const fp16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
  }
  static __m512 masked(const fp16_t* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
};

template <>
struct Load<bf16_t> {
  static __m512 at(const bf16_t* p) {
    return bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)p));
  }
  static __m512 masked(const bf16_t* p, __mmask16 m) {
    return bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, p));
  }
};

// The fp16 number stored at p (any alignment) as fp32, exactly.
inline float half_at(const void* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

}  // namespace

// The kernels of this folder (the table in table.cpp). Base AVX-512 (F, BW, VL, DQ):
void linear_f32(const float* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1);
void linear_bf16(const bf16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1);
void linear_f16(const fp16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1);
void linear_int8_f32s(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a,
                      int64_t n0, int64_t n1);
void linear_int8_bf16s(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a,
                       int64_t n0, int64_t n1);
void attend_f32(const float* q, const float* k, const float* v, CacheRows rows, const bool* m,
                int64_t lo, int64_t hi, int64_t D, float scale, float* out, float* p);
void attend_bf16(const bf16_t* q, const bf16_t* k, const bf16_t* v, CacheRows rows, const bool* m,
                 int64_t lo, int64_t hi, int64_t D, float scale, bf16_t* out, float* p);
void attend_f16(const fp16_t* q, const fp16_t* k, const fp16_t* v, CacheRows rows, const bool* m,
                int64_t lo, int64_t hi, int64_t D, float scale, fp16_t* out, float* p);
void silu(const float* x, int64_t n, float* out);
// AVX512-BF16 (files *_bf16.cpp):
void linear_bf16_dp(const bf16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0,
                    int64_t n1);
void linear_int4(const bf16_t* x, const float* xsum, int64_t M, int64_t K, int64_t group,
                 const Matrix& a, int64_t b0, int64_t b1);
void int4_dequantize_block_t(const uint8_t* w, const bf16_t* sz, int64_t N, int64_t K,
                             int64_t group, int64_t n0, bf16_t* out, int64_t ldo);
void int8_to_bf16(const int8_t* src, int64_t K, bf16_t* dst);
// AVX512-VNNI and AVX512-VBMI (files *_vnni.cpp):
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
void gemm_ggml_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const Matrix& a, int64_t b0, int64_t b1, const Buffers8da4w& buf);
void gemm_int8_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  int64_t group, bool bf16_scales, const Matrix& a, int64_t b0, int64_t b1,
                  const Buffers8da4w& buf);
// GGUF blocks (ggml_vnni.cpp: Q4_0; ggml_k_vnni.cpp: Q4_K, Q5_K, Q6_K): linear_ggml for
// the types these files run; false, and nothing written, for the others.
bool linear_ggml_vnni(const void* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a,
                      int64_t n0, int64_t n1);
bool linear_ggml_k_vnni(const uint8_t* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a,
                        int64_t n0, int64_t n1);
// Prefill's integer GEMM on Q4_K, Q5_K, Q6_K (ggml_gemm_vnni.cpp).
void gemm_ggml_k_vnni(const GgmlGemmActs& x, int64_t K, const Matrix& a, int64_t n0,
                      int64_t n1);

}  // namespace torchchat::cpu::avx512
