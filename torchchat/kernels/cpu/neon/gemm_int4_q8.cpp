// Weight-only int4 and GGUF prefill in integers on NEON (base dotprod), as cpu/common/kernels.h
// defines gemm_int4_q8 and gemm_ggml_q8: activations rounded to 8 bits per 32 values (int4:
// quantize_rows_q8, bit-equal to the reference; GGUF: as decode's), the block's codes (int4
// 0..15, unpacked by gemm_8da4w.h in UDOT's layout; GGUF up to 31: non-negative int8 too) times
// them by SDOT, exact per 32-value block, then f += I s d and f += z e in fp32, in the
// reference's order.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "../common/ggml_codes.h"
#include "gemm_8da4w.h"

namespace torchchat::cpu::neon {
namespace {

// acc[m][i] (rows 16vq + 4i..+3) += sum over k 4kq..4kq+3 of c q: the 4 q of token m are
// 32-bit lane J of a[m], broadcast by SDOT's by-element form.
template <int MT, int J>
inline void kq_step(const int8_t* wq, const int8x16_t a[MT], int32x4_t acc[MT][4]) {
  const int8x16_t w0 = vld1q_s8(wq), w1 = vld1q_s8(wq + 16);
  const int8x16_t w2 = vld1q_s8(wq + 32), w3 = vld1q_s8(wq + 48);
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    acc[m][0] = vdotq_laneq_s32(acc[m][0], w0, a[m], J);
    acc[m][1] = vdotq_laneq_s32(acc[m][1], w1, a[m], J);
    acc[m][2] = vdotq_laneq_s32(acc[m][2], w2, a[m], J);
    acc[m][3] = vdotq_laneq_s32(acc[m][3], w3, a[m], J);
  }
}

// MT tokens (rows K apart; their d and e nb apart) x the block's 64 rows over one weight group
// [k0, k1), 16 rows (4 x MT accumulators) at a time; s, z: the group's scales and z - 8 s.
template <int MT>
void tokens(const int8_t* q, const float* d, const float* e, int64_t K, int64_t nb, int64_t k0,
            int64_t k1, const int8_t* wbuf, const float* s, const float* z, float* f) {
  for (int vq = 0; vq < 4; ++vq) {
    float32x4_t out[MT][4];
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m)
#pragma GCC unroll 16
      for (int i = 0; i < 4; ++i) out[m][i] = vld1q_f32(f + m * 64 + 16 * vq + 4 * i);
    for (int64_t kb = k0; kb < k1; kb += 32) {  // one 32-value block of the activations
      int32x4_t acc[MT][4];
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m)
#pragma GCC unroll 16
        for (int i = 0; i < 4; ++i) acc[m][i] = vdupq_n_s32(0);
      for (int64_t k = kb; k < kb + 32; k += 16) {
        int8x16_t a[MT];
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) a[m] = vld1q_s8(q + m * K + k);
        const int8_t* wq = wbuf + (k / 4) * 256 + vq * 64;
        kq_step<MT, 0>(wq, a, acc);
        kq_step<MT, 1>(wq + 256, a, acc);
        kq_step<MT, 2>(wq + 512, a, acc);
        kq_step<MT, 3>(wq + 768, a, acc);
      }
      const int64_t b = kb / 32;
#pragma GCC unroll 16
      for (int i = 0; i < 4; ++i) {
        const float32x4_t sv = vld1q_f32(s + 16 * vq + 4 * i), zv = vld1q_f32(z + 16 * vq + 4 * i);
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) {
          const float32x4_t sd = vmulq_n_f32(sv, d[m * nb + b]);
          const float32x4_t t = vfmaq_f32(out[m][i], vcvtq_f32_s32(acc[m][i]), sd);
          out[m][i] = vfmaq_f32(t, zv, vdupq_n_f32(e[m * nb + b]));
        }
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m)
#pragma GCC unroll 16
      for (int i = 0; i < 4; ++i) vst1q_f32(f + m * 64 + 16 * vq + 4 * i, out[m][i]);
  }
}

}  // namespace

void quantize_rows_q8(const float* xp, int64_t Kx, int64_t K, int8_t* q, float* d, float* e,
                      int64_t m0, int64_t m1) {
  const float32x4_t zero = vdupq_n_f32(0.0f);
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = xp + m * Kx;
    for (int64_t k = 0; k < K; k += 32) {
      alignas(16) float pad[32];
      const float* src = row + k;
      if (k + 32 > Kx) {  // the block reaches past x's columns: zeros there
        for (int64_t j = 0; j < 32; ++j) pad[j] = k + j < Kx ? row[k + j] : 0.0f;
        src = pad;
      }
      float32x4_t v[8], bad = zero, amax = zero;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        v[i] = vld1q_f32(src + 4 * i);
        bad = vaddq_f32(bad, vmulq_f32(v[i], zero));  // NaN if an inf or a NaN
        amax = vmaxq_f32(amax, vabsq_f32(v[i]));
      }
      const bool finite = vaddvq_f32(bad) == 0.0f;
      const float db = finite ? vmaxvq_f32(amax) / 127.0f : std::numeric_limits<float>::quiet_NaN();
      int32_t sum = 0;
      if (finite && db > 0.0f) {
        const float32x4_t dv = vdupq_n_f32(db);
        int32x4_t qi[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) qi[i] = vcvtq_s32_f32(vrndnq_f32(vdivq_f32(v[i], dv)));
        int32x4_t s4 = vdupq_n_s32(0);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) s4 = vaddq_s32(s4, qi[i]);
        sum = vaddvq_s32(s4);
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {  // |q| <= 127: the narrowing moves are exact
          const int16x8_t a = vcombine_s16(vmovn_s32(qi[4 * h]), vmovn_s32(qi[4 * h + 1]));
          const int16x8_t b = vcombine_s16(vmovn_s32(qi[4 * h + 2]), vmovn_s32(qi[4 * h + 3]));
          vst1q_s8(q + m * K + k + 16 * h, vcombine_s8(vmovn_s16(a), vmovn_s16(b)));
        }
      } else {
        std::memset(q + m * K + k, 0, 32);
      }
      d[m * (K / 32) + k / 32] = db;
      e[m * (K / 32) + k / 32] = db * (float)sum;
    }
  }
}

namespace {

// f (M x 64) = the unpacked block's 64 rows' sums for every token, groups of `group` values with
// scales s = sbuf + g * sstride and z = s + zoff.
void gemm_unpacked(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                   int64_t group, const int8_t* wbuf, const float* sbuf, int64_t sstride,
                   int64_t zoff, float* f) {
  const int64_t nb = K / 32;
  std::memset(f, 0, M * 64 * sizeof(float));
  // 64 tokens at a time: their fp32 sums (16 KB) stay in L1 across the groups
  for (int64_t mb = 0; mb < M; mb += 64) {
    const int64_t me = std::min<int64_t>(M, mb + 64);
    for (int64_t g = 0; g < K / group; ++g) {
      const int64_t k0 = g * group, k1 = k0 + group;
      const float *s = sbuf + g * sstride, *z = s + zoff;
      for (int64_t m = mb; m < me; m += 4) {
        const int8_t* qm = q + m * K;
        const float *dm = d + m * nb, *em = e + m * nb;
        switch (std::min<int64_t>(4, me - m)) {
          case 1: tokens<1>(qm, dm, em, K, nb, k0, k1, wbuf, s, z, f + m * 64); break;
          case 2: tokens<2>(qm, dm, em, K, nb, k0, k1, wbuf, s, z, f + m * 64); break;
          case 3: tokens<3>(qm, dm, em, K, nb, k0, k1, wbuf, s, z, f + m * 64); break;
          default: tokens<4>(qm, dm, em, K, nb, k0, k1, wbuf, s, z, f + m * 64); break;
        }
      }
    }
  }
}

inline int64_t row_lane(int64_t r) { return r; }  // a row's lane in wbuf: its own

// Rows n0..n0 + 64 of a GGUF matrix of a type of gemm_ggml_q8_types (blocks of 32) -> wbuf
// in the layout above (row r's codes of k 4 kq.. at byte 256 kq + 4 r) and sbuf[b][2][64] =
// (s, z) per block; rows past a.N: codes and scales 0. 256 values of the 64 rows at a time
// decoded into a 16 KB buffer, then moved by 4 x 4 transposes of 32-bit words.
void unpack_codes_block(const Matrix& a, int64_t K, int64_t n0, int8_t* wbuf, float* sbuf) {
  const int64_t bs = std::min<int64_t>(64, a.N - n0);
  alignas(16) uint8_t codes[64][256];
  if (bs < 64) std::memset(codes[bs], 0, (64 - bs) * 256);
  for (int64_t u0 = 0; u0 < K; u0 += 256) {
    const int64_t values = std::min<int64_t>(256, K - u0);
    ggml_rows_codes<half_at, row_lane>(a, n0, bs, u0, values, codes, sbuf + u0 / 32 * 128);
    for (int r = 0; r < 64; r += 4)
      for (int64_t kq = 0; kq < values / 4; kq += 4) {
        uint32x4_t v[4];
        for (int i = 0; i < 4; ++i) v[i] = vld1q_u32((const uint32_t*)(codes[r + i] + 4 * kq));
        const uint32x4_t t0 = vtrn1q_u32(v[0], v[1]), t1 = vtrn2q_u32(v[0], v[1]);
        const uint32x4_t t2 = vtrn1q_u32(v[2], v[3]), t3 = vtrn2q_u32(v[2], v[3]);
        const uint64x2_t w0 = vreinterpretq_u64_u32(t0), w1 = vreinterpretq_u64_u32(t1);
        const uint64x2_t w2 = vreinterpretq_u64_u32(t2), w3 = vreinterpretq_u64_u32(t3);
        const uint64x2_t out[4] = {vtrn1q_u64(w0, w2), vtrn1q_u64(w1, w3), vtrn2q_u64(w0, w2),
                                   vtrn2q_u64(w1, w3)};  // k 4 (kq + j): rows r..r + 3
        for (int j = 0; j < 4; ++j)
          vst1q_u64((uint64_t*)(wbuf + (u0 / 4 + kq + j) * 256 + 4 * r), out[j]);
      }
  }
}

}  // namespace

void gemm_int4_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                  int64_t b0, int64_t b1, const Buffers8da4w& buf) {
  int8_t* wbuf = buf.wbuf;
  float *f = buf.f, *sbuf = buf.sbuf;
  const int64_t G = K / group;
  float* zbuf = sbuf + G * 64;  // z - 8 s, beside the scales unpack_8da4w_block writes
  alignas(16) float r[64];      // unpack's 8da4w sums: not used here
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64, bs = std::min<int64_t>(64, N - n0);
    unpack_8da4w_block<Layout::kUdot>(w, sz, N, K, group, n0, wbuf, sbuf, r);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < 64; ++i)
        zbuf[g * 64 + i] = i < bs ? (float)sz[(g * N + n0 + i) * 2 + 1] - 8.0f * sbuf[g * 64 + i]
                                  : 0.0f;
    gemm_unpacked(q, d, e, M, K, group, wbuf, sbuf, 64, G * 64, f);
    for (int64_t m = 0; m < M; ++m) std::memcpy(y + m * N + n0, f + m * 64, bs * sizeof(float));
  }
}

// GGUF prefill on the types of the table's gemm_ggml_q8_types: codes 0..31, non-negative int8
// for SDOT as int4's are.
void gemm_ggml_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const Matrix& a, int64_t b0, int64_t b1, const Buffers8da4w& buf) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64, bs = std::min<int64_t>(64, a.N - n0);
    unpack_codes_block(a, K, n0, buf.wbuf, buf.sbuf);
    gemm_unpacked(q, d, e, M, K, 32, buf.wbuf, buf.sbuf, 128, 64, buf.f);
    for (int64_t m = 0; m < M; ++m)
      std::memcpy(a.y + m * a.ldy + n0, buf.f + m * 64, bs * sizeof(float));
  }
}

}  // namespace torchchat::cpu::neon
