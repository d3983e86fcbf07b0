// GGUF's Q4_0 blocks (32 values) with AVX512-VNNI and VBMI, against Q8_0 activation blocks
// (common/ggml.h); Q4_1, Q5_0, Q5_1 and Q8_0 run AVX2's (avx2/ggml.cpp: Q8_0's codes need no
// unpacking, and this layout measured no faster there). linear_ggml_vnni is the VNNI tables'
// entry for Q4_0 and the K-quants (ggml_k_vnni.cpp).
//
// Blocks go 8 at a time (144 bytes). vpermt2b gathers 4 blocks' nibbles from two loads into
// one vector (block j in 128-bit chunk j), and the 8 blocks' fp16 d into one more. The codes
// stay unsigned (0-15); vpdpbusd sums 4 products a 32-bit lane, every lane within one block,
// and unpacks and adds fold the group's lanes to one vector of 2 lanes a block (exact: ggml's
// integer sums, split over two lanes), so that the fp32 work (a conversion, the d products, an
// FMA) is paid once a group. The offset (8) comes off as 8 times the activation codes' sums,
// folded the same way. The activations are rearranged once a call into 64-byte aligned records,
// one a group, in the order of the weight vectors, with their offsets and d in the folded order.
#include <cstdlib>

#include "../common/ggml.h"
#include "vec.h"

namespace torchchat::cpu::avx512 {
namespace {

constexpr int64_t kActBytes = sizeof(BlockQ8_0), kBytes = sizeof(BlockQ4_0);
constexpr int64_t kGroup = 8, kGroupBytes = kGroup * kBytes;

inline __mmask64 first_bytes(int64_t n) {  // the first n of 64 bytes
  return n >= 64 ? ~0ull : n <= 0 ? 0 : (1ull << n) - 1;
}

// 64 bytes at p, or the first n (zeros after): a last group stays within its row. Two 32-byte
// loads: a 64-byte load at an offset splits two cache lines, and a stream of those reads memory
// more slowly.
inline __m512i part(const uint8_t* p, int64_t n) {
  if (n < 64) return _mm512_maskz_loadu_epi8(first_bytes(n), p);
  const __m256i* q = reinterpret_cast<const __m256i*>(p);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(q)),
                            _mm256_loadu_si256(q + 1), 1);
}

// Lanes of a fold2 of two vectors (a, b) of 4 lanes a block (block j in chunk j): [a0+a2,
// b0+b2, a1+a3, b1+b3] in each 128-bit chunk, so lane 4c + i holds block c of a (i even) or b.
inline __m512i fold2(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}
constexpr int block_of(int lane) { return 4 * (lane % 2) + lane / 4; }  // blocks 4-7 in b

// Index vectors of vpermt2b: byte k of the result is the group's byte at(k), from a = the
// group's 64 bytes at offset a0 or b = those at b0 > a0 (a's taken first). Loads at 0, 64 and
// 80 cover the 144 bytes: blocks 0-3's nibbles and every d from the first two, blocks 4-7's
// nibbles from the last two.
struct Index {
  alignas(64) uint8_t b[64];
};

constexpr Index gather(int a0, int b0, bool d, int first) {
  Index x{};
  for (int k = 0; k < 64; ++k) {
    // d: block_of(lane)'s in word `lane` of the low 32 bytes; else block first + k / 16's
    // nibbles in chunk k / 16
    const int at = d ? kBytes * block_of(k / 2 % 16) + k % 2
                     : kBytes * (first + k / 16) + 2 + k % 16;
    x.b[k] = (uint8_t)(at < a0 + 64 ? at - a0 : 64 + at - b0);
  }
  return x;
}
constexpr Index kNibbles[2] = {gather(0, 64, false, 0), gather(64, 80, false, 4)};
constexpr Index kWeightD = gather(0, 64, true, 0);

struct Weights {
  __m512i lo[2], hi[2];  // blocks 4h..4h+3's codes of values 0-15 and 16-31
  __m512 d;              // in the folded order
};

inline Weights weights(const uint8_t* p, int64_t n) {  // n: bytes left in the row
  const __m512i l0 = part(p, n), l1 = part(p + 64, n - 64), l2 = part(p + 80, n - 80);
  const __m512i d = _mm512_permutex2var_epi8(l0, _mm512_load_si512(kWeightD.b), l1);
  const __m512i q[2] = {_mm512_permutex2var_epi8(l0, _mm512_load_si512(kNibbles[0].b), l1),
                        _mm512_permutex2var_epi8(l1, _mm512_load_si512(kNibbles[1].b), l2)};
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  Weights w;
  for (int h = 0; h < 2; ++h) {
    w.lo[h] = _mm512_and_si512(q[h], low4);
    w.hi[h] = _mm512_and_si512(_mm512_srli_epi16(q[h], 4), low4);
  }
  w.d = _mm512_cvtph_ps(_mm512_castsi512_si256(d));
  return w;
}

// A group's record: the activation codes matching lo[0], hi[0], lo[1], hi[1] (64 bytes each),
// the offsets' folded sums (8 times the codes'), d in the folded order.
constexpr int64_t kRecord = 384, kOffsets = 256, kActD = 320;

inline __m512 group_dot(const Weights& w, const int8_t* x, __m512 acc) {
  __m512i s[2];
  for (int h = 0; h < 2; ++h)
    s[h] = _mm512_dpbusd_epi32(
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.lo[h], _mm512_load_si512(x + 128 * h)),
        w.hi[h], _mm512_load_si512(x + 128 * h + 64));
  const __m512i sum = _mm512_sub_epi32(fold2(s[0], s[1]), _mm512_load_si512(x + kOffsets));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(w.d, _mm512_load_ps(x + kActD)),
                         acc);
}

// Row r's records, group g at rec + (r * groups + g) * kRecord; blocks past nb are zeros.
int8_t* prepare(const uint8_t* xq, int64_t xld, int64_t M, int64_t nb) {
  const int64_t groups = (nb + kGroup - 1) / kGroup;
  // aligned_alloc, not std::vector: no library templates in this folder (vec.h)
  int8_t* rec = static_cast<int8_t*>(std::aligned_alloc(64, M * groups * kRecord));
  std::memset(rec, 0, M * groups * kRecord);
  const __m512i eight = _mm512_set1_epi8(8);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      int8_t* out = rec + (r * groups + g) * kRecord;
      auto block = [&](int j) {  // null past nb
        const int64_t b = g * kGroup + j;
        return b < nb ? xq + r * xld + b * kActBytes : nullptr;
      };
      for (int j = 0; j < kGroup; ++j)
        if (block(j) != nullptr) {
          std::memcpy(out + 128 * (j / 4) + 16 * (j % 4), block(j) + 2, 16);
          std::memcpy(out + 128 * (j / 4) + 64 + 16 * (j % 4), block(j) + 18, 16);
        }
      __m512i s[2];
      for (int h = 0; h < 2; ++h)
        s[h] = _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, _mm512_load_si512(out + 128 * h)),
            eight, _mm512_load_si512(out + 128 * h + 64));
      _mm512_store_si512(out + kOffsets, fold2(s[0], s[1]));
      for (int l = 0; l < 16; ++l) {
        const float d = block(block_of(l)) != nullptr ? half_at(block(block_of(l))) : 0.0f;
        std::memcpy(out + kActD + 4 * l, &d, 4);
      }
    }
  return rec;
}

// out[r] = the dot product of weight row w (nb blocks) with activation row r, r < R.
template <int R>
void row(const uint8_t* w, int64_t nb, const int8_t* rec, float* out) {
  const int64_t groups = (nb + kGroup - 1) / kGroup, full = nb / kGroup;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  auto group = [&](int64_t g, const Weights& v) {
    for (int r = 0; r < R; ++r) acc[r] = group_dot(v, rec + (r * groups + g) * kRecord, acc[r]);
  };
  for (int64_t g = 0; g < full; ++g) group(g, weights(w + g * kGroupBytes, kGroupBytes));
  if (full < groups)  // a last group of fewer blocks: masked loads
    group(full, weights(w + full * kGroupBytes, (nb - full * kGroup) * kBytes));
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

void linear_q4_0(const uint8_t* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a,
                 int64_t n0, int64_t n1) {
  const int64_t nb = K / 32;
  int8_t* rec = prepare(xq, xld, M, nb);
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  with_rows(M, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    float out[R];
    for (int64_t n = n0; n < n1; ++n) {
      row<R>(w + n * a.ld, nb, rec, out);
      for (int r = 0; r < R; ++r) a.y[r * a.ldy + n] = out[r];
    }
  });
  std::free(rec);
}

}  // namespace

bool linear_ggml_vnni(const void* xq, int64_t xld, int64_t M, int64_t K, const Matrix& a,
                      int64_t n0, int64_t n1) {
  const uint8_t* x = static_cast<const uint8_t*>(xq);
  if (a.type == kGgmlQ4_0) {
    linear_q4_0(x, xld, M, K, a, n0, n1);
    return true;
  }
  return linear_ggml_k_vnni(x, xld, M, K, a, n0, n1);
}

}  // namespace torchchat::cpu::avx512
