// int4 weights in torch's CPU pack layout, read in place: the driver over 64-row blocks and the
// plain loops of a short last block, shared by int4.cpp (FMLA on fp32 lanes) and int4_bf16.cpp
// (BFDOT on bf16 pairs). Both sum, per group, the codes turned into 128 + q (vec.h's magic
// number) times the activations, then fold in the group's scale and zero point:
//   sum_k ((q_k - 8) s + z) x_k = s acc + (z - 136 s) xsum,   acc = sum_k (128 + q_k) x_k
// (w = (q - 8) * scale + zero, as aten::_weight_int4pack_mm_for_cpu).
//
// torch's CPU int4 layout (aten::_convert_weight_to_int4pack_for_cpu, [N, K/2] uint8): output
// rows in blocks of 64, each block stored k-major: for every k, 32 bytes whose low nibbles are
// rows 0-31 of the block and high nibbles rows 32-63. A last block of fewer rows (bs, a multiple
// of 16) stores bs/2 bytes per k, byte d holding rows 2d (low) and 2d+1 (high).
#pragma once

#include <algorithm>
#include <cstring>

#include "vec.h"

namespace torchchat::cpu::neon {
namespace {

// Rows 32h..32h+31's (scale, zero) pairs of one group (bf16, szg as int4_scale_offset places
// them) folded into total (rows 4v..4v+3 in total + 4v, fp32): += s acc + (z - 136 s) xsum.
// LD2 splits 8 pairs into 8 scales and 8 zeros.
inline void int4_fold_half(const bf16_t* szg, int h, const float32x4_t acc[8], float xsum,
                           float* total) {
  const float32x4_t k136 = vdupq_n_f32(136.0f), xs = vdupq_n_f32(xsum);
#pragma GCC unroll 16
  for (int c = 0; c < 4; ++c) {  // rows 32h + 8c..+7
    const uint16x8x2_t p = vld2q_u16((const uint16_t*)(szg + 64 * h + 16 * c));
    const float32x4_t s[2] = {bf16x4_to_f32(vget_low_u16(p.val[0])),
                              bf16x4_to_f32(vget_high_u16(p.val[0]))};
    const float32x4_t z[2] = {bf16x4_to_f32(vget_low_u16(p.val[1])),
                              bf16x4_to_f32(vget_high_u16(p.val[1]))};
#pragma GCC unroll 16
    for (int i = 0; i < 2; ++i) {
      float* t = total + 32 * h + 8 * c + 4 * i;
      const float32x4_t cz = vfmsq_f32(z[i], k136, s[i]);  // z - 136 s
      vst1q_f32(t, vfmaq_f32(vfmaq_f32(vld1q_f32(t), s[i], acc[2 * c + i]), cz, xs));
    }
  }
}


// One full block for one activation row by Block (a struct whose sums<h>(blk, xb, k0, k1, acc)
// adds acc[v] += sum_k (128 + q) x_k over [k0, k1) for rows 32h + 4v..+3), group after group,
// half a block at a time: 8 accumulators leave registers for the conversions (all 64 rows'
// 16 spill); the second half reads the group's bytes again, from L1.
template <typename Block>
void int4_block64(const uint8_t* blk, const bf16_t* xb, const float* xsum, int64_t K,
                  int64_t group, const bf16_t* sz, bool blocked, int64_t N, int64_t n0,
                  float* out) {
  const int64_t G = K / group;
  std::fill(out, out + 64, 0.0f);
  for (int64_t g = 0; g < G; ++g)
    for (int h = 0; h < 2; ++h) {
      float32x4_t acc[8];
#pragma GCC unroll 16
      for (int v = 0; v < 8; ++v) acc[v] = vdupq_n_f32(0.0f);
      if (h == 0)
        Block::template sums<0>(blk, xb, g * group, (g + 1) * group, acc);
      else
        Block::template sums<1>(blk, xb, g * group, (g + 1) * group, acc);
      int4_fold_half(sz + int4_scale_offset(blocked, g, G, N, n0, 64), h, acc, xsum[g], out);
    }
}

// x: M x K bf16 (K a multiple of group); the matrix: w [N, K/2] packed, s: (scale, zero) bf16
// pairs in torch's layout [K/group, N, 2] or blocked (Matrix::blocked).
template <typename Block>
void int4_linear(const bf16_t* x, const float* xsum, int64_t M, int64_t K, int64_t group,
                 const Matrix& a, int64_t b0, int64_t b1) {
  const int64_t G = K / group;
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  const bf16_t* sz = static_cast<const bf16_t*>(a.s);
  const int64_t N = a.N, ldy = a.ldy;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64;
    if (N - n0 < 64) {  // a short last block (small layers only): the reference's loops
      scalar_kernels().linear_int4(x, xsum, M, K, group, a, b, b + 1);
      continue;
    }
    const uint8_t* blk = w + n0 * (K / 2);
    for (int64_t m = 0; m < M; ++m) {
      alignas(16) float out[64];
      int4_block64<Block>(blk, x + m * K, xsum + m * G, K, group, sz, a.blocked, N, n0, out);
      std::memcpy(a.y + m * ldy + n0, out, sizeof out);
    }
  }
}

}  // namespace
}  // namespace torchchat::cpu::neon
