// Attention for one query row: reads only the span of the cache its mask leaves open, scores 4
// keys at a time (one vector of products per key, the 4 reduced together by pairwise adds) and
// sums the output 32 values at a time in registers.
#include <algorithm>
#include <limits>

#include "vec.h"

namespace torchchat::cpu::neon {
namespace {

// exp of 4 fp32 lanes: 2^n * p(r), x = n ln2 + r with |r| <= ln2/2, p a degree-6 polynomial
// (relative error ~2e-7, as std::exp's fp32 result within a few ulp). Lanes below -87 give ~0.
// 2^n is built from its exponent bits: (n + 127) << 23, a normal number for n in [-126, 127].
inline float32x4_t exp4(float32x4_t x) {
  x = vmaxq_f32(x, vdupq_n_f32(-87.0f));
  const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));  // ln2 in two parts
  r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t p = vdupq_n_f32(1.0f / 720);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 120), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 24), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 6), p, r);
  p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

// softmax(q k^T * scale, masked) v for one query row: k, v rows (`ts` apart), mask row m whose
// open positions all lie in [lo, hi); fp32 throughout, rounded once into out. D <= 256; q is
// converted once into qf, D % 8 values of each row go through scalar tails. Scores go into p
// (len + 16 floats); only the span the mask leaves open is read. A row with every position
// masked gets zeros (SDPA would give NaN; such rows are never read).
template <typename T>
void attend(const T* q, const T* k, const T* v, CacheRows rows, const bool* m, int64_t lo,
            int64_t hi, int64_t D, float scale, T* out, float* p) {
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t D8 = D / 8 * 8;
  alignas(16) float qf[256], y[256];
  for (int64_t d = 0; d < D; ++d) qf[d] = (float)q[d];
  float32x4_t mx = vdupq_n_f32(-inf);
  for (int64_t t0 = lo; t0 < hi; t0 += 4) {
    const int64_t n = std::min<int64_t>(4, hi - t0);
    float32x4_t part[4];
    alignas(16) float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    alignas(16) uint32_t open[4] = {0, 0, 0, 0};
    for (int j = 0; j < 4; ++j) {
      part[j] = vdupq_n_f32(0.0f);
      if (j >= n) continue;
      open[j] = m[t0 + j] ? ~0u : 0u;
      const T* kr = rows.at(k, t0 + j);
      float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f), k0, k1;
      for (int64_t d = 0; d < D8; d += 8) {
        Load8<T>::at(kr + d, k0, k1);
        a0 = vfmaq_f32(a0, vld1q_f32(qf + d), k0);
        a1 = vfmaq_f32(a1, vld1q_f32(qf + d + 4), k1);
      }
      part[j] = vaddq_f32(a0, a1);
      for (int64_t d = D8; d < D; ++d) tail[j] += qf[d] * (float)kr[d];
    }
    // lane j: the sum of part[j]'s lanes (+ its tail)
    const float32x4_t dots = vaddq_f32(
        vpaddq_f32(vpaddq_f32(part[0], part[1]), vpaddq_f32(part[2], part[3])), vld1q_f32(tail));
    const float32x4_t s =
        vbslq_f32(vld1q_u32(open), vmulq_n_f32(dots, scale), vdupq_n_f32(-inf));
    vst1q_f32(p + (t0 - lo), s);
    mx = vmaxq_f32(mx, s);
  }
  const float top = vmaxvq_f32(mx);
  float sum = 0.0f;
  for (int64_t d = 0; d < D; ++d) y[d] = 0.0f;
  if (top != -inf) {
    float32x4_t sv = vdupq_n_f32(0.0f);
    for (int64_t t0 = lo; t0 < hi; t0 += 4) {  // lanes past hi hold -inf: not live
      const float32x4_t s = vld1q_f32(p + (t0 - lo));
      const uint32x4_t live = vmvnq_u32(vceqq_f32(s, vdupq_n_f32(-inf)));
      const float32x4_t e = vreinterpretq_f32_u32(
          vandq_u32(live, vreinterpretq_u32_f32(exp4(vsubq_f32(s, vdupq_n_f32(top))))));
      vst1q_f32(p + (t0 - lo), e);
      sv = vaddq_f32(sv, e);
    }
    sum = vaddvq_f32(sv);
    for (int64_t c0 = 0; c0 < D8; c0 += 32) {  // 32 output values (8 vectors) at a time
      const int64_t cn = std::min<int64_t>(32, D8 - c0);
      float32x4_t acc[8];
#pragma GCC unroll 16
      for (int i = 0; i < 8; ++i) acc[i] = vdupq_n_f32(0.0f);
      for (int64_t t = lo; t < hi; ++t) {
        if (p[t - lo] == 0.0f) continue;  // a masked position: its v row is not read
        const float pt = p[t - lo];
        const T* vr = rows.at(v, t) + c0;
#pragma GCC unroll 16
        for (int i = 0; i < 4; ++i) {
          if (8 * i >= cn) break;
          float32x4_t v0, v1;
          Load8<T>::at(vr + 8 * i, v0, v1);
          acc[2 * i] = vfmaq_n_f32(acc[2 * i], v0, pt);
          acc[2 * i + 1] = vfmaq_n_f32(acc[2 * i + 1], v1, pt);
        }
      }
#pragma GCC unroll 16
      for (int i = 0; i < 8; ++i)
        if (4 * i < cn) vst1q_f32(y + c0 + 4 * i, acc[i]);
    }
    for (int64_t t = lo; t < hi; ++t)  // D % 8 last values
      if (p[t - lo] != 0.0f)
        for (int64_t d = D8; d < D; ++d) y[d] += p[t - lo] * (float)rows.at(v, t)[d];
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  for (int64_t d = 0; d < D; ++d) out[d] = (T)(y[d] * inv);
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

// SiLU of the feed-forward gate (here for exp4): x / (1 + t) for x >= 0, x t / (1 + t) below,
// t = exp(-|x|) in (0, 1] (never overflows; x < -87 gives ~1e-36 where x / (1 + e^-x) gives -0).
void silu(const float* x, int64_t n, float* out) {
  const float32x4_t one = vdupq_n_f32(1.0f);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float32x4_t v = vld1q_f32(x + i);
    const float32x4_t t = exp4(vnegq_f32(vabsq_f32(v)));
    const uint32x4_t neg = vcltq_f32(v, vdupq_n_f32(0.0f));
    const float32x4_t num = vbslq_f32(neg, vmulq_f32(v, t), v);
    vst1q_f32(out + i, vdivq_f32(num, vaddq_f32(one, t)));
  }
  if (i < n) {  // the last n % 4 through a zero-padded vector
    float buf[4] = {};
    for (int64_t j = i; j < n; ++j) buf[j - i] = x[j];
    silu(buf, 4, buf);
    for (int64_t j = i; j < n; ++j) out[j] = buf[j - i];
  }
}

}  // namespace torchchat::cpu::neon
