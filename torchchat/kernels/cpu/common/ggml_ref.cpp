// The scalar reference for GGUF's block-quantized weights (ggml.h): layouts, ggml's activation
// quantizers, dequantization bit-equal to ggml's dequantize_row_* (and gguf-py's numpy), and
// the integer dot products of ggml's generic vec_dot_*_q8_* that the linears run.
//
// Every weight block is decoded to integer codes q and, per 16 values, an integer scale sc and
// min mn, with the block's fp32 d and dmin: the weight is (d * sc) * q - dmin * mn, rounded
// after each operation in that order, which is ggml's order for every type.
//
// Dot products sum code products exactly in int32 per block (per 16 values times sc for the
// K-quants; mins through the activations' bsums) and scale each block in fp32, as ggml does;
// ggml's generic Q3_K..Q6_K keep 8 fp32 lanes across blocks and Q4_0 multiplies by one scale
// at a time: the same terms, a few roundings apart. Against the exact sum of the dequantized
// weights times the dequantized activations (float64), the result is within
//   1e-5 * sum_k (|d sc q_k| + |dmin mn|) |x_k|   (sum_k |w_k x_k| for types without mins)
// for K up to 4096 (worst case (K / block + 3) * 2^-24 of it), plus, for Q4_1 and Q5_1,
// |m| (2^-10 |s| + 2^-25 (|sum q| + 1)) a block: their min term m * s takes the activation
// block's s, which ggml computes from d before d is rounded to fp16 (a subnormal one when
// max |x| < 0.0077), then rounds to fp16 itself.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "ggml.h"

// Products are rounded before they are added, as in ggml's reference C and gguf's numpy: no
// fused multiply-adds (exact_fp.h).
#include "exact_fp.h"

namespace torchchat::cpu {
namespace {

constexpr GgmlLayout kQ4_0{32, 18, kGgmlQ8_0}, kQ4_1{32, 20, kGgmlQ8_1}, kQ5_0{32, 22, kGgmlQ8_0},
    kQ5_1{32, 24, kGgmlQ8_1}, kQ8_0{32, 34, kGgmlQ8_0}, kQ8_1{32, 36, kGgmlQ8_1},
    kQ2_K{256, 84, kGgmlQ8_K}, kQ3_K{256, 110, kGgmlQ8_K}, kQ4_K{256, 144, kGgmlQ8_K},
    kQ5_K{256, 176, kGgmlQ8_K}, kQ6_K{256, 210, kGgmlQ8_K}, kQ8_K{256, 292, kGgmlQ8_K};

static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 &&
              sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34 && sizeof(BlockQ8_1) == 36 &&
              sizeof(BlockQ2_K) == 84 && sizeof(BlockQ3_K) == 110 && sizeof(BlockQ4_K) == 144 &&
              sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210 && sizeof(BlockQ8_K) == 292,
              "ggml's block sizes");

// Any type's layout, the activation-only ones too.
const GgmlLayout* any_layout(int32_t type) {
  switch (type) {
    case kGgmlQ4_0: return &kQ4_0;
    case kGgmlQ4_1: return &kQ4_1;
    case kGgmlQ5_0: return &kQ5_0;
    case kGgmlQ5_1: return &kQ5_1;
    case kGgmlQ8_0: return &kQ8_0;
    case kGgmlQ8_1: return &kQ8_1;
    case kGgmlQ2_K: return &kQ2_K;
    case kGgmlQ3_K: return &kQ3_K;
    case kGgmlQ4_K: return &kQ4_K;
    case kGgmlQ5_K: return &kQ5_K;
    case kGgmlQ6_K: return &kQ6_K;
    case kGgmlQ8_K: return &kQ8_K;
    default: return nullptr;
  }
}

// One weight block: value i is (d * sc[i / 16]) * q[i] - dmin * mn[i / 16].
struct Decoded {
  int q[256];
  int sc[16], mn[16];
  float d, dmin;
};

// Blocks of 32 have one scale. Q4_1 and Q5_1 add their min m: dmin = -m (negating is exact,
// so d * q - (-m) is ggml's d * q + m to the bit); the others subtract 0, which leaves every
// value (-0 too) as it is.
void one_scale(Decoded& o, uint16_t d, float dmin) {
  o.d = half_to_float(d);
  o.dmin = dmin;
  o.sc[0] = o.sc[1] = o.mn[0] = o.mn[1] = 1;
}

// Q5's fifth bits: value j's is bit j of the 32-bit little-endian qh.
int fifth_bit(const uint8_t* qh, int j) { return (qh[j / 8] >> (j % 8) & 1) << 4; }

void decode(int32_t type, const uint8_t* p, Decoded& o) {
  switch (type) {
    case kGgmlQ4_0:
    case kGgmlQ4_1: {  // nibbles: low ones values 0-15, high ones 16-31
      const bool q4_0 = type == kGgmlQ4_0;
      const auto* b0 = (const BlockQ4_0*)p;
      const auto* b1 = (const BlockQ4_1*)p;
      const uint8_t* qs = q4_0 ? b0->qs : b1->qs;
      for (int j = 0; j < 16; ++j) {
        o.q[j] = (qs[j] & 15) - (q4_0 ? 8 : 0);
        o.q[j + 16] = (qs[j] >> 4) - (q4_0 ? 8 : 0);
      }
      if (q4_0) one_scale(o, b0->d, 0.0f);
      else one_scale(o, b1->d, -half_to_float(b1->m));
      return;
    }
    case kGgmlQ5_0:
    case kGgmlQ5_1: {
      const bool q5_0 = type == kGgmlQ5_0;
      const auto* b0 = (const BlockQ5_0*)p;
      const auto* b1 = (const BlockQ5_1*)p;
      const uint8_t *qs = q5_0 ? b0->qs : b1->qs, *qh = q5_0 ? b0->qh : b1->qh;
      for (int j = 0; j < 16; ++j) {
        o.q[j] = ((qs[j] & 15) | fifth_bit(qh, j)) - (q5_0 ? 16 : 0);
        o.q[j + 16] = ((qs[j] >> 4) | fifth_bit(qh, j + 16)) - (q5_0 ? 16 : 0);
      }
      if (q5_0) one_scale(o, b0->d, 0.0f);
      else one_scale(o, b1->d, -half_to_float(b1->m));
      return;
    }
    case kGgmlQ8_0: {
      const auto* b = (const BlockQ8_0*)p;
      for (int j = 0; j < 32; ++j) o.q[j] = b->qs[j];
      one_scale(o, b->d, 0.0f);
      return;
    }
    case kGgmlQ2_K: {  // each 128 values: 32 bytes, 2-bit fields 0-3 the 4 runs of 32
      const auto* b = (const BlockQ2_K*)p;
      for (int i = 0; i < 256; ++i) o.q[i] = b->qs[i / 128 * 32 + i % 32] >> (i % 128 / 32 * 2) & 3;
      for (int g = 0; g < 16; ++g) {
        o.sc[g] = b->scales[g] & 15;
        o.mn[g] = b->scales[g] >> 4;
      }
      o.d = half_to_float(b->d);
      o.dmin = half_to_float(b->dmin);
      return;
    }
    case kGgmlQ3_K: {  // Q2_K's low bits; the high bit of run r (0-7) is bit r of hmask, 0 = -4
      const auto* b = (const BlockQ3_K*)p;
      for (int i = 0; i < 256; ++i) {
        const int lo = b->qs[i / 128 * 32 + i % 32] >> (i % 128 / 32 * 2) & 3;
        o.q[i] = lo - (b->hmask[i % 32] >> (i / 32) & 1 ? 0 : 4);
      }
      // 16 6-bit scales, biased by 32: low nibbles in bytes 0-7 (scales 0-7 low, 8-15 high),
      // top 2 bits in bytes 8-11 (scale g's in byte 8 + g % 4 at bit 2 * (g / 4)).
      for (int g = 0; g < 16; ++g) {
        const int lo = b->scales[g % 8] >> (g / 8 * 4) & 15;
        const int hi = b->scales[8 + g % 4] >> (g / 4 * 2) & 3;
        o.sc[g] = (lo | hi << 4) - 32;
        o.mn[g] = 0;
      }
      o.d = half_to_float(b->d);
      o.dmin = 0.0f;
      return;
    }
    case kGgmlQ4_K:
    case kGgmlQ5_K: {  // each 64 values: 32 bytes, low nibbles the first 32, high the next
      const bool q5 = type == kGgmlQ5_K;
      const auto* b4 = (const BlockQ4_K*)p;
      const auto* b5 = (const BlockQ5_K*)p;
      const uint8_t *qs = q5 ? b5->qs : b4->qs, *scales = q5 ? b5->scales : b4->scales;
      for (int i = 0; i < 256; ++i) {
        o.q[i] = qs[i / 64 * 32 + i % 32] >> (i / 32 % 2 * 4) & 15;
        if (q5) o.q[i] |= (b5->qh[i % 32] >> (i / 32) & 1) << 4;  // run r's fifth bits: bit r
      }
      for (int j = 0; j < 8; ++j) {
        ggml_scale_min_k4(scales, j, o.sc[2 * j], o.mn[2 * j]);
        o.sc[2 * j + 1] = o.sc[2 * j];
        o.mn[2 * j + 1] = o.mn[2 * j];
      }
      o.d = half_to_float(q5 ? b5->d : b4->d);
      o.dmin = half_to_float(q5 ? b5->dmin : b4->dmin);
      return;
    }
    case kGgmlQ6_K: {  // each 128 values: 64 ql bytes (runs 0, 1 low nibbles, 2, 3 high), 32 qh
      const auto* b = (const BlockQ6_K*)p;
      for (int i = 0; i < 256; ++i) {
        const int h = i / 128, run = i % 128 / 32, l = i % 32;
        const int lo = b->ql[h * 64 + run % 2 * 32 + l] >> (run / 2 * 4) & 15;
        const int hi = b->qh[h * 32 + l] >> (run * 2) & 3;
        o.q[i] = (lo | hi << 4) - 32;
      }
      for (int g = 0; g < 16; ++g) {
        o.sc[g] = b->scales[g];
        o.mn[g] = 0;
      }
      o.d = half_to_float(b->d);
      o.dmin = 0.0f;
      return;
    }
  }
}

// One block's term of a dot product: the block of n values w against activation block x.
float block_dot(const Decoded& w, int n, int32_t act, const void* x) {
  if (act == kGgmlQ8_K) {  // mins through bsums: sum_g mn_g sum_k x_k, never each x_k
    const auto* b = (const BlockQ8_K*)x;
    int32_t isum = 0, msum = 0;
    for (int g = 0; g < 16; ++g) {
      int32_t s = 0;
      for (int l = 0; l < 16; ++l) s += w.q[g * 16 + l] * b->qs[g * 16 + l];
      isum += w.sc[g] * s;
      msum += w.mn[g] * b->bsums[g];
    }
    return (w.d * b->d) * (float)isum - (w.dmin * b->d) * (float)msum;
  }
  const auto* b0 = (const BlockQ8_0*)x;
  const auto* b1 = (const BlockQ8_1*)x;
  const int8_t* qs = act == kGgmlQ8_1 ? b1->qs : b0->qs;
  int32_t sumi = 0;
  for (int k = 0; k < n; ++k) sumi += w.q[k] * qs[k];
  const float term = (w.d * half_to_float(act == kGgmlQ8_1 ? b1->d : b0->d)) * (float)sumi;
  return act == kGgmlQ8_1 ? term - w.dmin * half_to_float(b1->s) : term;  // Q8_1: + m * s
}

// ggml's nearest_int: v rounded half to even by the fp32 addition's own rounding (|v| < 2^22;
// codes are |v| <= 127.5), no libm call (nearbyint is one on baseline x86-64: it was most of
// prefill's activation quantization, 2 ns a value).
inline int32_t nearest_int(float v) {
  const float f = v + 12582912.0f;
  int32_t i;
  std::memcpy(&i, &f, 4);
  return (i & 0x007fffff) - 0x00400000;
}

// |v|'s bits, 0 for a NaN: as unsigned integers they order as the magnitudes do, so the scans
// below vectorize without -ffast-math (a chain of maxss and a compare loop were 2/3 of a row's
// time), and NaNs are passed over as the sequential fabs(x) > amax scan passes them.
inline uint32_t abs_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0x7fffffffu;
  return u > 0x7f800000u ? 0u : u;
}

// max |x[j]| over n (a multiple of 16) values.
inline float abs_max(const float* x, int n) {
  uint32_t m[16] = {};
  for (int j = 0; j < n; j += 16)
    for (int l = 0; l < 16; ++l) m[l] = std::max(m[l], abs_bits(x[j + l]));
  uint32_t top = 0;
  for (int l = 0; l < 16; ++l) top = std::max(top, m[l]);
  float amax;
  std::memcpy(&amax, &top, 4);
  return amax;
}

// The first j with |x[j]| == amax, one of x[0..n) (n a multiple of 16).
inline int first_at(const float* x, int n, float amax) {
  const uint32_t bits = abs_bits(amax);
  for (int c = 0;; c += 16) {  // 16 at a time (vectorized), then which of them
    uint32_t hit = 0;
    for (int l = 0; l < 16; ++l) hit |= abs_bits(x[c + l]) == bits;
    if (hit)
      for (int l = 0;; ++l)
        if (abs_bits(x[c + l]) == bits) return c + l;
  }
}

}  // namespace

const GgmlLayout* ggml_layout(int32_t type) {
  return type == kGgmlQ8_1 || type == kGgmlQ8_K ? nullptr : any_layout(type);
}

int64_t ggml_row_bytes(int32_t type, int64_t K) {
  const GgmlLayout* l = any_layout(type);
  return K / l->block * l->bytes;
}

void ggml_quantize_row(int32_t act, const float* x, int64_t K, void* out) {
  uint8_t* p = static_cast<uint8_t*>(out);
  if (act == kGgmlQ8_K) {
    for (int64_t b = 0; b < K / 256; ++b, x += 256, p += sizeof(BlockQ8_K)) {
      BlockQ8_K& y = *(BlockQ8_K*)p;
      // max: the first value of the largest magnitude, sign kept (ggml's strict > scan, in two
      // passes that vectorize)
      const float amax = abs_max(x, 256);
      std::memset(&y, 0, sizeof y);  // an all-zero block: d = 0, codes 0
      if (amax == 0.0f) continue;
      // The largest becomes -127 whatever its sign.
      const float iscale = -127.0f / x[first_at(x, 256, amax)];
      for (int j = 0; j < 256; ++j) y.qs[j] = (int8_t)std::min(127, nearest_int(iscale * x[j]));
      for (int g = 0; g < 16; ++g) {
        int32_t s = 0;
        for (int l = 0; l < 16; ++l) s += y.qs[g * 16 + l];
        y.bsums[g] = (int16_t)s;
      }
      y.d = 1.0f / iscale;
    }
    return;
  }
  // Q8_0, Q8_1 as ggml's x86 code quantizes them (quantize_row_q8_0/q8_1 for AVX2 and AVX-512,
  // which llama.cpp runs on those CPUs): d = max |x| / 127 stored in fp16, codes x * (127 /
  // max |x|) rounded half to even. (The reference C takes x / d, rounded half away from zero: a
  // code here and there differs.)
  const int64_t bytes = any_layout(act)->bytes;
  for (int64_t b = 0; b < K / 32; ++b, x += 32, p += bytes) {
    const float amax = abs_max(x, 32);
    const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
    auto* b0 = (BlockQ8_0*)p;
    auto* b1 = (BlockQ8_1*)p;
    int8_t* qs = act == kGgmlQ8_1 ? b1->qs : b0->qs;
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) {
      qs[j] = (int8_t)nearest_int(x[j] * id);
      sum += qs[j];
    }
    if (act == kGgmlQ8_1) {
      b1->d = fp16_t(d).bits;
      b1->s = fp16_t((float)sum * d).bits;  // the codes' sum, times d
    } else {
      b0->d = fp16_t(d).bits;
    }
  }
}

void ggml_dequantize_ref(int32_t type, const void* w, int64_t ld, int64_t K, int64_t r0,
                         int64_t r1, float* out) {
  const GgmlLayout& l = *ggml_layout(type);
  Decoded d;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = static_cast<const uint8_t*>(w) + r * ld;
    float* y = out + (r - r0) * K;
    for (int64_t b = 0; b < K / l.block; ++b, y += l.block) {
      decode(type, row + b * l.bytes, d);
      for (int i = 0; i < l.block; ++i) {
        const float scale = d.d * (float)d.sc[i / 16], min = d.dmin * (float)d.mn[i / 16];
        y[i] = scale * (float)d.q[i] - min;
      }
    }
  }
}

int64_t ggml_q8_block(int32_t type) {
  return type == kGgmlQ2_K || type == kGgmlQ3_K || type == kGgmlQ6_K ? 16 : 32;
}

int ggml_code_offset(int32_t type) {
  switch (type) {
    case kGgmlQ4_0: return 8;
    case kGgmlQ5_0: return 16;
    case kGgmlQ8_0: return 128;
    case kGgmlQ3_K: return 4;
    case kGgmlQ6_K: return 32;
    default: return 0;
  }
}

void ggml_codes_ref(int32_t type, const void* row, int64_t K, uint8_t* codes, float* s,
                    float* z) {
  const GgmlLayout& l = *ggml_layout(type);
  const int64_t bk = ggml_q8_block(type);
  const int off = ggml_code_offset(type);
  Decoded d;
  for (int64_t b = 0; b < K / l.block; ++b) {
    decode(type, static_cast<const uint8_t*>(row) + b * l.bytes, d);
    for (int i = 0; i < l.block; ++i) codes[b * l.block + i] = (uint8_t)(d.q[i] + off);
    for (int64_t j = 0; j < l.block / bk; ++j) {
      const int g = (int)(j * bk / 16);  // Decoded keeps a scale per 16 values
      float& sj = s[b * l.block / bk + j];
      sj = d.d * (float)d.sc[g];
      z[b * l.block / bk + j] = off ? -(float)off * sj : -(d.dmin * (float)d.mn[g]);
    }
  }
}

float ggml_dot_ref(int32_t type, int64_t K, const void* w, const void* xq) {
  const GgmlLayout& l = *ggml_layout(type);
  const int64_t xbytes = any_layout(l.act)->bytes;
  Decoded d;
  float sum = 0.0f;
  for (int64_t b = 0; b < K / l.block; ++b) {
    decode(type, static_cast<const uint8_t*>(w) + b * l.bytes, d);
    sum += block_dot(d, (int)l.block, l.act, static_cast<const uint8_t*>(xq) + b * xbytes);
  }
  return sum;
}

// ggml_dot_ref for every (row, activation row), each weight block decoded once for all M.
void ggml_linear_ref(const void* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a,
                     int64_t n0, int64_t n1) {
  const GgmlLayout& l = *ggml_layout(a.type);
  const int64_t xbytes = any_layout(l.act)->bytes;
  const uint8_t* x = static_cast<const uint8_t*>(xq);
  Decoded d;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = static_cast<const uint8_t*>(a.w) + n * a.ld;
    for (int64_t m = 0; m < M; ++m) a.y[m * a.ldy + n] = 0.0f;
    for (int64_t b = 0; b < K / l.block; ++b) {
      decode(a.type, row + b * l.bytes, d);
      for (int64_t m = 0; m < M; ++m)
        a.y[m * a.ldy + n] += block_dot(d, (int)l.block, l.act, x + m * xld + b * xbytes);
    }
  }
}

}  // namespace torchchat::cpu
