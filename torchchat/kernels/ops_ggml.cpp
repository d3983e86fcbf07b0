// GGUF's block-quantized weights as torch custom ops (the packed GGUF path): a weight is a uint8
// tensor (N, row bytes) holding the file's blocks as they are -- usually a view of the mapped
// file -- and the ggml type id says how to read them (cpu/common/ggml.h).
//   linear_ggml: decode's few rows, x quantized per block as ggml does, integer dot products.
//   gemm_ggml:   prefill's many rows: up to a few dozen, decode's kernel 8 tokens at a time
//                (ggml_rows_prefill, AVX2); else integer GEMMs on x quantized as decode's (the
//                K-quants with VNNI; Q4_0, Q4_1, Q5_0, Q5_1, Q4_K on AVX2, Q4_0 and Q8_0 with
//                VNNI), else fp32/bf16 GEMMs on tiles of the weights dequantized just before.
//   ggml_rows:   the rows of an embedding table that a batch of tokens looks up.
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "cpu/common/ggml.h"
#include "ops.h"

namespace {

using namespace torchchat::ops;

// Checks w against `type` and K; returns the type's layout.
const cpu::GgmlLayout& check_ggml(const char* op, const at::Tensor& w, int64_t type, int64_t K) {
  const cpu::GgmlLayout* l = cpu::ggml_layout((int32_t)type);
  TORCH_CHECK(l != nullptr, op, ": ggml type ", type, " is not one the kernels run");
  TORCH_CHECK(K > 0 && K % l->block == 0, op, ": ", K, " columns are not whole blocks of ",
              l->block);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.stride(1) == 1 &&
                  w.size(1) == cpu::ggml_row_bytes((int32_t)type, K),
              op, ": w must be uint8 (N, ", cpu::ggml_row_bytes((int32_t)type, K),
              ") with unit column stride, got ", w.sizes());
  return *l;
}

// x (M <= kMaxRows, K) of any float dtype times each w[i] (N_i, row bytes) of ggml type
// types[i]; their results side by side, (M, all their rows), in x's dtype.
at::Tensor linear_ggml_cpu(const at::Tensor& x, at::TensorList ws, at::IntArrayRef types) {
  const char* op = "torchchat::linear_ggml";
  const auto& kt = kernels(op, cpu::kGgml);
  TORCH_CHECK(!ws.empty() && types.size() == ws.size(), op, ": ", ws.size(), " weights, ",
              types.size(), " types");
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows, op, ": x must be (M <= ", kMaxRows,
              ", K), got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  for (size_t i = 0; i < ws.size(); ++i) check_ggml(op, ws[i], types[i], K);
  std::vector<float> xf, y;
  rows_to(x, K, xf);
  auto mats = matrices(ws, {}, M, y);
  for (size_t i = 0; i < ws.size(); ++i) mats[i].type = (int32_t)types[i];
  cpu::linear_ggml(kt, parallel, xf.data(), M, K, mats);
  return rows_from(y, M, total_rows(ws), x);
}

// GGUF prefill in integers: x's rows quantized as decode's (ggml_quantize_row to the type's
// activation blocks: Q8_0, Q8_1 or Q8_K, ggml's scales and rounding), the codes of each block
// times the weights' codes summed exactly, scaled per block in fp32 (Kernels::gemm_ggml_q8)
// into y (M, N) fp32. Per block of bk values: d (Q8_K: its super-block's) and e = d * the
// codes' sum (Q8_1: the block's own fp16 s, as decode takes it).
void gemm_ggml_q8(const cpu::Kernels& kt, const at::Tensor& x, const at::Tensor& w, int64_t type,
                  at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t bk = cpu::ggml_q8_block((int32_t)type), nb = K / bk;
  const int32_t act = cpu::ggml_layout((int32_t)type)->act;
  const int64_t ablock = act == cpu::kGgmlQ8_K ? 256 : 32;
  const int64_t abytes = cpu::ggml_row_bytes(act, K), blk_bytes = cpu::ggml_row_bytes(act, ablock);
  const at::Tensor xf = x.detach().to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  std::vector<int8_t> q(M * K);
  std::vector<float> d(M * nb), e(M * nb);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<uint8_t> row(abytes);
    for (int64_t m = m0; m < m1; ++m) {
      cpu::ggml_quantize_row(act, xp + m * K, K, row.data());
      for (int64_t a = 0; a < K / ablock; ++a) {
        const uint8_t* blk = row.data() + a * blk_bytes;
        const int8_t* codes;
        float da, s = 0.0f;
        if (act == cpu::kGgmlQ8_K) {
          const auto* b = reinterpret_cast<const cpu::BlockQ8_K*>(blk);
          codes = b->qs;
          da = b->d;
        } else if (act == cpu::kGgmlQ8_1) {
          const auto* b = reinterpret_cast<const cpu::BlockQ8_1*>(blk);
          codes = b->qs;
          da = cpu::half_to_float(b->d);
          s = cpu::half_to_float(b->s);
        } else {
          const auto* b = reinterpret_cast<const cpu::BlockQ8_0*>(blk);
          codes = b->qs;
          da = cpu::half_to_float(b->d);
        }
        std::memcpy(q.data() + m * K + a * ablock, codes, ablock);
        for (int64_t j = 0; j < ablock / bk; ++j) {
          int32_t sum = 0;
          for (int64_t k = 0; k < bk; ++k) sum += codes[j * bk + k];
          const int64_t i = m * nb + a * (ablock / bk) + j;
          d[i] = da;
          e[i] = act == cpu::kGgmlQ8_1 ? s : da * (float)sum;
        }
      }
    }
  });
  cpu::Matrix a{w.data_ptr<uint8_t>(), w.stride(0), nullptr, N, y.data_ptr<float>(), N};
  a.type = (int32_t)type;
  int4_row_blocks(N, K, M, nb * 128, [&](int64_t b0, int64_t b1, const auto& buf) {
    kt.gemm_ggml_q8(q.data(), d.data(), e.data(), M, K, a, b0, b1, buf);
  });
}

// The GGUF types table kt prefills in integers (1 << type).
int64_t integer_types(const cpu::Kernels& kt) {
  return kt.gemm_ggml_types | (kt.features & cpu::kInt4Q8Gemm ? kt.gemm_ggml_q8_types : 0);
}

// At most how many tokens of prefill run on decode's kernel (linear_ggml_tiled) for `type`.
int64_t rows_prefill(const cpu::Kernels& kt, int64_t type) {
  if (!(integer_types(kt) >> type & 1)) return kt.ggml_rows_prefill;
  return type >= cpu::kGgmlQ2_K && type <= cpu::kGgmlQ6_K ? kt.ggml_rows_prefill_int_k
                                                           : kt.ggml_rows_prefill_int;
}

// x (M, K) of any float dtype @ w.T for many rows: GEMMs on tiles of w dequantized just before,
// each thread its own tiles (as bf16_gemm_tiles in ops.cpp); the result in x's dtype. Where the
// CPU has bf16 dot products (kBf16Gemm), tiles and x are rounded to bf16 and the GEMM's sums come
// back rounded to bf16 (2^-9 relative each, about what ggml's own 8-bit activations cost; 64 x
// 2048 @ 2048 x 5632: 3.8 ms against 11.2 in fp32 here); else the file's values exactly in fp32.
at::Tensor gemm_ggml_cpu(const at::Tensor& x, const at::Tensor& w, int64_t type) {
  const char* op = "torchchat::gemm_ggml";
  const auto& kt = kernels(op, cpu::kGgml);
  TORCH_CHECK(x.dim() == 2 && at::isFloatingType(x.scalar_type()), op,
              ": x must be float (M, K), got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_ggml(op, w, type, K);
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M <= rows_prefill(kt, type)) {  // a few dozen tokens: decode's kernel, the same sums
    const at::Tensor xf = x.detach().to(at::kFloat).contiguous();
    cpu::Matrix a{w.data_ptr<uint8_t>(), w.stride(0), nullptr, N, y.data_ptr<float>(), N};
    a.type = (int32_t)type;
    cpu::linear_ggml_tiled(kt, parallel, xf.data_ptr<float>(), M, K, a);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  if (kt.gemm_ggml_types >> type & 1) {  // in integers where the table can: K-quants, VNNI
    const at::Tensor xf = x.detach().to(at::kFloat).contiguous();
    cpu::Matrix a{w.data_ptr<uint8_t>(), w.stride(0), nullptr, N, y.data_ptr<float>(), N};
    a.type = (int32_t)type;
    if (cpu::gemm_ggml(kt, parallel, xf.data_ptr<float>(), M, K, a))
      return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  if ((kt.features & cpu::kInt4Q8Gemm) && (kt.gemm_ggml_q8_types >> type & 1)) {
    gemm_ggml_q8(kt, x, w, type, y);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  const bool bf16 = kt.features & cpu::kBf16Gemm;
  const auto* wp = w.data_ptr<uint8_t>();
  if (!bf16 && own_f32_gemm()) {  // tiles dequantized for the own fp32 GEMM
    y = f32_gemm(x, N, [&](int64_t n0, int64_t tn, float* buf) {
      kt.ggml_dequantize((int32_t)type, wp, w.stride(0), K, n0, n0 + tn, buf);
      return (const float*)buf;
    });
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  const int64_t rows = tile_rows(N, 1);
  const at::Tensor xg = x.detach().to(bf16 ? at::kBFloat16 : at::kFloat).contiguous();
  at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode guard;  // worker threads do not inherit the caller's mode
    auto buf = at::empty({rows, K}, at::kFloat);
    auto half = bf16 ? at::empty({rows, K}, at::kBFloat16) : buf;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, tn = std::min<int64_t>(rows, N - n0);
      kt.ggml_dequantize((int32_t)type, wp, w.stride(0), K, n0, n0 + tn, buf.data_ptr<float>());
      const at::Tensor tile = half.narrow(0, 0, tn);
      if (bf16) tile.copy_(buf.narrow(0, 0, tn));
      y.narrow(1, n0, tn).copy_(at::mm(xg, tile.t()));
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// Rows ids (any shape, int64) of an embedding table w (num, row bytes) of ggml type `type`,
// K values a row, dequantized: fp32 (ids..., K).
at::Tensor ggml_rows_cpu(const at::Tensor& w, int64_t type, int64_t K, const at::Tensor& ids) {
  const char* op = "torchchat::ggml_rows";
  const auto& kt = kernels(op, cpu::kGgml);
  check_ggml(op, w, type, K);
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids must be int64");
  const auto flat = ids.reshape({-1}).contiguous();
  const int64_t n = flat.numel(), num = w.size(0);
  const int64_t* ip = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < num, op, ": token id ", ip[i], " outside [0, ", num, ")");
  auto sizes = ids.sizes().vec();
  sizes.push_back(K);
  auto out = at::empty(sizes, w.options().dtype(at::kFloat));
  float* op_ = out.data_ptr<float>();
  const auto* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      kt.ggml_dequantize((int32_t)type, wp, w.stride(0), K, ip[i], ip[i] + 1, op_ + i * K);
  });
  return out;
}

}  // namespace

// The GGUF types whose prefill the selected table runs in integers (1 << type), 0 if none.
int64_t ggml_gemm_types() {
  if (table == nullptr || !(table->features & cpu::kGgml)) return 0;
  return integer_types(*table);
}

// At most how many tokens of a `type` prefill the selected table runs on decode's kernel, with
// decode's sums (0: none).
int64_t ggml_rows_prefill(int64_t type) {
  TORCH_CHECK(type >= 0 && type < 64 && cpu::ggml_layout((int32_t)type) != nullptr,
              "torchchat::ggml_rows_prefill: ggml type ", type, " is not one the kernels run");
  if (table == nullptr || !(table->features & cpu::kGgml)) return 0;
  return rows_prefill(*table, type);
}

TORCH_LIBRARY_FRAGMENT(torchchat, m) {
  m.def("ggml_gemm_types() -> int", &ggml_gemm_types);
  m.def("ggml_rows_prefill(int type) -> int", &ggml_rows_prefill);
  m.def("linear_ggml(Tensor x, Tensor[] w, int[] types) -> Tensor");
  m.def("gemm_ggml(Tensor x, Tensor w, int type) -> Tensor");
  m.def("ggml_rows(Tensor w, int type, int K, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchchat, CPU, m) {
  m.impl("linear_ggml", &linear_ggml_cpu);
  m.impl("gemm_ggml", &gemm_ggml_cpu);
  m.impl("ggml_rows", &ggml_rows_cpu);
}
