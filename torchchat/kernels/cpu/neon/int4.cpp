// int4 weights, base NEON: each k's codes become 128 + q in fp32 lanes (vec.h's magic number:
// two zips and a widening shift per 16 codes) and meet the activation by FMLA by element, 4 k
// per vector of activations. int4.h has the layout, the driver and the fold.
#include "int4.h"

namespace torchchat::cpu::neon {
namespace {

struct FmaBlock {
  // acc[v] += (128 + q) x_k for rows 32H + 4v..+3 at k (bytes a), x_k lane J of xv.
  template <int H, int J>
  static void step(const uint8_t* a, float32x4_t xv, float32x4_t acc[8]) {
    const uint8x16_t b[2] = {vld1q_u8(a), vld1q_u8(a + 16)};  // rows +0-15, +16-31
#pragma GCC unroll 16
    for (int q = 0; q < 2; ++q) {
      const uint8x16_t codes = H ? vshrq_n_u8(b[q], 4) : vandq_u8(b[q], vdupq_n_u8(15));
      float32x4_t wv[4];
      codes_to_f32_128(codes, wv);
#pragma GCC unroll 16
      for (int i = 0; i < 4; ++i) acc[4 * q + i] = vfmaq_laneq_f32(acc[4 * q + i], wv[i], xv, J);
    }
  }
  template <int H>
  static void sums(const uint8_t* blk, const bf16_t* xb, int64_t k0, int64_t k1,
                   float32x4_t acc[8]) {
    for (int64_t k = k0; k < k1; k += 4) {  // groups are multiples of 32
      const uint8_t* a = blk + k * 32;
      __builtin_prefetch(a + 1024);  // 128 bytes a step: two 64-byte lines
      __builtin_prefetch(a + 1024 + 64);
      const float32x4_t xv = bf16x4_to_f32(vld1_u16((const uint16_t*)(xb + k)));
      step<H, 0>(a, xv, acc);
      step<H, 1>(a + 32, xv, acc);
      step<H, 2>(a + 64, xv, acc);
      step<H, 3>(a + 96, xv, acc);
    }
  }
};

}  // namespace

void linear_int4(const bf16_t* x, const float* xsum, int64_t M, int64_t K, int64_t group,
                 const Matrix& a, int64_t b0, int64_t b1) {
  int4_linear<FmaBlock>(x, xsum, M, K, group, a, b0, b1);
}

}  // namespace torchchat::cpu::neon
