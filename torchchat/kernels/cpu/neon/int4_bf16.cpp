// int4 weights with FEAT_BF16: codes become bf16 128 + q (0x4300 | q: one zip with 0x43 bytes)
// in (k, k+1) pairs per row, the operand layout of BFDOT, which sums both products of a pair
// into a row's fp32 lane against a pair of activations chosen by element: 8 products per
// instruction against FMLA's 4, with 6 permutes per 32 codes against 12. int4.h has the
// layout, the driver and the fold; float_bf16.cpp says how BFDOT rounds.
#include "int4.h"

namespace torchchat::cpu::neon {
namespace {

struct BfdotBlock {
  // acc[v] += (128 + q_k) x_k + (128 + q_k+1) x_k+1 for rows 32H + 4v..+3 (bytes a: k, a + 32:
  // k + 1), (x_k, x_k+1) pair J of xv.
  template <int H, int J>
  static void step(const uint8_t* a, bfloat16x8_t xv, float32x4_t acc[8]) {
    const uint8x16_t c43 = vdupq_n_u8(0x43);
#pragma GCC unroll 16
    for (int q = 0; q < 2; ++q) {  // rows 32H + 16q..+15
      const uint8x16_t bk = vld1q_u8(a + 16 * q), bk1 = vld1q_u8(a + 32 + 16 * q);
      const uint8x16_t ck = H ? vshrq_n_u8(bk, 4) : vandq_u8(bk, vdupq_n_u8(15));
      const uint8x16_t ck1 = H ? vshrq_n_u8(bk1, 4) : vandq_u8(bk1, vdupq_n_u8(15));
      // bytes (q_k, q_k+1) of rows 0-7, 8-15; then each code with 0x43 above it: bf16 pairs
      const uint8x16_t z[2] = {vzip1q_u8(ck, ck1), vzip2q_u8(ck, ck1)};
#pragma GCC unroll 16
      for (int e = 0; e < 2; ++e) {
        const bfloat16x8_t w0 = vreinterpretq_bf16_u8(vzip1q_u8(z[e], c43));  // 4 rows
        const bfloat16x8_t w1 = vreinterpretq_bf16_u8(vzip2q_u8(z[e], c43));  // the next 4
        acc[4 * q + 2 * e] = vbfdotq_laneq_f32(acc[4 * q + 2 * e], w0, xv, J);
        acc[4 * q + 2 * e + 1] = vbfdotq_laneq_f32(acc[4 * q + 2 * e + 1], w1, xv, J);
      }
    }
  }
  template <int H>
  static void sums(const uint8_t* blk, const bf16_t* xb, int64_t k0, int64_t k1,
                   float32x4_t acc[8]) {
    for (int64_t k = k0; k < k1; k += 8) {  // groups are multiples of 32
      const uint8_t* a = blk + k * 32;
#pragma GCC unroll 16
      for (int line = 0; line < 4; ++line) __builtin_prefetch(a + 1024 + 64 * line);  // 256 B
      const bfloat16x8_t xv = vreinterpretq_bf16_u16(vld1q_u16((const uint16_t*)(xb + k)));
      step<H, 0>(a, xv, acc);
      step<H, 1>(a + 64, xv, acc);
      step<H, 2>(a + 128, xv, acc);
      step<H, 3>(a + 192, xv, acc);
    }
  }
};

}  // namespace

void linear_int4_dp(const bf16_t* x, const float* xsum, int64_t M, int64_t K, int64_t group,
                    const Matrix& a, int64_t b0, int64_t b1) {
  int4_linear<BfdotBlock>(x, xsum, M, K, group, a, b0, b1);
}

}  // namespace torchchat::cpu::neon
