// The AVX2 table (with FMA and F16C; dispatch.cpp checks the CPU has all three before calling
// this): every kernel, every feature bit.
#include "../common/ggml.h"
#include "vec.h"

namespace torchchat::cpu::avx2 {

const Kernels* kernels() {
  static const Kernels table = [] {
    Kernels t{};
    t.name = "avx2";
    t.features = kFewRows | kBf16 | kInt8Gemm | kInt4Q8Gemm | kQ8Decode | kGgml | kF32Gemm |
                 kInt8Q8;
    t.linear_f32 = linear_f32;
    t.linear_bf16 = linear_bf16;
    t.linear_f16 = linear_f16;
    t.linear_int8_f32s = linear_int8_f32s;
    t.linear_int8_bf16s = linear_int8_bf16s;
    t.linear_int4 = linear_int4;
    t.attend_f32 = attend_f32;
    t.attend_bf16 = attend_bf16;
    t.attend_f16 = attend_f16;
    t.silu = silu;
    t.int4_dequantize_block_t = int4_dequantize_block_t;
    t.int8_to_bf16 = int8_to_bf16;
    t.quantize_rows_8da4w = quantize_rows_8da4w;
    t.gemm_8da4w = gemm_8da4w;
    t.quantize_rows_q8 = quantize_rows_q8;
    t.gemm_int4_q8 = gemm_int4_q8;
    t.linear_int4_q8 = linear_int4_q8;
    t.linear_8da4w = linear_8da4w;
    t.linear_int8_q8 = linear_int8_q8;
    // Prefill in integers where it beat fp32 GEMMs on dequantized tiles (64 tokens, TinyLlama
    // shapes, 2 threads, 2026-12-06): Q4_0, Q4_1 and Q4_K 1.3-1.4x, Q5_0 and Q5_1 1.05-1.2x; Q5_K
    // about even and Q6_K 0.8x (their 5- and 6-bit codes widen int16 sums 2-4x as often, and
    // Q6_K's 16-value blocks double the fp32 scaling), so those two stay on the tiles.
    t.gemm_ggml_q8_types =
        1 << kGgmlQ4_0 | 1 << kGgmlQ4_1 | 1 << kGgmlQ5_0 | 1 << kGgmlQ5_1 | 1 << kGgmlQ4_K;
    t.gemm_ggml_q8 = gemm_ggml_q8;
    // Q5_K and Q6_K prefill past the decode kernel's few dozen tokens: the tokens-in-lanes GEMM
    // (ggml_k.cpp). Q4_K stays on the int4 GEMM: at 512 tokens it ran 1.35x this one.
    t.features |= kGgmlGemm;
    t.gemm_ggml_types = 1 << kGgmlQ5_K | 1 << kGgmlQ6_K;
    t.gemm_ggml = gemm_ggml_k;
    t.linear_ggml = linear_ggml;
    // Prefill of a few dozen tokens on the decode kernels (8 tokens at a time over ~256 KB tiles)
    // where that beat the GEMMs (TinyLlama shapes, 2 threads, 2026-12-06): Q5_K 1.25-2.2x the
    // fp32 tiles from 16 to 64 tokens, Q6_K 1.4-1.9x up to 26 and even at 64, Q8_0 1.1x at 26;
    // Q4_K 1.2-1.45x the integer GEMM up to 26 tokens, even at 40. On a Zen 3 (2026-12-07, two
    // runs) Q4_K's GEMM took 307-320 us a token at 25 tokens and 253-273 at 32, decode's kernel
    // 174-190 at 24: K-quants stay on it up to 32 tokens (Q4_0 gave no stable answer there).
    t.ggml_rows_prefill_int = 24;
    t.ggml_rows_prefill_int_k = 32;
    t.ggml_rows_prefill = 64;
    t.ggml_dequantize = ggml_dequantize;
    // Prefill's fp32 GEMMs (gemm.cpp). 64 tokens of stories110M's shapes, 2 threads, on a Zen 3
    // whose FMA peak is 187 GFLOP/s: 135-160 GFLOP/s against oneDNN's 97-134 (fp32 weights) and
    // torch's GEMM on widened tiles 94-110 (bf16, fp16, int8); 512 tokens about even.
    t.gemm_f32 = gemm_f32;
    return t;
  }();
  return &table;
}

}  // namespace torchchat::cpu::avx2
