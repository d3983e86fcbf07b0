// bf16 weights with AVX512-BF16: vdpbf16ps sums bf16 x bf16 products in fp32, 32 a
// instruction.
#include "float_rows.h"

namespace torchchat::cpu::avx512 {

void linear_bf16_dp(const bf16_t* x, int64_t M, int64_t K, const Matrix& a, int64_t n0,
                    int64_t n1) {
  float_rows<bf16_t, true>(x, M, K, a, n0, n1);
}

}  // namespace torchchat::cpu::avx512
