// fp32, bf16 and fp16 weights: dot products of a few activation rows with each weight row, 8
// fp32 lanes per FMA. Each thread reads its rows one after another, so the weights are one
// sequential stream per thread (as cpu/avx512/float_rows.h, which measured that faster than
// reading several rows side by side).
//
// bf16 needs no conversion instruction: 32 bytes hold 16 values, two per 32-bit lane, and a
// bf16 is the high half of the fp32 with the same value, so `lane << 16` is the even element
// and `lane & 0xFFFF0000` the odd one, exactly. Weights and activations are split the same way
// and the even and odd products summed in separate accumulators. fp16 goes through F16C.
//
// fp32 with 2 to 8 activation rows (a server's batched decode step) reads 3 weight rows side by
// side instead (f32_rows): there the FMAs, not the weight stream, bound a row-at-a-time kernel.
#include <algorithm>
#include <type_traits>

#include "vec.h"

namespace torchchat::cpu::avx2 {
namespace {

// A chunk of kWidth values as kVecs fp32 vectors (at: kWidth values; part: n < kWidth, zeros
// after). Products of two chunks' vectors pair up the same elements.
template <typename T>
struct Chunk {  // fp32 and fp16: 8 values, one vector
  static constexpr int kWidth = 8, kVecs = 1;
  static void at(const T* p, __m256* v) { v[0] = Load<T>::at(p); }
  static void part(const T* p, int64_t n, __m256* v) { v[0] = Load<T>::part(p, n); }
};

template <>
struct Chunk<bf16_t> {  // 16 values: the even ones, then the odd ones
  static constexpr int kWidth = 16, kVecs = 2;
  static void split(__m256i raw, __m256* v) {
    v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    v[1] = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32((int32_t)0xFFFF0000u)));
  }
  static void at(const bf16_t* p, __m256* v) { split(_mm256_loadu_si256((const __m256i*)p), v); }
  static void part(const bf16_t* p, int64_t n, __m256* v) {
    alignas(32) uint16_t b[16] = {};
    std::memcpy(b, p, n * 2);
    split(_mm256_load_si256((const __m256i*)b), v);
  }
};

// out[m] = dot(w row, x row m) for M activation rows (ldx apart). U chunks a step, each vector
// of a chunk with its own accumulator (M == 1: 4 chunks, 4 or 8 independent FMA chains).
template <typename T, int M>
void dot_row(const T* x, int64_t ldx, const T* w, int64_t K, float* out) {
  using C = Chunk<T>;
  constexpr int W = C::kWidth, V = C::kVecs, U = M == 1 ? 4 : 2 / V, A = U * V;
  __m256 acc[M][A];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i) acc[m][i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + W * U <= K; k += W * U)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      // one prefetch a cache line; fp32 measured faster without (2 threads: 5%, as AVX-512's)
      if (!std::is_same_v<T, float> && (u * W * sizeof(T)) % 64 == 0)
        _mm_prefetch((const char*)(w + k + W * u) + kPrefetch, _MM_HINT_T0);
      __m256 wv[V], xv[V];
      C::at(w + k + W * u, wv);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        C::at(x + m * ldx + k + W * u, xv);
#pragma GCC unroll 8
        for (int i = 0; i < V; ++i)
          acc[m][u * V + i] = _mm256_fmadd_ps(wv[i], xv[i], acc[m][u * V + i]);
      }
    }
  for (; k < K; k += W) {  // the last few chunks, the very last perhaps short
    const int64_t n = std::min<int64_t>(W, K - k);
    __m256 wv[V], xv[V];
    n == W ? C::at(w + k, wv) : C::part(w + k, n, wv);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      n == W ? C::at(x + m * ldx + k, xv) : C::part(x + m * ldx + k, n, xv);
#pragma GCC unroll 8
      for (int i = 0; i < V; ++i) acc[m][i] = _mm256_fmadd_ps(wv[i], xv[i], acc[m][i]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    __m256 t = acc[m][0];
    for (int i = 1; i < A; ++i) t = _mm256_add_ps(t, acc[m][i]);
    out[m] = hsum(t);
  }
}

// Rows [n0, n1) of one matrix; up to 4 activation rows share each weight load, more go 4 at a
// time.
template <typename T>
void float_rows(const T* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  const T* w = static_cast<const T*>(a.w);
  few_rows(x, M, K, a, n0, n1, [&](auto rows, const T* xm, int64_t n, float* out) {
    dot_row<T, decltype(rows)::value>(xm, K, w + n * a.ld, K, out);
  });
}

// fp32, R activation rows (ldx apart) x C weight rows (ld apart) -> y[r * ldy + c]: R * C
// accumulators, one 8-lane chunk at a time. Dot products of 4 activation rows with 1 weight row
// are bound by the loads (10 feed 8 FMAs at 2 a cycle); 4 x 3 feeds 12 FMAs with 7 and keeps 12
// chains in flight, enough for two FMA pipes of latency 4 (4 x 2's 8 chains stall on any
// hiccup). Every C gives a row the same sums in the same order (one accumulator over k, then
// hsum). `pf`: C rows to prefetch alongside, a line of each per 16 values (null: none).
template <int R, int C>
void f32_tile(const float* x, int64_t ldx, const float* w, int64_t ld, int64_t K, float* y,
              int64_t ldy, const float* pf) {
  __m256 acc[R][C];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (pf && k % 16 == 0)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) _mm_prefetch((const char*)(pf + c * ld + k), _MM_HINT_T0);
    __m256 wv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_ps(w + c * ld + k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + k);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  if (k < K) {
    const __m256i m = lanes(K - k);
    __m256 wv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) wv[c] = _mm256_maskload_ps(w + c * ld + k, m);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_maskload_ps(x + r * ldx + k, m);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) y[r * ldy + c] = hsum(acc[r][c]);
}

template <int C>
void f32_group(const float* x, int64_t M, int64_t K, const float* w, int64_t ld, float* y,
               int64_t ldy, const float* pf) {
  for (int64_t m = 0; m < M; m += 4, pf = nullptr) {
    const float* xm = x + m * K;
    float* ym = y + m * ldy;
    switch (std::min<int64_t>(4, M - m)) {
      case 1: f32_tile<1, C>(xm, K, w, ld, K, ym, ldy, pf); break;
      case 2: f32_tile<2, C>(xm, K, w, ld, K, ym, ldy, pf); break;
      case 3: f32_tile<3, C>(xm, K, w, ld, K, ym, ldy, pf); break;
      default: f32_tile<4, C>(xm, K, w, ld, K, ym, ldy, pf); break;
    }
  }
}

// 2 to 8 fp32 activation rows: 3 weight rows at a time for all of them, 4 activation rows a
// pass (the passes after the first read the 3 rows from L1), the first pass prefetching the rows
// ~20 KB ahead. The weights are read from memory once, and the prefetch keeps that stream going
// while the FMAs run: 8 rows of 2048 x 768 from memory, one thread, 0.64 ms against 0.65 for
// tiles of 256 KB passed over 4 rows at a time and 1.29 for 4 x 1 dot products.
void f32_rows(const float* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  const float* w = static_cast<const float*>(a.w);
  const int64_t ahead = std::max<int64_t>(3, (20 << 10) / (K * 4));
  int64_t n = n0;
  for (; n + 3 <= n1; n += 3) {
    const float* pf = w + std::min(n + ahead, n1 - 3) * a.ld;
    f32_group<3>(x, M, K, w + n * a.ld, a.ld, a.y + n, a.ldy, pf);
  }
  for (; n < n1; ++n) f32_group<1>(x, M, K, w + n * a.ld, a.ld, a.y + n, a.ldy, nullptr);
}

}  // namespace

void linear_f32(const float* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  if (M == 1)
    float_rows(x, M, K, a, n0, n1);  // bound by memory: 4 chunks a step, 4 chains
  else
    f32_rows(x, M, K, a, n0, n1);
}

// 16-bit weights stay on the row-at-a-time kernel: f32_rows' tiles over weights widened to fp32
// (tried) measured no better in the paged step (stories110M bf16, 2 threads, alternating: 2
// streams 127-155 against 155-185 tok/s, 4: 193-234 against 217-250, 8: 259-330 against
// 237-297).
void linear_bf16(const bf16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  float_rows(x, M, K, a, n0, n1);
}

void linear_f16(const fp16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  float_rows(x, M, K, a, n0, n1);
}

}  // namespace torchchat::cpu::avx2
