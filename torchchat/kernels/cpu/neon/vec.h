// Helpers of the NEON kernels (AArch64 Advanced SIMD, built for armv8.2-a + fp16 + dotprod):
// loads of 8 fp32/fp16/bf16 values as two fp32 vectors, bf16 rounding, the int4 "magic number"
// conversion. Everything here has internal linkage: files of this folder are compiled with
// different sub-feature flags (+i8mm, +bf16), and one instantiation must never stand in for
// another's (the linker keeps one copy of an inline function with external linkage, perhaps the
// one compiled with +i8mm, and would run it on a CPU without). For the same reason the kernels
// use no library templates that could be emitted out of line (std::vector).
//
// Loops over a fixed number of vectors (accumulators, rows of a tile) carry #pragma GCC unroll:
// GCC -O2 otherwise keeps such arrays in memory, a load and a store around every FMLA.
#pragma once

#include <arm_neon.h>

#include <cstring>

#include "../common/rows.h"

namespace torchchat::cpu::neon {
namespace {

// The fp16 number at p as fp32 (FCVTL, exact).
inline float half_at(const void* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

// 8 weights or activations as fp32 (two vectors of 4). fp16 by FCVTL (exact), bf16 by a shift
// into the high half of each fp32 lane (exact).
template <typename T>
struct Load8;

template <>
struct Load8<float> {
  static void at(const float* p, float32x4_t& a, float32x4_t& b) {
    a = vld1q_f32(p);
    b = vld1q_f32(p + 4);
  }
};

template <>
struct Load8<fp16_t> {
  static void at(const fp16_t* p, float32x4_t& a, float32x4_t& b) {
    const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16((const uint16_t*)p));
    a = vcvt_f32_f16(vget_low_f16(h));
    b = vcvt_high_f32_f16(h);
  }
};

template <>
struct Load8<bf16_t> {
  static void at(const bf16_t* p, float32x4_t& a, float32x4_t& b) {
    const uint16x8_t h = vld1q_u16((const uint16_t*)p);
    a = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16));
    b = vreinterpretq_f32_u32(vshll_high_n_u16(h, 16));
  }
};

// 4 bf16 bits -> fp32.
inline float32x4_t bf16x4_to_f32(uint16x4_t v) { return vreinterpretq_f32_u32(vshll_n_u16(v, 16)); }

// fp32 -> bf16 bits, rounded to nearest even as bf16_t's constructor: (u + 0x7FFF + lsb) >> 16
// is one ADDHN (add, keep the high halves), NaN -> 0x7FC0.
inline uint16x4_t f32_to_bf16x4(float32x4_t f) {
  const uint32x4_t u = vreinterpretq_u32_f32(f);
  const uint32x4_t bias = vaddq_u32(vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1)),
                                    vdupq_n_u32(0x7FFF));
  const uint16x4_t r = vaddhn_u32(u, bias);
  const uint16x4_t is_num = vmovn_u32(vceqq_f32(f, f));  // all ones unless NaN
  return vbsl_u16(is_num, r, vdup_n_u16(0x7FC0));
}

// 8 int8 values -> 2 fp32 vectors, exactly: sign-extend to int16, convert to fp16 (FEAT_FP16's
// SCVTF on halves; |w| <= 128 needs 8 of its 11 significand bits), widen to fp32 with FCVTL:
// 4 instructions instead of 5 through int32.
inline void int8x8_to_f32(const int8_t* p, float32x4_t out[2]) {
  const float16x8_t h = vcvtq_f16_s16(vmovl_s8(vld1_s8(p)));
  out[0] = vcvt_f32_f16(vget_low_f16(h));
  out[1] = vcvt_high_f32_f16(h);
}

// 16 int4 codes (bytes 0..15) -> 4 fp32 vectors holding 128 + code, exactly, in byte order.
// fp32 128 is 0x43000000 and its mantissa's top bits 16..22 count in units of 1: a code in bits
// 16..19 makes the number 128 + code. Zipping the codes with 0x43 bytes gives the 16-bit halves
// 0x43qq, and SHLL #16 moves each into the high half of a 32-bit lane: 6 instructions for 16
// values instead of 10 for widening to int32 and converting.
inline void codes_to_f32_128(uint8x16_t codes, float32x4_t out[4]) {
  const uint8x16_t c43 = vdupq_n_u8(0x43);
  const uint16x8_t lo = vreinterpretq_u16_u8(vzip1q_u8(codes, c43));
  const uint16x8_t hi = vreinterpretq_u16_u8(vzip2q_u8(codes, c43));
  out[0] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(lo), 16));
  out[1] = vreinterpretq_f32_u32(vshll_high_n_u16(lo, 16));
  out[2] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(hi), 16));
  out[3] = vreinterpretq_f32_u32(vshll_high_n_u16(hi, 16));
}

}  // namespace

// The kernels of this folder (the table in table.cpp). Base (armv8.2-a + fp16 + dotprod):
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
// GGUF blocks (ggml.cpp): every type.
void linear_ggml(const void* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a, int64_t n0,
                 int64_t n1);
void ggml_dequantize(int32_t type, const void* w, int64_t ld, int64_t K, int64_t r0, int64_t r1,
                     float* out);
void quantize_rows_8da4w(const float* x, int64_t Kx, int64_t K, uint8_t* u, float* sa, float* za,
                         int64_t m0, int64_t m1);
void gemm_8da4w(const uint8_t* u, int64_t M, int64_t K, const float* sa, const float* za,
                const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                int64_t b0, int64_t b1, const Buffers8da4w& buf);
void quantize_rows_q8(const float* x, int64_t Kx, int64_t K, int8_t* q, float* d, float* e,
                      int64_t m0, int64_t m1);
void linear_int8_q8(const int8_t* q, const float* d, int64_t M, int64_t K, int64_t group,
                    bool bf16_scales, const Matrix& a, int64_t n0, int64_t n1);
void gemm_ggml_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const Matrix& a, int64_t b0, int64_t b1, const Buffers8da4w& buf);
void gemm_int4_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                  int64_t b0, int64_t b1, const Buffers8da4w& buf);
// FEAT_BF16 (files *_bf16.cpp): BFDOT.
void linear_bf16_dp(const bf16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0,
                    int64_t n1);
void linear_int4_dp(const bf16_t* x, const float* xsum, int64_t M, int64_t K, int64_t group,
                    const Matrix& a, int64_t b0, int64_t b1);
// FEAT_I8MM (files *_i8mm.cpp): USMMLA.
void gemm_8da4w_mmla(const uint8_t* u, int64_t M, int64_t K, const float* sa, const float* za,
                     const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                     int64_t b0, int64_t b1, const Buffers8da4w& buf);

}  // namespace torchchat::cpu::neon
