// Attention for a few query rows: reads only the span of the cache its mask leaves open, scores
// 16 keys at a time and keeps the output row in registers.
#include <algorithm>
#include <limits>

#include "vec.h"

namespace torchchat::cpu::avx512 {
namespace {

// exp of 16 fp32 lanes: 2^n * p(r), x = n ln2 + r with |r| <= ln2/2, p a degree-6 polynomial
// (relative error ~2e-7, as std::exp's fp32 result within a few ulp). Lanes below -87 give ~0.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The 16 sums of v[0..15]'s lanes, in order: pairs, then quads within 128-bit lanes, then across.
inline __m512 sum16(__m512 v[16]) {
  __m512 t[8], u[4], s[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: a at 0, 2; b at 1, 3
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: one partial sum of each of 4 vectors
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s[0], s[1], 0x88), _mm512_shuffle_f32x4(s[0], s[1], 0xDD));
}

// softmax(q k^T * scale, masked) v for one query row: k, v rows where `rows` says, mask row m whose
// open positions all lie in [lo, hi); fp32 throughout, rounded once into out. D <= 16 C: the row's
// chunks of 16 lanes stay in registers (masks cut the last one short). Scores go 16 positions at
// a time (one vector of products per key, the 16 reduced together) into p (len + 16 floats);
// only the span the mask leaves open is read. A row with every position masked gets zeros (SDPA
// would give NaN; such rows are never read).
template <typename T, int C>
void attend_row(const T* q, const T* k, const T* v, CacheRows rows, const bool* m, int64_t lo,
                int64_t hi, int64_t D, float scale, T* out, float* p) {
  const float inf = std::numeric_limits<float>::infinity();
  __mmask16 dm[C];
  __m512 qv[C], acc[C];
  for (int c = 0; c < C; ++c) {
    dm[c] = mask16(D - 16 * c);
    qv[c] = Load<T>::masked(q + 16 * c, dm[c]);
    acc[c] = _mm512_setzero_ps();
  }
  __m512 mx = _mm512_set1_ps(-inf);
  for (int64_t t0 = lo; t0 < hi; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, hi - t0);
    __m512 part[16];
    for (int j = 0; j < 16; ++j) {
      part[j] = _mm512_setzero_ps();
      if (j >= n) continue;
      const T* kr = rows.at(k, t0 + j);
      for (int c = 0; c < C; ++c)
        part[j] = _mm512_fmadd_ps(qv[c], Load<T>::masked(kr + 16 * c, dm[c]), part[j]);
    }
    const __m128i mb = _mm_maskz_loadu_epi8(mask16(n), m + t0);
    const __mmask16 open = _mm_test_epi8_mask(mb, mb);
    const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-inf), open,
                                        _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale)));
    _mm512_storeu_ps(p + (t0 - lo), s);
    mx = _mm512_max_ps(mx, s);
  }
  const float top = _mm512_reduce_max_ps(mx);
  float sum = 0.0f;
  if (top != -inf) {
    __m512 sv = _mm512_setzero_ps();
    for (int64_t t0 = lo; t0 < hi; t0 += 16) {
      const __m512 s = _mm512_loadu_ps(p + (t0 - lo));
      const __mmask16 live =
          _mm512_cmp_ps_mask(s, _mm512_set1_ps(-inf), _CMP_NEQ_OQ) & mask16(hi - t0);
      const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, _mm512_set1_ps(top))));
      _mm512_storeu_ps(p + (t0 - lo), e);
      sv = _mm512_add_ps(sv, e);
    }
    sum = _mm512_reduce_add_ps(sv);
    for (int64_t t = lo; t < hi; ++t) {
      if (p[t - lo] == 0.0f) continue;  // a masked position: its v row is not read
      const __m512 pt = _mm512_set1_ps(p[t - lo]);
      const T* vr = rows.at(v, t);
      for (int c = 0; c < C; ++c)
        acc[c] = _mm512_fmadd_ps(pt, Load<T>::masked(vr + 16 * c, dm[c]), acc[c]);
    }
  }
  const __m512 inv = _mm512_set1_ps(sum > 0.0f ? 1.0f / sum : 0.0f);
  alignas(64) float y[16 * C];
  for (int c = 0; c < C; ++c) _mm512_store_ps(y + 16 * c, _mm512_mul_ps(acc[c], inv));
  for (int64_t d = 0; d < D; ++d) out[d] = (T)y[d];
}

template <typename T>
void attend(const T* q, const T* k, const T* v, CacheRows rows, const bool* m, int64_t lo,
            int64_t hi, int64_t D, float scale, T* out, float* p) {
  if (D <= 64)
    attend_row<T, 4>(q, k, v, rows, m, lo, hi, D, scale, out, p);
  else if (D <= 128)
    attend_row<T, 8>(q, k, v, rows, m, lo, hi, D, scale, out, p);
  else
    attend_row<T, 16>(q, k, v, rows, m, lo, hi, D, scale, out, p);
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

// SiLU of the feed-forward gate (here for exp16): x / (1 + t) for x >= 0, x t / (1 + t) below,
// t = exp(-|x|) in (0, 1] (never overflows; x < -87 gives ~1e-36 where x / (1 + e^-x) gives -0).
void silu(const float* x, int64_t n, float* out) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = mask16(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(mk, x + i);
    const __m512 t = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v)));
    const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 num = _mm512_mask_mul_ps(v, neg, v, t);
    _mm512_mask_storeu_ps(out + i, mk, _mm512_div_ps(num, _mm512_add_ps(one, t)));
  }
}

}  // namespace torchchat::cpu::avx512
