// GGUF's K-quants Q4_K, Q5_K and Q6_K with AVX512-VNNI (and VBMI's byte permutes), against Q8_K
// activation blocks (common/ggml.h); Q2_K and Q3_K run AVX2's (avx2/ggml_k.cpp).
//
// A block's 256 codes are four vectors of 64 unsigned bytes (0-15 Q4_K, 0-31 Q5_K, 0-63 Q6_K).
// vpdpbusd multiplies each by 64 activation codes, 4 products to a 32-bit lane, so every lane
// sums values of one scale. Those sums fit 16 bits (4 * 63 * 127 < 2^15): two vectors pack into
// one (vpackssdw, never saturating) and one vpdpwssd multiplies it by its scales into the block's
// int32 lanes -- exact, ggml's integer sum split over lanes --, so a block's fp32 work is one
// conversion and one FMA a row (and Q4_K/Q5_K's mins: their bsums term, as in ggml). A vector
// of Q4_K's or Q5_K's codes holds two runs of 32 values 64 apart (the low nibbles of 64 bytes:
// runs 0 and 2); the activations are reordered once a call to match. Q6_K's offset (32) comes
// off each packed lane as 32 times its activation codes' sum (also prepared once a call): no
// lane holds a large multiple of the activations for the fp32 sums to cancel.
#include <cstdlib>

#include "../common/ggml.h"
#include "vec.h"

namespace torchchat::cpu::avx512 {
namespace {

constexpr int64_t kActBytes = sizeof(BlockQ8_K), kActCodes = 4, kActBsums = 260;

// 64 bytes at p as two 32-byte loads: a 64-byte load at an offset splits two cache lines, and a
// stream of those reads memory more slowly (measured: 1.1x the GB/s from memory with these).
inline __m512i load(const void* p) {
  const __m256i* q = static_cast<const __m256i*>(p);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(q)),
                            _mm256_loadu_si256(q + 1), 1);
}
inline __m512i load_twice(const void* p) {  // 32 bytes in both halves
  return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p));
}
inline __m512i low4(__m512i v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
inline __m512i high4(__m512i v) { return low4(_mm512_srli_epi16(v, 4)); }
inline __m512i halves8(char lo, char hi) {  // bytes: lo in the low 32, hi in the high 32
  return _mm512_mask_blend_epi64(0xF0, _mm512_set1_epi8(lo), _mm512_set1_epi8(hi));
}
inline __m512i halves16(short lo, short hi) {
  return _mm512_mask_blend_epi64(0xF0, _mm512_set1_epi16(lo), _mm512_set1_epi16(hi));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Where scales_mins_k4 puts scale j and min j.
constexpr int scale_byte(int j) { return j < 4 ? j : j + 4; }
constexpr int min_byte(int j) { return j < 4 ? j + 4 : j + 8; }

// Index vectors of byte or word permutes, 64-byte aligned for one load.
struct Index {
  alignas(64) uint8_t b[64];
};

// vpackssdw of the dpbusd sums of code vectors 2p and 2p + 1 puts, in 128-bit chunk c, lanes
// 4c..4c+3 of the first (words 0-3) and of the second (4-7). Their scales' numbers, as bytes
// (Q4_K, Q5_K: of scales_mins_k4's bytes; every other byte zeroed) or words (Q6_K):
constexpr Index scale_pattern(bool q6, int p) {
  Index x{};
  for (int w = 0; w < 32; ++w) {
    const int c = w / 8, second = w % 8 >= 4;
    // Q4_K: vector 2p holds runs 4p (lanes 0-7) and 4p + 2, 2p + 1 runs 4p + 1 and 4p + 3.
    // Q6_K: vector 2p holds the 16s 8p..8p+3 (4 lanes each), 2p + 1 the 16s 8p+4..8p+7.
    x.b[2 * w] = (uint8_t)(q6 ? 8 * p + c + 4 * second
                               : scale_byte(4 * p + 2 * (c >= 2) + second));
  }
  return x;
}
constexpr Index kK4Scales[2] = {scale_pattern(false, 0), scale_pattern(false, 1)};
constexpr Index kQ6Scales[2] = {scale_pattern(true, 0), scale_pattern(true, 1)};
constexpr Index kK4Mins = [] {  // bsums g (16 values each) take min g / 2
  Index x{};
  for (int g = 0; g < 16; ++g) x.b[2 * g] = (uint8_t)min_byte(g / 2);
  return x;
}();
constexpr __mmask64 kLowBytes = 0x5555555555555555ull;  // the low byte of every word

// A block's scales as block_sum takes them.
struct Scales {
  __m512i sc[2];  // 16-bit, the scales of pack p's lanes (scale_pattern)
  __m256i mins;   // 16-bit, the min of each 16 values (Q4_K, Q5_K)
  __m128 d;       // d and dmin (Q4_K, Q5_K) in lanes 0 and 1
};

inline __m128 halves_at(const uint8_t* p, bool two) {  // one or two fp16 at p
  uint32_t h = 0;
  std::memcpy(&h, p, two ? 4 : 2);
  return _mm_cvtph_ps(_mm_cvtsi32_si128((int)h));
}

// Q4_K and Q5_K's 12 bytes of 6-bit (scale, min) pairs as bytes [sc 0-3, mn 0-3, sc 4-7,
// mn 4-7], on the integer pipes (the vector ones are the busy ones).
inline __m128i scales_mins_k4(const uint8_t* s) {
  uint64_t low, high;
  ggml_scales_mins_k4(s, low, high);
  return _mm_set_epi64x((long long)high, (long long)low);
}

inline Scales scales_k4(const uint8_t* p) {  // d, dmin, the 12 bytes
  const __m512i sm = _mm512_castsi128_si512(scales_mins_k4(p + 4));
  return {{_mm512_maskz_permutexvar_epi8(kLowBytes, _mm512_load_si512(kK4Scales[0].b), sm),
           _mm512_maskz_permutexvar_epi8(kLowBytes, _mm512_load_si512(kK4Scales[1].b), sm)},
          _mm256_maskz_permutexvar_epi8((__mmask32)kLowBytes,
                                        _mm256_load_si256((const __m256i*)kK4Mins.b),
                                        _mm512_castsi512_si256(sm)),
          halves_at(p, true)};
}

// The types: bytes a block, the codes' offset, whether they have mins, whether the activations
// are reordered (prepare), scales(p), and codes(p, u): the 4 vectors of codes.
struct Q4K {
  static constexpr int64_t kBytes = 144, kOffset = 0;
  static constexpr bool kMin = true, kReorder = true;
  static Scales scales(const uint8_t* p) { return scales_k4(p); }
  static void codes(const uint8_t* p, __m512i u[4]) {  // low nibbles runs 4i, 4i + 2; high +1
    const __m512i a = load(p + 16), b = load(p + 80);
    u[0] = low4(a), u[1] = high4(a), u[2] = low4(b), u[3] = high4(b);
  }
};

struct Q5K {
  static constexpr int64_t kBytes = 176, kOffset = 0;
  static constexpr bool kMin = true, kReorder = true;
  static Scales scales(const uint8_t* p) { return scales_k4(p); }
  static void codes(const uint8_t* p, __m512i u[4]) {  // Q4_K's, + 16 where qh's bit run is set
    Q4K::codes(p + 32, u);
    const __m512i h = load_twice(p + 16), sixteen = _mm512_set1_epi8(16);
    for (int i = 0; i < 4; ++i) {
      const int run = 4 * (i / 2) + i % 2;  // of the low 32 bytes; the high ones' is run + 2
      const __mmask64 k = _mm512_test_epi8_mask(h, halves8((char)(1 << run), (char)(4 << run)));
      u[i] = _mm512_mask_add_epi8(u[i], k, u[i], sixteen);
    }
  }
};

struct Q6K {
  static constexpr int64_t kBytes = 210, kOffset = 32;
  static constexpr bool kMin = false, kReorder = false;
  static Scales scales(const uint8_t* p) {  // 16 int8 scales
    const __m512i s = _mm512_castsi256_si512(
        _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(p + 192))));
    return {{_mm512_permutexvar_epi16(_mm512_load_si512(kQ6Scales[0].b), s),
             _mm512_permutexvar_epi16(_mm512_load_si512(kQ6Scales[1].b), s)},
            _mm256_setzero_si256(), halves_at(p + 208, false)};
  }
  // Each 128 values: ql's 64 bytes, low nibbles values 0-63, high 64-127; qh's 32 bytes, the
  // 2-bit field r of byte l value 32r + l's top bits (moved to bits 4-5 by 16-bit shifts; what
  // crosses bytes is masked off).
  static void codes(const uint8_t* p, __m512i u[4]) {
    const __m512i top = _mm512_set1_epi8(0x30), up = halves16(4, 2), down = halves16(0, 2);
    for (int h = 0; h < 2; ++h) {
      const __m512i l = load(p + 64 * h), q = load_twice(p + 128 + 32 * h);
      // a | (b & c)
      u[2 * h] = _mm512_ternarylogic_epi32(low4(l), _mm512_sllv_epi16(q, up), top, 0xF8);
      u[2 * h + 1] = _mm512_ternarylogic_epi32(high4(l), _mm512_srlv_epi16(q, down), top, 0xF8);
    }
  }
};

// The activation rows as the weight rows read them, prepared once a call: per row and block
// (row r's block b at (r * nb + b) * kRecord bytes, 64-byte aligned: no load splits a cache
// line) its codes in the order of the code vectors, then, for Q6_K, its offsets packed as the
// sums are (2 vectors: 32 times each lane's 4 codes' sum, 16-bit). Their d and bsums are read
// where they are.
template <class T>
struct Acts {
  static constexpr int64_t kRecord = T::kOffset ? 384 : 256;
  const uint8_t* x;  // the Q8_K rows: row r's block b at x + r * xld + b * kActBytes
  int64_t xld;
  const int8_t* rec;
};

template <class T>
Acts<T> prepare(const uint8_t* xq, int64_t xld, int64_t M, int64_t nb, void* buf) {
  int8_t* rec = static_cast<int8_t*>(buf);
  const __m512i offset = _mm512_set1_epi8((char)T::kOffset);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* codes = xq + r * xld + b * kActBytes + kActCodes;
      int8_t* out = rec + (r * nb + b) * Acts<T>::kRecord;
      for (int i = 0; i < 8; ++i) {  // Q4_K, Q5_K: runs of 32 in the order 0 2 1 3 4 6 5 7
        const int run = !T::kReorder ? i : i % 4 == 1 ? i + 1 : i % 4 == 2 ? i - 1 : i;
        std::memcpy(out + 32 * i, codes + 32 * run, 32);
      }
      for (int p = 0; p < 2 && T::kOffset; ++p) {
        __m512i s[2];
        for (int i = 0; i < 2; ++i)
          s[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset,
                                     load(codes + 128 * p + 64 * i));
        _mm512_store_si512(out + 256 + 64 * p, _mm512_packs_epi32(s[0], s[1]));
      }
    }
  return {xq, xld, rec};
}

// A block's integer sum with activation record x, in the lanes' total. Q6_K's offsets come off
// the packed sums: 4 * 63 * 127 before, 4 * 32 * 127 after, in 16 bits either way.
template <class T>
inline __m512i block_sum(const __m512i u[4], const Scales& k, const int8_t* x) {
  __m512i s[4];
  for (int i = 0; i < 4; ++i)
    s[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[i], _mm512_load_si512(x + 64 * i));
  __m512i p0 = _mm512_packs_epi32(s[0], s[1]), p1 = _mm512_packs_epi32(s[2], s[3]);
  if (T::kOffset) {
    p0 = _mm512_sub_epi16(p0, _mm512_load_si512(x + 256));
    p1 = _mm512_sub_epi16(p1, _mm512_load_si512(x + 320));
  }
  return _mm512_dpwssd_epi32(_mm512_madd_epi16(p0, k.sc[0]), p1, k.sc[1]);
}

// out[r] = the dot product of weight row w (nb blocks of T) with activation row r, r < R.
template <class T, int R>
void row_k(const uint8_t* w, int64_t nb, const Acts<T>& x, float* out) {
  __m512 acc[R];
  __m256 accm[R];  // the mins' terms
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), accm[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, w += T::kBytes) {
    __m512i u[4];
    T::codes(w, u);
    const Scales k = T::scales(w);
    for (int r = 0; r < R; ++r) {
      const uint8_t* xb = x.x + r * x.xld + b * kActBytes;
      float xd;
      std::memcpy(&xd, xb, 4);
      const __m128 f = _mm_mul_ps(k.d, _mm_set1_ps(xd));  // d * xd, dmin * xd
      const __m512i isum = block_sum<T>(u, k, x.rec + (r * nb + b) * Acts<T>::kRecord);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_broadcastss_ps(f), acc[r]);
      if (T::kMin) {
        const __m256i bsums = _mm256_loadu_si256((const __m256i*)(xb + kActBsums));
        const __m256 fmin = _mm256_permutexvar_ps(_mm256_set1_epi32(1), _mm256_castps128_ps256(f));
        accm[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(bsums, k.mins)), fmin,
                                   accm[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    out[r] = _mm512_reduce_add_ps(acc[r]) + (T::kMin ? hsum(accm[r]) : 0.0f);
}

template <class T>
void linear_k(const uint8_t* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a, int64_t n0,
              int64_t n1) {
  const int64_t nb = K / 256;
  // aligned_alloc, not std::vector: no library templates in this folder (vec.h)
  void* buf = std::aligned_alloc(64, M * nb * Acts<T>::kRecord);
  const Acts<T> x = prepare<T>(xq, xld, M, nb, buf);
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  with_rows(M, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    float out[R];
    for (int64_t n = n0; n < n1; ++n) {
      row_k<T, R>(w + n * a.ld, nb, x, out);
      for (int r = 0; r < R; ++r) a.y[r * a.ldy + n] = out[r];
    }
  });
  std::free(buf);
}

}  // namespace

bool linear_ggml_k_vnni(const uint8_t* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a,
                        int64_t n0, int64_t n1) {
  switch (a.type) {
    case kGgmlQ4_K: linear_k<Q4K>(xq, xld, M, K, a, n0, n1); return true;
    case kGgmlQ5_K: linear_k<Q5K>(xq, xld, M, K, a, n0, n1); return true;
    case kGgmlQ6_K: linear_k<Q6K>(xq, xld, M, K, a, n0, n1); return true;
  }
  return false;
}

}  // namespace torchchat::cpu::avx512
