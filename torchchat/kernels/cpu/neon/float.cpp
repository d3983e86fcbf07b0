// fp32 (FMLA), fp16 (FCVTL to fp32 + FMLA) and bf16 weights (a shift into fp32 lanes + FMLA,
// for CPUs without FEAT_BF16; float_bf16.cpp has BFDOT's).
#include "float_rows.h"

namespace torchchat::cpu::neon {

void linear_f32(const float* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  float_rows<FmaRow>(x, M, K, a, n0, n1);
}

void linear_bf16(const bf16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  float_rows<FmaRow>(x, M, K, a, n0, n1);
}

void linear_f16(const fp16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0, int64_t n1) {
  float_rows<FmaRow>(x, M, K, a, n0, n1);
}

}  // namespace torchchat::cpu::neon
