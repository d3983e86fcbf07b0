// GGUF's block-quantized weights in ggml's own encodings, read in place (the packed GGUF path):
// the block layouts, the activation blocks each type's integer dot products take, and the
// portable pieces every instruction set shares. The kernels themselves are table entries
// (Kernels::linear_ggml, Kernels::ggml_dequantize); the scalar reference (ggml_ref.cpp) follows
// ggml's reference C code operation for operation, so its dequantization is bit-equal to ggml's.
//
// Weights: each row of K values is K / block blocks of `bytes` bytes, rows one after another
// (a GGUF tensor's data as it is in the file). Activations: each row quantized to blocks of
// the type's activation type (ggml's vec_dot_type): Q8_0 for Q4_0, Q5_0, Q8_0; Q8_1 for Q4_1,
// Q5_1; Q8_K for the K-quants. The dot product of a weight row with an activation row sums
// integer products exactly within a (sub-)block and scales them in fp32, as ggml does.
#pragma once

#include <cstring>

#include "kernels.h"

namespace torchchat::cpu {

enum GgmlType : int32_t {
  kGgmlQ4_0 = 2,
  kGgmlQ4_1 = 3,
  kGgmlQ5_0 = 6,
  kGgmlQ5_1 = 7,
  kGgmlQ8_0 = 8,
  kGgmlQ8_1 = 9,  // activations only
  kGgmlQ2_K = 10,
  kGgmlQ3_K = 11,
  kGgmlQ4_K = 12,
  kGgmlQ5_K = 13,
  kGgmlQ6_K = 14,
  kGgmlQ8_K = 15,  // activations only
};

struct GgmlLayout {
  int64_t block;  // values a block
  int64_t bytes;  // bytes a block
  int32_t act;    // the activation type its dot products take
};

// The layout of a weight type the kernels run (not Q8_1/Q8_K), else null.
const GgmlLayout* ggml_layout(int32_t type);
// Bytes of a row of K values of `type` (weights or activations); K a multiple of its block.
int64_t ggml_row_bytes(int32_t type, int64_t K);

// Prefill in integers (Kernels::gemm_ggml_q8) reads a row as codes: value k is s_b * c_k + z_b
// with c_k an unsigned code (0..255) and (s_b, z_b) fp32 per block of ggml_q8_block(type)
// values -- 16 for the types that scale 16 values (Q2_K, Q3_K, Q6_K), else 32. c is the file's
// code plus the type's offset o (Q4_0 8, Q5_0 16, Q8_0 128, Q3_K 4, Q6_K 32), s = d * sc and
// z = -o * s or -dmin * mn (Q4_1, Q5_1: + m): each one exact product, so s c + z is the value.
int64_t ggml_q8_block(int32_t type);
// The offset o of a type's codes (0 for the types with mins, whose z carries them).
int ggml_code_offset(int32_t type);
void ggml_codes_ref(int32_t type, const void* row, int64_t K, uint8_t* codes, float* s, float* z);
// Every weight type, as bits of Kernels::gemm_ggml_q8_types.
constexpr int64_t kGgmlQ8Every = 1 << kGgmlQ4_0 | 1 << kGgmlQ4_1 | 1 << kGgmlQ5_0 | 1 << kGgmlQ5_1 |
                                 1 << kGgmlQ8_0 | 1 << kGgmlQ2_K | 1 << kGgmlQ3_K |
                                 1 << kGgmlQ4_K | 1 << kGgmlQ5_K | 1 << kGgmlQ6_K;

// ggml's block structs, as the file stores them (no padding: every member is 1- or 2-byte
// aligned but Q8_K's float, which starts the block).
struct BlockQ4_0 { uint16_t d; uint8_t qs[16]; };
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[16]; };
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; };
struct BlockQ5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[32]; };
struct BlockQ8_1 { uint16_t d, s; int8_t qs[32]; };  // s = d * sum(qs)
struct BlockQ2_K { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; };
struct BlockQ3_K { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; };
struct BlockQ4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; };
struct BlockQ5_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; };
struct BlockQ6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; };
struct BlockQ8_K { float d; int8_t qs[256]; int16_t bsums[16]; };  // bsums: sums of 16 qs

inline float half_to_float(uint16_t h) {
  fp16_t v;
  v.bits = h;
  return (float)v;
}

// Q4_K and Q5_K pack 8 pairs of 6-bit (scale, min) in 12 bytes: pairs 0-3 in the low 6 bits of
// bytes 0-3 (scales) and 4-7 (mins); pairs 4-7 in the nibbles of bytes 8-11 (scale low, min
// high), their top 2 bits in the top bits of bytes 0-3 (scales) and 4-7 (mins). Static: every
// folder that calls it gets its own copy, compiled with its own flags.
static inline void ggml_scale_min_k4(const uint8_t* s, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4;
    mn = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
  }
}

// The same 12 bytes decoded 8 pairs at once on 64-bit integers, as bytes: `low` holds scales 0-3
// then mins 0-3, `high` scales 4-7 then mins 4-7. Pair j < 4 is the low 6 bits of bytes j and
// j + 4; j >= 4 the nibbles of byte j + 4 under the top 2 bits of bytes j - 4 and j.
static inline void ggml_scales_mins_k4(const uint8_t* s, uint64_t& low, uint64_t& high) {
  uint64_t a;  // one load each (every target here is little-endian; GCC does not merge the
  uint32_t b;  // loads of a byte-by-byte assembly, and this is on decode's path)
  std::memcpy(&a, s, 8);
  std::memcpy(&b, s + 8, 4);
  const uint64_t nibbles = b | (uint64_t)(b >> 4) << 32;
  low = a & 0x3F3F3F3F3F3F3F3Full;
  high = (nibbles & 0x0F0F0F0F0F0F0F0Full) | (a >> 2 & 0x3030303030303030ull);
}

// Two int16 in one int32 lane, lo in the low half: the operand layout of vpmaddwd.
static inline int32_t ggml_pair16(int32_t lo, int32_t hi) {
  return (int32_t)((uint32_t)(uint16_t)lo | (uint32_t)hi << 16);
}

// The prefill GEMMs' form of those 12 bytes: the 8 scales, and the mins in pairs (2p, 2p + 1).
static inline void ggml_k4_scales(const uint8_t* s, int32_t sc[8], int32_t min_pairs[4]) {
  uint64_t low, high;
  ggml_scales_mins_k4(s, low, high);
  for (int j = 0; j < 4; ++j) {
    sc[j] = (int32_t)(low >> 8 * j & 0xFF);
    sc[j + 4] = (int32_t)(high >> 8 * j & 0xFF);
  }
  for (int p = 0; p < 2; ++p) {
    min_pairs[p] = ggml_pair16((int32_t)(low >> (32 + 16 * p) & 0xFF),
                               (int32_t)(low >> (40 + 16 * p) & 0xFF));
    min_pairs[p + 2] = ggml_pair16((int32_t)(high >> (32 + 16 * p) & 0xFF),
                                   (int32_t)(high >> (40 + 16 * p) & 0xFF));
  }
}

// One row of K activations quantized to `act` (Q8_0, Q8_1 or Q8_K) as ggml does on x86 (its
// AVX quantize_row_q8_0/q8_1, the reference quantize_row_q8_K_ref), so that decode's logits
// equal llama.cpp's there to float rounding (tests/gguf/test_llamacpp_logits.py).
void ggml_quantize_row(int32_t act, const float* x, int64_t K, void* out);

// Prefill's activations for Kernels::gemm_ggml (the K-quants): M tokens quantized to Q8_K as
// ggml_quantize_row does, laid out for dot products over 16 tokens at once: code 4 kq + j of
// super-block b of token 16 t + i at q[((b * 64 + kq) * T + t) * 64 + 4 i + j] (signed); T =
// ceil(M / 16), tokens past M all zeros (codes, scales and sums 0). The codes' sums come in pairs
// of int16 (the first in the low half), as vpmaddwd takes them: s16 the Q8_K bsums 2p, 2p + 1 (16
// codes each: Q6_K's sub-blocks), s32 the sums of 32 codes 2p, 2p + 1 (Q4_K's and Q5_K's).
struct GgmlGemmActs {
  int64_t M, T;
  const int8_t* q;
  const float* d;      // [K / 256][16 T]: each token's Q8_K scale
  const int32_t* s16;  // [K / 256][8][16 T]
  const int32_t* s32;  // [K / 256][4][16 T]
};

// The scalar reference (ggml_ref.cpp): the table entries Kernels::ggml_dequantize and
// Kernels::linear_ggml, and one weight row's dot product with one activation row, for tables
// whose own kernels lack a type.
void ggml_dequantize_ref(int32_t type, const void* w, int64_t ld, int64_t K, int64_t r0,
                         int64_t r1, float* out);
void ggml_linear_ref(const void* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a,
                     int64_t n0, int64_t n1);
float ggml_dot_ref(int32_t type, int64_t K, const void* w, const void* xq);

}  // namespace torchchat::cpu
