// torchchat's CPU kernels as torch custom ops (TORCH_LIBRARY torchchat): argument checks, the
// threading (at::parallel_for over the kernels' [begin, end) ranges) and oneDNN's bf16 GEMMs
// (at::mm), on the table of kernels chosen once for the CPU (cpu/common/dispatch.cpp; Python
// picks the level through select_isa). No intrinsics here: those live in cpu/<isa>/.
//
// Why our own kernels: torch 2.13's one-row matmuls (MKL/oneDNN GEMV for fp32/bf16, the int4
// pack kernel) stream weights at 16-27 GB/s on the 2-core machine these were measured on, about
// 40-60% of its read bandwidth and of what llama.cpp's kernels reach (docs/performance.md).
#include <torch/library.h>

#include <tuple>

#include "cpu/common/ggml.h"
#include "cpu/common/layer_math.h"
#include "ops.h"

namespace {

using namespace torchchat::ops;

// Selects the table of `level`; returns its feature bits, or -1 if that level is not here.
int64_t select_isa(std::string level) {
  const cpu::Kernels* t = cpu::select_kernels(level);
  if (t == nullptr) return -1;
  table = t;
  return t->features;
}

std::string isa_levels() {
  std::string out;
  for (const auto& level : cpu::levels()) out += (out.empty() ? "" : ",") + level;
  return out;
}

int64_t simd_level() { return table == nullptr ? 0 : table->features; }

// A grouped call's lists: one or more weights, and as many scales tensors where the op takes them.
void check_group(const char* op, at::TensorList w, at::TensorList s, bool scaled) {
  TORCH_CHECK(!w.empty(), op, ": no weights");
  TORCH_CHECK(!scaled || s.size() == w.size(), op, ": ", w.size(), " weights but ", s.size(),
              " scales tensors");
}

// x (M, K) @ w[i] (N_i, K).T for fp32, bf16 or fp16 x and weights of the same dtype.
at::Tensor linear_cpu(const at::Tensor& x, at::TensorList ws) {
  const auto& kt = kernels("torchchat::linear", cpu::kFewRows);
  check_group("torchchat::linear", ws, {}, false);
  const int64_t M = x.size(0), K = x.size(1);
  for (const auto& w : ws) {
    TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "torchchat::linear: w must be (N, K) row-major");
    TORCH_CHECK(x.scalar_type() == w.scalar_type(), "torchchat::linear: dtypes differ");
    check_rows(x, w.size(1));
    TORCH_CHECK(K == w.size(1), "torchchat::linear: K differs");
  }
  const auto xc = x.contiguous();
  std::vector<float> y;
  const auto mats = matrices(ws, {}, M, y);
  cpu::linear_float(kt, parallel, dtype_of(x.scalar_type()), xc.const_data_ptr(), M, K, mats);
  return rows_from(y, M, total_rows(ws), x);
}

// int8 weights w[i] (N_i, Kw) with scales (N_i,) or (N_i, Kw / group), all of one dtype;
// x (M, K <= Kw) of any float dtype.
at::Tensor linear_int8_cpu(const at::Tensor& x, at::TensorList ws, at::TensorList scales,
                           int64_t group) {
  const auto& kt = kernels("torchchat::linear_int8", cpu::kFewRows);
  check_group("torchchat::linear_int8", ws, scales, true);
  const int64_t M = x.size(0), Kw = ws[0].size(1);
  check_rows(x, Kw);
  TORCH_CHECK(group == 0 || (group >= 16 && (group & (group - 1)) == 0 && Kw % group == 0),
              "torchchat::linear_int8: group ", group, " must be 0 or a power of two >= 16 dividing ",
              Kw);
  TORCH_CHECK(Kw % 16 == 0, "torchchat::linear_int8: K ", Kw, " must be a multiple of 16");
  const auto sdt = scales[0].scalar_type();
  for (size_t i = 0; i < ws.size(); ++i) {
    const auto &w = ws[i], &s = scales[i];
    const int64_t N = w.size(0);
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar &&
                    w.size(1) == Kw,
                "torchchat::linear_int8: w must be contiguous int8 (N, ", Kw, ")");
    TORCH_CHECK((sdt == at::kBFloat16 || sdt == at::kFloat) && s.scalar_type() == sdt &&
                    s.is_contiguous() && s.numel() == N * (group ? Kw / group : 1),
                "torchchat::linear_int8: scales must be contiguous fp32 or bf16, ", s.sizes());
  }
  std::vector<float> xf, y;
  rows_to(x, Kw, xf);
  const auto mats = matrices(ws, scales, M, y);
  cpu::linear_int8(kt, parallel, sdt == at::kBFloat16, xf.data(), M, Kw, group, mats);
  return rows_from(y, M, total_rows(ws), x);
}

// int4 weights in torch's CPU pack layout: w (N, K/2) uint8, sz (K/group, N, 2) bf16 (scale,
// zero), N a multiple of 16, group (a multiple of `step`) dividing K. Returns K.
int64_t check_int4(const char* op, const at::Tensor& w, const at::Tensor& sz, int64_t group,
                   int64_t step) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kByte, op,
              ": w must be contiguous uint8 (N, K/2)");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(N % 16 == 0 && group > 0 && group % step == 0 && K % group == 0, op, ": N ", N,
              " must be a multiple of 16, K ", K, " of group ", group, " (a multiple of ", step,
              ")");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() &&
                  sz.numel() == (K / group) * N * 2,
              op, ": scales_and_zeros must be contiguous bf16 (K/group, N, 2)");
  return K;
}

// int4 weights w[i] (N_i, Kw/2), sz[i] as check_int4; x (M, K <= Kw). Activations are rounded
// to bf16 first, as the aten kernel's callers do.
at::Tensor linear_int4_cpu(const at::Tensor& x, at::TensorList ws, at::TensorList sz,
                           int64_t group) {
  const auto& kt = kernels("torchchat::linear_int4", cpu::kBf16);
  check_group("torchchat::linear_int4", ws, sz, true);
  const int64_t Kw = check_int4("torchchat::linear_int4", ws[0], sz[0], group, 2);
  for (size_t i = 1; i < ws.size(); ++i)
    TORCH_CHECK(check_int4("torchchat::linear_int4", ws[i], sz[i], group, 2) == Kw,
                "torchchat::linear_int4: K differs");
  const int64_t M = x.size(0);
  check_rows(x, Kw);
  std::vector<bf16_t> xb;
  std::vector<float> y;
  rows_to(x, Kw, xb);
  const auto mats = matrices(ws, sz, M, y);
  cpu::linear_int4(kt, parallel, xb.data(), M, Kw, group, mats);
  return rows_from(y, M, total_rows(ws), x);
}

// int4 (or 8da4w: dynamic) decode in integers, grouped as linear_int4: x (M <= kMaxRows, Kx <= K)
// quantized once as gemm_int4_q8 (gemm_8da4w) quantizes it, the same sums as those ops.
at::Tensor linear_int4_q8_cpu(const at::Tensor& x, at::TensorList ws, at::TensorList sz,
                              int64_t group, bool dynamic) {
  const char* op = "torchchat::linear_int4_q8";
  const auto& kt = kernels(op, cpu::kQ8Decode);
  check_group(op, ws, sz, true);
  const int64_t Kw = check_int4(op, ws[0], sz[0], group, 32);
  for (size_t i = 1; i < ws.size(); ++i)
    TORCH_CHECK(check_int4(op, ws[i], sz[i], group, 32) == Kw, op, ": K differs");
  const int64_t M = x.size(0), Kx = x.size(1);
  check_rows(x, Kw);
  std::vector<float> xf, y;
  rows_to(x, Kx, xf);
  const auto mats = matrices(ws, sz, M, y);
  cpu::linear_int4_q8(kt, parallel, dynamic, xf.data(), M, Kx, Kw, group, mats);
  return rows_from(y, M, total_rows(ws), x);
}

// fill(n0, tn, buf, ld) writes rows n0..n0 + tn of W as bf16 into buf: transposed (K x ld,
// k_major) or not (ld x K). The result (M, N) bf16, each column times scale[n] if scale is given
// (the product rounded once more to bf16).
template <typename Fill>
at::Tensor bf16_gemm_tiles(const at::Tensor& xb, int64_t N, int64_t K, bool k_major,
                           const float* scale, Fill fill) {
  const int64_t M = xb.size(0), rows = tile_rows(N, 64);
  const bool wide = !(table->features & cpu::kBf16Gemm);
  if (wide && !k_major && own_f32_gemm()) {  // rows of W widened to fp32 for the own GEMM
    const at::Tensor yf = f32_gemm(xb, N, [&](int64_t n0, int64_t tn, float* buf) {
      thread_local std::vector<bf16_t> half;  // kept: a fresh tile a call paid its page faults
      half.resize(tn * K);
      fill(n0, tn, half.data(), K);
      for (int64_t i = 0; i < tn * K; ++i) buf[i] = (float)half[i];
      return (const float*)buf;
    });
    const at::Tensor y = yf.to(at::kBFloat16);  // rounded once, as the bf16 GEMM's output
    if (scale == nullptr) return y;
    const at::Tensor s = at::from_blob(const_cast<float*>(scale), {N}, yf.options());
    return (y.to(at::kFloat) * s).to(at::kBFloat16);  // each product rounded once more
  }
  const at::Tensor xg = wide ? xb.to(at::kFloat) : xb;
  auto y = at::empty({M, N}, xb.options());
  at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t t0, int64_t t1) {
    auto buf = k_major ? at::empty({K, rows}, xb.options()) : at::empty({rows, K}, xb.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, tn = std::min<int64_t>(rows, N - n0);
      fill(n0, tn, reinterpret_cast<bf16_t*>(buf.data_ptr<at::BFloat16>()), rows);
      at::Tensor tile = k_major ? buf.narrow(1, 0, tn) : buf.narrow(0, 0, tn).t();
      at::Tensor yt = at::mm(xg, wide ? tile.to(at::kFloat) : tile);  // (M, tn)
      if (wide) yt = yt.to(at::kBFloat16);  // rounded once, as the bf16 GEMM's output
      const auto* src = yt.data_ptr<at::BFloat16>();
      auto* dst = y.data_ptr<at::BFloat16>();
      for (int64_t m = 0; m < M; ++m) {
        if (scale == nullptr) {
          std::memcpy(dst + m * N + n0, src + m * tn, tn * sizeof(at::BFloat16));
        } else {
          for (int64_t j = 0; j < tn; ++j)
            dst[m * N + n0 + j] = at::BFloat16((float)src[m * tn + j] * scale[n0 + j]);
        }
      }
    }
  });
  return y;
}

// x (M, K) bf16 @ int4 weights in torch's CPU pack layout (N, K/2), sz (K/group, N, 2) bf16
// -> bf16 (M, N): prefill's GEMM on tiles of the weights dequantized on the fly.
at::Tensor gemm_int4_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz,
                         int64_t group) {
  const auto& kt = kernels("torchchat::gemm_int4", cpu::kBf16);
  const int64_t K = check_int4("torchchat::gemm_int4", w, sz, group, 1), N = w.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kBFloat16,
              "torchchat::gemm_int4: x must be bf16 (M, ", K, "), got ", x.sizes());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const bf16_t* szp = ptr<bf16_t>(sz);
  return bf16_gemm_tiles(x.contiguous(), N, K, true, nullptr,
                         [&](int64_t n0, int64_t tn, bf16_t* buf, int64_t ld) {
                           for (int64_t r = 0; r < tn; r += 64)
                             kt.int4_dequantize_block_t(wp, szp, N, K, group, n0 + r, buf + r, ld);
                         });
}

// x (M, K) bf16 @ int8 weights (N, K) with per-row scales (N) -> bf16 (M, N), rounded as
// bf16(bf16(x @ codes.T) * bf16(scale)): prefill's GEMM on tiles of the codes.
at::Tensor gemm_int8_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  const auto& kt = kernels("torchchat::gemm_int8", cpu::kBf16);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar,
              "torchchat::gemm_int8: w must be contiguous int8 (N, K)");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(scales.numel() == N, "torchchat::gemm_int8: scales must have N = ", N, " values");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kBFloat16,
              "torchchat::gemm_int8: x must be bf16 (M, ", K, "), got ", x.sizes());
  // the scales as the GEMM's bf16 epilogue sees them: rounded to bf16
  const auto s = scales.reshape({N}).to(at::kBFloat16).to(at::kFloat).contiguous();
  const int8_t* wp = w.data_ptr<int8_t>();
  return bf16_gemm_tiles(x.contiguous(), N, K, false, s.data_ptr<float>(),
                         [&](int64_t n0, int64_t tn, bf16_t* buf, int64_t) {
                           for (int64_t r = 0; r < tn; ++r)
                             kt.int8_to_bf16(wp + (n0 + r) * K, K, buf + r * K);
                         });
}

// Prefill's fp32 GEMM on torchchat's kernel (kF32Gemm): x (M, K) @ w.T for fp32 x and w (N, K),
// w's rows read where they are; each output one FMA chain over k (Kernels::gemm_f32).
at::Tensor gemm_f32_cpu(const at::Tensor& x, const at::Tensor& w) {
  kernels("torchchat::gemm_f32", cpu::kF32Gemm);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) &&
                  x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "torchchat::gemm_f32: x (M, K) and w (N, K) must be fp32");
  const at::Tensor wc = w.detach().contiguous();
  const float* wp = wc.data_ptr<float>();
  const int64_t K = w.size(1);
  return f32_gemm(x, w.size(0), [&](int64_t n0, int64_t, float*) { return wp + n0 * K; });
}

// Prefill on levels without bf16 dot products (kBf16Gemm): x (M, K) @ w.T for bf16 or fp16 x and
// w (N, K) of x's dtype, as fp32 GEMMs on tiles of w widened just before (each thread its own
// tiles, as bf16_gemm_tiles) and x widened once; the result rounded once to x's dtype, as torch's
// bf16/fp16 GEMM rounds its fp32 sums. On AVX2, torch's bf16 GEMM ran stories110M's prefill at
// 119 tok/s against 691 in fp32.
at::Tensor gemm_wide_cpu(const at::Tensor& x, const at::Tensor& w) {
  kernels("torchchat::gemm_wide", cpu::kFewRows);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) &&
                  x.scalar_type() == w.scalar_type() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "torchchat::gemm_wide: x (M, K) and w (N, K) must be bf16 or fp16 of one dtype");
  const int64_t M = x.size(0), N = w.size(0), rows = tile_rows(N, 1);
  const at::Tensor xf = x.detach().to(at::kFloat), wc = w.detach().contiguous();
  if (own_f32_gemm()) {
    const int64_t K = w.size(1);
    return f32_gemm(xf, N, [&](int64_t n0, int64_t tn, float* buf) {
             at::from_blob(buf, {tn, K}, xf.options()).copy_(wc.narrow(0, n0, tn));
             return (const float*)buf;
           })
        .to(x.scalar_type());
  }
  auto y = at::empty({M, N}, x.options());
  at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode guard;  // worker threads do not inherit the caller's mode: y may be an
                               // inference tensor, written in place here
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, tn = std::min<int64_t>(rows, N - n0);
      const at::Tensor yt = at::mm(xf, wc.narrow(0, n0, tn).to(at::kFloat).t());  // (M, tn)
      y.narrow(1, n0, tn).copy_(yt);
    }
  });
  return y;
}

// Up to this many tokens 8da4w runs the decode entry (it reads the codes once a token): at 4 and
// more the GEMM (codes unpacked once for all tokens) was faster here (stories110M's 2048 x 768,
// 2 threads); the same sums either way. Weight-only int4's entry stays faster up to kMaxRows.
constexpr int64_t kFew8da4w = 3;

// An int4 matrix in torch's layout (scales [G][N][2]) for the decode entries, results y (M, N).
cpu::Matrix int4_matrix(const at::Tensor& w, const at::Tensor& sz, float* y) {
  cpu::Matrix a{};
  a.w = w.data_ptr<uint8_t>();
  a.s = ptr<bf16_t>(sz);
  a.N = w.size(0);
  a.y = y;
  a.ldy = a.N;
  return a;
}

// 8da4w prefill (and decode where the level has kQ8Decode): x (M, Kx <= K) of any float dtype, quantized here per token to int8 exactly as
// torchchat.quant.primitives.quantize_per_token_int8 does (fp32 arithmetic, round half to even;
// missing columns count as zeros); int4 weights in torch's CPU pack layout with zero points 0.
// Returns (M, N) in x's dtype.
at::Tensor gemm_8da4w_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz,
                          int64_t group) {
  const auto& kt = kernels("torchchat::gemm_8da4w", cpu::kInt8Gemm);
  const int64_t K = check_int4("torchchat::gemm_8da4w", w, sz, group, 4), N = w.size(0);
  TORCH_CHECK(K % 16 == 0, "torchchat::gemm_8da4w: K ", K, " must be a multiple of 16");
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= K && at::isFloatingType(x.scalar_type()),
              "torchchat::gemm_8da4w: x must be float (M, <= ", K, "), got ", x.sizes());
  const int64_t M = x.size(0), Kx = x.size(1);
  const auto xf = x.to(at::kFloat).contiguous();
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  std::vector<uint8_t> u(M * K);
  std::vector<float> sa(M), za(M);
  const float* xp = xf.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    kt.quantize_rows_8da4w(xp, Kx, K, u.data(), sa.data(), za.data(), m0, m1);
  });
  float* yp = y.data_ptr<float>();
  if (M <= kFew8da4w && (kt.features & cpu::kQ8Decode) && group % 32 == 0) {  // decode
    const cpu::Matrix a = int4_matrix(w, sz, yp);
    at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t b0, int64_t b1) {
      kt.linear_8da4w(u.data(), sa.data(), za.data(), M, K, group, a, b0, b1);
    });
    return y.to(x.scalar_type());
  }
  int4_row_blocks(N, K, M, (K / group) * 64, [&](int64_t b0, int64_t b1, const auto& buf) {
    kt.gemm_8da4w(u.data(), M, K, sa.data(), za.data(), w.data_ptr<uint8_t>(), ptr<bf16_t>(sz), N,
                  group, yp, b0, b1, buf);
  });
  return y.to(x.scalar_type());
}

// x (M, Kx <= K) of any float dtype rounded to 8 bits per 32 values (quantize_rows_q8): codes q
// (M, K), zeros past Kx, and per block d and e (M, K / 32).
struct Q8Rows {
  std::vector<int8_t> q;
  std::vector<float> d, e;
};

Q8Rows quantize_q8(const cpu::Kernels& kt, const at::Tensor& x, int64_t K) {
  const int64_t M = x.size(0), Kx = x.size(1), nb = K / 32;
  const auto xf = x.to(at::kFloat).contiguous();
  Q8Rows r{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  const float* xp = xf.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    kt.quantize_rows_q8(xp, Kx, K, r.q.data(), r.d.data(), r.e.data(), m0, m1);
  });
  return r;
}

// int4 prefill (and decode where the level has kQ8Decode) in integers: x (M, Kx <= K) of any
// float dtype quantized here to 8 bits per 32 values (quantize_rows_q8), int4 weights in torch's
// CPU pack layout with (scale, zero) pairs. Returns (M, N) in x's dtype.
at::Tensor gemm_int4_q8_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz,
                            int64_t group) {
  const auto& kt = kernels("torchchat::gemm_int4_q8", cpu::kInt4Q8Gemm);
  const int64_t K = check_int4("torchchat::gemm_int4_q8", w, sz, group, 32), N = w.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= K && at::isFloatingType(x.scalar_type()),
              "torchchat::gemm_int4_q8: x must be float (M, <= ", K, "), got ", x.sizes());
  const int64_t M = x.size(0);
  const Q8Rows x8 = quantize_q8(kt, x, K);
  const auto& q = x8.q;
  const auto &d = x8.d, &e = x8.e;
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  if (M <= cpu::kMaxRows && (kt.features & cpu::kQ8Decode)) {  // decode: the same sums
    const cpu::Matrix a = int4_matrix(w, sz, yp);
    at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t b0, int64_t b1) {
      kt.linear_int4_q8(q.data(), d.data(), e.data(), M, K, group, a, b0, b1);
    });
    return y.to(x.scalar_type());
  }
  int4_row_blocks(N, K, M, (K / group) * 128, [&](int64_t b0, int64_t b1, const auto& buf) {
    kt.gemm_int4_q8(q.data(), d.data(), e.data(), M, K, w.data_ptr<uint8_t>(), ptr<bf16_t>(sz), N,
                    group, yp, b0, b1, buf);
  });
  return y.to(x.scalar_type());
}

// int8 prefill in integers: x (M, Kx <= K) of any float dtype quantized here to 8 bits per 32
// values (quantize_rows_q8, as int8 decode does), int8 weights w (N, K) with fp32 or bf16 scales
// (N) or (N, K / group), group 0 or a multiple of 32. Returns (M, N) in x's dtype.
at::Tensor gemm_int8_q8_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                            int64_t group) {
  const char* op = "torchchat::gemm_int8_q8";
  const auto& kt = kernels(op, cpu::kInt8Q8Gemm);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar,
              op, ": w must be contiguous int8 (N, K)");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 32 == 0 && (group == 0 || (group % 32 == 0 && K % group == 0)), op, ": K ", K,
              " must be a multiple of 32 and group ", group, " 0 or a multiple of 32 dividing it");
  const int64_t G = group ? K / group : 1;
  TORCH_CHECK((s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16) &&
                  s.is_contiguous() && s.numel() == N * G,
              op, ": scales must be contiguous fp32 or bf16 with ", N * G, " values");
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= K && at::isFloatingType(x.scalar_type()),
              op, ": x must be float (M, <= ", K, "), got ", x.sizes());
  const int64_t M = x.size(0);
  const Q8Rows x8 = quantize_q8(kt, x, K);
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  cpu::Matrix a{};
  a.w = w.data_ptr<int8_t>();
  a.ld = K;
  a.s = s.const_data_ptr();
  a.N = N;
  a.y = y.data_ptr<float>();
  a.ldy = N;
  const bool bf16_scales = s.scalar_type() == at::kBFloat16;
  int4_row_blocks(N, K, M, G * 128, [&](int64_t b0, int64_t b1, const auto& buf) {
    kt.gemm_int8_q8(x8.q.data(), x8.d.data(), x8.e.data(), M, K, group, bf16_scales, a, b0, b1,
                    buf);
  });
  return y.to(x.scalar_type());
}

// f(T{}) with T the storage type of float dtype st.
template <typename F>
void with_dtype(at::ScalarType st, const F& f) {
  switch (dtype_of(st)) {
    case cpu::DType::f32: return f(float{});
    case cpu::DType::bf16: return f(bf16_t{});
    case cpu::DType::f16: return f(cpu::fp16_t{});
  }
}

// The model's RMSNorm (torchchat/model/transformer.py) of every row of x (..., D), weight w (D)
// of x's dtype, in the decode step's arithmetic (cpu/common/layer_math.h): one op for the eight
// aten ops of the module (~0.1-0.3 ms each time on 64 tokens of stories110M).
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1) &&
                  w.scalar_type() == x.scalar_type(),
              "torchchat::rms_norm: w must be (", x.size(-1), ") of x's dtype");
  const auto xc = x.contiguous(), wc = w.contiguous();
  auto y = at::empty_like(xc);
  const int64_t D = x.size(-1), rows = D ? xc.numel() / D : 0;
  with_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = ptr<T>(xc);
    const T* wp = ptr<T>(wc);
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      std::vector<float> row(D), out(D);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t d = 0; d < D; ++d) row[d] = (float)xp[r * D + d];
        cpu::rms_norm_row<T>(row.data(), wp, D, (float)eps, out.data());
        for (int64_t d = 0; d < D; ++d) yp[r * D + d] = T(out[d]);
      }
    });
  });
  return y;
}

// The feed-forward gate of the model's modules, silu(a) * b: a and b of one float dtype and
// shape, SiLU in fp32 on the level's vector exp (Kernels::silu), rounded to the dtype, times b,
// rounded (the decode step's arithmetic). One op for aten's silu and mul.
at::Tensor silu_mul_cpu(const at::Tensor& a, const at::Tensor& b) {
  const auto& kt = kernels("torchchat::silu_mul", cpu::kFewRows);
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(),
              "torchchat::silu_mul: a and b must be of one shape and dtype");
  const auto ac = a.contiguous(), bc = b.contiguous();
  auto y = at::empty_like(ac);
  with_dtype(a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* ap = ptr<T>(ac);
    const T* bp = ptr<T>(bc);
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    at::parallel_for(0, ac.numel(), 4096, [&](int64_t i0, int64_t i1) {
      float x[256], s[256];
      for (int64_t c0 = i0; c0 < i1; c0 += 256) {
        const int64_t n = std::min<int64_t>(256, i1 - c0);
        for (int64_t i = 0; i < n; ++i) x[i] = (float)ap[c0 + i];
        kt.silu(x, n, s);
        for (int64_t i = 0; i < n; ++i) yp[c0 + i] = T((float)T(s[i]) * (float)bp[c0 + i]);
      }
    });
  });
  return y;
}

// x (B, S, H, D) rotated as the model's apply_rope: interleaved pairs by freqs (S, D/2, 2), or
// one table a row (B, S, D/2, 2), fp32; the result in x's dtype (one op for ~12 aten ops).
at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& freqs) {
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "torchchat::rope: x must be (B, S, H, D)");
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3);
  const bool per_row = freqs.dim() == 4;
  TORCH_CHECK(freqs.scalar_type() == at::kFloat &&
                  (per_row ? freqs.sizes() == at::IntArrayRef{B, S, D / 2, 2}
                           : freqs.sizes() == at::IntArrayRef{S, D / 2, 2}),
              "torchchat::rope: freqs must be fp32 (S, D/2, 2) or (B, S, D/2, 2), got ",
              freqs.sizes());
  const auto xc = x.contiguous(), fc = freqs.contiguous();
  auto y = at::empty_like(xc);
  const float* fp = fc.data_ptr<float>();
  with_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = ptr<T>(xc);
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    at::parallel_for(0, B * S, 16, [&](int64_t r0, int64_t r1) {
      std::vector<float> row(H * D);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t i = 0; i < H * D; ++i) row[i] = (float)xp[r * H * D + i];
        cpu::rope_row<T>(row.data(), H, D, fp + (per_row ? r : r % S) * D);
        for (int64_t i = 0; i < H * D; ++i) yp[r * H * D + i] = T(row[i]);
      }
    });
  });
  return y;
}

// Rows of query q[b, h, s] against its sequence's keys and values: kv(b, j) gives the k and v
// base of batch row b, kv head j, and where each of its `len` positions' rows lie.
template <typename T, typename A, typename KV>
void attention_rows(A attend, const at::Tensor& q, int64_t KVH, int64_t len, KV kv,
                    const at::Tensor& mask, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), group = H / KVH;
  const T* qp = ptr<T>(q);
  const bool* mp = mask.data_ptr<bool>();
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const int64_t mb = mask.size(0) == 1 ? 0 : mask.stride(0), ms = mask.stride(2);
  // Tasks of at least ~64K multiply-adds: a one-token step over a short cache stays on one
  // thread (waking the others costs more than the work).
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, len * D));
  // Each mask row's open span, found once for all heads.
  std::vector<std::pair<int64_t, int64_t>> span(B * S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) span[b * S + s] = cpu::open_span(mp + b * mb + s * ms, len);
  at::parallel_for(0, B * H * S, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(len + 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * S), h = (i / S) % H, s = i % S;
      const auto [kb, vb, rows] = kv(b, h / group);
      attend(qp + b * q.stride(0) + h * q.stride(1) + s * q.stride(2), kb, vb, rows,
             mp + b * mb + s * ms, span[b * S + s].first, span[b * S + s].second, D,
             (float)scale, op + ((b * H + h) * S + s) * D, p.data());
    }
  });
}

// q (B, H, S, D) against keys and values of KVH heads with H a multiple of KVH (grouped-query
// attention) over `len` positions; mask bool (1 or B, 1, S, len). `index` (B, len) int64: rows
// of a pool k, v (rows, KVH, D) (a paged cache read in place), else k, v (B, KVH, len, D).
at::Tensor attention_of(const char* op, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor* index, const at::Tensor& mask,
                        double scale) {
  const auto& kt = kernels(op, cpu::kFewRows);
  const bool pooled = index != nullptr;
  TORCH_CHECK(q.dim() == 4 && k.dim() == (pooled ? 3 : 4) && mask.dim() == 4, op,
              ": q, mask 4-d, k, v ", pooled ? 3 : 4, "-d");
  TORCH_CHECK(k.sizes() == v.sizes() && k.strides() == v.strides(), op, ": k, v");
  const int64_t KVH = k.size(1), D = q.size(3);
  TORCH_CHECK(k.size(-1) == D && q.size(1) % KVH == 0 && (pooled || q.size(0) == k.size(0)), op,
              ": shapes ", q.sizes(), " ", k.sizes());
  TORCH_CHECK(k.stride(-1) == 1 && q.stride(3) == 1, op, ": rows of q, k, v must be contiguous");
  TORCH_CHECK(D <= 256, op, ": head dim ", D, " > 256");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), op,
              ": dtypes differ");
  const int64_t len = pooled ? index->size(1) : k.size(2);
  if (pooled) {
    TORCH_CHECK(index->dim() == 2 && index->size(0) == q.size(0) &&
                    index->scalar_type() == at::kLong && index->is_contiguous(),
                op, ": index must be contiguous int64 (B, len)");
    const auto* ip = index->data_ptr<int64_t>();
    for (int64_t i = 0; i < index->numel(); ++i)  // the pool is read at these rows
      TORCH_CHECK(ip[i] >= 0 && ip[i] < k.size(0), op, ": index ", ip[i], " outside the pool");
  }
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.size(2) == q.size(2) &&
                  mask.size(3) == len && mask.stride(3) == 1 &&
                  (mask.size(0) == 1 || mask.size(0) == q.size(0)),
              op, ": mask ", mask.sizes());
  auto out = at::empty(q.sizes(), q.options());
  auto run = [&](auto zero, auto attend) {
    using T = decltype(zero);
    const T* kp = ptr<T>(k);
    const T* vp = ptr<T>(v);
    if (pooled) {
      const int64_t* ip = index->data_ptr<int64_t>();
      attention_rows<T>(attend, q, KVH, len, [&](int64_t b, int64_t j) {
        const int64_t o = j * k.stride(1);
        return std::make_tuple(kp + o, vp + o, cpu::CacheRows{k.stride(0), ip + b * len});
      }, mask, scale, out);
    } else {
      attention_rows<T>(attend, q, KVH, len, [&](int64_t b, int64_t j) {
        const int64_t o = b * k.stride(0) + j * k.stride(1);
        return std::make_tuple(kp + o, vp + o, cpu::CacheRows{k.stride(2)});
      }, mask, scale, out);
    }
  };
  switch (dtype_of(q.scalar_type())) {
    case cpu::DType::f32: run(float{}, kt.attend_f32); break;
    case cpu::DType::bf16: run(bf16_t{}, kt.attend_bf16); break;
    case cpu::DType::f16: run(cpu::fp16_t{}, kt.attend_f16); break;
  }
  return out;
}

// softmax(q k^T * scale + mask) v: q (B, H, S, D); k, v (B, KVH, T, D), unit stride along D
// (rows any stride apart); mask bool (1 or B, 1, S, T).
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& mask, double scale) {
  return attention_of("torchchat::attention", q, k, v, nullptr, mask, scale);
}

// The same over a paged pool read in place: k, v (rows, KVH, D); index (B, T) int64, the pool
// row of each sequence's positions 0..T-1.
at::Tensor attention_paged_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& index, const at::Tensor& mask, double scale) {
  return attention_of("torchchat::attention_paged", q, k, v, &index, mask, scale);
}


// The layers of a fused decode step (cpu::decode_step) for the M rows of x (M, D): checks the
// weights (7 a layer: wq, wk, wv, wo, w1, w3, w2, of one kind; s their scales, none for float
// weights and GGUF blocks, int4's blocked, see int4_scale_offset; types: GGUF blocks' ggml type,
// one a weight) and norms (2 a layer of x's dtype), runs the step on `data`'s caches and
// returns the new hidden states.
at::Tensor step_layers(const char* op, const at::Tensor& x, at::TensorList norms, double eps,
                       at::TensorList w, at::TensorList s, int64_t kind, int64_t group,
                       int64_t n_heads, at::IntArrayRef types, int64_t L, int64_t KVH, int64_t Dh,
                       cpu::StepData data) {
  TORCH_CHECK(kind >= cpu::kFloatW && kind <= cpu::kGgmlW, op, ": unknown weight kind ", kind);
  const bool int4 = kind == cpu::kInt4W || kind == cpu::kInt4DynW, ggml = kind == cpu::kGgmlW;
  const auto& kt = kernels(op, int4 ? cpu::kBf16 : ggml ? cpu::kGgml : cpu::kFewRows);
  const int64_t n_scales = kind == cpu::kFloatW || ggml ? 0 : 7 * L;
  TORCH_CHECK((int64_t)norms.size() == 2 * L && (int64_t)w.size() == 7 * L &&
                  (int64_t)s.size() == n_scales && (int64_t)types.size() == (ggml ? 7 * L : 0),
              op, ": ", L, " layers need ", 2 * L, " norms, ", 7 * L, " weights, ", n_scales,
              " scales tensors and ", ggml ? 7 * L : 0, " types");
  const auto dt = x.scalar_type();
  const int64_t M = x.size(0), D = x.size(1);
  for (const auto& n : norms)
    TORCH_CHECK(n.numel() == D && n.is_contiguous() && n.scalar_type() == dt, op,
                ": norm weights must be (", D, ") of x's dtype");
  TORCH_CHECK(Dh <= 256 && Dh % 2 == 0 && n_heads > 0 && n_heads % KVH == 0, op, ": ", n_heads,
              " heads over ", KVH, " kv heads of ", Dh);
  const int64_t Nq = n_heads * Dh, Nkv = KVH * Dh, F = w[4].size(0);
  const bool bf16_scales = n_scales && s[0].scalar_type() == at::kBFloat16;
  // Each weight's shape (out N, in K0) and kind; returns the columns its kernel reads.
  auto check = [&](int64_t i, int64_t N, int64_t K0) -> int64_t {
    const auto& m = w[i];
    if (kind == cpu::kFloatW) {
      TORCH_CHECK(m.dim() == 2 && m.scalar_type() == dt && m.stride(1) == 1 && m.size(0) == N &&
                      m.size(1) == K0,
                  op, ": weight ", i, " must be (", N, ", ", K0, ") of x's dtype, got ", m.sizes());
      return K0;
    }
    if (ggml) {
      const cpu::GgmlLayout* l = cpu::ggml_layout((int32_t)types[i]);
      TORCH_CHECK(l != nullptr && K0 % l->block == 0, op, ": weight ", i, ": ggml type ",
                  types[i], " does not run on ", K0, " columns");
      const int64_t bytes = cpu::ggml_row_bytes((int32_t)types[i], K0);
      TORCH_CHECK(m.dim() == 2 && m.scalar_type() == at::kByte && m.stride(1) == 1 &&
                      m.size(0) == N && m.size(1) == bytes,
                  op, ": weight ", i, " must be uint8 (", N, ", ", bytes, "), got ", m.sizes());
      return K0;
    }
    if (kind == cpu::kInt8W) {
      const int64_t Kw = m.size(1);
      TORCH_CHECK(m.dim() == 2 && m.is_contiguous() && m.scalar_type() == at::kChar &&
                      m.size(0) == N && Kw >= K0 && Kw % 16 == 0 &&
                      (group == 0 || (group >= 16 && (group & (group - 1)) == 0 && Kw % group == 0)),
                  op, ": int8 weight ", i, " must be contiguous (", N, ", >= ", K0, "), got ",
                  m.sizes());
      TORCH_CHECK(s[i].is_contiguous() && s[i].numel() == N * (group ? Kw / group : 1) &&
                      s[i].scalar_type() == (bf16_scales ? at::kBFloat16 : at::kFloat),
                  op, ": scales ", i, " do not match their weight");
      return Kw;
    }
    const int64_t Kw = check_int4(op, m, s[i], group, 2);
    TORCH_CHECK(m.size(0) == N && Kw >= K0, op, ": int4 weight ", i, " must be (", N, ", >= ",
                K0, " / 2), got ", m.sizes());
    return Kw;
  };
  std::vector<float> qkv(M * (Nq + 2 * Nkv)), o(M * D), g(M * 2 * F), y2(M * D);
  std::vector<cpu::Projection> proj;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t b = 7 * l;
    auto mat = [&](int64_t i, int64_t N, float* y, int64_t ldy) {
      return Matrix{w[i].data_ptr(), w[i].stride(0), n_scales ? s[i].data_ptr() : nullptr,
                    N, y, ldy, int4, ggml ? (int32_t)types[i] : 0};
    };
    const int64_t Kq = check(b, Nq, D);
    TORCH_CHECK(check(b + 1, Nkv, D) == Kq && check(b + 2, Nkv, D) == Kq, op,
                ": q, k, v weights differ in width");
    const int64_t Ko = check(b + 3, D, Nq);
    const int64_t K1 = check(b + 4, F, D);
    TORCH_CHECK(check(b + 5, F, D) == K1, op, ": w1, w3 differ in width");
    const int64_t K2 = check(b + 6, D, F);
    const int64_t ldq = Nq + 2 * Nkv;
    proj.push_back({{mat(b, Nq, qkv.data(), ldq), mat(b + 1, Nkv, qkv.data() + Nq, ldq),
                     mat(b + 2, Nkv, qkv.data() + Nq + Nkv, ldq)}, Kq});
    proj.push_back({{mat(b + 3, D, o.data(), D)}, Ko});
    proj.push_back({{mat(b + 4, F, g.data(), 2 * F), mat(b + 5, F, g.data() + F, 2 * F)}, K1});
    proj.push_back({{mat(b + 6, D, y2.data(), D)}, K2});
  }
  // int4 and 8da4w decode in integers where the modules do: levels with kQ8Decode, groups of
  // whole 32-value blocks (models of any float dtype: their scales stay bf16, Int4Linear._apply)
  const bool q8 = int4 && (kt.features & cpu::kQ8Decode) && group % 32 == 0;
  const cpu::StepArgs a{L, D, n_heads, KVH, Dh, F, M, kind, group, bf16_scales, q8, (float)eps};
  std::vector<const void*> norm_ptrs;
  for (const auto& n : norms) norm_ptrs.push_back(n.const_data_ptr());
  data.norms = norm_ptrs.data();
  std::vector<float> h(M * D);
  auto out = at::empty({M, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "decode_layers", [&] {
    const auto* xp = x.data_ptr<scalar_t>();
    for (int64_t i = 0; i < M * D; ++i) h[i] = (float)xp[i];
    cpu::decode_step(kt, run_team, at::get_num_threads(), dtype_of(dt), a, data, proj, h.data(),
                     qkv.data(), o.data(), g.data(), y2.data());
    auto* dst = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < M * D; ++i) dst[i] = scalar_t(h[i]);
  });
  return out;
}

at::ScalarType check_step_dtype(const char* op, const at::Tensor& x) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": unsupported dtype ", dt);
  return dt;
}

// Caches of x's dtype, all of the first one's shape and contiguous.
void check_caches(const char* op, at::TensorList kc, at::TensorList vc, at::ScalarType dt) {
  TORCH_CHECK(!kc.empty() && vc.size() == kc.size(), op, ": ", kc.size(), " k caches, ",
              vc.size(), " v caches");
  for (size_t l = 0; l < kc.size(); ++l)
    TORCH_CHECK(kc[l].sizes() == kc[0].sizes() && vc[l].sizes() == kc[0].sizes() &&
                    kc[l].is_contiguous() && vc[l].is_contiguous() &&
                    kc[l].scalar_type() == dt && vc[l].scalar_type() == dt,
                op, ": caches must all be contiguous ", kc[0].sizes(), " of x's dtype");
}

void check_freqs(const char* op, const at::Tensor& freqs, int64_t positions, int64_t Dh) {
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.is_contiguous() && freqs.dim() == 3 &&
                  freqs.size(0) >= positions && freqs.size(1) == Dh / 2 && freqs.size(2) == 2,
              op, ": freqs must be fp32 (>= ", positions, ", ", Dh / 2, ", 2)");
}

std::vector<void*> data_ptrs(at::TensorList ts) {
  std::vector<void*> ps;
  for (const auto& t : ts) ps.push_back(t.data_ptr());
  return ps;
}

// One token through L layers: x (1, 1, D), the token's embedding; freqs (len, Dh/2, 2) fp32;
// mask (len, len) bool; pos (1,) int64; caches (1, KVH, len, Dh) of x's dtype, written at pos.
at::Tensor decode_layers_cpu(const at::Tensor& x, at::TensorList norms, double eps,
                             const at::Tensor& freqs, const at::Tensor& mask,
                             const at::Tensor& pos, at::TensorList kc, at::TensorList vc,
                             at::TensorList w, at::TensorList s, int64_t kind, int64_t group,
                             int64_t n_heads, at::IntArrayRef types) {
  const char* op = "torchchat::decode_layers";
  const auto dt = check_step_dtype(op, x);
  const int64_t D = x.size(-1);
  TORCH_CHECK(x.numel() == D && x.is_contiguous(), op, ": x must be one row, got ", x.sizes());
  check_caches(op, kc, vc, dt);
  TORCH_CHECK(kc[0].dim() == 4 && kc[0].size(0) == 1, op, ": caches must be (1, KVH, len, Dh)");
  const int64_t KVH = kc[0].size(1), len = kc[0].size(2), Dh = kc[0].size(3);
  TORCH_CHECK(pos.numel() == 1 && pos.scalar_type() == at::kLong, op, ": pos must be one int64");
  const int64_t* p = pos.data_ptr<int64_t>();
  TORCH_CHECK(p[0] >= 0 && p[0] < len, op, ": position ", p[0], " is outside the cache (", len,
              ")");
  check_freqs(op, freqs, len, Dh);
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) >= len &&
                  mask.size(1) == len && mask.stride(1) == 1,
              op, ": mask must be bool (", len, ", ", len, ")");
  const auto k_ptrs = data_ptrs(kc), v_ptrs = data_ptrs(vc);
  const cpu::StepData data{nullptr, freqs.data_ptr<float>(), p,
                           mask.data_ptr<bool>() + p[0] * mask.stride(0), 0, len,
                           k_ptrs.data(), v_ptrs.data(), len * Dh, Dh, nullptr, 0};
  return step_layers(op, x.reshape({1, D}), norms, eps, w, s, kind, group, n_heads, types,
                     (int64_t)kc.size(), KVH, Dh, data)
      .view(x.sizes());
}

// One token of each of M <= kMaxRows sequences in a paged pool through L layers: x (M, D), the
// tokens' embeddings; pos (M,) int64, their positions; index (M, T) int64, the pool rows of each
// sequence's positions 0..T-1 (those past a row's position are not read); pools (rows, KVH, Dh)
// of x's dtype, written at each token's row. A row attends its positions 0..pos[m].
at::Tensor decode_layers_paged_cpu(const at::Tensor& x, at::TensorList norms, double eps,
                                   const at::Tensor& freqs, const at::Tensor& pos,
                                   const at::Tensor& index, at::TensorList kc, at::TensorList vc,
                                   at::TensorList w, at::TensorList s, int64_t kind,
                                   int64_t group, int64_t n_heads, at::IntArrayRef types) {
  const char* op = "torchchat::decode_layers_paged";
  const auto dt = check_step_dtype(op, x);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(0) >= 1 && x.size(0) <= cpu::kStepRows,
              op, ": x must be (1 to ", cpu::kStepRows, ", dim), got ", x.sizes());
  const int64_t M = x.size(0);
  check_caches(op, kc, vc, dt);
  TORCH_CHECK(kc[0].dim() == 3, op, ": pools must be (rows, KVH, Dh)");
  const int64_t rows = kc[0].size(0), KVH = kc[0].size(1), Dh = kc[0].size(2);
  TORCH_CHECK(index.dim() == 2 && index.size(0) == M && index.scalar_type() == at::kLong &&
                  index.is_contiguous(),
              op, ": index must be contiguous int64 (", M, ", positions)");
  TORCH_CHECK(pos.numel() == M && pos.is_contiguous() && pos.scalar_type() == at::kLong, op,
              ": pos must be ", M, " int64");
  const int64_t T = index.size(1);
  const int64_t *p = pos.data_ptr<int64_t>(), *ip = index.data_ptr<int64_t>();
  at::Tensor mask = at::zeros({M, T}, at::kBool);
  bool* mp = mask.data_ptr<bool>();
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(p[m] >= 0 && p[m] < T, op, ": position ", p[m], " is outside the index (", T,
                ")");
    for (int64_t t = 0; t <= p[m]; ++t) {  // the pool is read (and written at p[m]) at these
      TORCH_CHECK(ip[m * T + t] >= 0 && ip[m * T + t] < rows, op, ": index ", ip[m * T + t],
                  " outside the pool");
      mp[m * T + t] = true;
    }
  }
  const int64_t top = *std::max_element(p, p + M);
  check_freqs(op, freqs, top + 1, Dh);
  const auto k_ptrs = data_ptrs(kc), v_ptrs = data_ptrs(vc);
  const cpu::StepData data{nullptr, freqs.data_ptr<float>(), p, mp, T, T, k_ptrs.data(),
                           v_ptrs.data(), Dh, KVH * Dh, ip, T};
  return step_layers(op, x, norms, eps, w, s, kind, group, n_heads, types, (int64_t)kc.size(),
                     KVH, Dh, data);
}

}  // namespace

TORCH_LIBRARY(torchchat, m) {
  m.def("simd_level() -> int", &simd_level);
  m.def("select_isa(str level) -> int", &select_isa);
  m.def("isa_levels() -> str", &isa_levels);
  // linear*: x times each weight of the list; their results side by side, (M, all their rows)
  m.def("linear(Tensor x, Tensor[] w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor[] w, Tensor[] scales, int group) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor[] w, Tensor[] scales_and_zeros, int group) -> Tensor");
  m.def(
      "linear_int4_q8(Tensor x, Tensor[] w, Tensor[] scales_and_zeros, int group, bool dynamic) "
      "-> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def(
      "attention_paged(Tensor q, Tensor k, Tensor v, Tensor index, Tensor mask, float scale) -> "
      "Tensor");
  m.def(
      "decode_layers(Tensor x, Tensor[] norms, float eps, Tensor freqs, Tensor mask, Tensor pos, "
      "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor[] w, Tensor[] scales, int kind, "
      "int group, int n_heads, int[] types=[]) -> Tensor");
  m.def(
      "decode_layers_paged(Tensor x, Tensor[] norms, float eps, Tensor freqs, Tensor pos, "
      "Tensor index, Tensor(a!)[] k_pools, Tensor(b!)[] v_pools, Tensor[] w, Tensor[] scales, "
      "int kind, int group, int n_heads, int[] types=[]) -> Tensor");
  m.def("gemm_int4(Tensor x, Tensor w, Tensor scales_and_zeros, int group) -> Tensor");
  m.def("gemm_int8(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("gemm_wide(Tensor x, Tensor w) -> Tensor");
  m.def("gemm_f32(Tensor x, Tensor w) -> Tensor");
  m.def("gemm_8da4w(Tensor x, Tensor w, Tensor scales_and_zeros, int group) -> Tensor");
  m.def("gemm_int4_q8(Tensor x, Tensor w, Tensor scales_and_zeros, int group) -> Tensor");
  m.def("gemm_int8_q8(Tensor x, Tensor w, Tensor scales, int group) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor freqs) -> Tensor");
  m.def("silu_mul(Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchchat, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("linear_int8", &linear_int8_cpu);
  m.impl("linear_int4", &linear_int4_cpu);
  m.impl("linear_int4_q8", &linear_int4_q8_cpu);
  m.impl("attention", &attention_cpu);
  m.impl("attention_paged", &attention_paged_cpu);
  m.impl("decode_layers", &decode_layers_cpu);
  m.impl("decode_layers_paged", &decode_layers_paged_cpu);
  m.impl("gemm_int4", &gemm_int4_cpu);
  m.impl("gemm_int8", &gemm_int8_cpu);
  m.impl("gemm_wide", &gemm_wide_cpu);
  m.impl("gemm_f32", &gemm_f32_cpu);
  m.impl("gemm_8da4w", &gemm_8da4w_cpu);
  m.impl("gemm_int4_q8", &gemm_int4_q8_cpu);
  m.impl("gemm_int8_q8", &gemm_int8_q8_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rope", &rope_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
}
