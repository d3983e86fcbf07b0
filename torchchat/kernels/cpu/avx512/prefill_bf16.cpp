// Prefill's many rows of int4 and int8 weights run as bf16 GEMMs (oneDNN, behind at::mm in
// ops.cpp) on tiles of the weights turned into bf16 just before; these are the conversions
// (vcvtneps2bf16: AVX512-BF16).
#include <algorithm>

#include "vec.h"

namespace torchchat::cpu::avx512 {

// One block of an int4 matrix (rows n0..n0 + bs), transposed, as bf16: out[k * ldo + r] =
// (q - 8) * scale + zero of row n0 + r at k, rounded once. Transposed because torch's layout
// stores each k's 64 rows side by side: every k of a block becomes 64 contiguous outputs.
void int4_dequantize_block_t(const uint8_t* w, const bf16_t* sz, int64_t N, int64_t K,
                             int64_t group, int64_t n0, bf16_t* out, int64_t ldo) {
  const int64_t bs = std::min<int64_t>(64, N - n0);
  const uint8_t* blk = w + n0 * (K / 2);
  if (bs < 64)  // a short last block (only small layers have one): the reference's loops
    return scalar_kernels().int4_dequantize_block_t(w, sz, N, K, group, n0, out, ldo);
  const __m512i high16 = _mm512_set1_epi32((int32_t)0xFFFF0000u);
  const __m128i low4 = _mm_set1_epi8(15);
  const __m512 eight = _mm512_set1_ps(8.0f);
  for (int64_t g = 0; g < K / group; ++g) {
    __m512 s[4], c[4];  // rows 0-15, 16-31, 32-47, 48-63: scale, zero - 8 * scale
    for (int q = 0; q < 4; ++q) {
      const __m512i v = _mm512_loadu_si512((const void*)(sz + (g * N + n0) * 2 + q * 32));
      s[q] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      c[q] = _mm512_fnmadd_ps(eight, s[q], _mm512_castsi512_ps(_mm512_and_si512(v, high16)));
    }
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const __m128i a = _mm_loadu_si128((const __m128i*)(blk + k * 32));
      const __m128i b2 = _mm_loadu_si128((const __m128i*)(blk + k * 32 + 16));
      const __m128i nib[4] = {_mm_and_si128(a, low4), _mm_and_si128(b2, low4),
                              _mm_and_si128(_mm_srli_epi16(a, 4), low4),
                              _mm_and_si128(_mm_srli_epi16(b2, 4), low4)};
      for (int q = 0; q < 4; ++q) {
        const __m512 wq =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(nib[q])), s[q], c[q]);
        _mm256_storeu_si256((__m256i*)(out + k * ldo + 16 * q), (__m256i)_mm512_cvtneps_pbh(wq));
      }
    }
  }
}

// int8 codes are exact in bf16: a tile of them feeds the GEMM, the row scales apply after.
void int8_to_bf16(const int8_t* src, int64_t K, bf16_t* dst) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(src + k))));
    _mm256_storeu_si256((__m256i*)(dst + k), (__m256i)_mm512_cvtneps_pbh(v));
  }
  for (; k < K; ++k) dst[k] = bf16_t((float)src[k]);
}

}  // namespace torchchat::cpu::avx512
