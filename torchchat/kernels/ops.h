// What torchchat's op files share (ops.cpp, ops_ggml.cpp): the kernel table chosen by
// torchchat::select_isa, the threading, and the conversions of few activation rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include "cpu/common/step.h"

namespace torchchat::ops {

namespace cpu = torchchat::cpu;
using cpu::bf16_t;
using cpu::kMaxRows;
using cpu::Matrix;

inline const cpu::Kernels* table = nullptr;  // set by select_isa; null: the ops refuse to run

inline void parallel(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  at::parallel_for(0, n, grain, f);
}

// A decode step's team (cpu/common/team.h): one OpenMP parallel region of torch's threads (the
// same pool at::parallel_for uses), or this thread alone inside another region.
inline void run_team(int size, const std::function<void(int, int)>& body) {
  if (size <= 1 || omp_in_parallel()) return body(0, 1);
#pragma omp parallel num_threads(size)
  body(omp_get_thread_num(), omp_get_num_threads());
}

// The table, if it has the feature bits `need`.
inline const cpu::Kernels& kernels(const char* op, int64_t need) {
  TORCH_CHECK(table != nullptr, op, ": no kernel level selected (torchchat.kernels.select_isa)");
  TORCH_CHECK((table->features & need) == need, op, ": not among the ", table->name,
              " kernels on this CPU (its feature bits ", table->features, ", needed ", need, ")");
  return *table;
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

inline cpu::DType dtype_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return cpu::DType::f32;
    case at::kBFloat16: return cpu::DType::bf16;
    case at::kHalf: return cpu::DType::f16;
    default: TORCH_CHECK(false, "torchchat: unsupported dtype ", st);
  }
}

inline void check_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows, "torchchat: x must be (M <= ", kMaxRows,
              ", K), got ", x.sizes());
  TORCH_CHECK(x.size(1) <= K, "torchchat: x has ", x.size(1), " columns, weights ", K);
}

// The ops below convert their few activation rows and outputs with plain loops into scratch
// vectors: a decode step calls them ~100 times, and each aten op spent on a cast, a pad or an
// allocation costs about a microsecond of dispatch (0.3 ms a token on stories110M).

// x (M, K) of any float dtype -> dst (M, Kpad) of type T, zero-padded.
template <typename T>
void rows_to(const at::Tensor& x, int64_t Kpad, std::vector<T>& dst) {
  const int64_t M = x.size(0), K = x.size(1);
  dst.assign(M * Kpad, T(0.0f));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rows_to", [&] {
    const auto* src = x.data_ptr<scalar_t>();
    const int64_t sm = x.stride(0), sk = x.stride(1);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) dst[m * Kpad + k] = T((float)src[m * sm + k * sk]);
  });
}

// fp32 results (M, N) -> a new tensor of x's dtype.
inline at::Tensor rows_from(const std::vector<float>& y, int64_t M, int64_t N, const at::Tensor& x) {
  auto out = at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "rows_from", [&] {
    auto* dst = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < M * N; ++i) dst[i] = scalar_t(y[i]);
  });
  return out;
}

inline int64_t total_rows(at::TensorList w) {
  int64_t rows = 0;
  for (const auto& t : w) rows += t.size(0);
  return rows;
}

// The matrices of a grouped call, w[i] with scales s[i] (none for float weights); their fp32
// results side by side in y, (M, all their rows).
inline std::vector<Matrix> matrices(at::TensorList w, at::TensorList s, int64_t M,
                             std::vector<float>& y) {
  const int64_t rows = total_rows(w);
  y.resize(M * rows);
  std::vector<Matrix> mats;
  int64_t off = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    const int64_t N = w[i].size(0);
    mats.push_back({w[i].data_ptr(), w[i].stride(0), s.empty() ? nullptr : s[i].data_ptr(), N,
                    y.data() + off, rows});
    off += N;
  }
  return mats;
}

// Prefill's many rows (int4 and int8 weights): x (M, K) bf16 @ W.T as bf16 GEMMs (oneDNN,
// AVX512-BF16; on levels without bf16 dot products, kBf16Gemm, each tile and x widened to fp32
// first) on tiles of W turned into bf16 just before -- up to kTileRows output rows at a
// time, each thread its own tiles (as many for each), so a tile goes from the conversion into
// the GEMM through the caches rather than through memory, and no matrix-sized buffer is
// allocated per call. Here (int4, 2 threads, 64 rows) that took tinyllama-1.1b's w1 from 2.8 to
// 2.1 ms and w2 (K = 5632) from 3.8 to 2.05 ms next to dequantizing the whole matrix first; 512
// rows: 14.1 -> 12.4 ms. Tiles of 128 and 512 rows ran about as fast as 256, of 64 slower.
constexpr int64_t kTileRows = 256;

// x (M, K) @ W.T -> fp32 (M, N) on the table's fp32 GEMM (kF32Gemm), W's rows as
// cpu::gemm_f32_tiles asks for them (rows(n0, tn, buf)).
inline at::Tensor f32_gemm(const at::Tensor& x, int64_t N, const cpu::F32Rows& rows) {
  const at::Tensor xf = x.detach().to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1);
  auto y = at::empty({M, N}, xf.options());
  cpu::gemm_f32_tiles(*table, parallel, at::get_num_threads(), xf.data_ptr<float>(), M, K, N,
                      y.data_ptr<float>(), rows);
  return y;
}

// Whether prefill's fp32 GEMMs run on the table's own kernel (f32_gemm).
inline bool own_f32_gemm() { return table != nullptr && (table->features & cpu::kF32Gemm); }

// Rows of one tile for N output rows: each thread the same number of tiles of at most kTileRows
// rows, a multiple of `align` (int4's 64-row blocks; 1 for row-major weights).
inline int64_t tile_rows(int64_t N, int64_t align) {
  const int64_t threads = at::get_num_threads();
  auto up = [align](int64_t n) { return (n + align - 1) / align * align; };
  const int64_t per_thread = up((N + threads - 1) / threads);
  const int64_t tiles_each = (per_thread + kTileRows - 1) / kTileRows;
  return up((per_thread + tiles_each - 1) / tiles_each);
}

// f(b0, b1, buf) over the 64-row blocks of N output rows on torch's threads, each thread with its
// own Buffers8da4w for M tokens of K values and `sbuf` floats of scales (kernels.h sizes them);
// torch's CPU allocator aligns them to 64 bytes, as the kernels' aligned loads need.
template <typename F>
void int4_row_blocks(int64_t N, int64_t K, int64_t M, int64_t sbuf, const F& f) {
  at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t b0, int64_t b1) {
    const auto wt = at::empty({K * 64}, at::kChar), ft = at::empty({M * 64}, at::kFloat);
    const auto st = at::empty({sbuf}, at::kFloat);
    f(b0, b1, cpu::Buffers8da4w{wt.data_ptr<int8_t>(), ft.data_ptr<float>(), st.data_ptr<float>()});
  });
}

}  // namespace torchchat::ops
