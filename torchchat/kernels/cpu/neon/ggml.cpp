// GGUF's blocks on NEON (armv8.2-a + dotprod): decode's dot products (linear_ggml) and the
// dequantization prefill's tiles take (ggml_dequantize), for every type.
//
// A weight row is read a unit at a time -- one K-quant super-block, or up to 8 blocks of 32 --
// decoded once for all activation rows (common/ggml_codes.h, the decoder the integer prefill
// GEMMs use) into signed 8-bit codes q and, per block of ggml_q8_block(type) values, s and m:
// the weight is s q - m (s = d sc; m = dmin mn for the types with mins, -m for Q4_1/Q5_1's + m,
// else 0), rounded as the reference rounds it (ggml_ref.cpp). A block's dot
// product with an activation block is SDOT's exact integer sum I, then y += (s d_x) I - m e_x in
// fp32, e_x the activation block's d times its codes' sum (Q8_1: its own s, as ggml takes it):
// ggml's sums, scaled per block rather than per super-block (within the harness's bound).
#include "../common/exact_fp.h"

#include <cstdlib>
#include <cstring>

#include "../common/ggml_codes.h"
#include "vec.h"

namespace torchchat::cpu::neon {
namespace {

// One unit of a weight row: signed codes in value order, each block's s and m.
struct Unit {
  alignas(16) int8_t q[256];
  float s[16], m[16];
};

// The unit of `values` values at p: ggml_unit_codes' codes less the type's offset (signed bytes
// for SDOT; Q8_0's are the file's), m = -z for the types with mins (z = -o s for the others,
// which the offset already takes).
inline void decode_unit(int32_t type, const uint8_t* p, int64_t values, Unit& u) {
  alignas(16) uint8_t c[256];
  float sz[32];
  ggml_unit_codes<half_at>(type, p, values, c, sz, 1);
  const int off = ggml_code_offset(type);
  for (int64_t k = 0; k < values; ++k) u.q[k] = (int8_t)(c[k] - off);
  for (int64_t j = 0; j < values / ggml_q8_block(type); ++j) {
    u.s[j] = sz[2 * j];
    u.m[j] = off ? 0.0f : -sz[2 * j + 1];
  }
}

// Activation rows as every weight row reads them, prepared once a call: codes (M, K), and per
// block of bk values d and e = d * (the block's code sum) (Q8_1: its s) (M, K / bk).
struct Acts {
  int8_t* q;
  float *d, *e;
};

Acts prepare(int32_t act, const uint8_t* xq, int64_t xld, int64_t M, int64_t K, int64_t bk,
             void* buf) {
  const int64_t nb = K / bk, ab = act == kGgmlQ8_K ? 256 : 32;
  const int64_t abytes = act == kGgmlQ8_K ? sizeof(BlockQ8_K) : act == kGgmlQ8_1 ? 36 : 34;
  Acts x{static_cast<int8_t*>(buf), nullptr, nullptr};
  x.d = reinterpret_cast<float*>(x.q + M * K);
  x.e = x.d + M * nb;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t a = 0; a < K / ab; ++a) {
      const uint8_t* p = xq + r * xld + a * abytes;
      const int8_t* codes;
      float d;
      if (act == kGgmlQ8_K) {
        std::memcpy(&d, p, 4);
        codes = reinterpret_cast<const int8_t*>(p + 4);
      } else {
        d = half_at(p);
        codes = reinterpret_cast<const int8_t*>(p + (act == kGgmlQ8_1 ? 4 : 2));
      }
      std::memcpy(x.q + r * K + a * ab, codes, ab);
      for (int64_t j = 0; j < ab / bk; ++j) {
        int32_t sum = 0;
        for (int64_t k = 0; k < bk; ++k) sum += codes[j * bk + k];
        const int64_t at = r * nb + a * (ab / bk) + j;
        x.d[at] = d;
        x.e[at] = act == kGgmlQ8_1 ? half_at(p + 2) : d * (float)sum;
      }
    }
  return x;
}

// The exact integer sum of a block of 16 or 32 codes with an activation block.
inline int32_t block_dot(const int8_t* w, const int8_t* x, bool wide) {
  int32x4_t acc = vdotq_s32(vdupq_n_s32(0), vld1q_s8(w), vld1q_s8(x));
  if (wide) acc = vdotq_s32(acc, vld1q_s8(w + 16), vld1q_s8(x + 16));
  return vaddvq_s32(acc);
}

}  // namespace

void linear_ggml(const void* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a, int64_t n0,
                 int64_t n1) {
  const GgmlLayout& l = *ggml_layout(a.type);
  const int64_t bk = ggml_q8_block(a.type), nb = K / bk;
  const bool wide = bk == 32;
  // malloc: no library templates in this folder (vec.h)
  void* buf = std::malloc(M * K + 2 * M * nb * sizeof(float));
  const Acts x = prepare(l.act, static_cast<const uint8_t*>(xq), xld, M, K, bk, buf);
  Unit u;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = static_cast<const uint8_t*>(a.w) + n * a.ld;
    float acc[kMaxRows] = {};
    for (int64_t u0 = 0; u0 < K; u0 += 256) {
      const int64_t values = K - u0 < 256 ? K - u0 : 256;
      decode_unit(a.type, row + u0 / l.block * l.bytes, values, u);
      for (int64_t r = 0; r < M; ++r) {
        const int8_t* xr = x.q + r * K + u0;
        const int64_t at = r * nb + u0 / bk;
        float f = acc[r];
        for (int64_t j = 0; j < values / bk; ++j) {
          const float sum = (float)block_dot(u.q + j * bk, xr + j * bk, wide);
          f = f + (u.s[j] * x.d[at + j]) * sum;
          f = f - u.m[j] * x.e[at + j];
        }
        acc[r] = f;
      }
    }
    for (int64_t r = 0; r < M; ++r) a.y[r * a.ldy + n] = acc[r];
  }
  std::free(buf);
}

void ggml_dequantize(int32_t type, const void* w, int64_t ld, int64_t K, int64_t r0, int64_t r1,
                     float* out) {
  const GgmlLayout& l = *ggml_layout(type);
  const int64_t bk = ggml_q8_block(type);
  Unit u;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = static_cast<const uint8_t*>(w) + r * ld;
    float* y = out + (r - r0) * K;
    for (int64_t u0 = 0; u0 < K; u0 += 256) {
      const int64_t values = K - u0 < 256 ? K - u0 : 256;
      decode_unit(type, row + u0 / l.block * l.bytes, values, u);
      for (int64_t k = 0; k < values; ++k)  // the reference's order: product, then difference
        y[u0 + k] = u.s[k / bk] * (float)u.q[k] - u.m[k / bk];
    }
  }
}

}  // namespace torchchat::cpu::neon
