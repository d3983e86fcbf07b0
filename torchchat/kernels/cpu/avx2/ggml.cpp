// GGUF's blocks of 32 values (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) on AVX2, and the table's GGUF
// entries (linear_ggml, ggml_dequantize), which hand the K-quants to ggml_k.cpp.
//
// A block's dot product is ggml's: the exact integer sum of weight codes times the activation
// block's int8 codes, scaled by (weight d) * (activation d) in fp32. Codes of Q4 (0-15) and Q5
// (0-31) stay unsigned, as vpmaddubsw takes them against the signed activations; their offset
// (8 or 16) comes off the integer sum as offset * (the activation block's code sum), exact.
// Those sums, the activations' d and their codes in the order the weights are read (codes2)
// are prepared once a call, not once a weight row. Q8_0's signed codes take the sign trick:
// |w| times x with w's sign. Eight blocks go together: their products fold into one vector of
// the 8 blocks' sums, so the fp32 work (a conversion, the 8 weight d as one fp16 vector, one
// FMA) is paid once for 8 blocks.
//
// Dequantization rounds as the reference (ggml_ref.cpp) does, product then difference, so no
// fused multiply-adds here unless written as such (_mm256_fmadd_ps): exact_fp.h stops GCC from
// contracting vector `*` and `-` (what the intrinsics are) in any mode.
#include "../common/exact_fp.h"

#include <cstdlib>

#include "../common/ggml.h"
#include "vec.h"

namespace torchchat::cpu::avx2 {
namespace {

// Low nibbles of 16 bytes as values 0-15, high nibbles as 16-31 (Q4_0..Q5_1's packing).
inline __m256i nibbles(const uint8_t* qs) {
  const __m128i v = _mm_loadu_si128((const __m128i*)qs);
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

// Q5's fifth bits (bit j of h, value j's) as 16 in byte j.
inline __m256i fifth_bits(uint32_t h) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h), spread);  // byte j: qh[j / 8]
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit),
                          _mm256_set1_epi8(0x10));
}

// The weight types: bytes a block, where the codes (and Q5's fifth bits) sit, the codes'
// offset (value = d * (code - offset) [+ m]), and whether a min m follows d.
template <int64_t Bytes, int64_t Qs, int64_t Qh, int64_t Offset, bool Min>
struct Type32 {
  static constexpr int64_t kBytes = Bytes, kQs = Qs, kQh = Qh, kOffset = Offset;
  static constexpr bool kMin = Min, kSigned = false;
  // One block's codes in value order.
  static __m256i codes(const uint8_t* p) {
    uint32_t h = 0;  // the 32-bit little-endian qh
    if (Qh) std::memcpy(&h, p + Qh, 4);
    return Qh ? _mm256_or_si256(nibbles(p + Qs), fifth_bits(h)) : nibbles(p + Qs);
  }
  // Two blocks' codes, paired: lo = [p0's values 0-15 | p1's 0-15], hi = [16-31 | 16-31].
  static void codes2(const uint8_t* p0, const uint8_t* p1, __m256i& lo, __m256i& hi) {
    const __m256i v = _mm256_loadu2_m128i((const __m128i*)(p1 + Qs), (const __m128i*)(p0 + Qs));
    lo = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
    if (Qh) {  // the fifth bits in the same order
      uint32_t h0, h1;
      std::memcpy(&h0, p0 + Qh, 4);
      std::memcpy(&h1, p1 + Qh, 4);
      lo = _mm256_or_si256(lo, fifth_bits((h0 & 0xFFFF) | h1 << 16));
      hi = _mm256_or_si256(hi, fifth_bits(h0 >> 16 | (h1 & 0xFFFF0000)));
    }
  }
};
using Q4_0 = Type32<18, 2, 0, 8, false>;
using Q4_1 = Type32<20, 4, 0, 0, true>;
using Q5_0 = Type32<22, 6, 2, 16, false>;
using Q5_1 = Type32<24, 8, 4, 0, true>;
struct Q8_0 {
  static constexpr int64_t kBytes = 34, kOffset = 0;
  static constexpr bool kMin = false, kSigned = true;
  static __m256i codes(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)(p + 2)); }
};

// A group of 8 blocks' sums comes out in lane order kLane (paired types; Q8_0 in block order):
// lane l holds block kLane[l]. Their d, offsets and mins are gathered in that order.
constexpr int kLane[8] = {0, 2, 4, 6, 1, 3, 5, 7};

template <class T>
constexpr int64_t block_of_lane(int l) { return T::kSigned ? l : kLane[l]; }

// The fp16 numbers at p of a group's 8 blocks (their d, or m at p + 2) as fp32, in lane
// order. Word l of the vector comes from a 16-byte load starting 2l bytes before block
// kLane[l]'s, so every word already sits in its lane and blends merge them (cheaper than
// inserting 8 words one by one; the loads stay within the group's 8 blocks).
template <class T>
inline __m256 halves8(const uint8_t* p) {
  __m128i v[8];
  for (int l = 0; l < 8; ++l)
    v[l] = _mm_loadu_si128((const __m128i*)(p + block_of_lane<T>(l) * T::kBytes - 2 * l));
  const __m128i v01 = _mm_blend_epi16(v[0], v[1], 0x02), v23 = _mm_blend_epi16(v[2], v[3], 0x08);
  const __m128i v45 = _mm_blend_epi16(v[4], v[5], 0x20), v67 = _mm_blend_epi16(v[6], v[7], 0x80);
  const __m128i lo = _mm_blend_epi32(v01, v23, 0x2), hi = _mm_blend_epi32(v45, v67, 0x8);
  return _mm256_cvtph_ps(_mm_blend_epi32(lo, hi, 0xC));
}

// The activation rows as every weight row reads them, prepared once a call: per block (in
// groups of 8 in lane order, the rest in block order) d in fp32 and the offset's term
// (offset * the code sum) or Q8_1's s; the paired types' codes rearranged to match codes2:
// for blocks 2i, 2i + 1, 64 bytes [2i's 0-15 | 2i+1's 0-15 | 2i's 16-31 | 2i+1's 16-31].
struct Acts {
  const uint8_t* q;  // row r's codes: Q8_0 block b at q + r * ld + b * 34 + 2; paired, pair i at
  int64_t ld;        // q + r * ld + 64 * i
  float* d;          // [r * nb + slot]
  int32_t* off;
  float* s;
};

// Where block b's d, offset and s go (group lanes in kLane order).
template <class T>
inline int64_t slot(int64_t b, int64_t nb) {
  if (T::kSigned || b >= nb / 8 * 8) return b;
  const int j = (int)(b % 8);
  return b - j + (j % 2 ? 4 + j / 2 : j / 2);
}

template <class T>
Acts prepare(const uint8_t* xq, int64_t xld, int64_t M, int64_t nb, void* buf) {
  const int64_t bytes = T::kMin ? 36 : 34, codes = T::kMin ? 4 : 2;
  const int64_t pld = 64 * ((nb + 1) / 2);
  Acts x{xq, xld, static_cast<float*>(buf), nullptr, nullptr};
  x.s = x.d + M * nb;
  x.off = reinterpret_cast<int32_t*>(x.s + M * nb);
  uint8_t* paired = reinterpret_cast<uint8_t*>(x.off + M * nb);
  if (!T::kSigned) x.q = paired, x.ld = pld;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* xb = xq + r * xld + b * bytes;
      const int64_t at = r * nb + slot<T>(b, nb);
      x.d[at] = half_at(xb);
      x.s[at] = T::kMin ? half_at(xb + 2) : 0.0f;
      if (T::kOffset) {  // the codes' sum: as bytes + 128 by vpsadbw, less 32 * 128
        const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(xb + codes)),
                                           _mm256_set1_epi8((char)0x80));
        const __m256i s4 = _mm256_sad_epu8(v, _mm256_setzero_si256());
        const __m128i s2 =
            _mm_add_epi64(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
        const int32_t sum = _mm_cvtsi128_si32(_mm_add_epi64(s2, _mm_unpackhi_epi64(s2, s2))) - 4096;
        x.off[at] = (int32_t)T::kOffset * sum;
      } else {
        x.off[at] = 0;
      }
      if (!T::kSigned) {
        uint8_t* pair = paired + r * pld + 64 * (b / 2) + 16 * (b % 2);
        std::memcpy(pair, xb + codes, 16);
        std::memcpy(pair + 32, xb + codes + 16, 16);
      }
    }
  return x;
}

// A group of 8 blocks' integer sums, lane l block kLane[l] (paired types) or l (Q8_0), for
// activation row r. Paired: each vpmaddubsw covers the same 16 values of two blocks (low half
// one, high half the other), and the values 16-31 add in 16 bits; unpacks fold the 4 pairs to
// one vector (within 128-bit halves, so the blocks stay apart). 16-bit lanes hold 16 products
// of Q4's codes (15 * 127 * 16 < 2^15) or 8 of Q5's, which widen one fold earlier. Q8_0:
// signed_sums8 (vec.h).
template <class T>
inline __m256i group_sums(const __m256i* w, const uint8_t* x) {
  const __m256i ones = _mm256_set1_epi16(1);
  auto load = [](const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); };
  if constexpr (T::kSigned) {
    return signed_sums8(w, reinterpret_cast<const int8_t*>(x), 34);
  } else {
    __m256i p[4];  // pair i: blocks 2i (low half) and 2i + 1 (high), 4 products a lane
    for (int i = 0; i < 4; ++i)
      p[i] = _mm256_add_epi16(_mm256_maddubs_epi16(w[2 * i], load(x + 64 * i)),
                              _mm256_maddubs_epi16(w[2 * i + 1], load(x + 64 * i + 32)));
    const __m256i a = fold32(p[0], p[1], false), b = fold32(p[2], p[3], false);  // [0 0 2 2 ..]
    if (T::kQh)
      return fold64(_mm256_madd_epi16(a, ones), _mm256_madd_epi16(b, ones), true);
    return _mm256_madd_epi16(fold64(a, b, false), ones);  // [0 0 2 2 4 4 6 6] -> [0 2 4 6]
  }
}

// One block's integer sum, for the last nb % 8 blocks: summed across lanes before it becomes
// a float, as the group's are (lanes of unsigned codes' partial sums would cancel in fp32).
template <class T>
inline int32_t block_sum(const uint8_t* wb, const Acts& x, int64_t r, int64_t b) {
  const __m256i w = T::codes(wb);
  __m256i p;
  if constexpr (T::kSigned) {
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(x.q + r * x.ld + 34 * b + 2));
    p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xv, w));
  } else {
    const uint8_t* pair = x.q + r * x.ld + 64 * (b / 2) + 16 * (b % 2);
    const __m256i xv = _mm256_loadu2_m128i((const __m128i*)(pair + 32), (const __m128i*)pair);
    p = _mm256_maddubs_epi16(w, xv);
  }
  const __m256i s = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}

// out[r] = the dot product of weight row w (nb blocks of T) with activation row r, r < R.
template <class T, int R>
void row32(const uint8_t* w, int64_t nb, const Acts& x, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    const uint8_t* wb = w + b * T::kBytes;
    __m256i q[8];
    if constexpr (T::kSigned)
      for (int i = 0; i < 8; ++i) q[i] = T::codes(wb + i * T::kBytes);
    else
      for (int i = 0; i < 4; ++i)
        T::codes2(wb + 2 * i * T::kBytes, wb + (2 * i + 1) * T::kBytes, q[2 * i], q[2 * i + 1]);
    const __m256 dw = halves8<T>(wb);
    for (int r = 0; r < R; ++r) {
      const int64_t at = r * nb + b;
      const uint8_t* xr = x.q + r * x.ld + (T::kSigned ? 34 * b + 2 : 32 * b);
      __m256i s = group_sums<T>(q, xr);
      if (T::kOffset) s = _mm256_sub_epi32(s, _mm256_loadu_si256((const __m256i*)(x.off + at)));
      const __m256 d = _mm256_mul_ps(dw, _mm256_loadu_ps(x.d + at));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[r]);
      if (T::kMin)  // + m * s
        acc[r] = _mm256_fmadd_ps(halves8<T>(wb + 2), _mm256_loadu_ps(x.s + at), acc[r]);
    }
  }
  for (; b < nb; ++b) {  // the last nb % 8 blocks one at a time, their terms in lane 0
    const uint8_t* wb = w + b * T::kBytes;
    const float dw = half_at(wb), m = T::kMin ? half_at(wb + 2) : 0.0f;
    for (int r = 0; r < R; ++r) {
      const int64_t at = r * nb + b;
      const float sum = (float)(block_sum<T>(wb, x, r, b) - x.off[at]);
      const float term = T::kMin ? (dw * x.d[at]) * sum + m * x.s[at] : (dw * x.d[at]) * sum;
      acc[r] = _mm256_add_ps(acc[r], _mm256_setr_ps(term, 0, 0, 0, 0, 0, 0, 0));
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

// Rows [n0, n1) of a (blocks of T) for M activation rows of Q8_0 (Q8_1 if T has a min).
template <class T>
void linear32(const uint8_t* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a, int64_t n0,
              int64_t n1) {
  const int64_t nb = K / 32;
  // malloc: no library templates in this folder (vec.h)
  void* buf = std::malloc(M * (nb * 12 + 64 * ((nb + 1) / 2)));
  const Acts x = prepare<T>(xq, xld, M, nb, buf);
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  with_rows(M, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    float out[R];
    for (int64_t n = n0; n < n1; ++n) {
      row32<T, R>(w + n * a.ld, nb, x, out);
      for (int r = 0; r < R; ++r) a.y[r * a.ldy + n] = out[r];
    }
  });
  std::free(buf);
}

// Rows [r0, r1) to fp32 as the reference: d * (code - offset), minus -m for Q4_1/Q5_1 (ggml's
// + m to the bit).
template <class T>
void dequantize32(const uint8_t* w, int64_t ld, int64_t K, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < K / 32; ++b, out += 32) {
      const uint8_t* p = w + r * ld + b * T::kBytes;
      const __m256i q = T::codes(p);
      const __m256 d = _mm256_set1_ps(half_at(p));
      const __m256 neg_m = _mm256_set1_ps(T::kMin ? -half_at(p + 2) : 0.0f);
      for (int i = 0; i < 4; ++i) {
        const __m128i q8 = _mm_loadl_epi64((const __m128i*)((const uint8_t*)&q + 8 * i));
        __m256i v = T::kSigned ? _mm256_cvtepi8_epi32(q8) : _mm256_cvtepu8_epi32(q8);
        v = _mm256_sub_epi32(v, _mm256_set1_epi32((int)T::kOffset));
        __m256 y = _mm256_mul_ps(d, _mm256_cvtepi32_ps(v));
        if (T::kMin) y = _mm256_sub_ps(y, neg_m);
        _mm256_storeu_ps(out + 8 * i, y);
      }
    }
}

}  // namespace

void linear_ggml(const void* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a, int64_t n0,
                 int64_t n1) {
  const uint8_t* x = static_cast<const uint8_t*>(xq);
  switch (a.type) {
    case kGgmlQ4_0: return linear32<Q4_0>(x, xld, M, K, a, n0, n1);
    case kGgmlQ4_1: return linear32<Q4_1>(x, xld, M, K, a, n0, n1);
    case kGgmlQ5_0: return linear32<Q5_0>(x, xld, M, K, a, n0, n1);
    case kGgmlQ5_1: return linear32<Q5_1>(x, xld, M, K, a, n0, n1);
    case kGgmlQ8_0: return linear32<Q8_0>(x, xld, M, K, a, n0, n1);
  }
  linear_ggml_k(x, xld, M, K, a, n0, n1);
}

void ggml_dequantize(int32_t type, const void* w, int64_t ld, int64_t K, int64_t r0, int64_t r1,
                     float* out) {
  const uint8_t* p = static_cast<const uint8_t*>(w);
  switch (type) {
    case kGgmlQ4_0: return dequantize32<Q4_0>(p, ld, K, r0, r1, out);
    case kGgmlQ4_1: return dequantize32<Q4_1>(p, ld, K, r0, r1, out);
    case kGgmlQ5_0: return dequantize32<Q5_0>(p, ld, K, r0, r1, out);
    case kGgmlQ5_1: return dequantize32<Q5_1>(p, ld, K, r0, r1, out);
    case kGgmlQ8_0: return dequantize32<Q8_0>(p, ld, K, r0, r1, out);
  }
  dequantize_ggml_k(type, p, ld, K, r0, r1, out);
}

}  // namespace torchchat::cpu::avx2
