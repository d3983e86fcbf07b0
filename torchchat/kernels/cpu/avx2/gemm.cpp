// Prefill's fp32 GEMM on a tile of weights (kF32Gemm): 16 tokens x 6 output rows a step, the
// tokens in lanes (x packed by pack_x_f32, a k's 16 tokens side by side), each weight broadcast
// from its row as it is. 12 accumulators, 2 loads of x and 6 broadcasts a k for 12 FMAs: the FMA
// units bound it, not the loads. Each output is one chain of FMAs over k ascending, the scalar
// reference's order: equal to it to the bit, whatever the tile, the thread or the batch.
#include "vec.h"

namespace torchchat::cpu::avx2 {
namespace {

// R (1..6) output rows from w (rows ldw apart) for the 16 tokens of one panel, `rows` of them
// real: y[m * ldy + j] for m < rows, j < R.
template <int R>
inline void panel_rows(const float* xp, int64_t K, const float* w, int64_t ldw, int64_t rows,
                       float* y, int64_t ldy) {
  __m256 acc[R][2];
#pragma GCC unroll 6
  for (int j = 0; j < R; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  const float* wr[R];
#pragma GCC unroll 6
  for (int j = 0; j < R; ++j) wr[j] = w + j * ldw;
#pragma GCC unroll 4  // 10% faster than unrolled by the compiler's choice (64 x 768 @ 768 x 2048)
  for (int64_t k = 0; k < K; ++k) {
    const __m256 x0 = _mm256_load_ps(xp + k * 16), x1 = _mm256_load_ps(xp + k * 16 + 8);
#pragma GCC unroll 6
    for (int j = 0; j < R; ++j) {
      const __m256 b = _mm256_broadcast_ss(wr[j] + k);
      acc[j][0] = _mm256_fmadd_ps(x0, b, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(x1, b, acc[j][1]);
    }
  }
  alignas(32) float t[R][16];
#pragma GCC unroll 6
  for (int j = 0; j < R; ++j) {
    _mm256_store_ps(t[j], acc[j][0]);
    _mm256_store_ps(t[j] + 8, acc[j][1]);
  }
  for (int64_t m = 0; m < rows; ++m)
#pragma GCC unroll 6
    for (int j = 0; j < R; ++j) y[m * ldy + j] = t[j][m];
}

}  // namespace

void gemm_f32(const float* xp, int64_t M, int64_t K, const float* w, int64_t ldw, int64_t N,
              float* y, int64_t ldy) {
  for (int64_t n = 0; n < N; n += 6) {
    const float* wn = w + n * ldw;
    for (int64_t m = 0; m < M; m += 16) {
      const float* xm = xp + m * K;
      const int64_t rows = std::min<int64_t>(16, M - m);
      float* ym = y + m * ldy + n;
      switch (std::min<int64_t>(6, N - n)) {
        case 1: panel_rows<1>(xm, K, wn, ldw, rows, ym, ldy); break;
        case 2: panel_rows<2>(xm, K, wn, ldw, rows, ym, ldy); break;
        case 3: panel_rows<3>(xm, K, wn, ldw, rows, ym, ldy); break;
        case 4: panel_rows<4>(xm, K, wn, ldw, rows, ym, ldy); break;
        case 5: panel_rows<5>(xm, K, wn, ldw, rows, ym, ldy); break;
        default: panel_rows<6>(xm, K, wn, ldw, rows, ym, ldy); break;
      }
    }
  }
}

}  // namespace torchchat::cpu::avx2
