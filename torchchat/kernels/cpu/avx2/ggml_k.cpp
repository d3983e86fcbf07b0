// GGUF's K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: blocks of 256 values) on AVX2, against Q8_K
// activation blocks (ggml.h).
//
// Every type is read the same way: per run of 32 values, the codes as unsigned bytes (0-3 for
// Q2_K, 0-7 Q3_K, 0-15 Q4_K, 0-31 Q5_K, 0-63 Q6_K), multiplied by the activations' int8 codes
// with vpmaddubsw; their pair sums fold (fold) to lanes of one scale each, which vpmaddwd
// multiplies by it into the block's int32 sum. The mins (Q2_K, Q4_K, Q5_K) go through the
// activations' bsums (sums of 16 codes) into their own fp32 term, times dmin, as in ggml; the
// offsets of Q3_K (4) and Q6_K (32) come off the folded lanes (fold_offsets). The integer sums
// are ggml's to the bit; the fp32 work (one or two FMAs) is once a block.
//
// Dequantization: the same codes and scales, then (d * sc) * q - dmin * mn rounded as the
// reference does (no contraction, see ggml.cpp).
#include "../common/exact_fp.h"

#include <algorithm>
#include <cstdlib>

#include "../common/ggml.h"
#include "vec.h"

namespace torchchat::cpu::avx2 {
namespace {

constexpr int64_t kActBytes = sizeof(BlockQ8_K), kActCodes = 4, kActBsums = 260;

// A block's scales as the dot products take them.
struct Scales {
  __m256i sc;    // 16-bit: lane r of the low (high) half, run r's scale for its values 0-15 (16-31)
  __m256i mins;  // 16-bit, one a 16 values in value order (Q2_K, Q4_K, Q5_K; else unused)
  float d, dmin;
};

// Run r's scales: lane r of each half of sc in all of that half.
inline __m256i run_scale(__m256i sc, int r) {
  return _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)((2 * r + 1) << 8 | 2 * r)));
}

// 16 scales of 16 values each (bytes, in value order) as Scales::sc: even ones in the low half,
// odd ones in the high (run r's are 2r and 2r + 1, both lane r).
inline __m256i per16(__m128i s8, bool is_signed) {
  const __m128i eo =
      _mm_shuffle_epi8(s8, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  return is_signed ? _mm256_cvtepi8_epi16(eo) : _mm256_cvtepu8_epi16(eo);
}

// Each byte's bits `mask << From` moved to `mask << To`. The shifts are of 16-bit lanes: what
// crosses into the other byte is masked off.
template <int From, int To>
inline __m256i bits_to(__m256i v, int mask) {
  const __m256i m = _mm256_set1_epi8((char)(mask << To));
  if constexpr (From < To) return _mm256_and_si256(_mm256_slli_epi16(v, To - From), m);
  else if constexpr (From > To) return _mm256_and_si256(_mm256_srli_epi16(v, From - To), m);
  else return _mm256_and_si256(v, m);
}

inline __m256i load(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }

inline __m256i low4(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i high4(__m256i v) { return low4(_mm256_srli_epi16(v, 4)); }

// Q4_K and Q5_K's 12 bytes s_0..s_11 of 6-bit (scale, min) pairs (ggml_ref.cpp's scale_min_k4)
// as Scales: one scale a run of 32, each min repeated for both 16s of it. Scale (min) r < 4 is
// s_r (s_r+4) & 63; r >= 4, the low (high) nibble of s_r+4 under the top 2 bits of s_r-4 (s_r).
inline Scales scales_k4(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128((const __m128i*)p);  // d, dmin, s_0..s_11
  const __m128i a =  // s_0..s_3 twice, s_4..s_7 twice
      _mm_shuffle_epi8(v, _mm_setr_epi8(4, 5, 6, 7, 4, 5, 6, 7, 8, 9, 10, 11, 8, 9, 10, 11));
  const __m128i at4 = _mm_set_epi32(-1, -1, 0x0F0E0D0C, -1);  // s_8..s_11 to bytes 4-7
  const __m128i at12 = _mm_set_epi32(0x0F0E0D0C, -1, -1, -1);  // to 12-15
  const __m128i nib =  // s_8..s_11's low nibbles in bytes 4-7, high ones in 12-15
      _mm_or_si128(_mm_shuffle_epi8(v, at4), _mm_shuffle_epi8(_mm_srli_epi16(v, 4), at12));
  const __m128i low6 = _mm_set_epi32(0, 0x3F3F3F3F, 0, 0x3F3F3F3F);
  const __m128i top2 = _mm_and_si128(_mm_srli_epi16(a, 2), _mm_set1_epi8(0x30));
  const __m128i sm = _mm_or_si128(  // scales in bytes 0-7, mins in 8-15
      _mm_and_si128(a, low6),
      _mm_andnot_si128(low6, _mm_or_si128(_mm_and_si128(nib, _mm_set1_epi8(0x0F)), top2)));
  return {_mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm)),
          _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm)), half_at(p), half_at(p + 2)};
}

// The types: bytes a block, the codes' offset (value = d * sc * (code - offset) - dmin * mn),
// whether they have mins, whether their codes reach 63 (kWide), scales(p), and codes<H>(p, u):
// runs 4H to 4H + 3's codes.
struct Q2K {
  static constexpr int64_t kBytes = 84, kOffset = 0;
  static constexpr bool kMin = true, kWide = false;
  static Scales scales(const uint8_t* p) {  // 4-bit scale and min a 16
    const __m128i s = _mm_loadu_si128((const __m128i*)p), f = _mm_set1_epi8(0x0F);
    return {per16(_mm_and_si128(s, f), false),
            _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s, 4), f)), half_at(p + 80),
            half_at(p + 82)};
  }
  template <int H>
  static void codes(const uint8_t* p, __m256i u[4]) {  // 2-bit fields r: run 4H + r
    const __m256i q = load(p + 16 + 32 * H);
    u[0] = bits_to<0, 0>(q, 3), u[1] = bits_to<2, 0>(q, 3);
    u[2] = bits_to<4, 0>(q, 3), u[3] = bits_to<6, 0>(q, 3);
  }
};

struct Q3K {
  static constexpr int64_t kBytes = 110, kOffset = 4;
  static constexpr bool kMin = false, kWide = false;
  static Scales scales(const uint8_t* p) {  // 16 6-bit scales biased by 32 (ggml_ref.cpp)
    uint32_t a[3];
    std::memcpy(a, p + 96, 12);
    const __m128i lo = _mm_setr_epi32((int)a[0], (int)a[1], (int)(a[0] >> 4), (int)(a[1] >> 4));
    const __m128i hi =
        _mm_setr_epi32((int)a[2], (int)(a[2] >> 2), (int)(a[2] >> 4), (int)(a[2] >> 6));
    const __m128i s = _mm_sub_epi8(
        _mm_or_si128(_mm_and_si128(lo, _mm_set1_epi8(0x0F)),
                     _mm_slli_epi16(_mm_and_si128(hi, _mm_set1_epi8(3)), 4)),
        _mm_set1_epi8(32));
    return {per16(s, true), _mm256_setzero_si256(), half_at(p + 108), 0};
  }
  template <int H>
  static void codes(const uint8_t* p, __m256i u[4]) {  // Q2_K's low bits, hmask's bit 4H + r
    const __m256i q = load(p + 32 + 32 * H), h = load(p);
    u[0] = _mm256_or_si256(bits_to<0, 0>(q, 3), bits_to<4 * H, 2>(h, 1));
    u[1] = _mm256_or_si256(bits_to<2, 0>(q, 3), bits_to<4 * H + 1, 2>(h, 1));
    u[2] = _mm256_or_si256(bits_to<4, 0>(q, 3), bits_to<4 * H + 2, 2>(h, 1));
    u[3] = _mm256_or_si256(bits_to<6, 0>(q, 3), bits_to<4 * H + 3, 2>(h, 1));
  }
};

struct Q4K {
  static constexpr int64_t kBytes = 144, kOffset = 0;
  static constexpr bool kMin = true, kWide = false;
  static Scales scales(const uint8_t* p) { return scales_k4(p); }
  template <int H>
  static void codes(const uint8_t* p, __m256i u[4]) {  // each 32 bytes: low nibbles, then high
    const __m256i q0 = load(p + 16 + 64 * H), q1 = load(p + 48 + 64 * H);
    u[0] = low4(q0), u[1] = high4(q0), u[2] = low4(q1), u[3] = high4(q1);
  }
};

struct Q5K {
  static constexpr int64_t kBytes = 176, kOffset = 0;
  static constexpr bool kMin = true, kWide = false;
  static Scales scales(const uint8_t* p) { return scales_k4(p); }
  template <int H>
  static void codes(const uint8_t* p, __m256i u[4]) {  // Q4_K's, qh's bit 4H + r the fifth
    Q4K::codes<H>(p + 32, u);  // qs 32 bytes further
    const __m256i h = load(p + 16);
    u[0] = _mm256_or_si256(u[0], bits_to<4 * H, 4>(h, 1));
    u[1] = _mm256_or_si256(u[1], bits_to<4 * H + 1, 4>(h, 1));
    u[2] = _mm256_or_si256(u[2], bits_to<4 * H + 2, 4>(h, 1));
    u[3] = _mm256_or_si256(u[3], bits_to<4 * H + 3, 4>(h, 1));
  }
};

struct Q6K {
  static constexpr int64_t kBytes = 210, kOffset = 32;
  static constexpr bool kMin = false, kWide = true;
  static Scales scales(const uint8_t* p) {  // 16 int8 scales
    const __m128i s = _mm_loadu_si128((const __m128i*)(p + 192));
    return {per16(s, true), _mm256_setzero_si256(), half_at(p + 208), 0};
  }
  template <int H>
  static void codes(const uint8_t* p, __m256i u[4]) {  // ql nibbles, qh's 2-bit fields
    const __m256i l0 = load(p + 64 * H), l1 = load(p + 64 * H + 32), h = load(p + 128 + 32 * H);
    u[0] = _mm256_or_si256(low4(l0), bits_to<0, 4>(h, 3));
    u[1] = _mm256_or_si256(low4(l1), bits_to<2, 4>(h, 3));
    u[2] = _mm256_or_si256(high4(l0), bits_to<4, 4>(h, 3));
    u[3] = _mm256_or_si256(high4(l1), bits_to<6, 4>(h, 3));
  }
};

// The runs' pair sums p (vpmaddubsw, 16-bit), folded by unpacks and 16-bit adds -- runs 2i,
// 2i + 1 into one vector of lanes [2i 2i 2i+1 2i+1 ...], those of 4 runs into [0 0 1 1 2 2 3 3]
// -- to lanes of 8 products (f[0], f[1]; Q6_K, whose codes reach 63, stops at 4 products,
// 4 * 63 * 127 < 2^15: f[0..3]). The folds stay within 128-bit halves, so each 16 values keep
// their own scale. (Horizontal adds fold the same way at several times the cost on Zen 4.)
template <class T>
inline void fold(const __m256i p[8], __m256i f[4]) {
  for (int i = 0; i < 4; ++i)
    f[i] = _mm256_add_epi16(_mm256_unpacklo_epi32(p[2 * i], p[2 * i + 1]),
                            _mm256_unpackhi_epi32(p[2 * i], p[2 * i + 1]));
  if (!T::kWide) {
    f[0] = _mm256_add_epi16(_mm256_unpacklo_epi64(f[0], f[1]), _mm256_unpackhi_epi64(f[0], f[1]));
    f[1] = _mm256_add_epi16(_mm256_unpacklo_epi64(f[2], f[3]), _mm256_unpackhi_epi64(f[2], f[3]));
  }
}

// The scales in fold's lane order. A half of Scales::sc holds run r's scale (for that half's 16)
// in lane r, so the patterns are unpacks of sc with itself.
template <class T>
inline void fold_scales(__m256i sc, __m256i s[4]) {
  const __m256i lo = _mm256_unpacklo_epi16(sc, sc), hi = _mm256_unpackhi_epi16(sc, sc);
  if (T::kWide) {  // f[i]: [2i 2i 2i+1 2i+1 2i 2i 2i+1 2i+1]
    s[0] = _mm256_shuffle_epi32(lo, 0x44), s[1] = _mm256_shuffle_epi32(lo, 0xEE);
    s[2] = _mm256_shuffle_epi32(hi, 0x44), s[3] = _mm256_shuffle_epi32(hi, 0xEE);
  } else {
    s[0] = lo, s[1] = hi;
  }
}

constexpr int kFolds = 4;  // fold's vectors, at most

// Q3_K and Q6_K's offset times the activation codes, folded as their products are (once a
// call): subtracted in 16 bits, each lane is then the exact sum of (code - offset) * x over its
// values, so that no lane holds the offset's large multiple of the activations for the fp32
// sums to cancel. (Per 16 values through the bsums, the lanes would not match.)
template <class T>
void fold_offsets(const uint8_t* x, int64_t xld, int64_t M, int64_t nb, __m256i* out) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < nb; ++b, out += kFolds) {
      const uint8_t* codes = x + r * xld + b * kActBytes + kActCodes;
      __m256i p[8];
      for (int i = 0; i < 8; ++i)
        p[i] = _mm256_maddubs_epi16(_mm256_set1_epi8((char)T::kOffset), load(codes + 32 * i));
      fold<T>(p, out);
    }
}

// A block's integer sum with activation row x (its codes; off: its fold_offsets, for Q3_K and
// Q6_K), from the runs' codes u and the fold's scales s: in the lanes' total, each lane exact.
template <class T>
inline __m256i block_sum(const __m256i u[8], const __m256i s[4], const uint8_t* x,
                         const __m256i* off) {
  __m256i p[8], f[4];
  for (int i = 0; i < 8; ++i) p[i] = _mm256_maddubs_epi16(u[i], load(x + 32 * i));
  fold<T>(p, f);
  constexpr int n = T::kWide ? 4 : 2;
  if (T::kOffset)
    for (int i = 0; i < n; ++i) f[i] = _mm256_sub_epi16(f[i], _mm256_load_si256(off + i));
  __m256i sum = _mm256_madd_epi16(f[0], s[0]);
  for (int i = 1; i < n; ++i) sum = _mm256_add_epi32(sum, _mm256_madd_epi16(f[i], s[i]));
  return sum;
}

// out[r] = the dot product of weight row w (nb blocks of T) with Q8_K activation row r, r < R.
template <class T, int R>
void row_k(const uint8_t* w, int64_t nb, const uint8_t* x, int64_t xld, const __m256i* off,
           float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, w += T::kBytes) {
    const Scales k = T::scales(w);
    __m256i u[8], s[4];
    T::template codes<0>(w, u);
    T::template codes<1>(w, u + 4);
    fold_scales<T>(k.sc, s);
    for (int r = 0; r < R; ++r) {
      const uint8_t* xr = x + r * xld + b * kActBytes;
      float xd;
      std::memcpy(&xd, xr, 4);
      const __m256i isum =
          block_sum<T>(u, s, xr + kActCodes, T::kOffset ? off + (r * nb + b) * kFolds : nullptr);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(k.d * xd), acc[r]);
      if (T::kMin) {  // mins through bsums
        const __m256i c = _mm256_madd_epi16(load(xr + kActBsums), k.mins);
        acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(c), _mm256_set1_ps(k.dmin * xd), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

template <class T>
void linear_k(const uint8_t* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a, int64_t n0,
              int64_t n1) {
  const int64_t nb = K / 256;
  // aligned_alloc, not std::vector: no library templates in this folder (vec.h)
  __m256i* off = T::kOffset ? static_cast<__m256i*>(std::aligned_alloc(32, M * nb * kFolds * 32))
                            : nullptr;
  if (T::kOffset) fold_offsets<T>(xq, xld, M, nb, off);
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  with_rows(M, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    float out[R];
    for (int64_t n = n0; n < n1; ++n) {
      row_k<T, R>(w + n * a.ld, nb, xq, xld, off, out);
      for (int r = 0; r < R; ++r) a.y[r * a.ldy + n] = out[r];
    }
  });
  std::free(off);
}

// Rows [r0, r1) to fp32: (d * sc) * (code - offset) - dmin * mn, each rounded as the reference.
template <class T>
void dequantize_k(const uint8_t* w, int64_t ld, int64_t K, int64_t r0, int64_t r1, float* out) {
  auto floats = [](__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(v)); };
  for (int64_t row = r0; row < r1; ++row)
    for (int64_t b = 0; b < K / 256; ++b) {
      const uint8_t* p = w + row * ld + b * T::kBytes;
      const Scales k = T::scales(p);
      alignas(32) int16_t mn[16];
      _mm256_store_si256((__m256i*)mn, k.mins);
      const __m256 d = _mm256_set1_ps(k.d), dmin = _mm256_set1_ps(k.dmin);
      auto half = [&](auto half_index) {
        constexpr int H = decltype(half_index)::value;
        __m256i u[4];
        T::template codes<H>(p, u);
        for (int i = 0; i < 4; ++i, out += 32) {
          const int run = 4 * H + i;
          const __m256i s = run_scale(k.sc, run);
          const __m256 scale[2] = {_mm256_mul_ps(d, floats(_mm256_castsi256_si128(s))),
                                   _mm256_mul_ps(d, floats(_mm256_extracti128_si256(s, 1)))};
          for (int j = 0; j < 4; ++j) {  // 8 values of 16s 2 run + j / 2
            const __m128i q8 = _mm_loadl_epi64((const __m128i*)((const uint8_t*)&u[i] + 8 * j));
            const __m256i q =
                _mm256_sub_epi32(_mm256_cvtepu8_epi32(q8), _mm256_set1_epi32((int)T::kOffset));
            __m256 y = _mm256_mul_ps(scale[j / 2], _mm256_cvtepi32_ps(q));
            if (T::kMin)
              y = _mm256_sub_ps(y, _mm256_mul_ps(dmin, _mm256_set1_ps(mn[2 * run + j / 2])));
            _mm256_storeu_ps(out + 8 * j, y);
          }
        }
      };
      half(std::integral_constant<int, 0>{});
      half(std::integral_constant<int, 1>{});
    }
}


// Prefill's GEMM (Kernels::gemm_ggml) on Q5_K and Q6_K: many tokens quantized to Q8_K
// (GgmlGemmActs), lanes are tokens as in avx512/ggml_gemm_vnni.cpp. vpmaddubsw multiplies 4
// activation codes of 8 tokens (signed) by 4 codes of one weight row (unsigned), broadcast, into
// 16-bit pair sums, which add up in 16 bits for as many steps as cannot overflow (each step's pair
// sum reaches 2 * max code * 127: Q5_K 4 steps, half a sub-block of 32; Q6_K 2); then
// vpmaddwd by the sub-block's scale adds them into the super-block's int32 sums, exact. The
// codes' offsets come from the tokens' block sums (vpmaddwd), the fp32 work once a super-block,
// as the AVX-512 kernel does. A tile is 2 rows x 32 tokens (R x TV token vectors of 8).
constexpr int kUnit = 16;  // rows unpacked together (the caller's units are 16 rows)

struct Unpacked {
  alignas(32) uint8_t codes[256];
  int32_t sc[16];  // Q6_K: 16 sub-blocks of 16; Q4_K, Q5_K: 8 of 32
  int32_t co[8];   // offsets' coefficients in int16 pairs (Q6_K: 32 sc; Q4_K, Q5_K: the mins)
  float d, dmin;
};

template <class T>
void unpack(const uint8_t* p, Unpacked& u) {
  __m256i c[4];
  T::template codes<0>(p, c);
  for (int i = 0; i < 4; ++i) _mm256_store_si256((__m256i*)(u.codes + 32 * i), c[i]);
  T::template codes<1>(p, c);
  for (int i = 0; i < 4; ++i) _mm256_store_si256((__m256i*)(u.codes + 128 + 32 * i), c[i]);
  if (T::kMin) {  // Q4_K, Q5_K: d, dmin, 12 bytes of scales and mins
    u.d = half_at(p);
    u.dmin = half_at(p + 2);
    ggml_k4_scales(p + 4, u.sc, u.co);
  } else {  // Q6_K: 16 int8 scales, d
    for (int j = 0; j < 16; ++j) u.sc[j] = (int8_t)p[192 + j];
    for (int q = 0; q < 8; ++q) u.co[q] = ggml_pair16(32 * u.sc[2 * q], 32 * u.sc[2 * q + 1]);
    u.d = half_at(p + 208);
    u.dmin = 0.0f;
  }
}

// Token vectors [v0, v0 + TV) (8 tokens each) x rows w[0..R) of super-block sb, into the fp32
// sums f (d * sumi) and g (dmin * summs), [R][TV].
template <class T, int R, int TV>
void gemm_tile(const GgmlGemmActs& x, int64_t sb, int64_t v0, const Unpacked* w, __m256* f,
               __m256* g) {
  constexpr int S = T::kMin ? 32 : 16, nsub = 256 / S, npair = nsub / 2;
  constexpr int steps = T::kWide ? 2 : 4;  // Q6_K, Q5_K
  const int64_t lanes = x.T * 16;
  __m256i si[R][TV];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TV; ++t) si[r][t] = _mm256_setzero_si256();
  const int8_t* base = x.q + sb * 64 * x.T * 64 + v0 * 32;
  for (int j = 0; j < nsub; ++j) {
    __m256i sc[R];
    for (int r = 0; r < R; ++r) sc[r] = _mm256_set1_epi16((short)w[r].sc[j]);
    for (int k0 = j * S / 4; k0 < (j + 1) * S / 4; k0 += steps) {
      __m256i acc[R][TV];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < TV; ++t) acc[r][t] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int kq = k0; kq < k0 + steps; ++kq) {
        __m256i a[TV];
        for (int t = 0; t < TV; ++t)
          a[t] = _mm256_loadu_si256((const __m256i*)(base + kq * x.T * 64 + 32 * t));
        for (int r = 0; r < R; ++r) {
          int32_t four;
          std::memcpy(&four, w[r].codes + 4 * kq, 4);
          const __m256i b = _mm256_set1_epi32(four);
          for (int t = 0; t < TV; ++t)
            acc[r][t] = _mm256_add_epi16(acc[r][t], _mm256_maddubs_epi16(b, a[t]));
        }
      }
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < TV; ++t)
          si[r][t] = _mm256_add_epi32(si[r][t], _mm256_madd_epi16(acc[r][t], sc[r]));
    }
  }
  const int32_t* sums = (T::kMin ? x.s32 : x.s16) + sb * npair * lanes + v0 * 8;
  const float* dx = x.d + sb * lanes + v0 * 8;
  for (int t = 0; t < TV; ++t) {
    __m256i o[R];
    for (int r = 0; r < R; ++r) o[r] = _mm256_setzero_si256();
    for (int q = 0; q < npair; ++q) {
      const __m256i s = _mm256_loadu_si256((const __m256i*)(sums + q * lanes + 8 * t));
      for (int r = 0; r < R; ++r)
        o[r] = _mm256_add_epi32(o[r], _mm256_madd_epi16(s, _mm256_set1_epi32(w[r].co[q])));
    }
    const __m256 d = _mm256_loadu_ps(dx + 8 * t);
    for (int r = 0; r < R; ++r) {
      const __m256 dd = _mm256_mul_ps(d, _mm256_set1_ps(w[r].d));
      if (!T::kMin) {  // Q6_K: sumi - 32 sum_j sc_j bsum_j
        f[r * TV + t] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(_mm256_sub_epi32(si[r][t], o[r])),
                                        f[r * TV + t]);
      } else {
        f[r * TV + t] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(si[r][t]), f[r * TV + t]);
        g[r * TV + t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(w[r].dmin)),
                                        _mm256_cvtepi32_ps(o[r]), g[r * TV + t]);
      }
    }
  }
}

// Rows n0.. (R of them; super-block sb of row r at all[sb * kUnit + r]) x token vectors [v0,
// v0 + TV), into y.
template <class T, int R, int TV>
void gemm_rows_tokens(const GgmlGemmActs& x, int64_t K, const Matrix& a, int64_t n0, int64_t v0,
                      const Unpacked* all) {
  __m256 f[R * TV], g[R * TV];
  for (int i = 0; i < R * TV; ++i) f[i] = g[i] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < K / 256; ++sb) gemm_tile<T, R, TV>(x, sb, v0, all + sb * kUnit, f, g);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TV; ++t) {
      alignas(32) float out[8];
      _mm256_store_ps(out, _mm256_sub_ps(f[r * TV + t], g[r * TV + t]));
      const int64_t m0 = 8 * (v0 + t);
      for (int i = 0; i < 8 && m0 + i < x.M; ++i) a.y[(m0 + i) * a.ldy + n0 + r] = out[i];
    }
}

// A unit's `rows` rows (from n0) x token vectors [v0, v0 + TV): pairs of rows, an odd one last.
template <class T, int TV>
void gemm_unit_tokens(const GgmlGemmActs& x, int64_t K, const Matrix& a, int64_t n0, int rows,
                      int64_t v0, const Unpacked* all) {
  int r = 0;
  for (; r + 2 <= rows; r += 2) gemm_rows_tokens<T, 2, TV>(x, K, a, n0 + r, v0, all + r);
  if (r < rows) gemm_rows_tokens<T, 1, TV>(x, K, a, n0 + r, v0, all + r);
}

// Units of kUnit rows, unpacked once; token tiles outside the unit's rows, so that a tile's
// activations (32 tokens x K codes: 64 KiB at K = 2048) stay in L2 while every pair of the
// unit passes over them (2 rows at a time over all tokens streamed them from L3: 512 tokens ran
// 0.9x 64's rate).
template <class T>
void gemm_k(const GgmlGemmActs& x, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  const int64_t nsb = K / 256, nv = (x.M + 7) / 8;  // token vectors holding tokens
  // aligned_alloc, not std::vector: no library templates in this folder (vec.h)
  auto* all = static_cast<Unpacked*>(std::aligned_alloc(32, nsb * kUnit * sizeof(Unpacked)));
  for (int64_t n = n0; n < n1; n += kUnit) {
    const int rows = (int)std::min<int64_t>(kUnit, n1 - n);
    for (int r = 0; r < rows; ++r)
      for (int64_t sb = 0; sb < nsb; ++sb)
        unpack<T>(static_cast<const uint8_t*>(a.w) + (n + r) * a.ld + sb * T::kBytes,
                  all[sb * kUnit + r]);
    int64_t v = 0;
    for (; v + 4 <= nv; v += 4) gemm_unit_tokens<T, 4>(x, K, a, n, rows, v, all);
    switch (nv - v) {
      case 3: gemm_unit_tokens<T, 3>(x, K, a, n, rows, v, all); break;
      case 2: gemm_unit_tokens<T, 2>(x, K, a, n, rows, v, all); break;
      case 1: gemm_unit_tokens<T, 1>(x, K, a, n, rows, v, all); break;
      default: break;
    }
  }
  std::free(all);
}

}  // namespace

void linear_ggml_k(const uint8_t* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a,
                   int64_t n0, int64_t n1) {
  switch (a.type) {
    case kGgmlQ2_K: return linear_k<Q2K>(xq, xld, M, K, a, n0, n1);
    case kGgmlQ3_K: return linear_k<Q3K>(xq, xld, M, K, a, n0, n1);
    case kGgmlQ4_K: return linear_k<Q4K>(xq, xld, M, K, a, n0, n1);
    case kGgmlQ5_K: return linear_k<Q5K>(xq, xld, M, K, a, n0, n1);
    case kGgmlQ6_K: return linear_k<Q6K>(xq, xld, M, K, a, n0, n1);
  }
}

void dequantize_ggml_k(int32_t type, const uint8_t* w, int64_t ld, int64_t K, int64_t r0,
                       int64_t r1, float* out) {
  switch (type) {
    case kGgmlQ2_K: return dequantize_k<Q2K>(w, ld, K, r0, r1, out);
    case kGgmlQ3_K: return dequantize_k<Q3K>(w, ld, K, r0, r1, out);
    case kGgmlQ4_K: return dequantize_k<Q4K>(w, ld, K, r0, r1, out);
    case kGgmlQ5_K: return dequantize_k<Q5K>(w, ld, K, r0, r1, out);
    case kGgmlQ6_K: return dequantize_k<Q6K>(w, ld, K, r0, r1, out);
  }
}

void gemm_ggml_k(const GgmlGemmActs& x, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  switch (a.type) {  // the table's gemm_ggml_types (Q4_K: the int4 GEMM, table.cpp)
    case kGgmlQ5_K: return gemm_k<Q5K>(x, K, a, n0, n1);
    case kGgmlQ6_K: return gemm_k<Q6K>(x, K, a, n0, n1);
  }
}

}  // namespace torchchat::cpu::avx2
