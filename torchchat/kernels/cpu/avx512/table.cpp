// The AVX-512 tables: F/BW/VL/DQ kernels, with AVX512-BF16's and VNNI/VBMI's where the CPU has
// them (dispatch.cpp checks the features before calling this). A CPU without those (Skylake-SP,
// Cascade Lake without BF16) takes the int4 and 8da4w entries from `fill` (the AVX2 table), so
// every AVX-512 table has every feature bit when AVX2's is built. One table per combination,
// so a caller can also ask for the base one on a CPU with more (the test harness does).
#include "vec.h"

namespace torchchat::cpu::avx512 {
namespace {

Kernels make_table(bool bf16, bool vnni, const Kernels* fill) {
  Kernels t{};
  t.name = "avx512";
  t.features = kFewRows;
  t.linear_f32 = linear_f32;
  t.linear_bf16 = bf16 ? linear_bf16_dp : linear_bf16;
  t.linear_f16 = linear_f16;
  t.linear_int8_f32s = linear_int8_f32s;
  t.linear_int8_bf16s = linear_int8_bf16s;
  t.attend_f32 = attend_f32;
  t.attend_bf16 = attend_bf16;
  t.attend_f16 = attend_f16;
  if (bf16) {
    t.features |= kBf16 | kBf16Gemm;
    t.linear_int4 = linear_int4;
    t.int4_dequantize_block_t = int4_dequantize_block_t;
    t.int8_to_bf16 = int8_to_bf16;
  } else if (fill != nullptr && (fill->features & kBf16)) {
    t.features |= kBf16;
    t.linear_int4 = fill->linear_int4;
    t.int4_dequantize_block_t = fill->int4_dequantize_block_t;
    t.int8_to_bf16 = fill->int8_to_bf16;
  }
  if (vnni) {
    t.features |= kInt8Gemm;
    t.quantize_rows_8da4w = quantize_rows_8da4w;
    t.gemm_8da4w = gemm_8da4w;
  } else if (fill != nullptr && (fill->features & kInt8Gemm)) {
    t.features |= kInt8Gemm;
    t.quantize_rows_8da4w = fill->quantize_rows_8da4w;
    t.gemm_8da4w = fill->gemm_8da4w;
  }
  return t;
}

}  // namespace

const Kernels* kernels(bool bf16, bool vnni, const Kernels* fill) {
  static const Kernels tables[4] = {make_table(false, false, fill), make_table(false, true, fill),
                                    make_table(true, false, fill), make_table(true, true, fill)};
  return &tables[(bf16 ? 2 : 0) + (vnni ? 1 : 0)];
}

}  // namespace torchchat::cpu::avx512
