// One row's weights as prefill's integer GEMM takes them (ggml.h, ggml_codes_ref): unsigned codes
// in k order and each block's (s, z), for up to 256 values at a time -- one K-quant super-block
// or up to 8 blocks of 32. Plain loops over whole byte runs, which the compiler vectorizes for
// each instruction set that includes this header; the values are ggml_codes_ref's to the bit
// (the harness checks every level against the reference). Internal linkage, and fp16 read by
// the including folder's Half (its own conversion): nothing here may be emitted out of line with
// one instruction set's flags and picked by the linker for another (see avx2/vec.h).
#pragma once

#include <cstring>

#include "ggml.h"

namespace torchchat::cpu {
namespace {

// The unit of `type` at p holding `values` values (256; a multiple of 32 for the 32-value types)
// -> codes[0, values) and, for its j-th block of ggml_q8_block(type) values, s[stride * 2 j] and
// z = s[stride * (2 j + 1)]. Q4_0, Q4_1, Q5_0, Q5_1 and Q4_K (the types the levels prefill in
// integers); false for the others.
// Half(p): the fp16 number at p as fp32.
template <float (*Half)(const void*)>
inline bool ggml_unit_codes(int32_t type, const uint8_t* p, int64_t values, uint8_t* codes,
                            float* s, int64_t stride) {
  switch (type) {
    case kGgmlQ4_0:
    case kGgmlQ4_1:
    case kGgmlQ5_0:
    case kGgmlQ5_1: {  // values j, 16 + j: byte j's low and high nibbles; Q5: bit j of qh
      const bool q5 = type == kGgmlQ5_0 || type == kGgmlQ5_1;
      const bool mins = type == kGgmlQ4_1 || type == kGgmlQ5_1;
      const int64_t bytes = ggml_layout(type)->bytes;
      for (int64_t b = 0; b < values / 32; ++b, p += bytes, codes += 32) {
        const uint8_t* qs = p + (mins ? 4 : 2) + (q5 ? 4 : 0);
        uint32_t qh = 0;
        if (q5) std::memcpy(&qh, p + (mins ? 4 : 2), 4);
        for (int j = 0; j < 16; ++j) {
          codes[j] = (uint8_t)((qs[j] & 15) | (q5 ? (qh >> j & 1) << 4 : 0));
          codes[16 + j] = (uint8_t)((qs[j] >> 4) | (q5 ? (qh >> (16 + j) & 1) << 4 : 0));
        }
        const float dv = Half(p);
        s[stride * 2 * b] = dv;
        s[stride * (2 * b + 1)] = mins ? Half(p + 2) : (q5 ? -16.0f : -8.0f) * dv;
      }
      return true;
    }
    case kGgmlQ4_K: {  // each 64 values: 32 bytes, low nibbles the first 32, high the next
      const auto& b = *reinterpret_cast<const BlockQ4_K*>(p);
      for (int h = 0; h < 4; ++h)
        for (int l = 0; l < 32; ++l) {
          codes[64 * h + l] = (uint8_t)(b.qs[32 * h + l] & 15);
          codes[64 * h + 32 + l] = (uint8_t)(b.qs[32 * h + l] >> 4);
        }
      const float d = Half(&b.d), dmin = Half(&b.dmin);
      for (int j = 0; j < 8; ++j) {
        int sc, mn;
        ggml_scale_min_k4(b.scales, j, sc, mn);
        s[stride * 2 * j] = d * (float)sc;
        s[stride * (2 * j + 1)] = -(dmin * (float)mn);
      }
      return true;
    }
    default: return false;
  }
}

// The unit of `values` values at u0 of the 64 rows n0.. of a (bs of them real) -> codes[r] and
// each block j's (s, z) at su[128 j + Pos(r)] and su[128 j + 64 + Pos(r)], Pos(r) a row's lane
// in the caller's layout; rows past bs: scales 0 (their codes stay the caller's zeros).
template <float (*Half)(const void*), int64_t (*Pos)(int64_t)>
inline void ggml_rows_codes(const Matrix& a, int64_t n0, int64_t bs, int64_t u0, int64_t values,
                            uint8_t (*codes)[256], float* su) {
  const GgmlLayout& l = *ggml_layout(a.type);
  const uint8_t* rows = static_cast<const uint8_t*>(a.w) + n0 * a.ld + u0 / l.block * l.bytes;
  for (int64_t r = 0; r < bs; ++r)
    ggml_unit_codes<Half>(a.type, rows + r * a.ld, values, codes[r], su + Pos(r), 64);
  for (int64_t j = 0; j < values / ggml_q8_block(a.type); ++j)
    for (int64_t r = bs; r < 64; ++r) su[128 * j + Pos(r)] = su[128 * j + 64 + Pos(r)] = 0.0f;
}

}  // namespace
}  // namespace torchchat::cpu
