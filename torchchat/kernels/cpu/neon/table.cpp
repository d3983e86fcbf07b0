// The NEON table: base kernels (armv8.2-a + fp16 + dotprod: every entry, every feature bit),
// with FEAT_I8MM's GEMM and FEAT_BF16's dot products where the CPU has them (dispatch.cpp checks
// the features before calling this). One table per combination, so a caller can also ask for
// the base kernels on a CPU with more (the test harness does, to test both).
#include "../common/ggml.h"
#include "vec.h"

namespace torchchat::cpu::neon {
namespace {

Kernels make_table(bool i8mm, bool bf16) {
  Kernels t{};
  t.name = "neon";
  t.features = kFewRows | kBf16 | kInt8Gemm | kInt4Q8Gemm | kGgml | kInt8Q8 |
               (bf16 ? kBf16Gemm : 0);
  t.linear_f32 = linear_f32;
  t.linear_bf16 = bf16 ? linear_bf16_dp : linear_bf16;
  t.linear_f16 = linear_f16;
  t.linear_int8_f32s = linear_int8_f32s;
  t.linear_int8_bf16s = linear_int8_bf16s;
  t.linear_int4 = bf16 ? linear_int4_dp : linear_int4;
  t.attend_f32 = attend_f32;
  t.attend_bf16 = attend_bf16;
  t.attend_f16 = attend_f16;
  t.silu = silu;
  t.int4_dequantize_block_t = int4_dequantize_block_t;
  t.int8_to_bf16 = int8_to_bf16;
  t.quantize_rows_8da4w = quantize_rows_8da4w;
  t.gemm_8da4w = i8mm ? gemm_8da4w_mmla : gemm_8da4w;
  t.quantize_rows_q8 = quantize_rows_q8;
  t.gemm_int4_q8 = gemm_int4_q8;
  t.linear_int8_q8 = linear_int8_q8;
  // GGUF prefill in integers: the types whose codes are non-negative int8 in blocks of 32
  t.gemm_ggml_q8_types =
      1 << kGgmlQ4_0 | 1 << kGgmlQ4_1 | 1 << kGgmlQ5_0 | 1 << kGgmlQ5_1 | 1 << kGgmlQ4_K;
  t.gemm_ggml_q8 = gemm_ggml_q8;
  t.linear_ggml = linear_ggml;
  t.ggml_dequantize = ggml_dequantize;
  return t;
}

}  // namespace

const Kernels* kernels(bool i8mm, bool bf16) {
  static const Kernels tables[4] = {make_table(false, false), make_table(false, true),
                                    make_table(true, false), make_table(true, true)};
  return &tables[(i8mm ? 2 : 0) + (bf16 ? 1 : 0)];
}

}  // namespace torchchat::cpu::neon
