// The portable drivers above the kernel table: grouped linears split over threads, and the
// fused one-token decode step (torchchat::decode_layers).
#pragma once

#include "kernels.h"
#include "team.h"

namespace torchchat::cpu {

enum class DType { f32, bf16, f16 };

// y = x @ W.T for each matrix of mats (one call for a layer's q, k, v: one parallel region),
// x: M <= kMaxRows rows of K values of dtype dt.
void linear_float(const Kernels& kt, ParallelFor pf, DType dt, const void* x, int64_t M,
                  int64_t K, const std::vector<Matrix>& mats);
// int8 weights; x fp32 (M, K) zero-padded, K a multiple of 16; scales fp32 or bf16. On a level
// with kInt8Q8, x rounded to 8 bits per 32 values (quantize_rows_q8) where K and group allow.
void linear_int8(const Kernels& kt, ParallelFor pf, bool bf16_scales, const float* x, int64_t M,
                 int64_t K, int64_t group, const std::vector<Matrix>& mats);
// int4 weights in torch's CPU pack layout; x bf16 (M, K), K a multiple of group.
void linear_int4(const Kernels& kt, ParallelFor pf, const bf16_t* x, int64_t M, int64_t K,
                 int64_t group, const std::vector<Matrix>& mats);
// int4 (kInt4W) or 8da4w (kInt4DynW) on 8-bit activations (kQ8Decode): x fp32 (M, Kx), quantized
// here as gemm_int4_q8 or gemm_8da4w quantize it, zero-padded to K.
void linear_int4_q8(const Kernels& kt, ParallelFor pf, bool dynamic, const float* x, int64_t M,
                    int64_t Kx, int64_t K, int64_t group, const std::vector<Matrix>& mats);
// GGUF blocks (ggml.h), each matrix of its own type (Matrix::type); x fp32 (M, K), quantized
// here once to each activation type the matrices take.
void linear_ggml(const Kernels& kt, ParallelFor pf, const float* x, int64_t M, int64_t K,
                 const std::vector<Matrix>& mats);
// A few dozen tokens of prefill on decode's kernel (Kernels::ggml_rows_prefill): y of a (a.y,
// a.ldy) for M tokens of x (M, K) fp32, quantized once, kMaxRows at a time over tiles of a.
void linear_ggml_tiled(const Kernels& kt, ParallelFor pf, const float* x, int64_t M, int64_t K,
                       const Matrix& a);
// Prefill's GEMM on GGUF blocks in integers (Kernels::gemm_ggml): y of a (a.y, a.ldy) for M
// tokens of x (M, K) fp32; false, and nothing written, when the table has none for a's type.
bool gemm_ggml(const Kernels& kt, ParallelFor pf, const float* x, int64_t M, int64_t K,
               const Matrix& a);
// Prefill's fp32 GEMM (Kernels::gemm_f32): y (M, N) = x (M, K) fp32 @ W.T over tiles of W's
// rows on `threads` threads, each its own tiles, x packed once here. rows(n0, tn, buf): W's rows
// n0..n0 + tn as fp32, K apart -- the weights themselves, or buf (tile x K floats, the thread's
// own) filled with them (widened, dequantized).
using F32Rows = std::function<const float*(int64_t n0, int64_t tn, float* buf)>;
void gemm_f32_tiles(const Kernels& kt, ParallelFor pf, int64_t threads, const float* x,
                    int64_t M, int64_t K, int64_t N, float* y, const F32Rows& rows);

// torchchat::decode_layers: the kinds of weights a step runs on, its projections and shapes.
enum WeightKind : int64_t { kFloatW = 0, kInt8W = 1, kInt4W = 2, kInt4DynW = 3, kGgmlW = 4 };

// One grouped projection of a layer: matrices of one kind that multiply the same activations.
struct Projection {
  std::vector<Matrix> mats;
  int64_t K;  // columns the kernel reads (int8 and int4 weights may be zero-padded past x's)
};

struct StepArgs {
  int64_t L, D, H, KVH, Dh, F, M, kind, group;  // M tokens (rows), each of its own sequence
  bool bf16_scales;
  bool q8;        // int4 and 8da4w in integers (Kernels::linear_int4_q8, linear_8da4w)
  float eps;
};

// What a step reads and writes besides its weights (all of the activation dtype but freqs).
// Row m's token is at position pos[m]: its RoPE pair freqs + pos[m] * Dh, its mask row
// mask + m * mask_ld (len values), and its keys and values at cache row index[m * index_ld + t]
// for position t (index null: row t), head j of a row at j * head_stride, rows row_stride apart.
// One sequence's cache (KVH, len, Dh): head_stride len * Dh, row_stride Dh; a paged pool
// (rows, KVH, Dh): Dh and KVH * Dh, with the sequences' block tables spelled out in index.
struct StepData {
  const void* const* norms;  // 2L: attention, feed-forward
  const float* freqs;        // the RoPE table: (position, Dh / 2, (cos, sin))
  const int64_t* pos;        // M positions
  const bool* mask;          // M rows of len values, mask_ld apart
  int64_t mask_ld, len;
  void* const* k_caches;  // L caches, written at each row's position
  void* const* v_caches;
  int64_t head_stride, row_stride;
  const int64_t* index;
  int64_t index_ld;
};

// M tokens' hidden states h (M x D floats, values of dtype dt) through a.L layers, in place,
// on a team of `threads` (team.h: one parallel region for the whole step, `run` starts it).
// proj: 4 a layer (qkv, wo, w1/w3, w2) whose matrices write into qkv (M rows of Nq + 2 Nkv), o
// (M x D), g (M rows of 2F: w1's then w3's) and y2 (M x D).
void decode_step(const Kernels& kt, RunTeam run, int threads, DType dt, const StepArgs& a,
                 const StepData& data, const std::vector<Projection>& proj, float* h, float* qkv,
                 float* o, float* g, float* y2);

}  // namespace torchchat::cpu
