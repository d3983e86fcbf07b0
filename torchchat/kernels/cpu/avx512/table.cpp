// The AVX-512 tables: F/BW/VL/DQ kernels, with AVX512-BF16's and VNNI/VBMI's where the CPU has
// them (dispatch.cpp checks the features before calling this). A CPU without those (Skylake-SP,
// Cascade Lake; Ice Lake has VNNI, not BF16) takes the missing int4 and 8da4w entries from `fill`
// (the AVX2 table), and without BF16 AVX2's decode in integers (kQ8Decode) too, so every AVX-512
// table has every feature bit of AVX2's when that is built (kQ8Decode only without BF16); the
// GGUF block entries come from there too, but for the VNNI tables' linear_ggml of the types
// ggml_vnni.cpp and ggml_k_vnni.cpp run. One table per combination, so a caller can also ask for
// the base one on a CPU with more (the test harness does).
#include "../common/ggml.h"
#include "vec.h"

namespace torchchat::cpu::avx512 {
namespace {

// The GGUF types the VNNI files do not run go to the fill table's linear_ggml (AVX2's), recorded
// here by make_table: every table is built once, from the same fill.
void (*ggml_others)(const void* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a,
                    int64_t n0, int64_t n1) = ggml_linear_ref;

void linear_ggml_vnni_or_fill(const void* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a,
                              int64_t n0, int64_t n1) {
  if (!linear_ggml_vnni(xq, xld, M, K, a, n0, n1)) ggml_others(xq, xld, M, K, a, n0, n1);
}

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
  t.silu = silu;
  t.features |= kGgml;  // GGUF blocks: AVX2's kernels when that table is built, else the reference
  t.linear_ggml = fill != nullptr && (fill->features & kGgml) ? fill->linear_ggml : ggml_linear_ref;
  t.ggml_dequantize =
      fill != nullptr && (fill->features & kGgml) ? fill->ggml_dequantize : ggml_dequantize_ref;
  if (vnni) {
    ggml_others = t.linear_ggml;
    t.linear_ggml = linear_ggml_vnni_or_fill;
    t.features |= kGgmlGemm;
    t.gemm_ggml_types = 1 << kGgmlQ4_K | 1 << kGgmlQ5_K | 1 << kGgmlQ6_K;
    t.gemm_ggml = gemm_ggml_k_vnni;
  } else if (fill != nullptr && (fill->features & kGgmlGemm)) {  // AVX2's
    t.features |= kGgmlGemm;
    t.gemm_ggml_types = fill->gemm_ggml_types;
    t.gemm_ggml = fill->gemm_ggml;
  }
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
    t.features |= kInt8Gemm | kInt4Q8Gemm;
    t.quantize_rows_8da4w = quantize_rows_8da4w;
    t.gemm_8da4w = gemm_8da4w;
    t.quantize_rows_q8 = quantize_rows_q8;
    t.gemm_int4_q8 = gemm_int4_q8;
    // Q4_1, Q5_0, Q5_1 through the portable decoder: 1.05-1.3x bf16 tiles (64 tokens, 2026-12-06)
    t.gemm_ggml_q8_types =
        1 << kGgmlQ4_0 | 1 << kGgmlQ8_0 | 1 << kGgmlQ4_1 | 1 << kGgmlQ5_0 | 1 << kGgmlQ5_1;
    t.gemm_ggml_q8 = gemm_ggml_q8;
    // int8 prefill on the Q8_0 path's GEMM: stories110M int8, 64 tokens, 2 threads (Zen 4,
    // 2026-12-07), the linears took 30-31 ms a prefill against 45-47 for bf16 GEMMs on codes
    // converted every call (1.2x the prefill's tok/s)
    t.features |= kInt8Q8Gemm;
    t.gemm_int8_q8 = gemm_int8_q8;
  } else if (fill != nullptr && (fill->features & kInt8Gemm)) {
    t.features |= fill->features & (kInt8Gemm | kInt4Q8Gemm);
    t.quantize_rows_8da4w = fill->quantize_rows_8da4w;
    t.gemm_8da4w = fill->gemm_8da4w;
    t.quantize_rows_q8 = fill->quantize_rows_q8;
    t.gemm_int4_q8 = fill->gemm_int4_q8;
    t.gemm_ggml_q8_types = fill->gemm_ggml_q8_types;
    t.gemm_ggml_q8 = fill->gemm_ggml_q8;
  }
  // Without AVX512-BF16, int4 decode on bf16 activations is AVX2's widening kernel; AVX2's decode
  // in integers (prefill's activations and sums) ran stories110M int4 at 177-201 tok/s against
  // 134-178 (Ice Lake, 2 threads, alternated, 2026-12-07), so such a CPU decodes in integers too.
  // int8 decode in integers: AVX2's kernel (exact block sums by VPMADDUBSW) on every AVX-512 CPU,
  // so every level rounds int8's activations alike. On a Zen 4 (one thread, 2026-12-07) it read
  // 21.5-28 GB/s from cache against 18-23.5 for this folder's int8 -> fp32 + FMA kernel.
  if (fill != nullptr && (fill->features & kInt8Q8) && (t.features & kInt4Q8Gemm)) {
    t.features |= kInt8Q8;
    t.linear_int8_q8 = fill->linear_int8_q8;
  }
  if (!bf16 && fill != nullptr && (fill->features & kQ8Decode) && (t.features & kInt4Q8Gemm)) {
    t.features |= kQ8Decode;
    t.linear_int4_q8 = fill->linear_int4_q8;
    t.linear_8da4w = fill->linear_8da4w;
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
