// int4 weights: torch's CPU int4 pack layout read in place, codes turned into fp32 (128 + q)
// without a conversion instruction and summed with FMAs against fp32 activations; per-group
// scale and zero folded in afterwards (w = (q - 8) * scale + zero), the same math as
// cpu/avx512/int4_bf16.cpp: acc = sum_k (128 + q_k) x_k per group, then
// scale * acc + (zero - 136 * scale) * xsum.
//
// torch's CPU int4 layout as aten::_convert_weight_to_int4pack_for_cpu packs it on a CPU with
// AVX-512 (elsewhere aten packs otherwise; torchchat packs this one on every machine:
// quant/linear.py pack_int4_cpu), [N, K/2] uint8: output
// rows in blocks of 64, each block stored k-major: for every k, 32 bytes whose low nibbles are
// rows 0-31 of the block and high nibbles rows 32-63. A last block of fewer rows (bs, a multiple
// of 16) stores bs/2 bytes per k, byte d holding rows 2d (low) and 2d+1 (high).
//
// From codes to fp32, per k (32 bytes, 64 codes; 15 integer operations for 8 vectors of 8):
//  - the low and high nibbles as bytes (and; shift, and);
//  - each nibble byte interleaved with the byte 0x43 (unpacklo/hi_epi8): 16-bit lanes
//    0x4300 | q, the bf16 number 128 + q;
//  - two of those per 32-bit lane, rows 2l and 2l + 1: `lane << 16` is the fp32 128 + q_even
//    and `lane & 0xFFFF0000` the fp32 128 + q_odd, exactly.
// (Leaving the odd lanes unmasked, 128 + q_odd + (0x4300 + q_even) * 2^-16, and subtracting
// 2^-16 times the even sums per group measured slower, and its inexact products made the
// errors 9x larger.) The interleaves work within 128-bit halves, so accumulator lanes hold rows
// in a fixed shuffled order (pairs_of); the scales are loaded in that order, the sums put back
// in row order once per block.
#include <algorithm>
#include <cstring>

#include "vec.h"

namespace torchchat::cpu::avx2 {
namespace {

constexpr int64_t kChunk = 256;  // activations converted to fp32 this many at a time

// Accumulator v (0-7) = 4 nibble + 2 half + parity: lane 4h + l holds block row
// 32 nibble + 8 half + 16 h + 2 l + parity. (scale, zero) pairs of rows r0 + {0, 2, 4, 6} and
// r0 + 16 + {0, 2, 4, 6} (even) or r0 + 1 + ... (odd), r0 = 32 nibble + 8 half, in that order:
inline void pairs_of(const bf16_t* szg, int64_t r0, __m256* even, __m256* odd) {
  const __m256 a = _mm256_castsi256_ps(_mm256_loadu2_m128i((const __m128i*)(szg + 2 * (r0 + 16)),
                                                           (const __m128i*)(szg + 2 * r0)));
  const __m256 b = _mm256_castsi256_ps(_mm256_loadu2_m128i(
      (const __m128i*)(szg + 2 * (r0 + 20)), (const __m128i*)(szg + 2 * (r0 + 4))));
  *even = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  *odd = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
}

// One full 64-row block for one activation row. xb: bf16 activations (K), xsum: per-group sums
// of them; sz: (scale, zero) bf16 pairs as int4_scale_offset. Writes the 64 outputs in row order.
template <bool Blocked>
void int4_block64(const uint8_t* blk, const bf16_t* xb, const float* xsum, int64_t K,
                  int64_t group, const bf16_t* sz, int64_t N, int64_t n0, float* out) {
  const int64_t G = K / group;
  const __m256i low4 = _mm256_set1_epi8(0x0F), magic = _mm256_set1_epi8(0x43);
  const __m256i high16 = _mm256_set1_epi32((int32_t)0xFFFF0000u);
  const __m256 k136 = _mm256_set1_ps(136.0f);
  alignas(32) float total[64];  // accumulator order
  alignas(32) float xf[kChunk];
  for (int i = 0; i < 64; i += 8) _mm256_store_ps(total + i, _mm256_setzero_ps());
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[8];
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_ps();
    if (!Blocked && g + 2 < G)  // scales of later groups (torch's layout: N * 4 bytes apart)
      for (int q = 0; q < 4; ++q)
        _mm_prefetch((const char*)(sz + int4_scale_offset(false, g + 2, G, N, n0, 64) + q * 32),
                     _MM_HINT_T0);
    const int64_t kend = (g + 1) * group;
    for (int64_t kc = g * group; kc < kend; kc += kChunk) {
      const int64_t kn = std::min(kChunk, kend - kc);  // even: group is
      int64_t i = 0;
      for (; i + 8 <= kn; i += 8)
        _mm256_store_ps(xf + i, bf16x8_to_f32(_mm_loadu_si128((const __m128i*)(xb + kc + i))));
      for (; i < kn; ++i) xf[i] = scalar_bf16(xb[kc + i]);
      for (int64_t k = 0; k < kn; k += 2) {
        const uint8_t* a2 = blk + (kc + k) * 32;
        _mm_prefetch((const char*)(a2 + kPrefetch), _MM_HINT_T0);
#pragma GCC unroll 8
        for (int t = 0; t < 2; ++t) {
          const __m256i a = _mm256_loadu_si256((const __m256i*)(a2 + 32 * t));
          const __m256i lo = _mm256_and_si256(a, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(a, 4), low4);
          const __m256i u[4] = {_mm256_unpacklo_epi8(lo, magic), _mm256_unpackhi_epi8(lo, magic),
                                _mm256_unpacklo_epi8(hi, magic), _mm256_unpackhi_epi8(hi, magic)};
          const __m256 xv = _mm256_broadcast_ss(xf + k + t);
#pragma GCC unroll 8
          for (int j = 0; j < 4; ++j) {
            const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(u[j], 16));
            const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(u[j], high16));
            acc[2 * j] = _mm256_fmadd_ps(even, xv, acc[2 * j]);
            acc[2 * j + 1] = _mm256_fmadd_ps(odd, xv, acc[2 * j + 1]);
          }
        }
      }
    }
    // total += scale * acc + (zero - 136 * scale) * xsum  (128 from the codes as 128 + q, 8
    // from their offset)
    const bf16_t* szg = sz + int4_scale_offset(Blocked, g, G, N, n0, 64);
    const __m256 xs = _mm256_set1_ps(xsum[g]);
#pragma GCC unroll 8
    for (int j = 0; j < 4; ++j) {
      __m256 pe, po;
      pairs_of(szg, 32 * (j >> 1) + 8 * (j & 1), &pe, &po);  // j = 2 nibble + half
      const __m256 se = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(pe), 16));
      const __m256 so = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(po), 16));
      const __m256 ce = _mm256_fnmadd_ps(k136, se, _mm256_and_ps(pe, _mm256_castsi256_ps(high16)));
      const __m256 co = _mm256_fnmadd_ps(k136, so, _mm256_and_ps(po, _mm256_castsi256_ps(high16)));
      float* te = total + 16 * j;
      const __m256 he = _mm256_fmadd_ps(se, acc[2 * j], _mm256_load_ps(te));
      const __m256 ho = _mm256_fmadd_ps(so, acc[2 * j + 1], _mm256_load_ps(te + 8));
      _mm256_store_ps(te, _mm256_fmadd_ps(ce, xs, he));
      _mm256_store_ps(te + 8, _mm256_fmadd_ps(co, xs, ho));
    }
  }
  for (int j = 0; j < 4; ++j) {  // back to row order: (even, odd) lane pairs are rows 2l, 2l + 1
    const __m256 e = _mm256_load_ps(total + 16 * j), o = _mm256_load_ps(total + 16 * j + 8);
    const __m256 r0 = _mm256_unpacklo_ps(e, o), r4 = _mm256_unpackhi_ps(e, o);
    float* dst = out + 32 * (j >> 1) + 8 * (j & 1);
    _mm_storeu_ps(dst, _mm256_castps256_ps128(r0));
    _mm_storeu_ps(dst + 4, _mm256_castps256_ps128(r4));
    _mm_storeu_ps(dst + 16, _mm256_extractf128_ps(r0, 1));
    _mm_storeu_ps(dst + 20, _mm256_extractf128_ps(r4, 1));
  }
}


}  // namespace

// x: M x K bf16 (K a multiple of group, group even); the matrix: w [N, K/2] packed, s: (scale,
// zero) bf16 pairs in torch's layout [K/group, N, 2] or blocked (Matrix::blocked).
void linear_int4(const bf16_t* x, const float* xsum, int64_t M, int64_t K, int64_t group,
                 const Matrix& a, int64_t b0, int64_t b1) {
  const int64_t G = K / group;
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  const bf16_t* sz = static_cast<const bf16_t*>(a.s);
  const int64_t N = a.N, ldy = a.ldy;
  float* y = a.y;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64;
    if (N - n0 < 64) {  // a short last block (small layers only): the reference's loops
      scalar_kernels().linear_int4(x, xsum, M, K, group, a, b, b + 1);
      continue;
    }
    const uint8_t* blk = w + n0 * (K / 2);
    for (int64_t m = 0; m < M; ++m) {
      alignas(32) float out[64];
      if (a.blocked)
        int4_block64<true>(blk, x + m * K, xsum + m * G, K, group, sz, N, n0, out);
      else
        int4_block64<false>(blk, x + m * K, xsum + m * G, K, group, sz, N, n0, out);
      std::memcpy(y + m * ldy + n0, out, sizeof out);
    }
  }
}

}  // namespace torchchat::cpu::avx2
