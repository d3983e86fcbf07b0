// Prefill's many rows of int4 and int8 weights run as bf16 GEMMs (oneDNN, behind at::mm in
// ops.cpp) on tiles of the weights turned into bf16 just before; these are the conversions.
// fp32 -> bf16 rounds to nearest even with integer operations (to_bf16_bits), as bf16_t does:
// the results are the scalar reference's to the bit.
#include <algorithm>

#include "vec.h"

namespace torchchat::cpu::avx2 {

// One block of an int4 matrix (rows n0..n0 + bs), transposed, as bf16: out[k * ldo + r] =
// (q - 8) * scale + zero of row n0 + r at k, rounded once ((q - 8) * scale is exact: a bf16
// scale times a 4-bit integer). Transposed because torch's layout stores each k's 64 rows side
// by side: every k of a block becomes 64 contiguous outputs.
void int4_dequantize_block_t(const uint8_t* w, const bf16_t* sz, int64_t N, int64_t K,
                             int64_t group, int64_t n0, bf16_t* out, int64_t ldo) {
  const int64_t bs = std::min<int64_t>(64, N - n0);
  const uint8_t* blk = w + n0 * (K / 2);
  if (bs < 64)  // a short last block (only small layers have one): the reference's loops
    return scalar_kernels().int4_dequantize_block_t(w, sz, N, K, group, n0, out, ldo);
  const __m256i high16 = _mm256_set1_epi32((int32_t)0xFFFF0000u);
  const __m256i low4 = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  for (int64_t g = 0; g < K / group; ++g) {
    alignas(32) float s[64], z[64];  // rows 0-63 of group g
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(sz + (g * N + n0 + 8 * c) * 2));
      _mm256_store_ps(s + 8 * c, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
      _mm256_store_ps(z + 8 * c, _mm256_castsi256_ps(_mm256_and_si256(v, high16)));
    }
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const uint8_t* a = blk + k * 32;
      __m256 wq[8];  // rows 8c..8c + 7: low nibbles of bytes 8c.. (c < 4), high ones (c >= 4)
#pragma GCC unroll 8
      for (int c = 0; c < 4; ++c) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(a + 8 * c)));
        const __m256i q[2] = {_mm256_and_si256(b, low4), _mm256_srli_epi32(b, 4)};
#pragma GCC unroll 8
        for (int h = 0; h < 2; ++h) {
          const int r = 32 * h + 8 * c;
          const __m256 qs = _mm256_cvtepi32_ps(_mm256_sub_epi32(q[h], eight));
          wq[4 * h + c] = _mm256_add_ps(_mm256_mul_ps(qs, _mm256_load_ps(s + r)),
                                        _mm256_load_ps(z + r));
        }
      }
#pragma GCC unroll 8
      for (int c = 0; c < 8; c += 2) store_bf16x16(out + k * ldo + 8 * c, wq[c], wq[c + 1]);
    }
  }
}

// int8 codes are exact in bf16: a tile of them feeds the GEMM, the row scales apply after.
void int8_to_bf16(const int8_t* src, int64_t K, bf16_t* dst) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 a =
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(src + k))));
    const __m256 b =
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(src + k + 8))));
    store_bf16x16(dst + k, a, b);
  }
  for (; k < K; ++k) dst[k] = scalar_to_bf16((float)src[k]);
}

}  // namespace torchchat::cpu::avx2
