// torchchat's CPU kernels without torch: the types they share, and the table of kernels one
// instruction set provides (struct Kernels), chosen once from the CPU's features
// (select_kernels). Portable code lives in this folder (scalar reference kernels, the decode
// step, the drivers that split work); each instruction set has its own folder (cpu/avx512,
// cpu/avx2, later cpu/neon) compiled with its own flags, and a new one is a new folder plus an
// entry in dispatch.cpp. Kernels take raw pointers and a [begin, end) range of rows or blocks: the
// caller (torchchat/kernels/ops.cpp, or the test harness) does the threading.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace torchchat::cpu {

struct GgmlGemmActs;  // ggml.h

constexpr int64_t kMaxRows = 8;  // more tokens than this: torch's GEMM is the better kernel
// Tokens of one paged decode step call (torchchat::decode_layers_paged): its linears take them
// kMaxRows at a time over each thread's weight rows, reading the weights once a call.
constexpr int64_t kStepRows = 3 * kMaxRows;

// bfloat16 and IEEE half as stored bits; conversions from float round to nearest even (as
// c10::BFloat16 and c10::Half do), so results match torch's to the bit.
struct bf16_t {
  uint16_t bits;
  bf16_t() = default;
  explicit bf16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = std::isnan(f) ? 0x7FC0 : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
  operator float() const {
    const uint32_t u = (uint32_t)bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

struct fp16_t {
  uint16_t bits;
  fp16_t() = default;
  explicit fp16_t(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFF;
    if (ax >= 0x7F800000) {  // inf, NaN
      bits = (uint16_t)(sign | (ax > 0x7F800000 ? 0x7E00 : 0x7C00));
    } else if (ax >= 0x477FF000) {  // 65520 and above round to inf
      bits = (uint16_t)(sign | 0x7C00);
    } else if (ax < 0x38800000) {  // a half subnormal: adding 0.5 rounds at its 2^-24 step
      float a;
      std::memcpy(&a, &ax, 4);
      const float r = a + 0.5f;
      uint32_t rb;
      std::memcpy(&rb, &r, 4);
      bits = (uint16_t)(sign | (rb - 0x3F000000));
    } else {  // rebias the exponent, round the 13 dropped mantissa bits to even
      bits = (uint16_t)(sign | ((ax + 0xC8000FFF + ((ax >> 13) & 1)) >> 13));
    }
  }
  operator float() const {
    const uint32_t sign = (uint32_t)(bits & 0x8000) << 16, e = (bits >> 10) & 0x1F,
                   m = bits & 0x3FF;
    uint32_t u;
    if (e == 0x1F) {
      u = sign | 0x7F800000 | (m << 13);
    } else if (e == 0) {  // zero or subnormal: m * 2^-24, exact in fp32
      const float f = (float)m * 5.9604644775390625e-8f;
      return sign ? -f : f;
    } else {
      u = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// Where attention finds a cache position's key and value rows: position t at base + t * stride,
// or at base + index[t] * stride when the positions lie scattered (a paged pool, its block
// table spelled out per position), so the kernel reads the pool in place instead of a gathered
// copy.
struct CacheRows {
  int64_t stride;
  const int64_t* index = nullptr;
  template <typename T>
  const T* at(const T* base, int64_t t) const {
    return base + (index ? index[t] : t) * stride;
  }
};

// One weight matrix of a grouped call (a layer's q, k and v; w1 and w3 go through one call):
// output rows numbered one after another over all of them, split evenly over the threads.
struct Matrix {
  const void* w;  // weights: rows `ld` elements apart (fp32, bf16, fp16, int8) or int4's packing
  int64_t ld;
  const void* s;  // int8 scales (fp32 or bf16), int4 (scale, zero) pairs; null for float weights
  int64_t N;      // output rows
  float* y;       // fp32 results: y[m * ldy + n] for activation row m, output row n
  int64_t ldy;
  bool blocked = false;  // int4: (scale, zero) pairs by 64-row block (int4_scale_offset)
  int32_t type = 0;      // GGUF blocks: the ggml type of w (ggml.h), rows `ld` bytes apart
};

// Where group g's (scale, zero) pair of the rows from n0 (a block of bs rows) starts: torch's
// layout [G][N][2], or blocked: each block's pairs together, group after group ([G][bs][2] at
// n0 * G * 2). Blocked, a 64-row block's scales are one run of G * 256 bytes instead of G runs of
// 256 bytes N * 4 apart: from memory, 1.1x (one thread) to 1.2x (two) the int4 stream
// (2048 x 768 matrices, 80 MB).
inline int64_t int4_scale_offset(bool blocked, int64_t g, int64_t G, int64_t N, int64_t n0,
                                 int64_t bs) {
  return blocked ? (n0 * G + g * bs) * 2 : (g * N + n0) * 2;
}

// Feature bits of a table (torchchat.kernels.simd_level): which families of kernels it runs.
constexpr int64_t kFewRows = 1;     // float and int8 linears, attention, the decode step
constexpr int64_t kBf16 = 2;        // int4 linears, bf16 GEMMs on int4/int8 tiles
constexpr int64_t kInt8Gemm = 4;    // 8da4w's integer prefill GEMM
// bf16 dot products in hardware (AVX512-BF16, FEAT_BF16): prefill's GEMMs on bf16 tiles stay in
// bf16; without them torch's bf16 GEMM widens its operands in its inner loop, and the ops widen
// each tile to fp32 once instead (the same products, exact in fp32, summed in fp32 either way).
constexpr int64_t kBf16Gemm = 8;
constexpr int64_t kGgml = 16;  // GGUF's block-quantized weights in place (ggml.h)
constexpr int64_t kGgmlGemm = 32;  // gemm_ggml: prefill on some GGUF types in integers
constexpr int64_t kInt4Q8Gemm = 64;  // gemm_int4_q8: int4 prefill on 8-bit activations
// int4 and 8da4w decode in integers (linear_int4_q8, linear_8da4w): the same 8-bit activations
// and sums as their prefill; without it int4 decodes on bf16 activations (linear_int4).
constexpr int64_t kQ8Decode = 128;
// Prefill's fp32 GEMMs on torchchat's kernel (gemm_f32): fp32 weights as they are, bf16/fp16,
// int8 and GGUF tiles widened to fp32 just before; without it they run on oneDNN or torch's GEMM.
constexpr int64_t kF32Gemm = 256;
// int8 decode in integers (linear_int8_q8): activations rounded to 8 bits per 32 values
// (quantize_rows_q8) instead of kept in fp32, when the scales are per row or per group of a
// multiple of 32 and K is a multiple of 32.
constexpr int64_t kInt8Q8 = 512;
// int8 prefill in integers (gemm_int8_q8): the activations of kInt8Q8's decode, many tokens.
constexpr int64_t kInt8Q8Gemm = 1024;

// Per-thread buffers of gemm_8da4w and gemm_int4_q8, 64-byte aligned: wbuf K * 64 bytes, f M * 64
// and sbuf (K / group) * 128 floats.
struct Buffers8da4w {
  int8_t* wbuf;
  float* f;
  float* sbuf;
};

// The kernels of one instruction set. Linears write rows [n0, n1) (int4: 64-row blocks
// [b0, b1)) of one matrix for M <= kMaxRows activation rows, x rows K apart.
struct Kernels {
  const char* name;  // "avx512", "scalar", ...
  int64_t features;  // kFewRows | kBf16 | kInt8Gemm | kBf16Gemm | kGgml | kGgmlGemm | ...
  void (*linear_f32)(const float* x, int64_t M, int64_t K, const Matrix& a, int64_t n0,
                     int64_t n1);
  void (*linear_bf16)(const bf16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0,
                      int64_t n1);
  void (*linear_f16)(const fp16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0,
                     int64_t n1);
  // int8 weights, scales per row (group 0) or per power-of-two group >= 16, fp32 or bf16; x fp32,
  // zero-padded to K, a multiple of 16.
  void (*linear_int8_f32s)(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a,
                           int64_t n0, int64_t n1);
  void (*linear_int8_bf16s)(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a,
                            int64_t n0, int64_t n1);
  // int4 in torch's CPU pack layout; x bf16, xsum its per-group sums (M x K / group).
  void (*linear_int4)(const bf16_t* x, const float* xsum, int64_t M, int64_t K, int64_t group,
                      const Matrix& a, int64_t b0, int64_t b1);
  // softmax(q k^T * scale, masked) v for one query row of D <= 256 values; open positions of
  // mask m all in [lo, hi); position t's k and v rows where `rows` says; p: hi - lo + 16 floats
  // of scratch.
  void (*attend_f32)(const float* q, const float* k, const float* v, CacheRows rows,
                     const bool* m, int64_t lo, int64_t hi, int64_t D, float scale, float* out,
                     float* p);
  void (*attend_bf16)(const bf16_t* q, const bf16_t* k, const bf16_t* v, CacheRows rows,
                      const bool* m, int64_t lo, int64_t hi, int64_t D, float scale, bf16_t* out,
                      float* p);
  void (*attend_f16)(const fp16_t* q, const fp16_t* k, const fp16_t* v, CacheRows rows,
                     const bool* m, int64_t lo, int64_t hi, int64_t D, float scale, fp16_t* out,
                     float* p);
  // SiLU of n fp32 values, x / (1 + exp(-x)), with the attention's exp polynomial (relative
  // error ~2e-7): the feed-forward gate of the decode step and of prefill (torchchat::silu_mul).
  void (*silu)(const float* x, int64_t n, float* out);
  // Prefill. Rows n0..n0 + 64 of an int4 matrix (fewer in a last block), transposed to bf16:
  // out[k * ldo + r] = (q - 8) * scale + zero, rounded once.
  void (*int4_dequantize_block_t)(const uint8_t* w, const bf16_t* sz, int64_t N, int64_t K,
                                  int64_t group, int64_t n0, bf16_t* out, int64_t ldo);
  void (*int8_to_bf16)(const int8_t* src, int64_t K, bf16_t* dst);  // one row of codes
  // 8da4w: rows [m0, m1) of x (Kx columns) as per-token int8 codes + 128 (K columns), scales
  // and zero points, exactly as quant.primitives.quantize_per_token_int8.
  void (*quantize_rows_8da4w)(const float* x, int64_t Kx, int64_t K, uint8_t* u, float* sa,
                              float* za, int64_t m0, int64_t m1);
  // y (M, N) fp32 for 64-row blocks [b0, b1) of int4 weights with zero points 0.
  void (*gemm_8da4w)(const uint8_t* u, int64_t M, int64_t K, const float* sa, const float* za,
                     const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                     int64_t b0, int64_t b1, const Buffers8da4w& buf);
  // Rows [m0, m1) of x (M, Kx) as 8-bit codes in blocks of 32 (K columns, K % 32 == 0, zeros
  // past Kx), as ggml's Q8_0 with fp32 scales: per block d = max|x| / 127, q = x / d rounded half
  // to even (0 where d is 0; a block with an inf or NaN: codes 0, d NaN), e = d * sum q; q rows
  // K apart, d and e K / 32. Bit-equal on every level.
  void (*quantize_rows_q8)(const float* x, int64_t Kx, int64_t K, int8_t* q, float* d, float* e,
                           int64_t m0, int64_t m1);
  // int4 prefill in integers, as llama.cpp's Q4_0 x Q8_0: y (M, N) fp32 for 64-row blocks
  // [b0, b1) of int4 weights with (scale, zero) pairs against x quantized by quantize_rows_q8,
  //   y = sum_b d_b (s_g I_b + (z_g - 8 s_g) X_b),   I_b = sum_{k in b} q_k c_k  (exact)
  // over x's 32-value blocks b (group g holds b), codes c = 0..15: x @ W.T with x rounded to
  // 8 bits per block, summed in fp32.
  void (*gemm_int4_q8)(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                       const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                       int64_t b0, int64_t b1, const Buffers8da4w& buf);
  // Decode in integers (kQ8Decode): a few rows (M <= kMaxRows) of x quantized as for gemm_int4_q8
  // (q, d, e) or gemm_8da4w (u, sa, za), the sums of those entries to the bit, for the 64-row
  // blocks [b0, b1) of int4 matrix a (scales as a.blocked lays them) into a.y (rows a.ldy apart).
  void (*linear_int4_q8)(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                         int64_t group, const Matrix& a, int64_t b0, int64_t b1);
  void (*linear_8da4w)(const uint8_t* u, const float* sa, const float* za, int64_t M, int64_t K,
                       int64_t group, const Matrix& a, int64_t b0, int64_t b1);
  // int8 decode in integers (kInt8Q8): M <= kMaxRows rows of x quantized by quantize_rows_q8 (q,
  // d: K / 32 a row), rows [n0, n1) of int8 matrix a with scales (fp32, or bf16 if bf16_scales)
  // per row (group 0) or per group of a multiple of 32:
  //   y = s_n sum_b d_b I_b (group 0),   y = sum_b (d_b s_n,g(b)) I_b,   I_b = sum_{k in b} q_k w_k
  // each I_b exact, the fp32 sum over blocks in the level's order (as for linear_int8_f32s).
  void (*linear_int8_q8)(const int8_t* q, const float* d, int64_t M, int64_t K, int64_t group,
                         bool bf16_scales, const Matrix& a, int64_t n0, int64_t n1);
  // int8 prefill in integers (kInt8Q8Gemm): a.y (rows a.ldy apart) for the 64-row blocks
  // [b0, b1) of int8 matrix a (scales as linear_int8_q8's) against M rows of x quantized by
  // quantize_rows_q8 (q, d, e), as gemm_ggml_q8 on Q8_0: with codes c = w + 128 (unsigned),
  //   y = sum_b fma(I_b, s_g(b) d_b, .) then fma(-128 s_g(b), e_b, .),   I_b = sum_{k in b} q_k c_k
  // each I_b exact, blocks in order. sbuf: 128 floats a group (one for group 0).
  void (*gemm_int8_q8)(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                       int64_t group, bool bf16_scales, const Matrix& a, int64_t b0, int64_t b1,
                       const Buffers8da4w& buf);
  // GGUF prefill in integers on the types of bits gemm_ggml_q8_types (1 << type; 0: none,
  // prefill dequantizes tiles): y = a.y (rows a.ldy apart) for 64-row blocks [b0, b1) of a (rows
  // a.ld bytes apart) against x's 8-bit codes q (M, K), per block b of ggml_q8_block(type)
  // values a scale d and e = d * (the block's sum of codes) (M, K / block):
  //   y = sum_b fma(I_b, s_b d_b, .) then fma(z_b, e_b, .),   I_b = sum_{k in b} q_k c_k (exact)
  // over the weights as codes (ggml_codes_ref: w = s_b c + z_b). The caller quantizes x as
  // decode does (ggml_quantize_row to the type's activation blocks), so both sum the same.
  int64_t gemm_ggml_q8_types;
  void (*gemm_ggml_q8)(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                       const Matrix& a, int64_t b0, int64_t b1, const Buffers8da4w& buf);
  // GGUF blocks (ggml.h). Rows [n0, n1) of a (ggml type a.type, rows a.ld bytes apart) against
  // M activation rows quantized to the type's activation blocks (ggml_quantize_row), xq rows
  // xld bytes apart; K a multiple of the type's block.
  void (*linear_ggml)(const void* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a,
                      int64_t n0, int64_t n1);
  // Rows [r0, r1) of K values of a `type` matrix (rows ld bytes apart) to fp32, row r at
  // out + (r - r0) * K, bit-equal to ggml's dequantize_row_*.
  void (*ggml_dequantize)(int32_t type, const void* w, int64_t ld, int64_t K, int64_t r0,
                          int64_t r1, float* out);
  // Prefill's GEMM in integers on the GGUF types of bits gemm_ggml_types (1 << type; 0: none,
  // prefill dequantizes tiles): rows [n0, n1) of a for every token of x, written as linear_ggml
  // writes them.
  int64_t gemm_ggml_types;
  void (*gemm_ggml)(const GgmlGemmActs& x, int64_t K, const Matrix& a, int64_t n0, int64_t n1);
  // Prefill of at most this many tokens runs decode's linear_ggml, kMaxRows tokens at a time over
  // tiles of the weights (the same sums as decode): for a type of 32-value blocks prefilled in
  // integers (gemm_ggml_types, gemm_ggml_q8_types), a K-quant prefilled in integers, and the
  // others; 0: never.
  int64_t ggml_rows_prefill_int, ggml_rows_prefill_int_k, ggml_rows_prefill;
  // Prefill's fp32 GEMM on a tile of N output rows (kF32Gemm): y[m * ldy + n] = sum_k x_mk
  // w[n * ldw + k] for the M tokens of x packed by pack_x_f32 (K columns), each output one chain
  // of FMAs over k ascending from 0 (bit-equal on every level, whatever the tile or batch).
  void (*gemm_f32)(const float* xp, int64_t M, int64_t K, const float* w, int64_t ldw, int64_t N,
                   float* y, int64_t ldy);
};

// x (M, K) fp32 for gemm_f32, panels of kF32Panel tokens, a k's tokens side by side:
// xp[(p * K + k) * kF32Panel + i] = x[(p * kF32Panel + i) * K + k], zeros past M; panels [p0, p1)
// of the ceil(M / kF32Panel) (xp 32-byte aligned).
constexpr int64_t kF32Panel = 16;
void pack_x_f32(const float* x, int64_t M, int64_t K, float* xp, int64_t p0, int64_t p1);

// The scalar reference kernels (reference.cpp): every entry, every feature bit.
const Kernels& scalar_kernels();

// The table of `level` ("avx512", "avx2", "neon", "scalar") if it was built and this CPU runs
// it, else null; levels(): those usable here, fastest first (dispatch.cpp).
const Kernels* select_kernels(const std::string& level);
std::vector<std::string> levels();

// Runs f(begin, end) over chunks of [0, n) of at least `grain`, perhaps on several threads.
using ParallelFor = void (*)(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& f);

// [lo, hi): the span of a mask row of len positions that holds all its open ones (a long cache a
// few positions in is mostly closed: attention reads only this span).
inline std::pair<int64_t, int64_t> open_span(const bool* m, int64_t len) {
  int64_t lo = 0, hi = len;
  while (hi > lo && !m[hi - 1]) --hi;
  while (lo < hi && !m[lo]) ++lo;
  return {lo, hi};
}

}  // namespace torchchat::cpu
