// Attention for a few query rows: reads only the span of the cache its mask leaves open, scores
// 8 keys at a time (one vector of products per key, the 8 reduced together), then sums the value
// rows weighted by the probabilities, 64 output values a pass (8 accumulators: AVX2 has 16
// registers, not enough to keep a 128- or 256-value row of q or of the output in them).
#include <algorithm>
#include <limits>
#include <type_traits>

#include "vec.h"

namespace torchchat::cpu::avx2 {
namespace {

// exp of 8 fp32 lanes: 2^n * p(r), x = n ln2 + r with |r| <= ln2/2, p a degree-6 polynomial
// (relative error ~2e-7, as std::exp's fp32 result within a few ulp). Lanes below -87 give ~0.
// AVX2 has no vscalefps: 2^n is built from its exponent bits, (n + 127) << 23 (n >= -126 here).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// The 8 sums of v[0..7]'s lanes, in order.
inline __m256 sum8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
  const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);  // per 128-bit half
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// 8 fp32 of `n` chunk values: all 8 or a short last chunk.
template <typename T>
inline __m256 load_n(const T* p, int64_t n) {
  return n == 8 ? Load<T>::at(p) : Load<T>::part(p, n);
}

// y[d0 .. d0 + 8C) = inv * sum_t p[t - lo] v[t][d0 + d]: C chunks of 8, the last `last` values.
template <typename T, int C>
void weighted_sum(const T* v, CacheRows rows, const float* p, int64_t lo, int64_t hi, int64_t d0,
                  int64_t last, __m256 inv, float* y) {
  __m256 acc[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t t = lo; t < hi; ++t) {
    if (p[t - lo] == 0.0f) continue;  // a masked position: its v row is not read
    const __m256 pt = _mm256_broadcast_ss(p + (t - lo));
    const T* vr = rows.at(v, t) + d0;
#pragma GCC unroll 8
    for (int c = 0; c < C - 1; ++c) acc[c] = _mm256_fmadd_ps(pt, Load<T>::at(vr + 8 * c), acc[c]);
    acc[C - 1] = _mm256_fmadd_ps(pt, load_n(vr + 8 * (C - 1), last), acc[C - 1]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) _mm256_store_ps(y + d0 + 8 * c, _mm256_mul_ps(acc[c], inv));
}

// out[0..D) = y rounded to T (8 at a time; y holds whole chunks).
inline void store_row(const float* y, int64_t D, float* out) { std::memcpy(out, y, D * 4); }

template <typename T>
inline void store_row(const float* y, int64_t D, T* out) {
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 v = _mm256_load_ps(y + d);
    __m128i h;
    if constexpr (std::is_same_v<T, fp16_t>) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);  // as fp16_t's rounding (F16C)
    } else {
      const __m256i b = _mm256_packus_epi32(to_bf16_bits(v), to_bf16_bits(v));
      h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(b, 0x08));  // lanes 0-3 | 4-7
    }
    alignas(16) uint16_t buf[8];
    _mm_store_si128((__m128i*)buf, h);
    std::memcpy(out + d, buf, std::min<int64_t>(8, D - d) * 2);
  }
}

// softmax(q k^T * scale, masked) v for one query row: k, v rows where `rows` says, mask row m whose
// open positions all lie in [lo, hi); fp32 throughout, rounded once into out. D <= 256. Scores
// go 8 positions at a time into p (len + 16 floats); only the span the mask leaves open is read.
// A row with every position masked gets zeros (SDPA would give NaN; such rows are never read).
template <typename T>
void attend(const T* q, const T* k, const T* v, CacheRows rows, const bool* m, int64_t lo,
            int64_t hi, int64_t D, float scale, T* out, float* p) {
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t C = (D + 7) / 8, last = D - 8 * (C - 1);  // chunks of 8 values, the last `last`
  alignas(32) float qf[256], y[256];
  for (int64_t c = 0; c < C; ++c)
    _mm256_store_ps(qf + 8 * c, load_n(q + 8 * c, c < C - 1 ? 8 : last));
  __m256 mx = _mm256_set1_ps(-inf);
  for (int64_t t0 = lo; t0 < hi; t0 += 8) {
    const int64_t n = std::min<int64_t>(8, hi - t0);
    __m256 part[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) part[j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m256 qv = _mm256_load_ps(qf + 8 * c);
      const int64_t w = c < C - 1 ? 8 : last;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
        if (j < n) part[j] = _mm256_fmadd_ps(qv, load_n(rows.at(k, t0 + j) + 8 * c, w), part[j]);
    }
    uint64_t open8 = 0;  // the mask's n bools, zeros after
    std::memcpy(&open8, m + t0, n);
    const __m256i open = _mm256_cmpgt_epi32(
        _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)open8)), _mm256_setzero_si256());
    const __m256 s = _mm256_blendv_ps(_mm256_set1_ps(-inf),
                                      _mm256_mul_ps(sum8(part), _mm256_set1_ps(scale)),
                                      _mm256_castsi256_ps(open));
    _mm256_storeu_ps(p + (t0 - lo), s);
    mx = _mm256_max_ps(mx, s);
  }
  const float top = hmax(mx);
  float sum = 0.0f;
  for (int64_t d = 0; d < 8 * C; d += 8) _mm256_store_ps(y + d, _mm256_setzero_ps());
  if (top != -inf) {
    __m256 sv = _mm256_setzero_ps();
    for (int64_t t0 = lo; t0 < hi; t0 += 8) {
      const __m256 s = _mm256_loadu_ps(p + (t0 - lo));
      const __m256 live = _mm256_and_ps(_mm256_cmp_ps(s, _mm256_set1_ps(-inf), _CMP_NEQ_OQ),
                                        _mm256_castsi256_ps(lanes(hi - t0)));
      const __m256 e = _mm256_and_ps(live, exp8(_mm256_sub_ps(s, _mm256_set1_ps(top))));
      _mm256_storeu_ps(p + (t0 - lo), e);
      sv = _mm256_add_ps(sv, e);
    }
    sum = hsum(sv);
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (int64_t d0 = 0; d0 < D; d0 += 64) {  // 8 chunks a pass, the last pass perhaps fewer
      const int64_t cn = std::min<int64_t>(8, C - d0 / 8), lw = d0 / 8 + cn == C ? last : 8;
      switch (cn) {
        case 1: weighted_sum<T, 1>(v, rows, p, lo, hi, d0, lw, inv, y); break;
        case 2: weighted_sum<T, 2>(v, rows, p, lo, hi, d0, lw, inv, y); break;
        case 3: weighted_sum<T, 3>(v, rows, p, lo, hi, d0, lw, inv, y); break;
        case 4: weighted_sum<T, 4>(v, rows, p, lo, hi, d0, lw, inv, y); break;
        case 5: weighted_sum<T, 5>(v, rows, p, lo, hi, d0, lw, inv, y); break;
        case 6: weighted_sum<T, 6>(v, rows, p, lo, hi, d0, lw, inv, y); break;
        case 7: weighted_sum<T, 7>(v, rows, p, lo, hi, d0, lw, inv, y); break;
        default: weighted_sum<T, 8>(v, rows, p, lo, hi, d0, lw, inv, y); break;
      }
    }
  }
  store_row(y, D, out);
}

}  // namespace

void attend_f32(const float* q, const float* k, const float* v, CacheRows rows, const bool* m,
                int64_t lo, int64_t hi, int64_t D, float scale, float* out, float* p) {
  attend(q, k, v, rows, m, lo, hi, D, scale, out, p);
}

void attend_bf16(const bf16_t* q, const bf16_t* k, const bf16_t* v, CacheRows rows, const bool* m,
                 int64_t lo, int64_t hi, int64_t D, float scale, bf16_t* out, float* p) {
  attend(q, k, v, rows, m, lo, hi, D, scale, out, p);
}

void attend_f16(const fp16_t* q, const fp16_t* k, const fp16_t* v, CacheRows rows, const bool* m,
                int64_t lo, int64_t hi, int64_t D, float scale, fp16_t* out, float* p) {
  attend(q, k, v, rows, m, lo, hi, D, scale, out, p);
}

// SiLU of the feed-forward gate (here for exp8): x / (1 + t) for x >= 0, x t / (1 + t) below,
// t = exp(-|x|) in (0, 1] (never overflows; x < -87 gives ~1e-36 where x / (1 + e^-x) gives -0).
void silu(const float* x, int64_t n, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 t = exp8(_mm256_or_ps(v, sign));  // -|x|
    const __m256 neg = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 num = _mm256_blendv_ps(v, _mm256_mul_ps(v, t), neg);
    _mm256_storeu_ps(out + i, _mm256_div_ps(num, _mm256_add_ps(one, t)));
  }
  if (i < n) {  // the last n % 8 through a zero-padded vector
    alignas(32) float buf[8] = {};
    for (int64_t j = i; j < n; ++j) buf[j - i] = x[j];
    silu(buf, 8, buf);
    for (int64_t j = i; j < n; ++j) out[j] = buf[j - i];
  }
}

}  // namespace torchchat::cpu::avx2
