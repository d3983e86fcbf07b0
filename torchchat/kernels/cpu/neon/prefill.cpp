// Prefill's many rows of int4 and int8 weights run as bf16 GEMMs (behind at::mm in ops.cpp) on
// tiles of the weights turned into bf16 just before; these are the conversions, bit-exact with
// the reference (fp32 arithmetic as it does, then bf16's round to nearest even).
#include <algorithm>

#include "vec.h"

namespace torchchat::cpu::neon {

// One block of an int4 matrix (rows n0..n0 + bs), transposed, as bf16: out[k * ldo + r] =
// (q - 8) * scale + zero of row n0 + r at k, rounded once to bf16 (the fp32 value is one fused
// multiply-add, as the reference compiles on AArch64: GCC contracts it). Transposed because
// torch's layout stores each k's 64 rows side by side: every k of a block becomes 64 contiguous
// outputs, 16 rows (one quarter) at a time with their scales in registers.
void int4_dequantize_block_t(const uint8_t* w, const bf16_t* sz, int64_t N, int64_t K,
                             int64_t group, int64_t n0, bf16_t* out, int64_t ldo) {
  const int64_t bs = std::min<int64_t>(64, N - n0);
  const uint8_t* blk = w + n0 * (K / 2);
  if (bs < 64)  // a short last block (only small layers have one): the reference's loops
    return scalar_kernels().int4_dequantize_block_t(w, sz, N, K, group, n0, out, ldo);
  const float32x4_t k136 = vdupq_n_f32(136.0f);
  for (int64_t g = 0; g < K / group; ++g)
    for (int qq = 0; qq < 4; ++qq) {  // rows 16qq..16qq+15: low nibbles of bytes 0-15, 16-31,
      float32x4_t s[4], z[4];         // then high nibbles of the same
#pragma GCC unroll 16
      for (int h = 0; h < 2; ++h) {
        const bf16_t* szh = sz + (g * N + n0 + 16 * qq + 8 * h) * 2;
        const uint16x8x2_t p = vld2q_u16((const uint16_t*)szh);
        s[2 * h] = bf16x4_to_f32(vget_low_u16(p.val[0]));
        s[2 * h + 1] = bf16x4_to_f32(vget_high_u16(p.val[0]));
        z[2 * h] = bf16x4_to_f32(vget_low_u16(p.val[1]));
        z[2 * h + 1] = bf16x4_to_f32(vget_high_u16(p.val[1]));
      }
      for (int64_t k = g * group; k < (g + 1) * group; ++k) {
        const uint8x16_t b = vld1q_u8(blk + k * 32 + (qq & 1) * 16);
        const uint8x16_t codes = qq < 2 ? vandq_u8(b, vdupq_n_u8(15)) : vshrq_n_u8(b, 4);
        float32x4_t c[4];
        codes_to_f32_128(codes, c);
        uint16_t* o = (uint16_t*)(out + k * ldo + 16 * qq);
#pragma GCC unroll 16
        for (int i = 0; i < 4; ++i)  // (128 + q) - 136 = q - 8 exactly
          vst1_u16(o + 4 * i, f32_to_bf16x4(vfmaq_f32(z[i], vsubq_f32(c[i], k136), s[i])));
      }
    }
}

// int8 codes are exact in bf16: a tile of them feeds the GEMM, the row scales apply after.
void int8_to_bf16(const int8_t* src, int64_t K, bf16_t* dst) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
#pragma GCC unroll 16
    for (int h = 0; h < 2; ++h) {
      float32x4_t f[2];
      int8x8_to_f32(src + k + 8 * h, f);
      vst1_u16((uint16_t*)(dst + k + 8 * h), f32_to_bf16x4(f[0]));
      vst1_u16((uint16_t*)(dst + k + 8 * h + 4), f32_to_bf16x4(f[1]));
    }
  }
  for (; k < K; ++k) dst[k] = bf16_t((float)src[k]);
}

}  // namespace torchchat::cpu::neon
