// bf16 weights with FEAT_BF16: BFDOT sums bf16 x bf16 products into fp32 lanes, 8 a
// instruction (lane i += w[2i] x[2i] + w[2i+1] x[2i+1]), with no conversion of either operand.
// Like AVX512-BF16's vdpbf16ps it is not a chain of IEEE fp32 FMAs: the two products and their
// sum are rounded separately (round-to-odd without FEAT_EBF16) and denormals are flushed; the
// errors stay within the fp32 reordering bound the harness allows (an ulp per step).
#include "float_rows.h"

namespace torchchat::cpu::neon {
namespace {

template <typename T, int M>
struct BfdotRow {
  static void dot(const bf16_t* x, int64_t ldx, const bf16_t* w, int64_t K, float* out) {
    constexpr int U = M == 1 ? 4 : 2;  // BFDOT by BFDOT accumulators: 4 to 8 of them
    float32x4_t acc[M][U];
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 16
      for (int u = 0; u < U; ++u) acc[m][u] = vdupq_n_f32(0.0f);
    auto load = [](const bf16_t* p) {
      return vreinterpretq_bf16_u16(vld1q_u16((const uint16_t*)p));
    };
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U)
#pragma GCC unroll 16
      for (int u = 0; u < U; ++u) {
        const bfloat16x8_t wv = load(w + k + 8 * u);
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m)
          acc[m][u] = vbfdotq_f32(acc[m][u], wv, load(x + m * ldx + k + 8 * u));
      }
    for (; k + 8 <= K; k += 8) {
      const bfloat16x8_t wv = load(w + k);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) acc[m][0] = vbfdotq_f32(acc[m][0], wv, load(x + m * ldx + k));
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      float32x4_t t = acc[m][0];
#pragma GCC unroll 16
      for (int u = 1; u < U; ++u) t = vaddq_f32(t, acc[m][u]);
      float tail = 0.0f;
      for (int64_t j = k; j < K; ++j) tail += (float)w[j] * (float)x[m * ldx + j];
      out[m] = vaddvq_f32(t) + tail;
    }
  }
};

}  // namespace

void linear_bf16_dp(const bf16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0,
                    int64_t n1) {
  float_rows<BfdotRow>(x, M, K, a, n0, n1);
}

}  // namespace torchchat::cpu::neon
