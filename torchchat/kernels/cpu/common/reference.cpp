// The scalar reference kernels: every table entry in plain C++, one output at a time, sums in
// index order. They define what each instruction set's kernels compute (the test harness
// compares those against these) and run the whole stack on any CPU (TORCHCHAT_ISA=scalar).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ggml.h"
#include "kernels.h"
#include "rows.h"

namespace torchchat::cpu {
namespace {

template <typename T>
void float_rows(const T* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  const T* w = static_cast<const T*>(a.w);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float t = 0.0f;
      for (int64_t k = 0; k < K; ++k) t += (float)w[n * a.ld + k] * (float)x[m * K + k];
      a.y[m * a.ldy + n] = t;
    }
}

// Group 0: one scale a row, applied after the sum; else each weight times its group's scale.
template <typename S>
void int8_rows(const float* x, int64_t M, int64_t K, int64_t group, const Matrix& a, int64_t n0,
               int64_t n1) {
  const int8_t* w = static_cast<const int8_t*>(a.w);
  const S* s = static_cast<const S*>(a.s);
  const int64_t G = group ? K / group : 1;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float t = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const float wk = group ? (float)w[n * a.ld + k] * (float)s[n * G + k / group]
                               : (float)w[n * a.ld + k];
        t += wk * x[m * K + k];
      }
      a.y[m * a.ldy + n] = group ? t : t * (float)s[n];
    }
}

// int8 weights against quantize_rows_q8's codes: each block's code products summed exactly, then
// in fp32 times d (and the group's scale), blocks in order; group 0 scaled once at the end.
void linear_int8_q8(const int8_t* q, const float* d, int64_t M, int64_t K, int64_t group,
                    bool bf16_scales, const Matrix& a, int64_t n0, int64_t n1) {
  auto dot = [](const int8_t* w, const auto* s, int64_t per, const int8_t* x, const float* dx,
                int64_t nb) {
    float t = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t sum = 0;
      for (int64_t k = 32 * b; k < 32 * b + 32; ++k) sum += (int32_t)w[k] * x[k];
      t += (per ? dx[b] * (float)s[b / per] : dx[b]) * (float)sum;
    }
    return per ? t : t * (float)s[0];
  };
  int8_q8_rows(q, d, M, K, group, bf16_scales, a, n0, n1, dot);
}

// Code (0..15) of row n0 + r at k in torch's CPU int4 pack layout: 64-row blocks k-major, 32
// bytes a k (low nibbles rows 0-31, high 32-63); a last block of bs < 64 rows bs/2 bytes a k
// (byte d: rows 2d low, 2d + 1 high).
int int4_code(const uint8_t* w, int64_t N, int64_t K, int64_t n0, int64_t r, int64_t k) {
  const int64_t bs = std::min<int64_t>(64, N - n0);
  const uint8_t* blk = w + n0 * (K / 2);
  if (bs == 64) return r < 32 ? blk[k * 32 + r] & 15 : blk[k * 32 + r - 32] >> 4;
  const uint8_t byte = blk[k * (bs / 2) + r / 2];
  return r % 2 ? byte >> 4 : byte & 15;
}

void linear_int4(const bf16_t* x, const float* xsum, int64_t M, int64_t K, int64_t group,
                 const Matrix& a, int64_t b0, int64_t b1) {
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  const bf16_t* sz = static_cast<const bf16_t*>(a.s);
  const int64_t G = K / group;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * 64, bs = std::min<int64_t>(64, a.N - n0);
    for (int64_t r = 0; r < bs; ++r)
      for (int64_t m = 0; m < M; ++m) {
        float t = 0.0f;
        for (int64_t g = 0; g < G; ++g) {
          float acc = 0.0f;
          for (int64_t k = g * group; k < (g + 1) * group; ++k)
            acc += (float)int4_code(w, a.N, K, n0, r, k) * (float)x[m * K + k];
          const bf16_t* p = sz + int4_scale_offset(a.blocked, g, G, a.N, n0, bs) + 2 * r;
          const float s = (float)p[0], z = (float)p[1];
          t += s * acc + (z - 8.0f * s) * xsum[m * G + g];
        }
        a.y[m * a.ldy + n0 + r] = t;
      }
  }
}

template <typename T>
void attend(const T* q, const T* k, const T* v, CacheRows rows, const bool* m, int64_t lo,
            int64_t hi, int64_t D, float scale, T* out, float* p) {
  const float inf = std::numeric_limits<float>::infinity();
  float top = -inf;
  for (int64_t t = lo; t < hi; ++t) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += (float)q[d] * (float)rows.at(k, t)[d];
    p[t - lo] = m[t] ? s * scale : -inf;
    top = std::max(top, p[t - lo]);
  }
  float sum = 0.0f;
  for (int64_t t = lo; t < hi; ++t) {
    p[t - lo] = top == -inf || p[t - lo] == -inf ? 0.0f : std::exp(p[t - lo] - top);
    sum += p[t - lo];
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    float acc = 0.0f;
    for (int64_t t = lo; t < hi; ++t)
      if (p[t - lo] != 0.0f) acc += p[t - lo] * (float)rows.at(v, t)[d];
    out[d] = T(acc * inv);
  }
}

void int4_dequantize_block_t(const uint8_t* w, const bf16_t* sz, int64_t N, int64_t K,
                             int64_t group, int64_t n0, bf16_t* out, int64_t ldo) {
  const int64_t bs = std::min<int64_t>(64, N - n0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < bs; ++r) {
      const bf16_t* p = sz + ((k / group) * N + n0 + r) * 2;
      const int q = int4_code(w, N, K, n0, r, k);
      out[k * ldo + r] = bf16_t((float)(q - 8) * (float)p[0] + (float)p[1]);
    }
}

void int8_to_bf16(const int8_t* src, int64_t K, bf16_t* dst) {
  for (int64_t k = 0; k < K; ++k) dst[k] = bf16_t((float)src[k]);
}

// As quant.primitives.quantize_per_token_int8: min/max with 0, scale, zero point, codes + 128.
void quantize_rows_8da4w(const float* x, int64_t Kx, int64_t K, uint8_t* u, float* sa, float* za,
                         int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * Kx;
    float lo = 0.0f, hi = 0.0f;
    for (int64_t k = 0; k < Kx; ++k) {
      lo = std::min(lo, row[k]);
      hi = std::max(hi, row[k]);
    }
    const float scale = std::max((hi - lo) / 255.0f, std::numeric_limits<float>::epsilon());
    const float zero = std::clamp(-128.0f - std::nearbyint(lo / scale), -128.0f, 127.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float q = k < Kx ? std::nearbyint(row[k] / scale) + zero + 128.0f : zero + 128.0f;
      u[m * K + k] = (uint8_t)std::clamp(q, 0.0f, 255.0f);
    }
    sa[m] = scale;
    za[m] = zero;
  }
}

// Row n's (scale, zero) pair of group g, as a.blocked lays them (int4_scale_offset).
const bf16_t* int4_pair(const Matrix& a, int64_t G, int64_t g, int64_t n) {
  const int64_t n0 = n / 64 * 64, bs = std::min<int64_t>(64, a.N - n0);
  return static_cast<const bf16_t*>(a.s) + int4_scale_offset(a.blocked, g, G, a.N, n0, bs) +
         2 * (n - n0);
}

// The matrix of a gemm entry's arguments: torch's layout, results M x N.
Matrix int4_matrix(const uint8_t* w, const bf16_t* sz, int64_t N, float* y) {
  Matrix a{};
  a.w = w;
  a.s = sz;
  a.N = N;
  a.y = y;
  a.ldy = N;
  return a;
}

// y = s_a * (sum_g s_w,g I_g - (128 + z_a) R) with exact integer sums I_g = sum_k u_k w_k and
// R = sum_g s_w,g W_g (prefill_vnni.cpp derives it).
void linear_8da4w(const uint8_t* u, const float* sa, const float* za, int64_t M, int64_t K,
                  int64_t group, const Matrix& a, int64_t b0, int64_t b1) {
  const int64_t G = K / group, N = a.N;
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  for (int64_t n = b0 * 64; n < std::min(N, b1 * 64); ++n) {
    const int64_t n0 = n / 64 * 64, r = n - n0;
    float R = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      int32_t wsum = 0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k)
        wsum += int4_code(w, N, K, n0, r, k) - 8;
      R += (float)int4_pair(a, G, g, n)[0] * (float)wsum;
    }
    for (int64_t m = 0; m < M; ++m) {
      float f = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t sum = 0;
        for (int64_t k = g * group; k < (g + 1) * group; ++k)
          sum += (int32_t)u[m * K + k] * (int4_code(w, N, K, n0, r, k) - 8);
        f += (float)sum * (float)int4_pair(a, G, g, n)[0];
      }
      a.y[m * a.ldy + n] = sa[m] * (f - (128.0f + za[m]) * R);
    }
  }
}

void gemm_8da4w(const uint8_t* u, int64_t M, int64_t K, const float* sa, const float* za,
                const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                int64_t b0, int64_t b1, const Buffers8da4w&) {
  linear_8da4w(u, sa, za, M, K, group, int4_matrix(w, sz, N, y), b0, b1);
}

void quantize_rows_q8(const float* x, int64_t Kx, int64_t K, int8_t* q, float* d, float* e,
                      int64_t m0, int64_t m1) {
  // |x / d| <= 127: adding and taking away 1.5 * 2^23 rounds it half to even in the current
  // (default) rounding mode, which the compiler vectorizes without SSE4.1's roundps
  constexpr float kRound = 12582912.0f;
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * Kx;
    for (int64_t b = 0; b < K / 32; ++b) {
      float v[32], amax = 0.0f, bad = 0.0f;  // bad: NaN if the block holds an inf or a NaN
      for (int j = 0; j < 32; ++j) {
        v[j] = b * 32 + j < Kx ? row[b * 32 + j] : 0.0f;
        amax = std::max(amax, std::fabs(v[j]));
        bad += v[j] * 0.0f;
      }
      const bool finite = bad == 0.0f;
      // a block that is not finite gets codes 0 and d NaN: its outputs come out NaN, as floats'
      const float db = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
      int32_t sum = 0;
      for (int j = 0; j < 32; ++j) {
        const float r = finite && db > 0.0f ? (v[j] / db + kRound) - kRound : 0.0f;
        q[m * K + b * 32 + j] = (int8_t)r;
        sum += (int32_t)r;
      }
      d[m * (K / 32) + b] = db;
      e[m * (K / 32) + b] = db * (float)sum;
    }
  }
}

// y = sum_b d_b (s_g I_b + (z_g - 8 s_g) X_b) over x's 32-value blocks, in block order, each
// term as the vector kernels round it: fma(I_b, s_g d_b, f), then fma(z_g - 8 s_g, e_b, f).
void linear_int4_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                    int64_t group, const Matrix& a, int64_t b0, int64_t b1) {
  const int64_t nb = K / 32, N = a.N;
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  for (int64_t n = b0 * 64; n < std::min(N, b1 * 64); ++n) {
    const int64_t n0 = n / 64 * 64, r = n - n0;
    for (int64_t m = 0; m < M; ++m) {
      float f = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t sum = 0;
        for (int64_t k = b * 32; k < b * 32 + 32; ++k)
          sum += (int32_t)q[m * K + k] * int4_code(w, N, K, n0, r, k);
        const bf16_t* p = int4_pair(a, K / group, b * 32 / group, n);
        const float s = (float)p[0], z = (float)p[1] - 8.0f * (float)p[0];
        f = std::fma((float)sum, s * d[m * nb + b], f);
        f = std::fma(z, e[m * nb + b], f);
      }
      a.y[m * a.ldy + n] = f;
    }
  }
}

void gemm_int4_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const uint8_t* w, const bf16_t* sz, int64_t N, int64_t group, float* y,
                  int64_t b0, int64_t b1, const Buffers8da4w&) {
  linear_int4_q8(q, d, e, M, K, group, int4_matrix(w, sz, N, y), b0, b1);
}

void gemm_ggml_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  const Matrix& a, int64_t b0, int64_t b1, const Buffers8da4w&) {
  const int64_t bk = ggml_q8_block(a.type), nb = K / bk;
  std::vector<uint8_t> c(K);
  std::vector<float> s(nb), z(nb);
  for (int64_t n = b0 * 64; n < std::min(a.N, b1 * 64); ++n) {
    ggml_codes_ref(a.type, static_cast<const uint8_t*>(a.w) + n * a.ld, K, c.data(), s.data(),
                   z.data());
    for (int64_t m = 0; m < M; ++m) {
      float f = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t sum = 0;  // sum_k x_k c_k
        for (int64_t k = b * bk; k < (b + 1) * bk; ++k) sum += (int32_t)q[m * K + k] * c[k];
        f = std::fma((float)sum, s[b] * d[m * nb + b], f);
        f = std::fma(z[b], e[m * nb + b], f);
      }
      a.y[m * a.ldy + n] = f;
    }
  }
}

// int8 prefill in integers: codes c = w + 128, per block f += I s d, then f += (-128 s) e.
void gemm_int8_q8(const int8_t* q, const float* d, const float* e, int64_t M, int64_t K,
                  int64_t group, bool bf16_scales, const Matrix& a, int64_t b0, int64_t b1,
                  const Buffers8da4w&) {
  const int64_t nb = K / 32, G = group ? K / group : 1, per = group ? group / 32 : nb;
  const int8_t* w = static_cast<const int8_t*>(a.w);
  for (int64_t n = b0 * 64; n < std::min(a.N, b1 * 64); ++n)
    for (int64_t m = 0; m < M; ++m) {
      float f = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t i = n * G + b / per;
        const float s = bf16_scales ? (float)static_cast<const bf16_t*>(a.s)[i]
                                    : static_cast<const float*>(a.s)[i];
        int32_t sum = 0;
        for (int64_t k = 32 * b; k < 32 * b + 32; ++k)
          sum += (int32_t)q[m * K + k] * (w[n * a.ld + k] + 128);
        f = std::fma((float)sum, s * d[m * nb + b], f);
        f = std::fma(-128.0f * s, e[m * nb + b], f);
      }
      a.y[m * a.ldy + n] = f;
    }
}

// SiLU as torch computes it in fp32: x / (1 + exp(-x)).
void silu(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] / (1.0f + std::exp(-x[i]));
}

// Prefill's fp32 GEMM: one FMA chain an output, k ascending from 0.
void gemm_f32(const float* xp, int64_t M, int64_t K, const float* w, int64_t ldw, int64_t N,
              float* y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = xp + (m / kF32Panel) * K * kF32Panel + m % kF32Panel;
    for (int64_t n = 0; n < N; ++n) {
      float f = 0.0f;
      for (int64_t k = 0; k < K; ++k) f = std::fma(xm[k * kF32Panel], w[n * ldw + k], f);
      y[m * ldy + n] = f;
    }
  }
}

}  // namespace

const Kernels& scalar_kernels() {
  static const Kernels table = [] {
    Kernels t{};
    t.name = "scalar";
    // kInt4Q8Gemm's entries are here as the reference (the harness checks the levels against
    // them) but not its bit: on this level prefill stays on torch's GEMM, ~100x a scalar one
    t.features = kFewRows | kBf16 | kInt8Gemm | kGgml;
    t.linear_f32 = float_rows<float>;
    t.linear_bf16 = float_rows<bf16_t>;
    t.linear_f16 = float_rows<fp16_t>;
    t.linear_int8_f32s = int8_rows<float>;
    t.linear_int8_bf16s = int8_rows<bf16_t>;
    t.linear_int4 = linear_int4;
    t.attend_f32 = attend<float>;
    t.attend_bf16 = attend<bf16_t>;
    t.attend_f16 = attend<fp16_t>;
    t.silu = silu;
    t.int4_dequantize_block_t = int4_dequantize_block_t;
    t.int8_to_bf16 = int8_to_bf16;
    t.quantize_rows_8da4w = quantize_rows_8da4w;
    t.gemm_8da4w = gemm_8da4w;
    t.quantize_rows_q8 = quantize_rows_q8;
    t.gemm_int4_q8 = gemm_int4_q8;
    t.linear_int4_q8 = linear_int4_q8;  // kQ8Decode's too: the reference, not the bit
    t.linear_8da4w = linear_8da4w;
    t.linear_int8_q8 = linear_int8_q8;  // kInt8Q8's too: the reference, not the bit
    t.gemm_int8_q8 = gemm_int8_q8;      // kInt8Q8Gemm's too
    t.gemm_ggml_q8_types = kGgmlQ8Every;
    t.gemm_ggml_q8 = gemm_ggml_q8;
    t.linear_ggml = ggml_linear_ref;  // ggml_ref.cpp
    t.ggml_dequantize = ggml_dequantize_ref;
    t.gemm_f32 = gemm_f32;  // kF32Gemm's too: the reference, not the bit
    return t;
  }();
  return table;
}

}  // namespace torchchat::cpu
