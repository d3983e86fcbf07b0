// 8da4w prefill with FEAT_I8MM: USMMLA multiplies a 2 x 8 block of unsigned activations (two
// tokens' u over 8 k) by a 2 x 8 block of signed weights (two rows' w = c - 8) into a 2 x 2
// block of int32 sums, 32 products per instruction (UDOT: 16) and no correction by U_g.
// gemm_8da4w.h has the unpacking (Layout::kMmla) and the driver.
#include "gemm_8da4w.h"

namespace torchchat::cpu::neon {
namespace {

struct Mmla {
  // P token pairs x 16 rows (8 row pairs): acc[p][j] = [t0 r0, t0 r1, t1 r0, t1 r1] for tokens
  // (2p, 2p + 1) and rows 16vq + 2j, +1. n <= 2P tokens are real; a missing second token of a
  // pair repeats the first (its sums are dropped).
  template <int P>
  static void tokens(const uint8_t* u, int64_t K, int64_t k0, int64_t k1, const int8_t* wbuf,
                     const float* sw, float* f, int64_t n) {
    const uint8_t* ut[2 * P];
#pragma GCC unroll 16
    for (int m = 0; m < 2 * P; ++m) ut[m] = u + (m < n ? m : m - 1) * K;
    for (int vq = 0; vq < 4; ++vq) {
      int32x4_t acc[P][8];
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
        for (int j = 0; j < 8; ++j) acc[p][j] = vdupq_n_s32(0);
      for (int64_t k = k0; k < k1; k += 8) {
        uint8x16_t a[P];
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p)
          a[p] = vcombine_u8(vld1_u8(ut[2 * p] + k), vld1_u8(ut[2 * p + 1] + k));
        const int8_t* wk = wbuf + (k / 8) * 512 + vq * 128;
#pragma GCC unroll 16
        for (int j = 0; j < 8; ++j) {
          const int8x16_t wv = vld1q_s8(wk + 16 * j);
#pragma GCC unroll 16
          for (int p = 0; p < P; ++p) acc[p][j] = vusmmlaq_s32(acc[p][j], a[p], wv);
        }
      }
      // 64-bit zips regroup rows (2j, 2j+1), (2j+2, 2j+3) by token: rows 4i..4i+3 of one token
#pragma GCC unroll 16
      for (int i = 0; i < 4; ++i) {
        const float32x4_t s = vld1q_f32(sw + 16 * vq + 4 * i);
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          const int64x2_t x0 = vreinterpretq_s64_s32(acc[p][2 * i]);
          const int64x2_t x1 = vreinterpretq_s64_s32(acc[p][2 * i + 1]);
          const int32x4_t I[2] = {vreinterpretq_s32_s64(vzip1q_s64(x0, x1)),
                                  vreinterpretq_s32_s64(vzip2q_s64(x0, x1))};
#pragma GCC unroll 16
          for (int t = 0; t < 2; ++t) {
            if (2 * p + t >= n) continue;
            float* fm = f + (2 * p + t) * 64 + 16 * vq + 4 * i;
            vst1q_f32(fm, vfmaq_f32(vld1q_f32(fm), vcvtq_f32_s32(I[t]), s));
          }
        }
      }
    }
  }

  static void group(const uint8_t* u, int64_t K, int64_t k0, int64_t k1, const int8_t* wbuf,
                    const float* sw, float* f, int64_t n) {
    if (n > 2)
      tokens<2>(u, K, k0, k1, wbuf, sw, f, n);
    else
      tokens<1>(u, K, k0, k1, wbuf, sw, f, n);
  }
};

}  // namespace

void gemm_8da4w_mmla(const uint8_t* u, int64_t M, int64_t K, const float* sa, const float* za,
                     const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                     int64_t b0, int64_t b1, const Buffers8da4w& buf) {
  gemm_8da4w_blocks<Layout::kMmla, Mmla>(u, M, K, sa, za, w, sz, N, group, y, b0, b1, buf);
}

}  // namespace torchchat::cpu::neon
