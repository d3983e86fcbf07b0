// The AVX-512 table: F/BW/VL/DQ kernels, with AVX512-BF16's and VNNI/VBMI's where the CPU has
// them (dispatch.cpp checks the features before calling this).
#include "vec.h"

namespace torchchat::cpu::avx512 {

const Kernels* kernels(bool bf16, bool vnni) {
  static const Kernels table = [bf16, vnni] {
    Kernels t{};
    t.name = "avx512";
    t.features = kFewRows;
    t.linear_f32 = linear_f32;
    t.linear_bf16 = linear_bf16;
    t.linear_f16 = linear_f16;
    t.linear_int8_f32s = linear_int8_f32s;
    t.linear_int8_bf16s = linear_int8_bf16s;
    t.attend_f32 = attend_f32;
    t.attend_bf16 = attend_bf16;
    t.attend_f16 = attend_f16;
    if (bf16) {
      t.features |= kBf16;
      t.linear_bf16 = linear_bf16_dp;
      t.linear_int4 = linear_int4;
      t.int4_dequantize_block_t = int4_dequantize_block_t;
      t.int8_to_bf16 = int8_to_bf16;
    }
    if (vnni) {
      t.features |= kInt8Gemm;
      t.quantize_rows_8da4w = quantize_rows_8da4w;
      t.gemm_8da4w = gemm_8da4w;
    }
    return t;
  }();
  return &table;
}

}  // namespace torchchat::cpu::avx512
