// Grouped linears over threads: one call multiplies x by one or several weight matrices of the
// same kind and width (a layer's q, k and v; w1 and w3): their output rows are numbered one after
// another and split evenly over the threads in one parallel region. Measured on stories110M's
// 768 x 768 int4 matrices, a call for q, k and v together took 17 us against 26 us for three
// calls (call, thread wake-up and conversions are paid once).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "ggml.h"
#include "step.h"

namespace torchchat::cpu {
namespace {

// f(matrix, u0, u1) for each run [u0, u1) of one matrix's units (rows, or `per`-row blocks) in a
// thread's share of all matrices' units.
template <typename F>
void for_units(ParallelFor pf, const std::vector<Matrix>& mats, int64_t per, int64_t grain,
               const F& f) {
  std::vector<int64_t> first(mats.size() + 1, 0);
  for (size_t i = 0; i < mats.size(); ++i) first[i + 1] = first[i] + (mats[i].N + per - 1) / per;
  pf(first.back(), grain, [&](int64_t u0, int64_t u1) {
    for (size_t i = 0; i < mats.size(); ++i) {
      const int64_t a = std::max(u0, first[i]), b = std::min(u1, first[i + 1]);
      if (a < b) f(mats[i], a - first[i], b - first[i]);
    }
  });
}

// f(m0, rows, am) for x's rows in groups of at most kMaxRows (the kernels' register tiles), am
// the matrix with its results from row m0: each group runs over the same weight rows of a
// thread's unit, which the first group reads from memory and the others from cache (a paged
// step of 24 tokens reads the weights once, not once every 8 tokens).
template <typename F>
void row_groups(int64_t M, const Matrix& a, const F& f) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    Matrix am = a;
    am.y = a.y + m0 * a.ldy;
    f(m0, std::min(kMaxRows, M - m0), am);
  }
}

// x (M rows of Kx values, zeros up to K) quantized once by quantize_rows_q8, then f(q, d, e, rows,
// am, u0, u1) for each thread's run [u0, u1) of units (`per` rows each) of each matrix and each
// group of x's rows (row_groups), q, d and e from that group's first row.
template <typename F>
void on_q8_rows(const Kernels& kt, ParallelFor pf, const float* x, int64_t M, int64_t Kx,
                int64_t K, const std::vector<Matrix>& mats, int64_t per, int64_t grain,
                const F& f) {
  std::vector<int8_t> q(M * K);
  std::vector<float> d(M * K / 32), e(M * K / 32);
  kt.quantize_rows_q8(x, Kx, K, q.data(), d.data(), e.data(), 0, M);
  const int64_t nb = K / 32;
  for_units(pf, mats, per, grain, [&](const Matrix& a, int64_t u0, int64_t u1) {
    row_groups(M, a, [&](int64_t m0, int64_t rows, const Matrix& am) {
      f(q.data() + m0 * K, d.data() + m0 * nb, e.data() + m0 * nb, rows, am, u0, u1);
    });
  });
}

}  // namespace

void linear_float(const Kernels& kt, ParallelFor pf, DType dt, const void* x, int64_t M,
                  int64_t K, const std::vector<Matrix>& mats) {
  // Grain of 16 rows: big enough to amortize a task, small enough to split the smallest layers.
  for_units(pf, mats, 1, 16, [&](const Matrix& a, int64_t n0, int64_t n1) {
    row_groups(M, a, [&](int64_t m0, int64_t rows, const Matrix& am) {
      switch (dt) {
        case DType::f32:
          kt.linear_f32(static_cast<const float*>(x) + m0 * K, rows, K, am, n0, n1);
          break;
        case DType::bf16:
          kt.linear_bf16(static_cast<const bf16_t*>(x) + m0 * K, rows, K, am, n0, n1);
          break;
        case DType::f16:
          kt.linear_f16(static_cast<const fp16_t*>(x) + m0 * K, rows, K, am, n0, n1);
          break;
      }
    });
  });
}

void linear_int8(const Kernels& kt, ParallelFor pf, bool bf16_scales, const float* x, int64_t M,
                 int64_t K, int64_t group, const std::vector<Matrix>& mats) {
  if ((kt.features & kInt8Q8) && K % 32 == 0 && group % 32 == 0) {  // x to 8 bits per 32 values
    on_q8_rows(kt, pf, x, M, K, K, mats, 1, 16,
               [&](const int8_t* q, const float* d, const float*, int64_t rows, const Matrix& am,
                   int64_t n0, int64_t n1) {
                 kt.linear_int8_q8(q, d, rows, K, group, bf16_scales, am, n0, n1);
               });
    return;
  }
  const auto kernel = bf16_scales ? kt.linear_int8_bf16s : kt.linear_int8_f32s;
  for_units(pf, mats, 1, 16, [&](const Matrix& a, int64_t n0, int64_t n1) {
    row_groups(M, a, [&](int64_t m0, int64_t rows, const Matrix& am) {
      kernel(x + m0 * K, rows, K, group, am, n0, n1);
    });
  });
}

void linear_int4(const Kernels& kt, ParallelFor pf, const bf16_t* x, int64_t M, int64_t K,
                 int64_t group, const std::vector<Matrix>& mats) {
  const int64_t G = K / group;
  std::vector<float> xsum(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float t = 0.0f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) t += (float)x[m * K + k];
      xsum[m * G + g] = t;
    }
  const float* xs = xsum.data();
  for_units(pf, mats, 64, 1, [&](const Matrix& a, int64_t b0, int64_t b1) {
    row_groups(M, a, [&](int64_t m0, int64_t rows, const Matrix& am) {
      kt.linear_int4(x + m0 * K, xs + m0 * G, rows, K, group, am, b0, b1);
    });
  });
}

void linear_int4_q8(const Kernels& kt, ParallelFor pf, bool dynamic, const float* x, int64_t M,
                    int64_t Kx, int64_t K, int64_t group, const std::vector<Matrix>& mats) {
  if (dynamic) {
    std::vector<uint8_t> u(M * K);
    std::vector<float> sa(M), za(M);
    kt.quantize_rows_8da4w(x, Kx, K, u.data(), sa.data(), za.data(), 0, M);
    for_units(pf, mats, 64, 1, [&](const Matrix& a, int64_t b0, int64_t b1) {
      row_groups(M, a, [&](int64_t m0, int64_t rows, const Matrix& am) {
        kt.linear_8da4w(u.data() + m0 * K, sa.data() + m0, za.data() + m0, rows, K, group, am,
                        b0, b1);
      });
    });
    return;
  }
  on_q8_rows(kt, pf, x, M, Kx, K, mats, 64, 1,
             [&](const int8_t* q, const float* d, const float* e, int64_t rows, const Matrix& am,
                 int64_t b0, int64_t b1) {
               kt.linear_int4_q8(q, d, e, rows, K, group, am, b0, b1);
             });
}

void linear_ggml(const Kernels& kt, ParallelFor pf, const float* x, int64_t M, int64_t K,
                 const std::vector<Matrix>& mats) {
  struct Quantized {  // x as one activation type's blocks
    int32_t type;
    int64_t ld;
    std::vector<uint8_t> rows;
  };
  std::vector<Quantized> qs;  // one per activation type the matrices take (a Q4_K_M layer: 2)
  qs.reserve(mats.size());   // so that `of` may point into it
  std::vector<const Quantized*> of;
  for (const auto& a : mats) {
    const int32_t act = ggml_layout(a.type)->act;
    auto it = std::find_if(qs.begin(), qs.end(), [&](const Quantized& q) { return q.type == act; });
    if (it == qs.end()) {
      const int64_t ld = ggml_row_bytes(act, K);
      qs.push_back({act, ld, std::vector<uint8_t>(M * ld)});
      it = qs.end() - 1;
      for (int64_t m = 0; m < M; ++m) ggml_quantize_row(act, x + m * K, K, it->rows.data() + m * ld);
    }
    of.push_back(&*it);
  }
  for_units(pf, mats, 1, 16, [&](const Matrix& a, int64_t n0, int64_t n1) {
    const Quantized& q = *of[&a - mats.data()];
    row_groups(M, a, [&](int64_t m0, int64_t rows, const Matrix& am) {
      kt.linear_ggml(q.rows.data() + m0 * q.ld, q.ld, rows, K, am, n0, n1);
    });
  });
}

void linear_ggml_tiled(const Kernels& kt, ParallelFor pf, const float* x, int64_t M, int64_t K,
                       const Matrix& a) {
  const int32_t act = ggml_layout(a.type)->act;
  const int64_t ld = ggml_row_bytes(act, K);
  std::vector<uint8_t> rows(M * ld);
  pf(M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) ggml_quantize_row(act, x + m * K, K, rows.data() + m * ld);
  });
  // Tiles of ~256 KB of weights: read from memory once, then from L2 for every kMaxRows tokens.
  const int64_t tile = std::max<int64_t>(16, (256 << 10) / a.ld);
  pf((a.N + tile - 1) / tile, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, n1 = std::min(a.N, n0 + tile);
      for (int64_t m = 0; m < M; m += kMaxRows) {
        Matrix am = a;
        am.y = a.y + m * a.ldy;
        kt.linear_ggml(rows.data() + m * ld, ld, std::min(kMaxRows, M - m), K, am, n0, n1);
      }
    }
  });
}

bool gemm_ggml(const Kernels& kt, ParallelFor pf, const float* x, int64_t M, int64_t K,
               const Matrix& a) {
  if (kt.gemm_ggml == nullptr || !(kt.gemm_ggml_types >> a.type & 1) || K % 256) return false;
  const int64_t T = (M + 15) / 16, nsb = K / 256;
  std::vector<int8_t> q(K * T * 16, 0);  // tokens past M: all 0
  std::vector<float> d(nsb * T * 16, 0.0f);
  std::vector<int32_t> s16(nsb * 8 * T * 16, 0), s32(nsb * 4 * T * 16, 0);
  pf(M, 8, [&](int64_t m0, int64_t m1) {
    std::vector<BlockQ8_K> row(nsb);
    for (int64_t m = m0; m < m1; ++m) {
      ggml_quantize_row(kGgmlQ8_K, x + m * K, K, row.data());
      const int64_t t = m / 16, i = m % 16;
      for (int64_t b = 0; b < nsb; ++b) {
        const BlockQ8_K& r = row[b];
        d[b * T * 16 + m] = r.d;
        for (int p = 0; p < 8; ++p)
          s16[(b * 8 + p) * T * 16 + m] = ggml_pair16(r.bsums[2 * p], r.bsums[2 * p + 1]);
        for (int p = 0; p < 4; ++p)
          s32[(b * 4 + p) * T * 16 + m] = ggml_pair16(r.bsums[4 * p] + r.bsums[4 * p + 1],
                                               r.bsums[4 * p + 2] + r.bsums[4 * p + 3]);
        for (int64_t kq = 0; kq < 64; ++kq)
          std::memcpy(&q[((b * 64 + kq) * T + t) * 64 + 4 * i], r.qs + 4 * kq, 4);
      }
    }
  });
  const GgmlGemmActs acts{M, T, q.data(), d.data(), s16.data(), s32.data()};
  // 16-row units (each level's kernel tiles them by its own rows)
  pf((a.N + 15) / 16, 1, [&](int64_t u0, int64_t u1) {
    kt.gemm_ggml(acts, K, a, u0 * 16, std::min(a.N, u1 * 16));
  });
  return true;
}

void pack_x_f32(const float* x, int64_t M, int64_t K, float* xp, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t rows = std::min<int64_t>(kF32Panel, M - p * kF32Panel);
    float* out = xp + p * K * kF32Panel;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < kF32Panel; ++i)
        out[k * kF32Panel + i] = i < rows ? x[(p * kF32Panel + i) * K + k] : 0.0f;
  }
}

void gemm_f32_tiles(const Kernels& kt, ParallelFor pf, int64_t threads, const float* x,
                    int64_t M, int64_t K, int64_t N, float* y, const F32Rows& rows) {
  if (M == 0 || N == 0) return;
  if (K == 0) return std::fill(y, y + M * N, 0.0f);  // (the tile sizes below divide by K)
  const int64_t panels = (M + kF32Panel - 1) / kF32Panel;
  const int64_t xn = panels * kF32Panel * K;
  std::unique_ptr<float[]> xbuf(new float[xn + 8]);  // 32-byte aligned below
  float* xp = xbuf.get() + ((32 - (reinterpret_cast<uintptr_t>(xbuf.get()) & 31)) & 31) / 4;
  pf(panels, 1, [&](int64_t p0, int64_t p1) { pack_x_f32(x, M, K, xp, p0, p1); });
  // Each thread the same number of tiles, 6-row multiples (the kernel's step) of at most ~256 KB
  // of fp32 weights: a tile filled into a buffer stays in L2 while every token reads it.
  auto up6 = [](int64_t n) { return (n + 5) / 6 * 6; };
  const int64_t per_thread = up6((N + threads - 1) / threads);
  const int64_t most = std::max<int64_t>(6, (256 << 10) / (K * 4) / 6 * 6);
  const int64_t tiles_each = (per_thread + most - 1) / most;
  const int64_t tile = up6((per_thread + tiles_each - 1) / tiles_each);
  pf((N + tile - 1) / tile, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> buf;  // kept: a fresh one a call paid its page faults
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, tn = std::min(tile, N - n0);
      if ((int64_t)buf.size() < tile * K) buf.resize(tile * K);
      kt.gemm_f32(xp, M, K, rows(n0, tn, buf.data()), K, tn, y + n0, N);
    }
  });
}

}  // namespace torchchat::cpu
