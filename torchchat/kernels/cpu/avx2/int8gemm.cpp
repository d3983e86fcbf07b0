// int4 prefill in integers: gemm_int4_q8 (weight-only int4 on activations quantized to 8 bits
// per 32 values, kernels.h) and 8da4w's GEMM, as cpu/avx512/prefill_vnni.cpp derives it:
// activations quantized per token to u = q + 128 (unsigned bytes, scale s_a, zero z_a), int4
// weights w = c - 8 (signed), per group g and output row
//   I_g = sum_k u_k w_k,   y = s_a * (sum_g s_w,g I_g - (128 + z_a) R),   R = sum_g s_w,g W_g
// with W_g = sum_k w_k. AVX2 has no vpdpbusd: vpmaddubsw multiplies unsigned by signed bytes and
// adds adjacent pairs into int16 lanes (|u0 w0 + u1 w1| <= 255 * 8 * 2 = 4080: never
// saturates), and eight of those add up in int16 without overflow (8 * 4080 = 32640 < 32767)
// before vpmaddwd with ones widens them to int32. The integer sums are exact.
//
// Each 64-row block of torch's int4 pack layout is first unpacked into the per-thread buffer
// wbuf (K * 64 bytes): for every 4 k, 8 vectors of 8 rows x 4 bytes (k .. k + 3); byte
// interleaves work within 128-bit halves, so vector v's lane l is block row
// 32 (v / 4) + 4 (v % 4) + (l % 4) + 16 (l / 4) (row_of). A group of it stays in L1 while every
// token passes over it.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "../common/ggml_codes.h"
#include "vec.h"

namespace torchchat::cpu::avx2 {
namespace {

inline int64_t row_of(int64_t v, int64_t l) {
  return 32 * (v / 4) + 4 * (v % 4) + (l % 4) + 16 * (l / 4);
}

// Block rows n0..n0 + 64 (bs of them real) -> wbuf[K/4][8][8 lanes][4 bytes]. kSigned (8da4w):
// w = c - 8, scales sbuf[G][64] fp32 and r[64] = sum_g s_w,g W_g. Else (gemm_int4_q8): the
// codes c, sbuf[G][2][64] = s, z - 8 s. All in wbuf's lane order.
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
      for (int64_t v = 0; v < 8; ++v)
        for (int64_t l = 0; l < 8; ++l) {
          const int64_t i = row_of(v, l);
          if (i >= bs) continue;
          const uint8_t byte = blk[k * half + i / 2];
          wbuf[(k / 4) * 256 + v * 32 + l * 4 + k % 4] =
              (int8_t)((i % 2 ? byte >> 4 : byte & 15) - kOffset);
        }
    if constexpr (!kSigned) {
      for (int64_t g = 0; g < G; ++g)
        for (int64_t v = 0; v < 8; ++v)
          for (int64_t l = 0; l < 8; ++l) {
            const int64_t i = row_of(v, l);
            const float sc = i < bs ? scalar_bf16(sz[(g * N + n0 + i) * 2]) : 0.0f;
            const float z = i < bs ? scalar_bf16(sz[(g * N + n0 + i) * 2 + 1]) : 0.0f;
            sbuf[g * 128 + v * 8 + l] = sc;
            sbuf[g * 128 + 64 + v * 8 + l] = z - 8.0f * sc;
          }
      return;
    }
    for (int64_t v = 0; v < 8; ++v)
      for (int64_t l = 0; l < 8; ++l) {
        const int64_t i = row_of(v, l);
        float t = 0.0f;
        for (int64_t g = 0; g < G; ++g) {
          int32_t wsum = 0;
          for (int64_t k = g * group; k < (g + 1) * group; ++k)
            wsum += wbuf[(k / 4) * 256 + v * 32 + l * 4 + k % 4];
          const float s = i < bs ? scalar_bf16(sz[(g * N + n0 + i) * 2]) : 0.0f;
          sbuf[g * 64 + v * 8 + l] = s;
          t += s * (float)wsum;
        }
        r[v * 8 + l] = t;
      }
    return;
  }
  const __m256i low4 = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(kOffset);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  __m256 rv[8];
#pragma GCC unroll 8
  for (int v = 0; v < 8; ++v) rv[v] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i wsum[8];  // W_g of the lanes' rows
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) wsum[v] = _mm256_setzero_si256();
    for (int64_t kq = g * group / 4; kq < (g + 1) * group / 4; ++kq) {
      __m256i a[4];
#pragma GCC unroll 8
      for (int t = 0; t < 4; ++t)
        a[t] = _mm256_loadu_si256((const __m256i*)(blk + (4 * kq + t) * 32));
#pragma GCC unroll 8
      for (int n = 0; n < 2; ++n) {  // low nibbles: rows 0-31; high: 32-63
        __m256i x[4];
#pragma GCC unroll 8
        for (int t = 0; t < 4; ++t)
          x[t] = _mm256_sub_epi8(
              _mm256_and_si256(n ? _mm256_srli_epi16(a[t], 4) : a[t], low4), eight);
        // (row, k k+1) byte pairs, then (row, k..k+3) quadruples
        const __m256i lo01 = _mm256_unpacklo_epi8(x[0], x[1]);
        const __m256i hi01 = _mm256_unpackhi_epi8(x[0], x[1]);
        const __m256i lo23 = _mm256_unpacklo_epi8(x[2], x[3]);
        const __m256i hi23 = _mm256_unpackhi_epi8(x[2], x[3]);
        const __m256i q[4] = {
            _mm256_unpacklo_epi16(lo01, lo23), _mm256_unpackhi_epi16(lo01, lo23),
            _mm256_unpacklo_epi16(hi01, hi23), _mm256_unpackhi_epi16(hi01, hi23)};
#pragma GCC unroll 8
        for (int i = 0; i < 4; ++i) {
          const int v = 4 * n + i;
          _mm256_store_si256((__m256i*)(wbuf + kq * 256 + v * 32), q[i]);
          if constexpr (kSigned)
            wsum[v] = _mm256_add_epi32(
                wsum[v], _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q[i]), ones16));
        }
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) {  // (scale, zero) pairs, the scale the low half
      const bf16_t* p = sz + (g * N + n0 + row_of(v, 0)) * 2;
      const __m256i sv = _mm256_loadu2_m128i((const __m128i*)(p + 32), (const __m128i*)p);
      const __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(sv, 16));
      if constexpr (kSigned) {
        _mm256_store_ps(sbuf + g * 64 + v * 8, sc);
        rv[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(wsum[v]), sc, rv[v]);
      } else {  // z - 8 s: 8 s is exact, one rounding as the reference's
        const __m256 z = _mm256_castsi256_ps(
            _mm256_and_si256(sv, _mm256_set1_epi32((int)0xFFFF0000u)));
        _mm256_store_ps(sbuf + g * 128 + v * 8, sc);
        _mm256_store_ps(sbuf + g * 128 + 64 + v * 8,
                        _mm256_sub_ps(z, _mm256_mul_ps(_mm256_set1_ps(8.0f), sc)));
      }
    }
  }
  if constexpr (kSigned) {
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) _mm256_storeu_ps(r + v * 8, rv[v]);
  }
}

// One group (kq0..kq0 + nkq) of one token x the 32 rows of vectors v0..v0 + 3 of an unpacked
// block, added into the token's fp32 sums f[0..64): 8 k at a time summed in int16, then
// widened. (One token a call: two or four, sharing each weight load, ran out of registers and
// measured 25% slower; the weights come from L1 either way.)
inline void gemm_8da4w_group(const uint8_t* u, int64_t kq0, int64_t nkq, const int8_t* wbuf,
                             int v0, const float* sw, float* f) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i acc[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) acc[i] = _mm256_setzero_si256();
  for (int64_t c0 = kq0; c0 < kq0 + nkq; c0 += 8) {
    const int64_t c1 = std::min(c0 + 8, kq0 + nkq);
    __m256i s16[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) s16[i] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int64_t kq = c0; kq < c1; ++kq) {
      const int8_t* wq = wbuf + kq * 256 + v0 * 32;
      int32_t four;
      std::memcpy(&four, u + kq * 4, 4);
      const __m256i a = _mm256_set1_epi32(four);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i)
        s16[i] = _mm256_add_epi16(
            s16[i], _mm256_maddubs_epi16(a, _mm256_load_si256((const __m256i*)(wq + 32 * i))));
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(s16[i], ones16));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    float* fi = f + (v0 + i) * 8;
    const __m256 s = _mm256_load_ps(sw + (v0 + i) * 8);
    _mm256_store_ps(fi, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]), s, _mm256_load_ps(fi)));
  }
}

// One group (kq0..kq0 + nkq, its 32-value blocks one after another) of one token x the 32 rows
// of vectors v0..v0 + 3 of a block unpacked as codes: vpmaddubsw of the codes (unsigned) with
// the token's 8-bit values (signed) sums byte pairs into int16 (|c0 q0 + c1 q1| <= 2 * 127
// c_max), widened by vpmaddwd every W of them while int16 holds their sum exactly (4-bit codes:
// 8 * 2 * 15 * 127 = 30480 < 32767, W = 8, a block's all; 5-bit: W = 4); then per block
// f += I s d and f += z e, the block's d and e from d[i], e[i]. (nkq comes from the group at
// run time: a constant count let the compiler hoist the block's 32 weight vectors out of the
// token loop and spill them, 0.6x the speed.)
template <int W>
__attribute__((always_inline)) inline void gemm_q8_group(const int8_t* q, int64_t kq0, int64_t nkq,
                                                        const int8_t* wbuf, int v0,
                          const float* s, const float* z, const float* d, const float* e,
                          float* f) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256 acc[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) acc[i] = _mm256_load_ps(f + (v0 + i) * 8);
  for (int64_t c0 = kq0; c0 < kq0 + nkq; c0 += 8) {
    __m256i s32[4];
#pragma GCC unroll 2
    for (int h = 0; h < 8 / W; ++h) {
      __m256i s16[4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) s16[i] = _mm256_setzero_si256();
      const int64_t c1 = std::min(c0 + (h + 1) * W, kq0 + nkq);  // always c0 + (h + 1) W
#pragma GCC unroll 8
      for (int64_t kq = c0 + h * W; kq < c1; ++kq) {
        const int8_t* wq = wbuf + kq * 256 + v0 * 32;
        int32_t four;
        std::memcpy(&four, q + kq * 4, 4);
        const __m256i a = _mm256_set1_epi32(four);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i)
          s16[i] = _mm256_add_epi16(
              s16[i], _mm256_maddubs_epi16(_mm256_load_si256((const __m256i*)(wq + 32 * i)), a));
      }
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m256i w = _mm256_madd_epi16(s16[i], ones16);
        s32[i] = h ? _mm256_add_epi32(s32[i], w) : w;
      }
    }
    const int64_t b = (c0 - kq0) / 8;
    const __m256 dv = _mm256_set1_ps(d[b]), ev = _mm256_set1_ps(e[b]);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256 sd = _mm256_mul_ps(_mm256_load_ps(s + (v0 + i) * 8), dv);
      const __m256 t = _mm256_cvtepi32_ps(s32[i]);
      acc[i] = _mm256_fmadd_ps(_mm256_load_ps(z + (v0 + i) * 8), ev, _mm256_fmadd_ps(t, sd, acc[i]));
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) _mm256_store_ps(f + (v0 + i) * 8, acc[i]);
}

// Rows of the unpacked block back in row order: f[m][v * 8 + l] is row row_of(v, l).
void store_block(const float* f, int64_t M, int64_t N, int64_t n0, int64_t bs, float* y) {
  for (int64_t m = 0; m < M; ++m)
    for (int v = 0; v < 8; ++v)
      for (int h = 0; h < 2; ++h) {  // lanes 4h..4h + 3: rows row_of(v, 4h) + 0..3
        const int64_t i = row_of(v, 4 * h);
        const float* src = f + m * 64 + v * 8 + 4 * h;
        float* dst = y + m * N + n0 + i;
        if (i + 4 <= bs)
          std::memcpy(dst, src, 16);
        else
          for (int64_t j = 0; i + j < bs; ++j) dst[j] = src[j];
      }
}

inline float hmin(__m256 v) {
  __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_min_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_min_ss(s, _mm_movehdup_ps(s)));
}

// A few tokens (decode): torch's layout read in place, no unpacked copy. Rows r and 32 + r of a
// k share byte r of its 32; vpunpck{l,h}bw of the bytes of k and k + 1 put each row's (k, k + 1)
// byte pair in one 16-bit lane -- lane j of a 128-bit half holds row j (low half) or 16 + j
// (high) of the unpacklo, 8 + j or 24 + j of the unpackhi; the low nibbles are rows 0-31's codes,
// the high ones rows 32-63's -- and one vpmaddubsw of those codes (unsigned) against the token's
// two 8-bit values (signed) adds the row's two products in its lane. 19 instructions for 64 bytes
// of codes (the bf16 kernel, int4.cpp: 48). Eight pairs add up in int16 exactly (8 * 2 * 15 * 127
// = 30480 < 32767) before they widen to int32. Same sums and fp32 steps as gemm_q8_group.
//
// The codes of k and k + 1 (64 bytes at blk + 32 k) as 4 vectors of 16 rows' byte pairs, rows
// {0-7, 16-23}, {8-15, 24-31}, {32-39, 48-55}, {40-47, 56-63}; and one token's two values
// there (x + k) broadcast to every 16-bit lane.
template <typename X>
inline __m256i pair_codes(const uint8_t* blk, const X* x, int64_t k, __m256i* c) {
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i a0 = _mm256_loadu_si256((const __m256i*)(blk + k * 32));
  const __m256i a1 = _mm256_loadu_si256((const __m256i*)(blk + k * 32 + 32));
  _mm_prefetch((const char*)(blk + k * 32 + kPrefetch), _MM_HINT_T0);  // a line a pair
  const __m256i lo = _mm256_unpacklo_epi8(a0, a1), hi = _mm256_unpackhi_epi8(a0, a1);
  c[0] = _mm256_and_si256(lo, low4);
  c[1] = _mm256_and_si256(hi, low4);
  c[2] = _mm256_and_si256(_mm256_srli_epi16(lo, 4), low4);
  c[3] = _mm256_and_si256(_mm256_srli_epi16(hi, 4), low4);
  int16_t two;
  std::memcpy(&two, x + k, 2);
  return _mm256_set1_epi16(two);
}

// The 4 vectors of int16 row sums (pair_codes' order) added into I (8 vectors of int32, rows
// 8v..8v + 7): s[i]'s halves are vectors 4 (i / 2) + i % 2 and that + 2.
inline void widen_rows(const __m256i* s, __m256i* I) {
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const int v = 4 * (i / 2) + i % 2;
    I[v] = _mm256_add_epi32(I[v], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s[i])));
    I[v + 2] = _mm256_add_epi32(I[v + 2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s[i], 1)));
  }
}

// One token's sums over 8 pairs from k0 (codes times its 8-bit values q), added into I.
inline void q8_pairs(const uint8_t* blk, const int8_t* q, int64_t k0, __m256i* I) {
  __m256i s[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) s[i] = _mm256_setzero_si256();
#pragma GCC unroll 8
  for (int p = 0; p < 8; ++p) {
    __m256i c[4];
    const __m256i x = pair_codes(blk, q, k0 + 2 * p, c);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) s[i] = _mm256_add_epi16(s[i], _mm256_maddubs_epi16(c[i], x));
  }
  widen_rows(s, I);
}

// The (scale, zero) pairs of a block's 64 rows for one group: 4 cache lines.
inline void prefetch_pairs(const bf16_t* p) {
  for (int q = 0; q < 4; ++q) _mm_prefetch((const char*)(p + q * 32), _MM_HINT_T0);
}

// One full 64-row block (torch's layout at blk) for one token: out (64, row order) = its sums.
void int4_q8_block(const uint8_t* blk, const int8_t* q, const float* d, const float* e,
                   int64_t K, int64_t group, const bf16_t* sz, bool blocked, int64_t N,
                   int64_t n0, float* out) {
  const int64_t G = K / group;
  const __m256 eight = _mm256_set1_ps(8.0f);
  const __m256i high16 = _mm256_set1_epi32((int)0xFFFF0000u);
  for (int v = 0; v < 8; ++v) _mm256_store_ps(out + 8 * v, _mm256_setzero_ps());
  for (int64_t b = 0; b < K / 32; ++b) {
    __m256i I[8];
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) I[v] = _mm256_setzero_si256();
    if (!blocked && b + 2 < K / 32)  // torch's layout: a group's scales are N * 4 bytes apart
      prefetch_pairs(sz + int4_scale_offset(false, (b + 2) * 32 / group, G, N, n0, 64));
    q8_pairs(blk, q, b * 32, I);
    q8_pairs(blk, q, b * 32 + 16, I);
    const bf16_t* szg = sz + int4_scale_offset(blocked, b * 32 / group, G, N, n0, 64);
    const __m256 dv = _mm256_set1_ps(d[b]), ev = _mm256_set1_ps(e[b]);
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) {  // (scale, zero) pairs of rows 8v..8v + 7, the scale low
      const __m256i sv = _mm256_loadu_si256((const __m256i*)(szg + 16 * v));
      const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(sv, 16));
      const __m256 z = _mm256_fnmadd_ps(eight, s, _mm256_castsi256_ps(_mm256_and_si256(sv, high16)));
      const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I[v]), _mm256_mul_ps(s, dv),
                                       _mm256_load_ps(out + 8 * v));
      _mm256_store_ps(out + 8 * v, _mm256_fmadd_ps(z, ev, f));
    }
  }
}

// 8da4w's sums for a few tokens, as int4_q8_block reads the codes: the token's unsigned values
// u (pairs broadcast) times the codes c as signed bytes (c <= 15) by vpmaddubsw, four pairs in
// int16 (4 * 2 * 255 * 15 = 30600 < 32767); per group I_g = sum u c - 8 U_g (U_g: the token's sum
// of u over the group) is gemm_8da4w's sum u (c - 8), exactly. kSums: also R = sum_g s_g W_g
// (W_g = sum (c - 8), the codes' byte sums over 4 pairs widened by vpmaddubsw with ones) into r.
// f (64, row order) = sum_g s_g I_g in gemm_8da4w_group's order.
template <bool kSums>
void int4_8da4w_block(const uint8_t* blk, const uint8_t* u, const int32_t* U, int64_t K,
                      int64_t group, const bf16_t* sz, bool blocked, int64_t N, int64_t n0,
                      float* f, float* r) {
  const int64_t G = K / group;
  const __m256i ones8 = _mm256_set1_epi8(1);
  for (int v = 0; v < 8; ++v) {
    _mm256_store_ps(f + 8 * v, _mm256_setzero_ps());
    if (kSums) _mm256_store_ps(r + 8 * v, _mm256_setzero_ps());
  }
  for (int64_t g = 0; g < G; ++g) {
    __m256i I[8], w16[4];
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) I[v] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) w16[i] = _mm256_setzero_si256();
    if (!blocked && g + 2 < G)  // torch's layout: a group's scales are N * 4 bytes apart
      prefetch_pairs(sz + int4_scale_offset(false, g + 2, G, N, n0, 64));
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 8) {
      __m256i s[4], c8[4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) s[i] = c8[i] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        __m256i c[4];
        const __m256i x = pair_codes(blk, u, k0 + 2 * p, c);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          s[i] = _mm256_add_epi16(s[i], _mm256_maddubs_epi16(x, c[i]));
          if (kSums) c8[i] = _mm256_add_epi8(c8[i], c[i]);
        }
      }
      widen_rows(s, I);
      if (kSums)
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) w16[i] = _mm256_add_epi16(w16[i], _mm256_maddubs_epi16(c8[i], ones8));
    }
    const bf16_t* szg = sz + int4_scale_offset(blocked, g, G, N, n0, 64);
    const __m256i off = _mm256_set1_epi32(8 * U[g]);
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) {  // (scale, zero) pairs of rows 8v..8v + 7, the scale low
      const __m256 sc = _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(szg + 16 * v)), 16));
      const __m256 t = _mm256_cvtepi32_ps(_mm256_sub_epi32(I[v], off));
      _mm256_store_ps(f + 8 * v, _mm256_fmadd_ps(t, sc, _mm256_load_ps(f + 8 * v)));
      if (kSums) {
        const __m256i wv = w16[2 * (v / 4) + v % 2];  // the inverse of v = 4 (i / 2) + i % 2
        const __m128i h = (v / 2) % 2 ? _mm256_extracti128_si256(wv, 1) : _mm256_castsi256_si128(wv);
        const __m256i W = _mm256_sub_epi32(_mm256_cvtepi16_epi32(h),
                                           _mm256_set1_epi32((int)(8 * group)));
        _mm256_store_ps(r + 8 * v,
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(W), sc, _mm256_load_ps(r + 8 * v)));
      }
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
    __m256 lo8 = _mm256_setzero_ps(), hi8 = _mm256_setzero_ps();
    for (int64_t k = 0; k < Kx; k += 8) {
      const __m256 v = _mm256_maskload_ps(row + k, lanes(Kx - k));  // zeros past Kx
      lo8 = _mm256_min_ps(lo8, v);
      hi8 = _mm256_max_ps(hi8, v);
    }
    const float lo = hmin(lo8), hi = hmax(hi8);
    const float scale = std::max((hi - lo) / 255.0f, std::numeric_limits<float>::epsilon());
    const float zero = std::clamp(-128.0f - std::nearbyint(lo / scale), -128.0f, 127.0f);
    const __m256 sv = _mm256_set1_ps(scale), zv = _mm256_set1_ps(zero + 128.0f);
    const __m256 qmin = _mm256_setzero_ps(), qmax = _mm256_set1_ps(255.0f);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256i in = lanes(Kx - k);
      const __m256 v = _mm256_maskload_ps(row + k, in);
      const __m256 r = _mm256_round_ps(_mm256_div_ps(v, sv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 q = _mm256_blendv_ps(zv, _mm256_add_ps(r, zv), _mm256_castsi256_ps(in));
      const __m256i qi = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, qmin), qmax));
      const __m256i p16 = _mm256_packus_epi32(qi, qi);  // q0-3 q0-3 | q4-7 q4-7
      const __m256i p8 = _mm256_packus_epi16(p16, p16);
      const __m128i b8 =  // bytes q0-3 (low half), q4-7 (high half)
          _mm_unpacklo_epi32(_mm256_castsi256_si128(p8), _mm256_extracti128_si256(p8, 1));
      _mm_storel_epi64((__m128i*)(u + m * K + k), b8);
    }
    for (; k < K; ++k) {  // K not a multiple of 8 (ops.cpp asks for 16): as the reference
      const float q = k < Kx ? std::nearbyint(row[k] / scale) + zero + 128.0f : zero + 128.0f;
      u[m * K + k] = (uint8_t)std::clamp(q, 0.0f, 255.0f);
    }
    sa[m] = scale;
    za[m] = zero;
  }
}

void gemm_8da4w(const uint8_t* u, int64_t M, int64_t K, const float* sa, const float* za,
                const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                int64_t b0, int64_t b1, const Buffers8da4w& buf) {
  int8_t* wbuf = buf.wbuf;
  float *f = buf.f, *sbuf = buf.sbuf;
  alignas(32) float r[64];
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
        for (int v0 = 0; v0 < 8; v0 += 4)
          for (int64_t m = mb; m < me; ++m)
            gemm_8da4w_group(u + m * K, kq0, nkq, wbuf, v0, sw, f + m * 64);
      }
    }
    for (int64_t m = 0; m < M; ++m) {  // y = s_a * (f - (128 + z_a) * R)
      const __m256 s = _mm256_set1_ps(sa[m]), c = _mm256_set1_ps(128.0f + za[m]);
      for (int v = 0; v < 8; ++v) {
        float* fv = f + m * 64 + v * 8;
        _mm256_store_ps(fv, _mm256_mul_ps(s, _mm256_fnmadd_ps(c, _mm256_load_ps(r + v * 8),
                                                              _mm256_load_ps(fv))));
      }
    }
    store_block(f, M, N, n0, bs, y);
  }
}

// Decode's entries: full blocks token by token from the codes in place (int4_q8_block,
// int4_8da4w_block); a short last block (small layers only) through the reference's loops.
void linear_8da4w(const uint8_t* u, const float* sa, const float* za, int64_t M, int64_t K,
                  int64_t group, const Matrix& a, int64_t b0, int64_t b1) {
  const int64_t G = K / group;
  // Each token's sum of u over each group (malloc: no library templates in this folder)
  int32_t* U = static_cast<int32_t*>(std::malloc(M * G * sizeof(int32_t)));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      int32_t t = 0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) t += u[m * K + k];
      U[m * G + g] = t;
    }
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  const bf16_t* sz = static_cast<const bf16_t*>(a.s);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64;
    if (a.N - n0 < 64) {
      scalar_kernels().linear_8da4w(u, sa, za, M, K, group, a, b, b + 1);
      continue;
    }
    alignas(32) float f[64], r[64];
    for (int64_t m = 0; m < M; ++m) {
      if (m == 0)
        int4_8da4w_block<true>(w + n0 * (K / 2), u, U, K, group, sz, a.blocked, a.N, n0, f, r);
      else
        int4_8da4w_block<false>(w + n0 * (K / 2), u + m * K, U + m * G, K, group, sz, a.blocked,
                                a.N, n0, f, r);
      const __m256 s = _mm256_set1_ps(sa[m]), c = _mm256_set1_ps(128.0f + za[m]);
      for (int v = 0; v < 8; ++v)  // y = s_a * (f - (128 + z_a) * R), as gemm_8da4w
        _mm256_storeu_ps(a.y + m * a.ldy + n0 + 8 * v,
                         _mm256_mul_ps(s, _mm256_fnmadd_ps(c, _mm256_load_ps(r + 8 * v),
                                                           _mm256_load_ps(f + 8 * v))));
    }
  }
  std::free(U);
}

void linear_int4_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                    int64_t group, const Matrix& a, int64_t b0, int64_t b1) {
  const int64_t nb = K / 32;
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  const bf16_t* sz = static_cast<const bf16_t*>(a.s);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64;
    if (a.N - n0 < 64) {
      scalar_kernels().linear_int4_q8(q, d, e, M, K, group, a, b, b + 1);
      continue;
    }
    for (int64_t m = 0; m < M; ++m) {
      alignas(32) float out[64];
      int4_q8_block(w + n0 * (K / 2), q + m * K, d + m * nb, e + m * nb, K, group, sz, a.blocked,
                    a.N, n0, out);
      std::memcpy(a.y + m * a.ldy + n0, out, sizeof out);
    }
  }
}

void quantize_rows_q8(const float* xp, int64_t Kx, int64_t K, int8_t* q, float* d, float* e,
                      int64_t m0, int64_t m1) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = xp + m * Kx;
    for (int64_t k = 0; k < K; k += 32) {
      __m256 v[4], bad8 = zero, amax8 = zero;
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_maskload_ps(row + k + 8 * i, lanes(Kx - k - 8 * i));  // zeros past Kx
        bad8 = _mm256_add_ps(bad8, _mm256_mul_ps(v[i], zero));  // NaN if an inf or NaN
        amax8 = _mm256_max_ps(amax8, _mm256_and_ps(v[i], absmask));
      }
      const bool finite = hsum(bad8) == 0.0f;
      const float db = finite ? hmax(amax8) / 127.0f : std::numeric_limits<float>::quiet_NaN();
      int32_t sum = 0;
      if (finite && db > 0.0f) {
        const __m256 dv = _mm256_set1_ps(db);
        __m256i qi[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i)
          qi[i] = _mm256_cvtps_epi32(_mm256_round_ps(
              _mm256_div_ps(v[i], dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        // int32 -> int8 in order: packs interleave the 128-bit halves, the permute undoes it
        const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
        const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)(q + m * K + k), p8);
        const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]),
                                             _mm256_add_epi32(qi[2], qi[3]));
        alignas(32) int32_t t[8];
        _mm256_store_si256((__m256i*)t, s32);
        for (int i = 0; i < 8; ++i) sum += t[i];
      } else {
        std::memset(q + m * K + k, 0, 32);
      }
      d[m * (K / 32) + k / 32] = db;
      e[m * (K / 32) + k / 32] = db * (float)sum;
    }
  }
}

namespace {

// The GEMM of gemm_int4_q8 and gemm_ggml_q8 on an unpacked block: f (M x 64, wbuf's lane order) =
// the 64 rows' sums for every token over x's 32-value blocks, scales sbuf[g][2][64] (s, z) per
// group of `group`, int16 sums widened every W steps (gemm_q8_group).
template <int W>
void gemm_q8_unpacked(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                      int64_t group, const int8_t* wbuf, const float* sbuf, float* f) {
  const int64_t nb = K / 32;
  std::memset(f, 0, M * 64 * sizeof(float));
  // 64 tokens at a time: their fp32 sums (16 KB) stay in L1 across the blocks
  for (int64_t mb = 0; mb < M; mb += 64) {
    const int64_t me = std::min<int64_t>(M, mb + 64);
    for (int64_t g = 0; g < K / group; ++g) {
      const float* s = sbuf + g * 128;
      const int64_t j = g * group / 32;  // the group's first block
      for (int v0 = 0; v0 < 8; v0 += 4)
        for (int64_t m = mb; m < me; ++m)
          gemm_q8_group<W>(q + m * K, g * group / 4, group / 4, wbuf, v0, s, s + 64,
                           d + m * nb + j, e + m * nb + j, f + m * 64);
    }
  }
}

// Block position of row i in wbuf's lane order: the inverse of row_of.
inline int64_t lane_of(int64_t i) {
  return 8 * (4 * (i / 32) + i % 16 / 4) + i % 4 + 4 * (i % 32 / 16);
}

// Rows n0..n0 + 64 (bs of them real) of a GGUF matrix of a type of gemm_ggml_q8_types -> wbuf
// in unpack_int4_block's lane order (unsigned codes) and sbuf[b][2][64] = (s, z) per block of
// ggml_q8_block(type) values; rows past bs: codes and scales 0. 256 values of 64 rows at a time
// decoded into a 16 KB buffer, then moved 4 bytes of 8 rows a time by 32-bit gathers.
void unpack_codes_block(const Matrix& a, int64_t K, int64_t n0, int8_t* wbuf, float* sbuf) {
  const int64_t bs = std::min<int64_t>(64, a.N - n0), bk = ggml_q8_block(a.type);
  alignas(32) uint8_t codes[64][256];
  if (bs < 64) std::memset(codes[bs], 0, (64 - bs) * 256);
  for (int64_t u0 = 0; u0 < K; u0 += 256) {
    const int64_t values = std::min<int64_t>(256, K - u0);
    ggml_rows_codes<half_at, lane_of>(a, n0, bs, u0, values, codes, sbuf + u0 / bk * 128);
    for (int v = 0; v < 8; ++v) {
      alignas(32) int32_t off[8];
      for (int i = 0; i < 8; ++i) off[i] = (int32_t)(row_of(v, i) * 256);
      const __m256i idx = _mm256_load_si256((const __m256i*)off);
      for (int64_t kq = 0; kq < values / 4; ++kq)
        _mm256_store_si256((__m256i*)(wbuf + (u0 / 4 + kq) * 256 + v * 32),
                           _mm256_i32gather_epi32((const int*)(codes[0] + 4 * kq), idx, 1));
    }
  }
}

// Rows n0..n0 + 64 (bs of them real) of a GGUF Q4_0 matrix (rows ld bytes apart; per 32 values
// an fp16 scale d and 16 bytes, value j in byte j's low nibble, value 16 + j in its high) ->
// wbuf in unpack_int4_block's lane order (codes 0..15) and sbuf[b][2][64] = d, -8 d per block:
// w = d (c - 8). 8 rows at a time by 32-bit gathers (4 bytes of each row: 4 values' low and 4
// values' high nibbles); rows past bs: codes and scales 0.
void unpack_q4_0_block(const uint8_t* w, int64_t ld, int64_t N, int64_t K, int64_t n0,
                       int8_t* wbuf, float* sbuf) {
  const int64_t bs = std::min<int64_t>(64, N - n0), nb = K / 32;
  const __m256i low4 = _mm256_set1_epi8(15), zero = _mm256_setzero_si256();
  const __m256i half = _mm256_set1_epi32(0xFFFF);
  const uint8_t* rows = w + n0 * ld;
  for (int v = 0; v < 8; ++v) {
    alignas(32) int32_t off[8], live[8];
    for (int l = 0; l < 8; ++l) {
      off[l] = (int32_t)(row_of(v, l) * ld);
      live[l] = row_of(v, l) < bs ? -1 : 0;
    }
    const __m256i idx = _mm256_load_si256((const __m256i*)off);
    const __m256i in = _mm256_load_si256((const __m256i*)live);
    for (int64_t b = 0; b < nb; ++b) {
      const int* blk = (const int*)(rows + b * 18);
      const __m256i dw = _mm256_and_si256(_mm256_mask_i32gather_epi32(zero, blk, idx, in, 1), half);
      const __m256 sc = _mm256_cvtph_ps(
          _mm_packus_epi32(_mm256_castsi256_si128(dw), _mm256_extracti128_si256(dw, 1)));
      _mm256_store_ps(sbuf + b * 128 + 8 * v, sc);
      _mm256_store_ps(sbuf + b * 128 + 64 + 8 * v, _mm256_mul_ps(_mm256_set1_ps(-8.0f), sc));
      for (int j = 0; j < 4; ++j) {
        const __m256i g = _mm256_mask_i32gather_epi32(
            zero, (const int*)(rows + b * 18 + 2 + 4 * j), idx, in, 1);
        _mm256_store_si256((__m256i*)(wbuf + (b * 8 + j) * 256 + v * 32),
                           _mm256_and_si256(g, low4));
        _mm256_store_si256((__m256i*)(wbuf + (b * 8 + 4 + j) * 256 + v * 32),
                           _mm256_and_si256(_mm256_srli_epi32(g, 4), low4));
      }
    }
  }
}

}  // namespace

void gemm_int4_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                  int64_t b0, int64_t b1, const Buffers8da4w& buf) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64;
    unpack_int4_block<false>(w, sz, N, K, group, n0, buf.wbuf, buf.sbuf, nullptr);
    gemm_q8_unpacked<8>(q, d, e, M, K, group, buf.wbuf, buf.sbuf, buf.f);
    store_block(buf.f, M, N, n0, std::min<int64_t>(64, N - n0), y);
  }
}

// Every type of the table's gemm_ggml_q8_types; not Q8_0: its codes + 128 times 8-bit values
// overflow vpmaddubsw's int16 pairs.
void gemm_ggml_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const Matrix& a, int64_t b0, int64_t b1, const Buffers8da4w& buf) {
  // vpmaddubsw pairs summed in int16: 8 of 4-bit codes, 4 of 5-bit (Q5_0, Q5_1)
  const bool five = a.type == kGgmlQ5_0 || a.type == kGgmlQ5_1;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64;
    if (a.type == kGgmlQ4_0)
      unpack_q4_0_block(static_cast<const uint8_t*>(a.w), a.ld, a.N, K, n0, buf.wbuf, buf.sbuf);
    else
      unpack_codes_block(a, K, n0, buf.wbuf, buf.sbuf);
    if (five)
      gemm_q8_unpacked<4>(q, d, e, M, K, 32, buf.wbuf, buf.sbuf, buf.f);
    else
      gemm_q8_unpacked<8>(q, d, e, M, K, 32, buf.wbuf, buf.sbuf, buf.f);
    store_block(buf.f, M, a.ldy, n0, std::min<int64_t>(64, a.N - n0), a.y);
  }
}

}  // namespace torchchat::cpu::avx2
