// 8da4w prefill, base NEON: per-token quantization of the activations (bit-exact with the
// reference) and the integer GEMM by UDOT (dotprod), 16 products u * c per instruction, codes
// unsigned (gemm_8da4w.h derives the correction by U_g).
#include <algorithm>
#include <cmath>
#include <limits>

#include "gemm_8da4w.h"

namespace torchchat::cpu::neon {
namespace {

struct Udot {
  // acc[m][i] (rows 16vq + 4i..+3) += sum over k 4kq..4kq+3 of u c: the 4 u of token m are
  // 32-bit lane J of a[m], broadcast by UDOT's by-element form.
  template <int MT, int J>
  static void kq_step(const uint8_t* wq, const uint8x16_t a[MT], uint32x4_t acc[MT][4]) {
    const uint8x16_t w0 = vld1q_u8(wq), w1 = vld1q_u8(wq + 16);
    const uint8x16_t w2 = vld1q_u8(wq + 32), w3 = vld1q_u8(wq + 48);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      acc[m][0] = vdotq_laneq_u32(acc[m][0], w0, a[m], J);
      acc[m][1] = vdotq_laneq_u32(acc[m][1], w1, a[m], J);
      acc[m][2] = vdotq_laneq_u32(acc[m][2], w2, a[m], J);
      acc[m][3] = vdotq_laneq_u32(acc[m][3], w3, a[m], J);
    }
  }

  // MT tokens x the block's 64 rows, 16 rows (4 x MT accumulators) at a time.
  template <int MT>
  static void tokens(const uint8_t* u, int64_t K, int64_t k0, int64_t k1, const int8_t* wbuf,
                     const float* sw, float* f) {
    int32x4_t u8sum[MT];  // 8 U_g per token, in every lane
    for (int m = 0; m < MT; ++m) {
      uint32x4_t s = vdupq_n_u32(0);
      for (int64_t k = k0; k < k1; k += 16)
        s = vdotq_u32(s, vld1q_u8(u + m * K + k), vdupq_n_u8(1));
      u8sum[m] = vdupq_n_s32(8 * (int32_t)vaddvq_u32(s));
    }
    for (int vq = 0; vq < 4; ++vq) {
      uint32x4_t acc[MT][4];
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m)
#pragma GCC unroll 16
        for (int i = 0; i < 4; ++i) acc[m][i] = vdupq_n_u32(0);
      for (int64_t k = k0; k < k1; k += 16) {  // groups are multiples of 32
        uint8x16_t a[MT];
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) a[m] = vld1q_u8(u + m * K + k);
        const uint8_t* wq = (const uint8_t*)wbuf + (k / 4) * 256 + vq * 64;
        kq_step<MT, 0>(wq, a, acc);
        kq_step<MT, 1>(wq + 256, a, acc);
        kq_step<MT, 2>(wq + 512, a, acc);
        kq_step<MT, 3>(wq + 768, a, acc);
      }
#pragma GCC unroll 16
      for (int i = 0; i < 4; ++i) {  // f += s_w * (sum u c - 8 U_g)
        const float32x4_t s = vld1q_f32(sw + 16 * vq + 4 * i);
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) {
          const int32x4_t I = vsubq_s32(vreinterpretq_s32_u32(acc[m][i]), u8sum[m]);
          float* fm = f + m * 64 + 16 * vq + 4 * i;
          vst1q_f32(fm, vfmaq_f32(vld1q_f32(fm), vcvtq_f32_s32(I), s));
        }
      }
    }
  }

  static void group(const uint8_t* u, int64_t K, int64_t k0, int64_t k1, const int8_t* wbuf,
                    const float* sw, float* f, int64_t n) {
    switch (n) {
      case 1: tokens<1>(u, K, k0, k1, wbuf, sw, f); break;
      case 2: tokens<2>(u, K, k0, k1, wbuf, sw, f); break;
      case 3: tokens<3>(u, K, k0, k1, wbuf, sw, f); break;
      default: tokens<4>(u, K, k0, k1, wbuf, sw, f); break;
    }
  }
};

}  // namespace

// x (M, Kx) fp32 -> u (M, K) = per-token int8 codes + 128 (columns past Kx: the zero point,
// they meet zero weights), scales sa and zero points za, exactly as
// torchchat.quant.primitives.quantize_per_token_int8 and the reference: the same fp32 min/max
// (with 0), IEEE division (FDIV), round half to even (FRINTN), and additions in its order.
void quantize_rows_8da4w(const float* xp, int64_t Kx, int64_t K, uint8_t* u, float* sa, float* za,
                         int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = xp + m * Kx;
    uint8_t* um = u + m * K;
    float32x4_t lo4 = vdupq_n_f32(0.0f), hi4 = vdupq_n_f32(0.0f);
    int64_t k = 0;
    for (; k + 4 <= Kx; k += 4) {
      const float32x4_t v = vld1q_f32(row + k);
      lo4 = vminq_f32(lo4, v);
      hi4 = vmaxq_f32(hi4, v);
    }
    float lo = vminvq_f32(lo4), hi = vmaxvq_f32(hi4);
    for (; k < Kx; ++k) {
      lo = std::min(lo, row[k]);
      hi = std::max(hi, row[k]);
    }
    const float scale = std::max((hi - lo) / 255.0f, std::numeric_limits<float>::epsilon());
    const float zero = std::clamp(-128.0f - std::nearbyint(lo / scale), -128.0f, 127.0f);
    const float32x4_t sv = vdupq_n_f32(scale), zv = vdupq_n_f32(zero), c128 = vdupq_n_f32(128.0f);
    const float32x4_t qmin = vdupq_n_f32(0.0f), qmax = vdupq_n_f32(255.0f);
    for (k = 0; k + 16 <= Kx; k += 16) {
      uint32x4_t q[4];
#pragma GCC unroll 16
      for (int i = 0; i < 4; ++i) {
        const float32x4_t r = vrndnq_f32(vdivq_f32(vld1q_f32(row + k + 4 * i), sv));
        const float32x4_t c = vaddq_f32(vaddq_f32(r, zv), c128);
        q[i] = vcvtq_u32_f32(vminq_f32(vmaxq_f32(c, qmin), qmax));  // integral: exact
      }
      const uint16x8_t h0 = vcombine_u16(vmovn_u32(q[0]), vmovn_u32(q[1]));
      const uint16x8_t h1 = vcombine_u16(vmovn_u32(q[2]), vmovn_u32(q[3]));
      vst1q_u8(um + k, vcombine_u8(vmovn_u16(h0), vmovn_u16(h1)));
    }
    for (; k < K; ++k) {  // the last Kx % 16 columns and the padding, as the reference
      const float q = k < Kx ? std::nearbyint(row[k] / scale) + zero + 128.0f : zero + 128.0f;
      um[k] = (uint8_t)std::clamp(q, 0.0f, 255.0f);
    }
    sa[m] = scale;
    za[m] = zero;
  }
}

void gemm_8da4w(const uint8_t* u, int64_t M, int64_t K, const float* sa, const float* za,
                const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                int64_t b0, int64_t b1, const Buffers8da4w& buf) {
  gemm_8da4w_blocks<Layout::kUdot, Udot>(u, M, K, sa, za, w, sz, N, group, y, b0, b1, buf);
}

}  // namespace torchchat::cpu::neon
