// 8da4w prefill on NEON: the parts shared by gemm_8da4w.cpp (UDOT, base dotprod) and
// gemm_8da4w_i8mm.cpp (USMMLA): unpacking a 64-row block of torch's int4 pack layout into the
// per-thread buffer in a kernel's operand layout, and the driver over blocks, tokens and groups.
//
// The math is avx512/prefill_vnni.cpp's: activations per-token int8 (u = q + 128 unsigned,
// scale s_a, zero z_a), weights int4 symmetric per group (codes c = w + 8, scale s_w); per group g
// the exact integer sum I_g = sum_k u_k w_k, and
//   y = s_a * (sum_g s_w,g I_g - (128 + z_a) R),   R = sum_g s_w,g W_g,   W_g = sum_k w_k.
// Dotprod has no unsigned x signed product (USDOT is FEAT_I8MM), so the UDOT kernel keeps the
// codes unsigned and takes I_g = sum_k u_k c_k - 8 U_g with U_g = sum_k u_k over the group (both
// exact in int32); the USMMLA kernel stores w = c - 8 signed and sums u * w directly.
#pragma once

#include <algorithm>
#include <cstring>

#include "vec.h"

namespace torchchat::cpu::neon {
namespace {

// Operand layouts of the unpacked block (K * 64 bytes):
//   kUdot: for every 4 k, 16 vectors of 4 rows x 4 k (row 4v + i, k 4kq + t at byte
//          kq * 256 + v * 16 + 4 i + t), codes unsigned: UDOT by element sums 4 k per row lane.
//   kMmla: for every 8 k, 32 vectors of 2 rows x 8 k (row 2j + i, k 8ko + t at byte
//          ko * 512 + j * 16 + 8 i + t), codes - 8 signed: USMMLA's 2 x 8 right operand.
enum class Layout { kUdot, kMmla };

template <Layout L>
inline int64_t unpacked_at(int64_t r, int64_t k) {
  return L == Layout::kUdot ? (k / 4) * 256 + (r / 4) * 16 + (r % 4) * 4 + k % 4
                            : (k / 8) * 512 + (r / 2) * 16 + (r % 2) * 8 + k % 8;
}

// Block rows n0..n0 + 64 (bs of them real) -> wbuf in layout L, scales sbuf[G][64] fp32 and
// r[64] = sum_g s_w,g W_g. Rows past bs get code 8 (weight 0) and scale 0.
template <Layout L>
void unpack_8da4w_block(const uint8_t* w, const bf16_t* sz, int64_t N, int64_t K, int64_t group,
                        int64_t n0, int8_t* wbuf, float* sbuf, float* r) {
  const int64_t bs = std::min<int64_t>(64, N - n0), G = K / group;
  const int bias = L == Layout::kUdot ? 0 : 8;  // stored value: code - bias
  const uint8_t* blk = w + n0 * (K / 2);
  if (bs < 64) {  // a short last block: byte d of each k holds rows 2d (low), 2d + 1 (high)
    const int64_t half = bs / 2;
    for (int64_t i = 0; i < 64; ++i) {
      float t = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t wsum = 0;
        for (int64_t k = g * group; k < (g + 1) * group; ++k) {
          const uint8_t byte = i < bs ? blk[k * half + i / 2] : 0;
          const int code = i >= bs ? 8 : i % 2 ? byte >> 4 : byte & 15;
          wbuf[unpacked_at<L>(i, k)] = (int8_t)(code - bias);
          wsum += code - 8;
        }
        sbuf[g * 64 + i] = i < bs ? (float)sz[(g * N + n0 + i) * 2] : 0.0f;
        t += sbuf[g * 64 + i] * (float)wsum;
      }
      r[i] = t;
    }
    return;
  }
  // A quarter (16 rows: low nibbles of bytes 0-15, 16-31, then high nibbles) of a group at a
  // time: its code sums (4 vectors) stay in registers.
  const uint8x16_t low4 = vdupq_n_u8(15), ones = vdupq_n_u8(1), eight = vdupq_n_u8(8);
  const int32x4_t off = vdupq_n_s32((int32_t)(8 * group));  // W_g = sum c - 8 group
  std::fill(r, r + 64, 0.0f);
  for (int64_t g = 0; g < G; ++g)
    for (int qq = 0; qq < 4; ++qq) {
      uint32x4_t csum[4];  // sums of the codes of rows 16qq + 4i..+3 over the group
#pragma GCC unroll 16
      for (int i = 0; i < 4; ++i) csum[i] = vdupq_n_u32(0);
      for (int64_t k8 = g * group / 8; k8 < (g + 1) * group / 8; ++k8) {  // 8 k at a time
        const uint8_t* a = blk + k8 * 256 + (qq & 1) * 16;
        uint8x16_t c[8];  // c[t]: the 16 rows' codes at k 8k8 + t
#pragma GCC unroll 16
        for (int t = 0; t < 8; ++t) {
          const uint8x16_t b = vld1q_u8(a + 32 * t);
          c[t] = qq < 2 ? vandq_u8(b, low4) : vshrq_n_u8(b, 4);
        }
        // Byte zips pair k (t, t+1) per row, 16-bit zips make each 32-bit lane one row's 4 k:
        // d[h][i] = rows 16qq + 4i..+3 at k 8k8 + 4h..+3, UDOT's layout.
        uint8x16_t d[2][4];
#pragma GCC unroll 16
        for (int h = 0; h < 2; ++h) {
          const uint8x16_t* ch = c + 4 * h;
          const uint16x8_t z01[2] = {vreinterpretq_u16_u8(vzip1q_u8(ch[0], ch[1])),
                                     vreinterpretq_u16_u8(vzip2q_u8(ch[0], ch[1]))};
          const uint16x8_t z23[2] = {vreinterpretq_u16_u8(vzip1q_u8(ch[2], ch[3])),
                                     vreinterpretq_u16_u8(vzip2q_u8(ch[2], ch[3]))};
#pragma GCC unroll 16
          for (int e = 0; e < 2; ++e) {
            d[h][2 * e] = vreinterpretq_u8_u16(vzip1q_u16(z01[e], z23[e]));
            d[h][2 * e + 1] = vreinterpretq_u8_u16(vzip2q_u16(z01[e], z23[e]));
          }
        }
#pragma GCC unroll 16
        for (int i = 0; i < 4; ++i) {
          const int v = 4 * qq + i;  // rows 4v..4v+3
          csum[i] = vdotq_u32(vdotq_u32(csum[i], d[0][i], ones), d[1][i], ones);
          uint8_t* out = (uint8_t*)wbuf;
          if constexpr (L == Layout::kUdot) {
            vst1q_u8(out + (2 * k8) * 256 + v * 16, d[0][i]);
            vst1q_u8(out + (2 * k8 + 1) * 256 + v * 16, d[1][i]);
          } else {  // 32-bit zips: rows (4v, 4v+1) and (4v+2, 4v+3) with their 8 k each
            const uint32x4_t lo = vreinterpretq_u32_u8(d[0][i]);
            const uint32x4_t hi = vreinterpretq_u32_u8(d[1][i]);
            const uint8x16_t p0 = vreinterpretq_u8_u32(vzip1q_u32(lo, hi));
            const uint8x16_t p1 = vreinterpretq_u8_u32(vzip2q_u32(lo, hi));
            vst1q_u8(out + k8 * 512 + (2 * v) * 16, vsubq_u8(p0, eight));
            vst1q_u8(out + k8 * 512 + (2 * v + 1) * 16, vsubq_u8(p1, eight));
          }
        }
      }
      // the quarter's scales (the low halves of its (scale, zero) pairs), and R += s_w,g W_g
#pragma GCC unroll 16
      for (int h = 0; h < 2; ++h) {  // rows 16qq + 8h..+7
        const int64_t row = 16 * qq + 8 * h;
        const uint16x8x2_t p = vld2q_u16((const uint16_t*)(sz + (g * N + n0 + row) * 2));
        const float32x4_t s[2] = {bf16x4_to_f32(vget_low_u16(p.val[0])),
                                  bf16x4_to_f32(vget_high_u16(p.val[0]))};
#pragma GCC unroll 16
        for (int j = 0; j < 2; ++j) {
          vst1q_f32(sbuf + g * 64 + row + 4 * j, s[j]);
          const int32x4_t wsum = vsubq_s32(vreinterpretq_s32_u32(csum[2 * h + j]), off);
          vst1q_f32(r + row + 4 * j,
                    vfmaq_f32(vld1q_f32(r + row + 4 * j), vcvtq_f32_s32(wsum), s[j]));
        }
      }
    }
}

// y (M, N) for blocks [b0, b1) by Kernel::group(u, K, k0, k1, wbuf, sw, f, n): the sums of n <= 4
// tokens (rows K apart) over k in [k0, k1) (one group) with the block's 64 rows, times the
// group's scales sw, added into f[m * 64 + row].
template <Layout L, typename Kernel>
void gemm_8da4w_blocks(const uint8_t* u, int64_t M, int64_t K, const float* sa, const float* za,
                       const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                       int64_t b0, int64_t b1, const Buffers8da4w& buf) {
  int8_t* wbuf = buf.wbuf;
  float *f = buf.f, *sbuf = buf.sbuf;
  alignas(16) float r[64];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64, bs = std::min<int64_t>(64, N - n0);
    unpack_8da4w_block<L>(w, sz, N, K, group, n0, wbuf, sbuf, r);
    std::memset(f, 0, M * 64 * sizeof(float));
    // 64 tokens at a time: their fp32 sums (16 KB) stay in L1 across the groups, and a group of
    // the unpacked weights (group * 64 bytes) while every token passes over it
    for (int64_t mb = 0; mb < M; mb += 64) {
      const int64_t me = std::min<int64_t>(M, mb + 64);
      for (int64_t g = 0; g < K / group; ++g)
        for (int64_t m = mb; m < me; m += 4)
          Kernel::group(u + m * K, K, g * group, (g + 1) * group, wbuf, sbuf + g * 64,
                        f + m * 64, std::min<int64_t>(4, me - m));
    }
    for (int64_t m = 0; m < M; ++m) {  // y = s_a * (f - (128 + z_a) * R)
      const float32x4_t c = vdupq_n_f32(128.0f + za[m]);
      for (int64_t v = 0; 4 * v < bs; ++v) {
        const float32x4_t out =
            vmulq_n_f32(vfmsq_f32(vld1q_f32(f + m * 64 + 4 * v), c, vld1q_f32(r + 4 * v)), sa[m]);
        if (4 * v + 4 <= bs) {
          vst1q_f32(y + m * N + n0 + 4 * v, out);
        } else {
          alignas(16) float o[4];
          vst1q_f32(o, out);
          for (int64_t i = 4 * v; i < bs; ++i) y[m * N + n0 + i] = o[i - 4 * v];
        }
      }
    }
  }
}

}  // namespace
}  // namespace torchchat::cpu::neon
