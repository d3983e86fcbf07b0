// The driver every instruction set's few-row linears share (float and int8 weights): activation
// rows taken up to four at a time, each count a compile-time constant so a kernel keeps its
// accumulators in registers, and output rows computed one after another (each thread's weights
// are then one sequential stream). Header-only with internal linkage: it is compiled with each
// folder's flags, and no copy may stand in for another's (see avx512/vec.h).
#pragma once

#include <algorithm>
#include <type_traits>

#include "kernels.h"

namespace torchchat::cpu {
namespace {

// f(std::integral_constant<int, R>{}) with R = M (1 to kMaxRows): a kernel keeps the
// accumulators of all M activation rows in registers, and reads each weight once for all of them.
template <typename F>
inline void with_rows(int64_t M, F f) {
  switch (M) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}
static_assert(kMaxRows == 8, "with_rows covers 1 to kMaxRows");

template <int R, typename T, typename Dot>
inline void rows_of(const T* xm, int64_t m0, const Matrix& a, int64_t n0, int64_t n1, Dot& dot) {
  float* y = a.y + m0 * a.ldy;
  float out[R];
  for (int64_t n = n0; n < n1; ++n) {
    dot(std::integral_constant<int, R>{}, xm, n, out);
#pragma GCC unroll 16
    for (int m = 0; m < R; ++m) y[m * a.ldy + n] = out[m];
  }
}

// Rows [n0, n1) of matrix a for M activation rows of x (K apart): dot(rows, xm, n, out) writes
// out[0..R) = the sums of output row n with activation rows xm[0..R), R = decltype(rows)::value
// (1 to 4); they land at a.y[(m + i) * a.ldy + n]. More than 4 activation rows pass over the
// weights 4 at a time, a tile of output rows (~256 KB of weights) at a time, so the passes after
// the first read it from L2: without tiles 8 rows read every weight from memory twice (32000 x
// 768 fp32: 10.3 ms against 3.8 ms for one row).
template <typename T, typename Dot>
inline void few_rows(const T* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1,
                     Dot dot) {
  // (sized by x's element type: int8 weights get tiles of 64 KB, in L2 all the same)
  const int64_t tile = M <= 4 ? n1 - n0 : std::max<int64_t>(1, (256 << 10) / (K * (int64_t)sizeof(T)));
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    for (int64_t m = 0; m < M; m += 4) {
      const T* xm = x + m * K;
      switch (std::min<int64_t>(4, M - m)) {
        case 1: rows_of<1>(xm, m, a, t0, t1, dot); break;
        case 2: rows_of<2>(xm, m, a, t0, t1, dot); break;
        case 3: rows_of<3>(xm, m, a, t0, t1, dot); break;
        default: rows_of<4>(xm, m, a, t0, t1, dot); break;
      }
    }
  }
}

// linear_int8_q8's loops (kernels.h) around a level's dot product of one weight row with one
// activation row, dot(w, s, per, x, d, nb): w's nb blocks of 32 codes, its scales s as stored
// (fp32, or bf16 when bf16_scales: one, or one a group of `per` blocks when per > 0), x's codes
// and block scales d. Output row by output row, so the weight row stays in L1 for the other
// activation rows.
template <typename Dot>
inline void int8_q8_rows(const int8_t* q, const float* d, int64_t M, int64_t K, int64_t group,
                         bool bf16_scales, const Matrix& a, int64_t n0, int64_t n1, Dot dot) {
  const int64_t nb = K / 32, G = group ? K / group : 1, per = group / 32;
  const int8_t* w = static_cast<const int8_t*>(a.w);
  auto run = [&](auto* s) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m)
        a.y[m * a.ldy + n] = dot(w + n * a.ld, s + n * G, per, q + m * K, d + m * nb, nb);
  };
  if (bf16_scales)
    run(static_cast<const bf16_t*>(a.s));
  else
    run(static_cast<const float*>(a.s));
}

}  // namespace
}  // namespace torchchat::cpu
