// fp32, bf16 and fp16 weights: dot products of a few activation rows with each weight row.
// Included by float.cpp (F/BW/VL/DQ) and float_bf16.cpp (+ AVX512-BF16, whose bf16 rows sum
// 32 products per instruction with vdpbf16ps).
//
// Each thread reads its rows one after another: weights are then a single sequential stream per
// thread, which measured faster here than reading 2-8 rows side by side (8 rows: 30 GB/s, one
// row with 4 accumulators: 38 GB/s, a plain sum of the same memory: 37 GB/s, one thread).
#pragma once

#include <algorithm>
#include <type_traits>

#include "vec.h"

namespace torchchat::cpu::avx512 {
namespace {

// out[m] = dot(w row, x row m) for M activation rows (ldx apart), U independent accumulators
// per activation row to keep enough FMAs in flight. Dp: bf16 rows by vdpbf16ps (AVX512-BF16,
// instantiated only in float_bf16.cpp).
template <typename T, int M, bool Dp>
void dot_row(const T* x, int64_t ldx, const T* w, int64_t K, float* out) {
  constexpr int U = M == 1 ? 4 : 2;
  __m512 acc[M][U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  if constexpr (Dp) {  // 32 products per instruction
    for (; k + 32 * U <= K; k += 32 * U)
      for (int u = 0; u < U; ++u) {
        _mm_prefetch((const char*)(w + k + 32 * u) + kPrefetch, _MM_HINT_T0);
        const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)(w + k + 32 * u));
        for (int m = 0; m < M; ++m) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x + m * ldx + k + 32 * u));
          acc[m][u] = _mm512_dpbf16_ps(acc[m][u], wv, xv);
        }
      }
  }
  for (; k + 16 * U <= K; k += 16 * U)  // unmasked: a mask written every step is 2x slower
    for (int u = 0; u < U; ++u) {
      if constexpr (!std::is_same_v<T, float>)  // fp32 measured faster without (0.99 vs 0.93)
        _mm_prefetch((const char*)(w + k + 16 * u) + kPrefetch, _MM_HINT_T0);
      const __m512 wv = Load<T>::at(w + k + 16 * u);
      for (int m = 0; m < M; ++m)
        acc[m][u] = _mm512_fmadd_ps(wv, Load<T>::at(x + m * ldx + k + 16 * u), acc[m][u]);
    }
  for (; k < K; k += 16) {
    const __mmask16 mk = mask16(K - k);
    const __m512 wv = Load<T>::masked(w + k, mk);
    for (int m = 0; m < M; ++m)
      acc[m][0] = _mm512_fmadd_ps(wv, Load<T>::masked(x + m * ldx + k, mk), acc[m][0]);
  }
  for (int m = 0; m < M; ++m) {
    __m512 t = acc[m][0];
    for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, acc[m][u]);
    out[m] = _mm512_reduce_add_ps(t);
  }
}

// Rows [n0, n1) of one matrix; up to 4 activation rows share each weight load, more go 4 at a
// time.
template <typename T, bool Dp = false>
void float_rows(const T* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  const T* w = static_cast<const T*>(a.w);
  few_rows(x, M, K, a, n0, n1, [&](auto rows, const T* xm, int64_t n, float* out) {
    dot_row<T, decltype(rows)::value, Dp>(xm, K, w + n * a.ld, K, out);
  });
}

}  // namespace
}  // namespace torchchat::cpu::avx512
