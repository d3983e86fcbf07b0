// Prefill on GGUF's K-quants (Q4_K, Q5_K, Q6_K) in integers with AVX512-VNNI: the GEMM of many
// tokens, each quantized to Q8_K as decode's are (GgmlGemmActs, common/ggml.h).
//
// Lanes are tokens: a vector holds 4 consecutive activation codes (signed) of 16 tokens and
// vpdpbusd multiplies it by 4 codes of one weight row (unsigned: Q6_K's without its offset of
// 32), broadcast, so a row's codes are read in their own order -- unpacked once per super-block
// -- and no weight layout is made. A sub-block's integer sums (exact) are multiplied by its
// integer scale and summed over the super-block (exact, as ggml's sumi). The codes' offsets are
// sums of the activations, in integers too (vpmaddwd of the tokens' block sums with the row's
// coefficients in pairs): Q6_K's 32 sum_j sc_j bsum_j comes off sumi; Q4_K's and Q5_K's
// sum_j m_j bsum_j is ggml's summs. Each super-block then adds in fp32 d_x * d * sumi and
// subtracts d_x * dmin * summs, as ggml's dot products do, so prefill and decode compute the
// same sums; only the fp32 order over super-blocks differs.
//
// A tile is 4 rows x 48 tokens: its 12 running sums, the super-block's 12 and 3 activation
// vectors stay in the 32 registers (4 x 64 spilled the super-block's sums at every sub-block).
#include <algorithm>
#include <cstring>

#include "../common/ggml.h"
#include "vec.h"

namespace torchchat::cpu::avx512 {
namespace {

constexpr int kRows = 4;  // weight rows of a tile (broadcast operands)
constexpr int kTv = 3;    // token vectors of a tile (16 tokens each)

// One super-block of one weight row, unpacked: codes in k order, per-sub-block scales, the
// offsets' coefficients in int16 pairs (Q6_K: 32 sc_2p, 32 sc_2p+1; Q4_K, Q5_K: m_2p, m_2p+1).
struct Unpacked {
  alignas(64) uint8_t codes[256];
  int32_t sc[16];  // Q6_K: 16 sub-blocks of 16; Q4_K, Q5_K: 8 of 32
  int32_t co[8];   // Q6_K: 8 pairs; Q4_K, Q5_K: 4
  float d, dmin;
};

// 64 bytes of nibble pairs (bytes i and 32 + i of two 32-value runs) -> codes of 128 values in
// order: low nibbles of bytes 0-31 (k 0-31), their high nibbles (k 32-63), then bytes 32-63's.
inline void nibbles_in_order(const uint8_t* qs, __m512i& k0, __m512i& k1) {
  const __m512i v = _mm512_loadu_si512((const void*)qs), m = _mm512_set1_epi8(0x0F);
  const __m512i lo = _mm512_and_si512(v, m), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
  k0 = _mm512_shuffle_i64x2(lo, hi, 0x44);  // lo[0:32], hi[0:32]
  k1 = _mm512_shuffle_i64x2(lo, hi, 0xEE);  // lo[32:64], hi[32:64]
}

// Q4_K's and Q5_K's d, dmin and 8 (scale, min) pairs (ggml_scale_min_k4 a pair at a time was 13%
// of the GEMM's time at 64 tokens; ggml_k4_scales decodes all 8 at once).
void scales_mins(uint16_t d, uint16_t dmin, const uint8_t* scales, Unpacked& u) {
  u.d = half_at(&d);
  u.dmin = half_at(&dmin);
  ggml_k4_scales(scales, u.sc, u.co);
}

void unpack_q4_k(const BlockQ4_K& b, Unpacked& u) {
  __m512i k[4];
  nibbles_in_order(b.qs, k[0], k[1]);
  nibbles_in_order(b.qs + 64, k[2], k[3]);
  for (int i = 0; i < 4; ++i) _mm512_store_si512((void*)(u.codes + 64 * i), k[i]);
  scales_mins(b.d, b.dmin, b.scales, u);
}

void unpack_q5_k(const BlockQ5_K& b, Unpacked& u) {
  __m512i k[4];
  nibbles_in_order(b.qs, k[0], k[1]);
  nibbles_in_order(b.qs + 64, k[2], k[3]);
  // bit 2c (runs 2c) and 2c + 1 (runs 2c + 1) of qh[l] is bit 4 of value l of run 2c / 2c + 1
  const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)b.qh));
  const __m512i sixteen = _mm512_set1_epi8(16);
  for (int c = 0; c < 4; ++c) {
    const __m512i lo = _mm512_set1_epi8((char)(1 << (2 * c))),
                  hi = _mm512_set1_epi8((char)(1 << (2 * c + 1)));
    const __m512i bit = _mm512_mask_blend_epi64(0xF0, lo, hi);  // runs 2c (low), 2c + 1 (high)
    const __mmask64 set = _mm512_test_epi8_mask(qh, bit);
    k[c] = _mm512_mask_add_epi8(k[c], set, k[c], sixteen);
    _mm512_store_si512((void*)(u.codes + 64 * c), k[c]);
  }
  scales_mins(b.d, b.dmin, b.scales, u);
}

void unpack_q6_k(const BlockQ6_K& b, Unpacked& u) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(3);
  for (int h = 0; h < 2; ++h) {  // 128 values: ql[64h..], qh[32h..]
    const __m512i ql = _mm512_loadu_si512((const void*)(b.ql + 64 * h));
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(b.qh + 32 * h)));
    // values l, 32 + l: low nibbles of ql[l], ql[32 + l] and qh bits 0-1, 2-3;
    // values 64 + l, 96 + l: high nibbles and qh bits 4-5, 6-7
    const __m512i s01 = _mm512_mask_blend_epi64(0xF0, _mm512_set1_epi16(0), _mm512_set1_epi16(2));
    const __m512i s23 = _mm512_mask_blend_epi64(0xF0, _mm512_set1_epi16(4), _mm512_set1_epi16(6));
    const __m512i h0 = _mm512_and_si512(_mm512_srlv_epi16(qh, s01), m2);
    const __m512i h1 = _mm512_and_si512(_mm512_srlv_epi16(qh, s23), m2);
    const __m512i a = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_slli_epi16(h0, 4));
    const __m512i c = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                      _mm512_slli_epi16(h1, 4));
    _mm512_store_si512((void*)(u.codes + 128 * h), a);
    _mm512_store_si512((void*)(u.codes + 128 * h + 64), c);
  }
  u.d = half_at(&b.d);
  u.dmin = 0.0f;
  for (int j = 0; j < 16; ++j) u.sc[j] = b.scales[j];
  for (int p = 0; p < 8; ++p) u.co[p] = ggml_pair16(32 * u.sc[2 * p], 32 * u.sc[2 * p + 1]);
}

// Tokens [16 t0, 16 (t0 + TV)) x rows r0..r0 + R of super-block sb, added into the tile's fp32
// sums f (d * sumi) and g (dmin * summs): [R][TV] vectors. S: values a sub-block.
template <int R, int TV, int S>
void tile(const GgmlGemmActs& x, int64_t sb, int64_t t0, const Unpacked* w, __m512* f,
          __m512* g) {
  constexpr int nsub = 256 / S, npair = nsub / 2;
  const int64_t lanes = x.T * 16;
  __m512i si[R][TV];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TV; ++t) si[r][t] = _mm512_setzero_si512();
  const int8_t* base = x.q + (sb * 64 * x.T + t0) * 64;
  for (int j = 0; j < nsub; ++j) {
    __m512i acc[R][TV];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < TV; ++t) acc[r][t] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int kq = j * S / 4; kq < (j + 1) * S / 4; ++kq) {
      __m512i a[TV];
      for (int t = 0; t < TV; ++t)
        a[t] = _mm512_loadu_si512((const void*)(base + (kq * x.T + t) * 64));
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, w[r].codes + 4 * kq, 4);
        const __m512i b = _mm512_set1_epi32(four);
        for (int t = 0; t < TV; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], b, a[t]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512i sc = _mm512_set1_epi32(w[r].sc[j]);
      for (int t = 0; t < TV; ++t)
        si[r][t] = _mm512_add_epi32(si[r][t], _mm512_mullo_epi32(acc[r][t], sc));
    }
  }
  // the offsets' sums: sum over pairs p of the tokens' (s_2p, s_2p+1) times the row's pair
  const int32_t* sums = (S == 16 ? x.s16 : x.s32) + sb * npair * lanes + t0 * 16;
  const float* dx = x.d + sb * lanes + t0 * 16;
  for (int t = 0; t < TV; ++t) {
    __m512i o[R];
    for (int r = 0; r < R; ++r) o[r] = _mm512_setzero_si512();
    for (int p = 0; p < npair; ++p) {
      const __m512i s = _mm512_loadu_si512((const void*)(sums + p * lanes + 16 * t));
      for (int r = 0; r < R; ++r)
        o[r] = _mm512_dpwssd_epi32(o[r], s, _mm512_set1_epi32(w[r].co[p]));
    }
    const __m512 d = _mm512_loadu_ps(dx + 16 * t);
    for (int r = 0; r < R; ++r) {
      if (S == 16) {  // Q6_K: sumi - 32 sum_j sc_j bsum_j
        f[r * TV + t] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(w[r].d)),
                                        _mm512_cvtepi32_ps(_mm512_sub_epi32(si[r][t], o[r])),
                                        f[r * TV + t]);
      } else {
        f[r * TV + t] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(w[r].d)),
                                        _mm512_cvtepi32_ps(si[r][t]), f[r * TV + t]);
        g[r * TV + t] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(w[r].dmin)),
                                        _mm512_cvtepi32_ps(o[r]), g[r * TV + t]);
      }
    }
  }
}

template <int R, int TV>
void rows_tokens(const GgmlGemmActs& x, int64_t K, const Matrix& a, int64_t n0, int64_t t0,
                 const Unpacked* all) {
  __m512 f[R * TV], g[R * TV];
  for (int i = 0; i < R * TV; ++i) f[i] = g[i] = _mm512_setzero_ps();
  const bool q6 = a.type == kGgmlQ6_K;
  for (int64_t sb = 0; sb < K / 256; ++sb) {
    const Unpacked* w = all + sb * kRows;
    if (q6)
      tile<R, TV, 16>(x, sb, t0, w, f, g);
    else
      tile<R, TV, 32>(x, sb, t0, w, f, g);
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TV; ++t) {
      alignas(64) float out[16];
      _mm512_store_ps(out, _mm512_sub_ps(f[r * TV + t], g[r * TV + t]));
      const int64_t m0 = 16 * (t0 + t);
      for (int i = 0; i < 16 && m0 + i < x.M; ++i) a.y[(m0 + i) * a.ldy + n0 + r] = out[i];
    }
}

// Tiles of 3 token vectors, the last ones 2 + 2 rather than 3 + 1 (a tile of one vector
// broadcasts 4 weights for 4 vpdpbusd).
template <int R>
void rows(const GgmlGemmActs& x, int64_t K, const Matrix& a, int64_t n0, const Unpacked* all) {
  int64_t t = 0;
  for (; x.T - t >= kTv && x.T - t != 4; t += kTv) rows_tokens<R, kTv>(x, K, a, n0, t, all);
  for (; x.T - t >= 2; t += 2) rows_tokens<R, 2>(x, K, a, n0, t, all);
  if (t < x.T) rows_tokens<R, 1>(x, K, a, n0, t, all);
}

}  // namespace

void gemm_ggml_k_vnni(const GgmlGemmActs& x, int64_t K, const Matrix& a, int64_t n0,
                      int64_t n1) {
  const int64_t nsb = K / 256, bytes = ggml_layout(a.type)->bytes;
  std::vector<Unpacked> all(nsb * kRows);  // kRows rows' super-blocks, sb-major
  for (int64_t n = n0; n < n1; n += kRows) {
    const int R = (int)std::min<int64_t>(kRows, n1 - n);
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = static_cast<const uint8_t*>(a.w) + (n + r) * a.ld;
      for (int64_t sb = 0; sb < nsb; ++sb) {
        const uint8_t* blk = row + sb * bytes;
        Unpacked& u = all[sb * kRows + r];
        switch (a.type) {
          case kGgmlQ4_K: unpack_q4_k(*reinterpret_cast<const BlockQ4_K*>(blk), u); break;
          case kGgmlQ5_K: unpack_q5_k(*reinterpret_cast<const BlockQ5_K*>(blk), u); break;
          default: unpack_q6_k(*reinterpret_cast<const BlockQ6_K*>(blk), u); break;
        }
      }
    }
    switch (R) {
      case 4: rows<4>(x, K, a, n, all.data()); break;
      case 3: rows<3>(x, K, a, n, all.data()); break;
      case 2: rows<2>(x, K, a, n, all.data()); break;
      default: rows<1>(x, K, a, n, all.data()); break;
    }
  }
}

}  // namespace torchchat::cpu::avx512
