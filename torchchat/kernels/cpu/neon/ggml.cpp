// GGUF's blocks on NEON (armv8.2-a + dotprod): decode's dot products (linear_ggml) and the
// dequantization prefill's tiles take (ggml_dequantize), for every type.
//
// A weight row is read a unit at a time -- one K-quant super-block, or up to 8 blocks of 32 --
// decoded once for all activation rows into signed 8-bit codes q and, per block of
// ggml_q8_block(type) values, s and m: the weight is s q - m (s = d sc; m = dmin mn for the types
// with mins, -m for Q4_1/Q5_1's + m, else 0), rounded as the reference rounds it (ggml_ref.cpp).
// The decoding loops are plain C++ over whole byte runs, which GCC vectorizes. A block's dot
// product with an activation block is SDOT's exact integer sum I, then y += (s d_x) I - m e_x in
// fp32, e_x the activation block's d times its codes' sum (Q8_1: its own s, as ggml takes it):
// ggml's sums, scaled per block rather than per super-block (within the harness's bound).
#include "../common/exact_fp.h"

#include <cstdlib>
#include <cstring>

#include "../common/ggml.h"
#include "vec.h"

namespace torchchat::cpu::neon {
namespace {

// One unit of a weight row: codes in value order, each block's s and m.
struct Unit {
  alignas(16) int8_t q[256];
  float s[16], m[16];
};

// Blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): values j and 16 + j are byte j's low and high
// nibbles (Q5: bit j of the 32-bit qh the fifth), less the offset (Q4_0 8, Q5_0 16).
void decode32(int32_t type, const uint8_t* p, int64_t values, Unit& u) {
  const int64_t bytes = ggml_layout(type)->bytes;
  const bool mins = type == kGgmlQ4_1 || type == kGgmlQ5_1;
  const bool q5 = type == kGgmlQ5_0 || type == kGgmlQ5_1;
  const int off = type == kGgmlQ4_0 ? 8 : type == kGgmlQ5_0 ? 16 : 0;
  for (int64_t b = 0; b < values / 32; ++b, p += bytes) {
    int8_t* q = u.q + 32 * b;
    u.s[b] = half_at(p);
    u.m[b] = mins ? -half_at(p + 2) : 0.0f;
    if (type == kGgmlQ8_0) {
      std::memcpy(q, p + 2, 32);
      continue;
    }
    uint32_t qh = 0;
    if (q5) std::memcpy(&qh, p + (mins ? 4 : 2), 4);
    const uint8_t* qs = p + (mins ? 4 : 2) + (q5 ? 4 : 0);
    for (int j = 0; j < 16; ++j) {
      q[j] = (int8_t)(((qs[j] & 15) | (q5 ? (qh >> j & 1) << 4 : 0)) - off);
      q[16 + j] = (int8_t)(((qs[j] >> 4) | (q5 ? (qh >> (16 + j) & 1) << 4 : 0)) - off);
    }
  }
}

// A K-quant super-block (ggml_ref.cpp's decode, run by run).
void decode256(int32_t type, const uint8_t* p, Unit& u) {
  int8_t* q = u.q;
  switch (type) {
    case kGgmlQ2_K:
    case kGgmlQ3_K: {  // each 128 values: 32 bytes, 2-bit fields 0-3 the 4 runs of 32;
                       // Q3_K: bit r of hmask[l] the high bit of run r's value l, 0 = -4
      const bool q3 = type == kGgmlQ3_K;
      const auto& b2 = *reinterpret_cast<const BlockQ2_K*>(p);
      const auto& b3 = *reinterpret_cast<const BlockQ3_K*>(p);
      const uint8_t* qs = q3 ? b3.qs : b2.qs;
      for (int h = 0; h < 2; ++h)
        for (int r = 0; r < 4; ++r)
          for (int l = 0; l < 32; ++l) {
            const int lo = qs[32 * h + l] >> (2 * r) & 3;
            q[128 * h + 32 * r + l] =
                (int8_t)(q3 ? lo - (b3.hmask[l] >> (4 * h + r) & 1 ? 0 : 4) : lo);
          }
      if (q3) {  // 16 6-bit scales, biased by 32: low nibbles in bytes 0-7, top 2 bits in 8-11
        const float d = half_at(&b3.d);
        for (int g = 0; g < 16; ++g) {
          const int lo = b3.scales[g % 8] >> (g / 8 * 4) & 15;
          const int hi = b3.scales[8 + g % 4] >> (g / 4 * 2) & 3;
          u.s[g] = d * (float)((lo | hi << 4) - 32);
          u.m[g] = 0.0f;
        }
      } else {  // scale in the low nibble, min in the high
        const float d = half_at(&b2.d), dmin = half_at(&b2.dmin);
        for (int g = 0; g < 16; ++g) {
          u.s[g] = d * (float)(b2.scales[g] & 15);
          u.m[g] = dmin * (float)(b2.scales[g] >> 4);
        }
      }
      return;
    }
    case kGgmlQ4_K:
    case kGgmlQ5_K: {  // each 64 values: 32 bytes, low nibbles the first 32, high the next;
                       // Q5_K: bit r of qh[l] the fifth bit of run r's value l
      const bool q5 = type == kGgmlQ5_K;
      const auto& b4 = *reinterpret_cast<const BlockQ4_K*>(p);
      const auto& b5 = *reinterpret_cast<const BlockQ5_K*>(p);
      const uint8_t* qs = q5 ? b5.qs : b4.qs;
      for (int h = 0; h < 4; ++h)
        for (int l = 0; l < 32; ++l) {
          const int hi0 = q5 ? (b5.qh[l] >> (2 * h) & 1) << 4 : 0;
          const int hi1 = q5 ? (b5.qh[l] >> (2 * h + 1) & 1) << 4 : 0;
          q[64 * h + l] = (int8_t)((qs[32 * h + l] & 15) | hi0);
          q[64 * h + 32 + l] = (int8_t)((qs[32 * h + l] >> 4) | hi1);
        }
      const float d = half_at(q5 ? &b5.d : &b4.d), dmin = half_at(q5 ? &b5.dmin : &b4.dmin);
      for (int j = 0; j < 8; ++j) {
        int sc, mn;
        ggml_scale_min_k4(q5 ? b5.scales : b4.scales, j, sc, mn);
        u.s[j] = d * (float)sc;
        u.m[j] = dmin * (float)mn;
      }
      return;
    }
    default: {  // Q6_K: each 128 values: 64 ql bytes (runs 0, 1 low nibbles, 2, 3 high), 32 qh
      const auto& b = *reinterpret_cast<const BlockQ6_K*>(p);
      for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l) {
          const uint8_t lo = b.ql[64 * h + l], hi = b.ql[64 * h + 32 + l], qh = b.qh[32 * h + l];
          q[128 * h + l] = (int8_t)(((lo & 15) | (qh & 3) << 4) - 32);
          q[128 * h + 32 + l] = (int8_t)(((hi & 15) | (qh >> 2 & 3) << 4) - 32);
          q[128 * h + 64 + l] = (int8_t)(((lo >> 4) | (qh >> 4 & 3) << 4) - 32);
          q[128 * h + 96 + l] = (int8_t)(((hi >> 4) | (qh >> 6 & 3) << 4) - 32);
        }
      const float d = half_at(&b.d);
      for (int g = 0; g < 16; ++g) {
        u.s[g] = d * (float)b.scales[g];
        u.m[g] = 0.0f;
      }
      return;
    }
  }
}

// The unit of `values` values at p.
inline void decode_unit(int32_t type, const uint8_t* p, int64_t values, Unit& u) {
  if (ggml_layout(type)->block == 32)
    decode32(type, p, values, u);
  else
    decode256(type, p, u);
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
