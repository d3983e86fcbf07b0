// int4 weights with AVX512-BF16: torch's CPU int4 pack layout read in place; codes turned into
// bf16 (128 + q) with one OR and summed with vdpbf16ps against bf16 activations; per-group scale
// and zero folded in afterwards (w = (q - 8) * scale + zero, as aten::_weight_int4pack_mm_for_cpu).
//
// torch's CPU int4 layout (aten::_convert_weight_to_int4pack_for_cpu, [N, K/2] uint8): output
// rows in blocks of 64, each block stored k-major: for every k, 32 bytes whose low nibbles are
// rows 0-31 of the block and high nibbles rows 32-63. A last block of fewer rows (bs, a multiple
// of 16) stores bs/2 bytes per k, byte d holding rows 2d (low) and 2d+1 (high).
//
// The 64-row kernel takes two k at a time: widening the bytes of k and k+1 to 16 bits and
// interleaving them puts, in each 32-bit lane, the pair (k, k+1) of one row -- the operand layout
// of vdpbf16ps. OR-ing 0x4300 onto a code q (0..15) makes the bf16 number 128 + q exactly, so
// sum_k (128 + q_k) x_k - 128 sum_k x_k = sum_k q_k x_k with no int->float conversion.
// The interleave works within 128-bit lanes, so accumulator lane i holds block row kPerm[i].
#include <algorithm>
#include <cstring>

#include "vec.h"

namespace torchchat::cpu::avx512 {
namespace {

// One full 64-row block for one activation row. xb: bf16 activations (K), xsum: per-group sums
// of them; sz: (scale, zero) bf16 pairs as int4_scale_offset. Writes the 64 outputs in row order.
template <bool Blocked>
void int4_block64(const uint8_t* blk, const bf16_t* xb, const float* xsum, int64_t K,
                  int64_t group, const bf16_t* sz, int64_t N, int64_t n0, float* out) {
  const int64_t G = K / group;
  const __m512i nibble = _mm512_set1_epi32(0x000F000F);
  const __m512i magic = _mm512_set1_epi32(0x43004300);  // bf16 128.0 in both halves
  const __m512i high16 = _mm512_set1_epi32((int32_t)0xFFFF0000u);
  // Accumulator lanes -> rows: the 128-bit-lane interleave gives rows {0-3, 8-11, 16-19, 24-27}
  // (unpacklo) and {4-7, 12-15, 20-23, 28-31} (unpackhi), +32 for the high nibbles.
  const __m512i perm_lo = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i perm_hi = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const __m512 k136 = _mm512_set1_ps(136.0f);
  __m512 total[4];
  for (int i = 0; i < 4; ++i) total[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_ps();
    const int64_t kend = (g + 1) * group;
    if (g + 2 < G)  // scales of later groups (torch's layout: N * 4 bytes apart, no stream)
      for (int q = 0; q < 4; ++q)
        _mm_prefetch((const char*)(sz + int4_scale_offset(Blocked, g + 2, G, N, n0, 64) + q * 32),
                     _MM_HINT_T0);
    for (int64_t k = g * group; k < kend; k += 2) {
      const uint8_t* a = blk + k * 32;
      _mm_prefetch((const char*)(a + kPrefetch), _MM_HINT_T0);
      const __m512i wa = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)a));
      const __m512i wb = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(a + 32)));
      const __m512i p0 = _mm512_unpacklo_epi16(wa, wb);  // lane: byte(k) | byte(k+1) << 16
      const __m512i p1 = _mm512_unpackhi_epi16(wa, wb);
      // 0xEA: (p & nibble) | magic
      const __m512bh lo0 = (__m512bh)_mm512_ternarylogic_epi32(p0, nibble, magic, 0xEA);
      const __m512bh lo1 = (__m512bh)_mm512_ternarylogic_epi32(p1, nibble, magic, 0xEA);
      const __m512bh hi0 =
          (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(p0, 4), nibble, magic, 0xEA);
      const __m512bh hi1 =
          (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(p1, 4), nibble, magic, 0xEA);
      int32_t pair;
      std::memcpy(&pair, xb + k, 4);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      acc[0] = _mm512_dpbf16_ps(acc[0], lo0, xv);
      acc[1] = _mm512_dpbf16_ps(acc[1], lo1, xv);
      acc[2] = _mm512_dpbf16_ps(acc[2], hi0, xv);
      acc[3] = _mm512_dpbf16_ps(acc[3], hi1, xv);
    }
    // total += scale * acc + (zero - 136 * scale) * xsum  (128 from the bf16 trick, 8 from the
    // codes' offset). (scale, zero) pairs of 16 rows fill one vector: scale in the low half of
    // each 32-bit lane, zero in the high half.
    const bf16_t* szg = sz + int4_scale_offset(Blocked, g, G, N, n0, 64);
    __m512 s[4], c[4];
    for (int q = 0; q < 4; ++q) {
      const __m512i v = _mm512_loadu_si512((const void*)(szg + q * 32));
      s[q] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      c[q] = _mm512_fnmadd_ps(k136, s[q], _mm512_castsi512_ps(_mm512_and_si512(v, high16)));
    }
    const __m512 xs = _mm512_set1_ps(xsum[g]);
    for (int h = 0; h < 2; ++h) {  // rows 0-31 (low nibbles), 32-63 (high nibbles)
      const __m512 s_lo = _mm512_permutex2var_ps(s[2 * h], perm_lo, s[2 * h + 1]);
      const __m512 s_hi = _mm512_permutex2var_ps(s[2 * h], perm_hi, s[2 * h + 1]);
      const __m512 c_lo = _mm512_permutex2var_ps(c[2 * h], perm_lo, c[2 * h + 1]);
      const __m512 c_hi = _mm512_permutex2var_ps(c[2 * h], perm_hi, c[2 * h + 1]);
      total[2 * h] = _mm512_fmadd_ps(c_lo, xs, _mm512_fmadd_ps(s_lo, acc[2 * h], total[2 * h]));
      total[2 * h + 1] =
          _mm512_fmadd_ps(c_hi, xs, _mm512_fmadd_ps(s_hi, acc[2 * h + 1], total[2 * h + 1]));
    }
  }
  for (int h = 0; h < 2; ++h) {
    alignas(64) float lo[16], hi[16];
    _mm512_store_ps(lo, total[2 * h]);
    _mm512_store_ps(hi, total[2 * h + 1]);
    for (int lane = 0; lane < 4; ++lane)
      for (int j = 0; j < 4; ++j) {
        out[32 * h + lane * 8 + j] = lo[lane * 4 + j];
        out[32 * h + lane * 8 + 4 + j] = hi[lane * 4 + j];
      }
  }
}


}  // namespace

// x: M x K bf16 (K a multiple of group); the matrix: w [N, K/2] packed, s: (scale, zero) bf16
// pairs in torch's layout [K/group, N, 2] or blocked (Matrix::blocked).
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
      alignas(64) float out[64];
      if (a.blocked)
        int4_block64<true>(blk, x + m * K, xsum + m * G, K, group, sz, N, n0, out);
      else
        int4_block64<false>(blk, x + m * K, xsum + m * G, K, group, sz, N, n0, out);
      std::memcpy(y + m * ldy + n0, out, sizeof out);
    }
  }
}

}  // namespace torchchat::cpu::avx512
