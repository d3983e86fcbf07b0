// fp32 (FMAs), fp16 (F16C conversions + FMAs) and bf16 weights (conversions + FMAs, for CPUs
// without AVX512-BF16; float_bf16.cpp has the dot-product instruction's).
#include "float_rows.h"

namespace torchchat::cpu::avx512 {

void linear_f32(const float* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  float_rows(x, M, K, a, n0, n1);
}

void linear_bf16(const bf16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  float_rows(x, M, K, a, n0, n1);
}

void linear_f16(const fp16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  float_rows(x, M, K, a, n0, n1);
}

}  // namespace torchchat::cpu::avx512
