// One row's weights as codes (ggml.h, ggml_codes_ref): unsigned codes in k order and each
// block's (s, z), for up to 256 values at a time -- one K-quant super-block or up to 8 blocks
// of 32 -- for prefill's integer GEMMs (AVX512-VNNI, AVX2, NEON) and NEON's decode kernels. Plain loops over whole byte runs, which the compiler vectorizes for
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
// z = s[stride * (2 j + 1)]: ggml_codes_ref's, for every type. Half(p): the fp16 number at p.
template <float (*Half)(const void*)>
inline void ggml_unit_codes(int32_t type, const uint8_t* p, int64_t values, uint8_t* codes,
                            float* s, int64_t stride) {
  auto put = [&](int64_t j, float sj, float zj) {
    s[stride * 2 * j] = sj;
    s[stride * (2 * j + 1)] = zj;
  };
  switch (type) {
    case kGgmlQ4_0:
    case kGgmlQ4_1:
    case kGgmlQ5_0:
    case kGgmlQ5_1:
    case kGgmlQ8_0: {  // values j, 16 + j: byte j's low and high nibbles; Q5: bit j of qh
      const bool q5 = type == kGgmlQ5_0 || type == kGgmlQ5_1;
      const bool mins = type == kGgmlQ4_1 || type == kGgmlQ5_1;
      const int64_t bytes = ggml_layout(type)->bytes;
      for (int64_t b = 0; b < values / 32; ++b, p += bytes, codes += 32) {
        const float d = Half(p);
        if (type == kGgmlQ8_0) {  // int8 codes + 128
          for (int j = 0; j < 32; ++j) codes[j] = (uint8_t)(p[2 + j] ^ 0x80);
          put(b, d, -128.0f * d);
          continue;
        }
        const uint8_t* qs = p + (mins ? 4 : 2) + (q5 ? 4 : 0);
        uint32_t qh = 0;
        if (q5) std::memcpy(&qh, p + (mins ? 4 : 2), 4);
        for (int j = 0; j < 16; ++j) {
          codes[j] = (uint8_t)((qs[j] & 15) | (q5 ? (qh >> j & 1) << 4 : 0));
          codes[16 + j] = (uint8_t)((qs[j] >> 4) | (q5 ? (qh >> (16 + j) & 1) << 4 : 0));
        }
        put(b, d, mins ? Half(p + 2) : (q5 ? -16.0f : -8.0f) * d);
      }
      return;
    }
    case kGgmlQ2_K:
    case kGgmlQ3_K: {  // each 128 values: 32 bytes, 2-bit fields 0-3 the 4 runs of 32; Q3_K:
                       // bit r of hmask[l] the high bit (4) of run r's value l
      const bool q3 = type == kGgmlQ3_K;
      const auto& b2 = *reinterpret_cast<const BlockQ2_K*>(p);
      const auto& b3 = *reinterpret_cast<const BlockQ3_K*>(p);
      const uint8_t* qs = q3 ? b3.qs : b2.qs;
      for (int h = 0; h < 2; ++h)
        for (int r = 0; r < 4; ++r)
          for (int l = 0; l < 32; ++l)
            codes[128 * h + 32 * r + l] = (uint8_t)((qs[32 * h + l] >> (2 * r) & 3) |
                                                    (q3 ? (b3.hmask[l] >> (4 * h + r) & 1) << 2 : 0));
      if (q3) {  // 16 6-bit scales, biased by 32: low nibbles in bytes 0-7, top 2 bits in 8-11
        const float d = Half(&b3.d);
        for (int g = 0; g < 16; ++g) {
          const int lo = b3.scales[g % 8] >> (g / 8 * 4) & 15;
          const int hi = b3.scales[8 + g % 4] >> (g / 4 * 2) & 3;
          const float sg = d * (float)((lo | hi << 4) - 32);
          put(g, sg, -4.0f * sg);
        }
      } else {  // scale in the low nibble, min in the high
        const float d = Half(&b2.d), dmin = Half(&b2.dmin);
        for (int g = 0; g < 16; ++g)
          put(g, d * (float)(b2.scales[g] & 15), -(dmin * (float)(b2.scales[g] >> 4)));
      }
      return;
    }
    case kGgmlQ4_K:
    case kGgmlQ5_K: {  // each 64 values: 32 bytes, low nibbles the first 32, high the next;
                       // Q5_K: bit r of qh[l] the fifth bit of run r's value l
      const bool q5 = type == kGgmlQ5_K;
      const auto& b4 = *reinterpret_cast<const BlockQ4_K*>(p);
      const auto& b5 = *reinterpret_cast<const BlockQ5_K*>(p);
      const uint8_t* qs = q5 ? b5.qs : b4.qs;
      for (int h = 0; h < 4; ++h)
        for (int l = 0; l < 32; ++l) {
          const int hi0 = q5 ? (b5.qh[l] >> (2 * h) & 1) << 4 : 0;
          const int hi1 = q5 ? (b5.qh[l] >> (2 * h + 1) & 1) << 4 : 0;
          codes[64 * h + l] = (uint8_t)((qs[32 * h + l] & 15) | hi0);
          codes[64 * h + 32 + l] = (uint8_t)((qs[32 * h + l] >> 4) | hi1);
        }
      const float d = Half(q5 ? &b5.d : &b4.d), dmin = Half(q5 ? &b5.dmin : &b4.dmin);
      for (int j = 0; j < 8; ++j) {
        int sc, mn;
        ggml_scale_min_k4(q5 ? b5.scales : b4.scales, j, sc, mn);
        put(j, d * (float)sc, -(dmin * (float)mn));
      }
      return;
    }
    default: {  // Q6_K: each 128 values: 64 ql bytes (runs 0, 1 low nibbles, 2, 3 high), 32 qh
      const auto& b = *reinterpret_cast<const BlockQ6_K*>(p);
      for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l) {
          const uint8_t lo = b.ql[64 * h + l], hi = b.ql[64 * h + 32 + l], qh = b.qh[32 * h + l];
          codes[128 * h + l] = (uint8_t)((lo & 15) | (qh & 3) << 4);
          codes[128 * h + 32 + l] = (uint8_t)((hi & 15) | (qh >> 2 & 3) << 4);
          codes[128 * h + 64 + l] = (uint8_t)((lo >> 4) | (qh >> 4 & 3) << 4);
          codes[128 * h + 96 + l] = (uint8_t)((hi >> 4) | (qh >> 6 & 3) << 4);
        }
      const float d = Half(&b.d);
      for (int g = 0; g < 16; ++g) {
        const float sg = d * (float)b.scales[g];
        put(g, sg, -32.0f * sg);
      }
      return;
    }
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
