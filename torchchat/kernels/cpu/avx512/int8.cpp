// int8 weights: int8 -> fp32 + FMAs on fp32 activations, per-row or per-group scales.
#include <algorithm>

#include "vec.h"

namespace torchchat::cpu::avx512 {
namespace {

// out[m] = sum_k w[k] s(k) x[m][k] for one int8 weight row w, s(k) its scale: scales[0] for the
// whole row (group 0, applied after the sum) or scales[k >> log2(group)] (group a power of two
// >= 16, applied to each 16 weights as they are converted). K is a multiple of 16; x is fp32,
// zero-padded to K by the caller.
template <int M, typename S>
void int8_row(const float* x, int64_t K, const int8_t* w, const S* scales, int64_t group,
              float* out) {
  constexpr int U = M == 1 ? 4 : 2;
  const int shift = group ? __builtin_ctzll(group) : 0;
  __m512 acc[M][U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  auto weights = [&](int64_t k) {
    const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k))));
    return group ? _mm512_mul_ps(wv, _mm512_set1_ps((float)scales[k >> shift])) : wv;
  };
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U)
    for (int u = 0; u < U; ++u) {
      if (u % 4 == 0) _mm_prefetch((const char*)(w + k + 16 * u) + kPrefetch, _MM_HINT_T0);
      const __m512 wv = weights(k + 16 * u);
      for (int m = 0; m < M; ++m)
        acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k + 16 * u), acc[m][u]);
    }
  for (; k < K; k += 16) {
    const __m512 wv = weights(k);
    for (int m = 0; m < M; ++m)
      acc[m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
  }
  for (int m = 0; m < M; ++m) {
    __m512 t = acc[m][0];
    for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, acc[m][u]);
    out[m] = _mm512_reduce_add_ps(t) * (group ? 1.0f : (float)scales[0]);
  }
}

template <typename S>  // scales: fp32 or bf16, read as they are stored
void int8_rows(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a, int64_t n0,
               int64_t n1) {
  const int64_t G = group ? K / group : 1;
  const int8_t* w = static_cast<const int8_t*>(a.w);
  const S* scales = static_cast<const S*>(a.s);
  few_rows(x, M, K, a, n0, n1, [&](auto rows, const float* xm, int64_t n, float* out) {
    int8_row<decltype(rows)::value, S>(xm, K, w + n * a.ld, scales + n * G, group, out);
  });
}

}  // namespace

void linear_int8_f32s(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a,
                      int64_t n0, int64_t n1) {
  int8_rows<float>(x, M, K, group, a, n0, n1);
}

void linear_int8_bf16s(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a,
                       int64_t n0, int64_t n1) {
  int8_rows<bf16_t>(x, M, K, group, a, n0, n1);
}

}  // namespace torchchat::cpu::avx512
