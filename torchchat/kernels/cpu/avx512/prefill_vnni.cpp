// int4 prefill with AVX512-VNNI (and VBMI's byte permutes): the many-row GEMMs in integers.
// gemm_int4_q8 (weight-only int4, zero points) multiplies the codes by activations quantized to
// 8 bits per 32 values, as llama.cpp's Q4_0 x Q8_0 (kernels.h gives the sum). 8da4w, as
// the format intends: activations quantized per token to int8 (q, scale s_a, zero z_a), weights
// int4 symmetric per group (codes c = q_w + 8, scale s_w). With u = q + 128 (unsigned) and
// w = c - 8 (signed), vpdpbusd sums 4 products u * w per 32-bit lane -- twice the products per
// instruction of vdpbf16ps --, so per group g
//   I_g = sum_k u_k w_k,   sum_k (q_k - z_a) w_k = I_g - (128 + z_a) W_g,   W_g = sum_k w_k
//   y = s_a * (sum_g s_w,g I_g - (128 + z_a) R),   R = sum_g s_w,g W_g  (per output row).
// The integer sums are exact; the float path (fake-quantized activations rounded to bf16, a bf16
// GEMM) rounds twice more. Each 64-row block of torch's int4 pack layout is first unpacked into
// a per-thread buffer in the operand layout (for every 4 k, 16 rows x 4 bytes per vector); a
// group of it then stays in L1 while every token passes over it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "../common/ggml_codes.h"
#include "vec.h"

namespace torchchat::cpu::avx512 {
namespace {

// Block rows n0..n0 + 64 (bs of them real) -> wbuf[K/4][4][64 bytes] (rows 16v + lane, k 4kq + t
// at byte 4 lane + t). kSigned (8da4w): w = c - 8, scales sbuf[G][64] fp32 and
// r[64] = sum_g s_w,g W_g. Else (gemm_int4_q8): the codes c, sbuf[G][2][64] = s, z - 8 s.
template <bool kSigned>
void unpack_int4_block(const uint8_t* w, const bf16_t* sz, int64_t N, int64_t K, int64_t group,
                       int64_t n0, int8_t* wbuf, float* sbuf, float* r) {
  constexpr int8_t kOffset = kSigned ? 8 : 0;
  const int64_t bs = std::min<int64_t>(64, N - n0), G = K / group;
  const uint8_t* blk = w + n0 * (K / 2);
  if (bs < 64) {  // a short last block: byte d of each k holds rows 2d (low), 2d + 1 (high)
    const int64_t half = bs / 2;
    std::memset(wbuf, 0, K * 64);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < bs; ++i) {
        const uint8_t byte = blk[k * half + i / 2];
        wbuf[(k / 4) * 256 + (i / 16) * 64 + (i % 16) * 4 + k % 4] =
            (int8_t)((i % 2 ? byte >> 4 : byte & 15) - kOffset);
      }
    if constexpr (!kSigned) {
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < 64; ++i) {
          const float sc = i < bs ? (float)sz[(g * N + n0 + i) * 2] : 0.0f;
          const float z = i < bs ? (float)sz[(g * N + n0 + i) * 2 + 1] : 0.0f;
          sbuf[g * 128 + i] = sc;
          sbuf[g * 128 + 64 + i] = z - 8.0f * sc;
        }
      return;
    }
    for (int64_t i = 0; i < 64; ++i) {
      float t = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t wsum = 0;
        for (int64_t k = g * group; k < (g + 1) * group; ++k)
          wsum += wbuf[(k / 4) * 256 + (i / 16) * 64 + (i % 16) * 4 + k % 4];
        sbuf[g * 64 + i] = i < bs ? (float)sz[(g * N + n0 + i) * 2] : 0.0f;
        t += sbuf[g * 64 + i] * (float)wsum;
      }
      r[i] = t;
    }
    return;
  }
  // lane j of p0: bytes j and 32 + j (rows j, j + 32 in low/high nibbles) at k, k + 1 (from a)
  // and k + 2, k + 3 (from b); p1: rows 16 + j, 48 + j.
  alignas(64) uint8_t idx[2][64];
  for (int v = 0; v < 2; ++v)
    for (int j = 0; j < 16; ++j) {
      idx[v][4 * j] = (uint8_t)(16 * v + j);
      idx[v][4 * j + 1] = (uint8_t)(32 + 16 * v + j);
      idx[v][4 * j + 2] = (uint8_t)(64 + 16 * v + j);
      idx[v][4 * j + 3] = (uint8_t)(96 + 16 * v + j);
    }
  const __m512i i0 = _mm512_load_si512((const void*)idx[0]);
  const __m512i i1 = _mm512_load_si512((const void*)idx[1]);
  const __m512i low4 = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(kOffset);
  const __m512i ones = _mm512_set1_epi8(1);
  __m512 rv[4];
  for (int v = 0; v < 4; ++v) rv[v] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i wsum[4];  // W_g of rows 16v + lane
    for (int v = 0; v < 4; ++v) wsum[v] = _mm512_setzero_si512();
    for (int64_t kq = g * group / 4; kq < (g + 1) * group / 4; ++kq) {
      const __m512i a = _mm512_loadu_si512((const void*)(blk + kq * 128));
      const __m512i b = _mm512_loadu_si512((const void*)(blk + kq * 128 + 64));
      const __m512i p0 = _mm512_permutex2var_epi8(a, i0, b);
      const __m512i p1 = _mm512_permutex2var_epi8(a, i1, b);
      const __m512i q[4] = {  // rows 0-15, 16-31, 32-47, 48-63
          _mm512_sub_epi8(_mm512_and_si512(p0, low4), eight),
          _mm512_sub_epi8(_mm512_and_si512(p1, low4), eight),
          _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(p0, 4), low4), eight),
          _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(p1, 4), low4), eight)};
      for (int v = 0; v < 4; ++v) {
        _mm512_store_si512(wbuf + kq * 256 + v * 64, q[v]);
        if constexpr (kSigned) wsum[v] = _mm512_dpbusd_epi32(wsum[v], ones, q[v]);
      }
    }
    for (int v = 0; v < 4; ++v) {  // rows 16v..: (scale, zero) pairs, the scale the low half
      const __m512i sv = _mm512_loadu_si512((const void*)(sz + (g * N + n0 + 16 * v) * 2));
      const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(sv, 16));
      if constexpr (kSigned) {
        _mm512_store_ps(sbuf + g * 64 + v * 16, sc);
        rv[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(wsum[v]), sc, rv[v]);
      } else {  // z - 8 s: 8 s is exact, one rounding as the reference's
        const __m512 z = _mm512_castsi512_ps(
            _mm512_and_si512(sv, _mm512_set1_epi32((int)0xFFFF0000u)));
        _mm512_store_ps(sbuf + g * 128 + v * 16, sc);
        _mm512_store_ps(sbuf + g * 128 + 64 + v * 16,
                        _mm512_sub_ps(z, _mm512_mul_ps(_mm512_set1_ps(8.0f), sc)));
      }
    }
  }
  if constexpr (kSigned)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(r + v * 16, rv[v]);
}

// One group (kq0..kq0 + group/4) of MR tokens x the 64 rows of an unpacked block, added into
// their fp32 sums f[m][0..64): 4 x MR integer sums in registers, the group's weights (2 KB for
// group 32) read from L1 by every MR tokens in turn.
template <int MR>
inline void gemm_8da4w_group(const uint8_t* u, int64_t K, int64_t kq0, int64_t nkq,
                             const int8_t* wbuf, const float* sw, float* f) {
  __m512i acc[MR][4];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int64_t kq = kq0; kq < kq0 + nkq; ++kq) {
    const int8_t* wq = wbuf + kq * 256;
    const __m512i w0 = _mm512_load_si512(wq), w1 = _mm512_load_si512(wq + 64);
    const __m512i w2 = _mm512_load_si512(wq + 128), w3 = _mm512_load_si512(wq + 192);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      int32_t four;
      std::memcpy(&four, u + m * K + kq * 4, 4);
      const __m512i a = _mm512_set1_epi32(four);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], a, w0);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], a, w1);
      acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], a, w2);
      acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], a, w3);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
    const __m512 s = _mm512_loadu_ps(sw + v * 16);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
      _mm512_store_ps(f + m * 64 + v * 16,
                      _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][v]), s,
                                      _mm512_load_ps(f + m * 64 + v * 16)));
  }
}

// One 32-value block (8 kq from kq0) of MR tokens x the 64 rows of a block unpacked as codes:
// vpdpbusd of the codes (unsigned) with the tokens' 8-bit values (signed), exact, then
// f += I s d and f += (z - 8 s) e per row, the tokens' d and e for this block nb apart.
template <int MR>
inline void gemm_q8_block(const int8_t* q, int64_t K, int64_t kq0, const int8_t* wbuf,
                          const float* s, const float* z, const float* d, const float* e,
                          int64_t nb, float* f) {
  __m512i acc[MR][4];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int64_t kq = kq0; kq < kq0 + 8; ++kq) {
    const int8_t* wq = wbuf + kq * 256;
    const __m512i w0 = _mm512_load_si512(wq), w1 = _mm512_load_si512(wq + 64);
    const __m512i w2 = _mm512_load_si512(wq + 128), w3 = _mm512_load_si512(wq + 192);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      int32_t four;
      std::memcpy(&four, q + m * K + kq * 4, 4);
      const __m512i a = _mm512_set1_epi32(four);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], w0, a);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], w1, a);
      acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], w2, a);
      acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], w3, a);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
    const __m512 sv = _mm512_loadu_ps(s + v * 16), zv = _mm512_loadu_ps(z + v * 16);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      float* fm = f + m * 64 + v * 16;
      const __m512 sd = _mm512_mul_ps(sv, _mm512_set1_ps(d[m * nb]));
      const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][v]), sd, _mm512_load_ps(fm));
      _mm512_store_ps(fm, _mm512_fmadd_ps(zv, _mm512_set1_ps(e[m * nb]), t));
    }
  }
}

}  // namespace

// x (M, Kx) fp32 -> u (M, K) = per-token int8 codes + 128 (columns past Kx: the zero point,
// they meet zero weights), scales sa and zero points za, exactly as
// torchchat.quant.primitives.quantize_per_token_int8: the same fp32 min/max, IEEE division and
// round half to even.
void quantize_rows_8da4w(const float* xp, int64_t Kx, int64_t K, uint8_t* u, float* sa, float* za,
                         int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = xp + m * Kx;
    __m512 lo16 = _mm512_setzero_ps(), hi16 = _mm512_setzero_ps();
    for (int64_t k = 0; k < Kx; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(mask16(Kx - k), row + k);  // zeros past Kx
      lo16 = _mm512_min_ps(lo16, v);
      hi16 = _mm512_max_ps(hi16, v);
    }
    const float lo = _mm512_reduce_min_ps(lo16), hi = _mm512_reduce_max_ps(hi16);
    const float scale = std::max((hi - lo) / 255.0f, std::numeric_limits<float>::epsilon());
    const float zero = std::clamp(-128.0f - std::nearbyint(lo / scale), -128.0f, 127.0f);
    const __m512 sv = _mm512_set1_ps(scale), zv = _mm512_set1_ps(zero + 128.0f);
    const __m512 qmin = _mm512_setzero_ps(), qmax = _mm512_set1_ps(255.0f);
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 in = mask16(Kx - k);
      const __m512 v = _mm512_maskz_loadu_ps(in, row + k);
      const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, sv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 q = _mm512_mask_blend_ps(in, zv, _mm512_add_ps(r, zv));
      const __m512i qi = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, qmin), qmax));
      _mm_storeu_si128((__m128i*)(u + m * K + k), _mm512_cvtepi32_epi8(qi));
    }
    sa[m] = scale;
    za[m] = zero;
  }
}

void gemm_8da4w(const uint8_t* u, int64_t M, int64_t K, const float* sa, const float* za,
                const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                int64_t b0, int64_t b1, const Buffers8da4w& buf) {
  constexpr int MR = 4;
  int8_t* wbuf = buf.wbuf;
  float *f = buf.f, *sbuf = buf.sbuf;
  alignas(64) float r[64];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64, bs = std::min<int64_t>(64, N - n0);
    unpack_int4_block<true>(w, sz, N, K, group, n0, wbuf, sbuf, r);
    std::memset(f, 0, M * 64 * sizeof(float));
    // 64 tokens at a time: their fp32 sums (16 KB) stay in L1 across the groups
    for (int64_t mb = 0; mb < M; mb += 64) {
      const int64_t me = std::min<int64_t>(M, mb + 64);
      for (int64_t g = 0; g < K / group; ++g) {
        const int64_t kq0 = g * group / 4, nkq = group / 4;
        const float* sw = sbuf + g * 64;
        int64_t m = mb;
        for (; m + MR <= me; m += MR)
          gemm_8da4w_group<MR>(u + m * K, K, kq0, nkq, wbuf, sw, f + m * 64);
        switch (me - m) {
          case 3: gemm_8da4w_group<3>(u + m * K, K, kq0, nkq, wbuf, sw, f + m * 64); break;
          case 2: gemm_8da4w_group<2>(u + m * K, K, kq0, nkq, wbuf, sw, f + m * 64); break;
          case 1: gemm_8da4w_group<1>(u + m * K, K, kq0, nkq, wbuf, sw, f + m * 64); break;
          default: break;
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {  // y = s_a * (f - (128 + z_a) * R)
      const __m512 s = _mm512_set1_ps(sa[m]), c = _mm512_set1_ps(128.0f + za[m]);
      for (int v = 0; v < 4 && v * 16 < bs; ++v) {
        const __m512 out = _mm512_mul_ps(
            s, _mm512_fnmadd_ps(c, _mm512_load_ps(r + v * 16),
                                _mm512_load_ps(f + m * 64 + v * 16)));
        _mm512_mask_storeu_ps(y + m * N + n0 + v * 16, mask16(bs - v * 16), out);
      }
    }
  }
}

void quantize_rows_q8(const float* xp, int64_t Kx, int64_t K, int8_t* q, float* d, float* e,
                      int64_t m0, int64_t m1) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = xp + m * Kx;
    for (int64_t k = 0; k < K; k += 32) {
      const __m512 v0 = _mm512_maskz_loadu_ps(mask16(Kx - k), row + k);  // zeros past Kx
      const __m512 v1 = _mm512_maskz_loadu_ps(mask16(Kx - k - 16), row + k + 16);
      // an inf or NaN makes v * 0 NaN
      const float bad = _mm512_reduce_add_ps(
          _mm512_add_ps(_mm512_mul_ps(v0, zero), _mm512_mul_ps(v1, zero)));
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const bool finite = bad == 0.0f;
      const float db = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
      int32_t sum = 0;
      if (finite && db > 0.0f) {
        const __m512 dv = _mm512_set1_ps(db);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(
            _mm512_div_ps(v0, dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(
            _mm512_div_ps(v1, dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128((__m128i*)(q + m * K + k), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i*)(q + m * K + k + 16), _mm512_cvtepi32_epi8(q1));
        sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      } else {
        std::memset(q + m * K + k, 0, 32);
      }
      d[m * (K / 32) + k / 32] = db;
      e[m * (K / 32) + k / 32] = db * (float)sum;
    }
  }
}

namespace {

// The GEMM of gemm_int4_q8 and gemm_ggml_q8 on an unpacked block: f (M x 64) = the 64 rows' sums for
// every token, scales sbuf[g][2][64] (s, z - 8 s) per group of `group` values.
void gemm_q8_unpacked(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                      int64_t group, const int8_t* wbuf, const float* sbuf, float* f) {
  constexpr int MR = 4;
  const int64_t nb = K / 32;
  std::memset(f, 0, M * 64 * sizeof(float));
  // 64 tokens at a time: their fp32 sums (16 KB) stay in L1 across the blocks
  for (int64_t mb = 0; mb < M; mb += 64) {
    const int64_t me = std::min<int64_t>(M, mb + 64);
    for (int64_t j = 0; j < nb; ++j) {
      const float* s = sbuf + (j * 32 / group) * 128;
      int64_t m = mb;
      for (; m + MR <= me; m += MR)
        gemm_q8_block<MR>(q + m * K, K, j * 8, wbuf, s, s + 64, d + m * nb + j, e + m * nb + j,
                          nb, f + m * 64);
      const int64_t left = me - m;
      if (left == 3)
        gemm_q8_block<3>(q + m * K, K, j * 8, wbuf, s, s + 64, d + m * nb + j, e + m * nb + j,
                         nb, f + m * 64);
      else if (left == 2)
        gemm_q8_block<2>(q + m * K, K, j * 8, wbuf, s, s + 64, d + m * nb + j, e + m * nb + j,
                         nb, f + m * 64);
      else if (left == 1)
        gemm_q8_block<1>(q + m * K, K, j * 8, wbuf, s, s + 64, d + m * nb + j, e + m * nb + j,
                         nb, f + m * 64);
    }
  }
}

void store_block(const float* f, int64_t M, int64_t N, int64_t n0, int64_t bs, float* y) {
  for (int64_t m = 0; m < M; ++m)
    for (int v = 0; v < 4 && v * 16 < bs; ++v)
      _mm512_mask_storeu_ps(y + m * N + n0 + v * 16, mask16(bs - v * 16),
                            _mm512_load_ps(f + m * 64 + v * 16));
}

// Rows n0..n0 + 64 (bs of them real) of a GGUF Q4_0 matrix (rows ld bytes apart; per 32 values
// an fp16 scale d and 16 bytes, value j in byte j's low nibble, value 16 + j in its high) ->
// wbuf in unpack_int4_block's layout (codes 0..15) and sbuf[b][2][64] = d, -8 d per block:
// w = d (c - 8). 16 rows at a time by 32-bit gathers (4 bytes of each row: 4 values' low and 4
// values' high nibbles); rows past bs: codes and scales 0.
void unpack_q4_0_block(const uint8_t* w, int64_t ld, int64_t N, int64_t K, int64_t n0,
                       int8_t* wbuf, float* sbuf) {
  const int64_t bs = std::min<int64_t>(64, N - n0), nb = K / 32;
  const __m512i low4 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32((int32_t)ld));
  for (int v = 0; v < 4; ++v) {
    const __mmask16 live = mask16(bs - 16 * v);
    const uint8_t* rows = w + (n0 + 16 * v) * ld;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = rows + b * 18;
      const __m512i dw = _mm512_mask_i32gather_epi32(zero, live, idx, blk, 1);
      const __m512 sc = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dw));  // the low halves: d
      _mm512_store_ps(sbuf + b * 128 + 16 * v, sc);
      _mm512_store_ps(sbuf + b * 128 + 64 + 16 * v, _mm512_mul_ps(_mm512_set1_ps(-8.0f), sc));
      for (int j = 0; j < 4; ++j) {
        const __m512i g = _mm512_mask_i32gather_epi32(zero, live, idx, blk + 2 + 4 * j, 1);
        _mm512_store_si512(wbuf + (b * 8 + j) * 256 + v * 64, _mm512_and_si512(g, low4));
        _mm512_store_si512(wbuf + (b * 8 + 4 + j) * 256 + v * 64,
                           _mm512_and_si512(_mm512_srli_epi32(g, 4), low4));
      }
    }
  }
}

// Rows n0..n0 + 64 (bs of them real) of a GGUF Q8_0 matrix (rows ld bytes apart; per 32 values
// an fp16 scale d and 32 int8 values) -> wbuf as unpack_q4_0_block's with codes q + 128 (bytes
// vpdpbusd reads as unsigned) and sbuf[b][2][64] = d, -128 d: w = d (c - 128).
void unpack_q8_0_block(const uint8_t* w, int64_t ld, int64_t N, int64_t K, int64_t n0,
                       int8_t* wbuf, float* sbuf) {
  const int64_t bs = std::min<int64_t>(64, N - n0), nb = K / 32;
  const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32((int32_t)ld));
  for (int v = 0; v < 4; ++v) {
    const __mmask16 live = mask16(bs - 16 * v);
    const uint8_t* rows = w + (n0 + 16 * v) * ld;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = rows + b * 34;
      const __m512i dw = _mm512_mask_i32gather_epi32(zero, live, idx, blk, 1);
      const __m512 sc = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dw));
      _mm512_store_ps(sbuf + b * 128 + 16 * v, sc);
      _mm512_store_ps(sbuf + b * 128 + 64 + 16 * v, _mm512_mul_ps(_mm512_set1_ps(-128.0f), sc));
      for (int j = 0; j < 8; ++j) {  // rows past bs: code 128 (weight 0), scale 0
        const __m512i g = _mm512_mask_i32gather_epi32(zero, live, idx, blk + 2 + 4 * j, 1);
        _mm512_store_si512(wbuf + (b * 8 + j) * 256 + v * 64, _mm512_xor_si512(g, flip));
      }
    }
  }
}

// Rows n0..n0 + 64 of an int8 matrix (rows a.ld apart, scales S per row or per group) -> wbuf
// as unpack_q8_0_block's (codes w + 128) and sbuf[g][2][64] = s, -128 s for each of the G
// groups; rows past a.N: code 128 (weight 0), scale 0.
template <typename S>
void unpack_int8_block(const Matrix& a, int64_t K, int64_t G, int64_t n0, int8_t* wbuf,
                       float* sbuf) {
  const int64_t bs = std::min<int64_t>(64, a.N - n0);
  const auto* s = static_cast<const S*>(a.s);
  const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i idx = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int32_t)a.ld));
  for (int v = 0; v < 4; ++v) {
    const __mmask16 live = mask16(bs - 16 * v);
    const int8_t* rows = static_cast<const int8_t*>(a.w) + (n0 + 16 * v) * a.ld;
    for (int64_t g = 0; g < G; ++g) {
      float sc[16];
      for (int64_t i = 0; i < 16; ++i)
        sc[i] = i < bs - 16 * v ? (float)s[(n0 + 16 * v + i) * G + g] : 0.0f;
      const __m512 sv = _mm512_loadu_ps(sc);
      _mm512_store_ps(sbuf + g * 128 + 16 * v, sv);
      _mm512_store_ps(sbuf + g * 128 + 64 + 16 * v, _mm512_mul_ps(_mm512_set1_ps(-128.0f), sv));
    }
    for (int64_t kq = 0; kq < K / 4; ++kq) {
      const __m512i c = _mm512_mask_i32gather_epi32(zero, live, idx, rows + 4 * kq, 1);
      _mm512_store_si512(wbuf + kq * 256 + v * 64, _mm512_xor_si512(c, flip));
    }
  }
}

inline int64_t row_lane(int64_t r) { return r; }

// Rows n0..n0 + 64 of a GGUF matrix of a type of gemm_ggml_q8_types (blocks of 32) -> wbuf in
// unpack_q4_0_block's layout (row r's 4 codes of k 4 kq.. at byte 256 kq + 4 r, unsigned) and
// sbuf[b][2][64] = (s, z) per block; rows past a.N: codes and scales 0. 256 values of the 64
// rows at a time decoded into a 16 KB buffer, then moved by 32-bit gathers of 16 rows.
void unpack_codes_block(const Matrix& a, int64_t K, int64_t n0, int8_t* wbuf, float* sbuf) {
  const int64_t bs = std::min<int64_t>(64, a.N - n0);
  alignas(64) uint8_t codes[64][256];
  if (bs < 64) std::memset(codes[bs], 0, (64 - bs) * 256);
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(256));
  for (int64_t u0 = 0; u0 < K; u0 += 256) {
    const int64_t values = std::min<int64_t>(256, K - u0);
    ggml_rows_codes<half_at, row_lane>(a, n0, bs, u0, values, codes, sbuf + u0 / 32 * 128);
    for (int64_t kq = 0; kq < values / 4; ++kq)
      for (int v = 0; v < 4; ++v)
        _mm512_store_si512(wbuf + (u0 / 4 + kq) * 256 + v * 64,
                           _mm512_i32gather_epi32(idx, codes[16 * v] + 4 * kq, 1));
  }
}

}  // namespace

void gemm_int4_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                  int64_t b0, int64_t b1, const Buffers8da4w& buf) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64;
    unpack_int4_block<false>(w, sz, N, K, group, n0, buf.wbuf, buf.sbuf, nullptr);
    gemm_q8_unpacked(q, d, e, M, K, group, buf.wbuf, buf.sbuf, buf.f);
    store_block(buf.f, M, N, n0, std::min<int64_t>(64, N - n0), y);
  }
}

void gemm_ggml_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const Matrix& a, int64_t b0, int64_t b1, const Buffers8da4w& buf) {
  const auto* w = static_cast<const uint8_t*>(a.w);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64;
    if (a.type == kGgmlQ8_0)
      unpack_q8_0_block(w, a.ld, a.N, K, n0, buf.wbuf, buf.sbuf);
    else if (a.type == kGgmlQ4_0)
      unpack_q4_0_block(w, a.ld, a.N, K, n0, buf.wbuf, buf.sbuf);
    else
      unpack_codes_block(a, K, n0, buf.wbuf, buf.sbuf);
    gemm_q8_unpacked(q, d, e, M, K, 32, buf.wbuf, buf.sbuf, buf.f);
    store_block(buf.f, M, a.ldy, n0, std::min<int64_t>(64, a.N - n0), a.y);
  }
}

void gemm_int8_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  int64_t group, bool bf16_scales, const Matrix& a, int64_t b0, int64_t b1,
                  const Buffers8da4w& buf) {
  const int64_t G = group ? K / group : 1;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64;
    if (bf16_scales)
      unpack_int8_block<bf16_t>(a, K, G, n0, buf.wbuf, buf.sbuf);
    else
      unpack_int8_block<float>(a, K, G, n0, buf.wbuf, buf.sbuf);
    gemm_q8_unpacked(q, d, e, M, K, group ? group : K, buf.wbuf, buf.sbuf, buf.f);
    store_block(buf.f, M, a.ldy, n0, std::min<int64_t>(64, a.N - n0), a.y);
  }
}

}  // namespace torchchat::cpu::avx512
