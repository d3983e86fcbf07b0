// One-token (and few-token) linear layers for x86 CPUs with AVX-512: y = x @ W.T for x of at
// most kMaxRows rows, the decode step's shape. Built on first use by torchchat/kernels/__init__.py
// (torch.utils.cpp_extension, -march=native) and registered as torch custom ops, so eager code
// and torch.compile'd graphs call the same kernels.
//
// Why our own: torch 2.13's one-row matmuls (MKL/oneDNN GEMV for fp32/bf16, the int4 pack kernel)
// stream weights at 16-27 GB/s on the 2-core machine these were measured on, about 40-60% of its
// read bandwidth and of what llama.cpp's kernels reach (docs/performance.md). A decode step is a
// stream of weights, so each kernel here reads several weight rows at once per thread (hardware
// prefetchers track a few sequential streams each), splits rows evenly over torch's intra-op
// threads and does the least arithmetic per weight byte that keeps the reference semantics:
//   fp32      fp32 FMAs, 8 rows per pass.
//   bf16      AVX512-BF16 dot products (vdpbf16ps): bf16 x bf16 products summed in fp32.
//   fp16      F16C conversions + fp32 FMAs.
//   int8      int8 -> fp32 + FMAs on fp32 activations, per-row or per-group scales.
//   int4      torch's CPU int4 pack layout read in place; codes turned into bf16 (128 + q) with one
//             OR and summed with vdpbf16ps against bf16 activations; per-group scale and zero folded
//             in afterwards (w = (q - 8) * scale + zero, as aten::_weight_int4pack_mm_for_cpu).
// Every kernel accumulates in fp32 and rounds once, like the aten ops it replaces. Matrices that
// multiply the same activations (a layer's q, k and v; w1 and w3) go in one call: the ops take a
// list of weights and return their results side by side.
//
// Attention for a few query rows reads only the span of the cache its mask leaves open, scores
// 16 keys at a time and keeps the output row in registers.
//
// Prefill (many rows) of quantized weights, further down: int4 and int8 as bf16 GEMMs on tiles of
// the weights converted just before (gemm_int4, gemm_int8), 8da4w as an integer GEMM on the
// int8 activation codes (gemm_8da4w, AVX512-VNNI).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kMaxRows = 8;  // more tokens than this: torch's GEMM is the better kernel
constexpr int64_t kPrefetch = 2048;  // bytes ahead in the weight stream (int4: 2048 > 1024 > 512)

// ---------------------------------------------------------------- grouped calls
//
// One call multiplies x by one or several weight matrices of the same kind and width (a layer's
// q, k and v; w1 and w3): their output rows are numbered one after another and split evenly over
// torch's threads in one parallel region. Measured on stories110M's 768 x 768 int4 matrices, a
// call for q, k and v together took 17 us against 26 us for three calls (call, thread wake-up
// and conversions are paid once).
struct Matrix {
  const void* w;  // weights: rows `ld` elements apart (fp32, bf16, fp16, int8) or int4's packing
  int64_t ld;
  const void* s;  // int8 scales (fp32 or bf16), int4 (scale, zero) pairs; null for float weights
  int64_t N;      // output rows
  float* y;       // fp32 results: y[m * ldy + n] for activation row m, output row n
  int64_t ldy;
  bool blocked = false;  // int4: (scale, zero) pairs by 64-row block (int4_scale_offset)
};

// f(matrix, u0, u1) for each run [u0, u1) of one matrix's units (rows, or `per`-row blocks) in a
// thread's share of all matrices' units.
template <typename F>
void for_units(const std::vector<Matrix>& mats, int64_t per, int64_t grain, const F& f) {
  std::vector<int64_t> first(mats.size() + 1, 0);
  for (size_t i = 0; i < mats.size(); ++i) first[i + 1] = first[i] + (mats[i].N + per - 1) / per;
  at::parallel_for(0, first.back(), grain, [&](int64_t u0, int64_t u1) {
    for (size_t i = 0; i < mats.size(); ++i) {
      const int64_t a = std::max(u0, first[i]), b = std::min(u1, first[i + 1]);
      if (a < b) f(mats[i], a - first[i], b - first[i]);
    }
  });
}

// torchchat::decode_layers: the kinds of weights a step runs on, its projections and shapes.
enum WeightKind : int64_t { kFloatW = 0, kInt8W = 1, kInt4W = 2, kInt4DynW = 3 };

// One grouped projection of a layer: matrices of one kind that multiply the same activations.
struct Projection {
  std::vector<Matrix> mats;
  int64_t K;  // columns the kernel reads (int8 and int4 weights may be zero-padded past x's)
};

struct StepArgs {
  int64_t L, D, H, KVH, Dh, F, len, pos, kind, group;
  bool bf16_scales;
  bool bf16_out;  // int4 behind fp32 activations: outputs rounded to bf16, as aten's kernel does
  float eps;
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
constexpr bool kAvx512 = true;

inline __m512 load_f32(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}
inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << n) - 1);
}

// bf16 bits (16 lanes) -> fp32.
inline __m512 bf16x16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// ---------------------------------------------------------------- 16-bit and fp32 weights
//
// Each thread reads its rows one after another: weights are then a single sequential stream per
// thread, which measured faster here than reading 2-8 rows side by side (8 rows: 30 GB/s, one
// row with 4 accumulators: 38 GB/s, a plain sum of the same memory: 37 GB/s, one thread).

// 16 weights or activations as fp32; `Load<T>::step` elements per accumulator update.
template <typename T>
struct Load;

template <>
struct Load<float> {
  static __m512 at(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};

template <>
struct Load<c10::Half> {
  static __m512 at(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
  }
  static __m512 masked(const c10::Half* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
};

template <>
struct Load<c10::BFloat16> {
  static __m512 at(const c10::BFloat16* p) {
    return bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)p));
  }
  static __m512 masked(const c10::BFloat16* p, __mmask16 m) {
    return bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, p));
  }
};

// out[m] = dot(w row, x row m) for M activation rows (ldx apart), U independent accumulators
// per activation row to keep enough FMAs in flight.
template <typename T, int M>
void dot_row(const T* x, int64_t ldx, const T* w, int64_t K, float* out) {
  constexpr int U = M == 1 ? 4 : 2;
  __m512 acc[M][U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // 32 products per instruction
    for (; k + 32 * U <= K; k += 32 * U)
      for (int u = 0; u < U; ++u) {
        _mm_prefetch((const char*)(w + k + 32 * u) + kPrefetch, _MM_HINT_T0);
        const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)(w + k + 32 * u));
        for (int m = 0; m < M; ++m) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x + m * ldx + k + 32 * u));
          acc[m][u] = _mm512_dpbf16_ps(acc[m][u], wv, xv);
        }
      }
  }
#endif
  for (; k + 16 * U <= K; k += 16 * U)  // unmasked: a mask written every step is 2x slower
    for (int u = 0; u < U; ++u) {
      if constexpr (!std::is_same_v<T, float>)  // fp32 measured faster without (0.99 vs 0.93)
        _mm_prefetch((const char*)(w + k + 16 * u) + kPrefetch, _MM_HINT_T0);
      const __m512 wv = Load<T>::at(w + k + 16 * u);
      for (int m = 0; m < M; ++m)
        acc[m][u] = _mm512_fmadd_ps(wv, Load<T>::at(x + m * ldx + k + 16 * u), acc[m][u]);
    }
  for (; k < K; k += 16) {
    const __mmask16 mk = mask16(K - k);
    const __m512 wv = Load<T>::masked(w + k, mk);
    for (int m = 0; m < M; ++m)
      acc[m][0] = _mm512_fmadd_ps(wv, Load<T>::masked(x + m * ldx + k, mk), acc[m][0]);
  }
  for (int m = 0; m < M; ++m) {
    __m512 t = acc[m][0];
    for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, acc[m][u]);
    out[m] = _mm512_reduce_add_ps(t);
  }
}

template <typename T, int M>
void float_linear_m(const T* x, int64_t K, const std::vector<Matrix>& mats, int64_t m0) {
  // Grain of 16 rows: big enough to amortize a task, small enough to split the smallest layers.
  for_units(mats, 1, 16, [=](const Matrix& a, int64_t n0, int64_t n1) {
    const T* w = static_cast<const T*>(a.w);
    const int64_t ld = a.ld, ldy = a.ldy;
    float* y = a.y + m0 * ldy;
    float out[M];
    for (int64_t n = n0; n < n1; ++n) {
      dot_row<T, M>(x, K, w + n * ld, K, out);
      for (int m = 0; m < M; ++m) y[m * ldy + n] = out[m];
    }
  });
}

template <typename T>
void float_linear(const T* x, int64_t M, int64_t K, const std::vector<Matrix>& mats) {
  // Up to 4 activation rows share each weight load; more rows go 4 at a time.
  for (int64_t m = 0; m < M; m += 4) {
    const T* xm = x + m * K;
    switch (std::min<int64_t>(4, M - m)) {
      case 1: float_linear_m<T, 1>(xm, K, mats, m); break;
      case 2: float_linear_m<T, 2>(xm, K, mats, m); break;
      case 3: float_linear_m<T, 3>(xm, K, mats, m); break;
      default: float_linear_m<T, 4>(xm, K, mats, m); break;
    }
  }
}

// ---------------------------------------------------------------- int8 weights

// out[m] = sum_k w[k] s(k) x[m][k] for one int8 weight row w, s(k) its scale: scales[0] for the
// whole row (group 0, applied after the sum) or scales[k >> log2(group)] (group a power of two
// >= 16, applied to each 16 weights as they are converted). K is a multiple of 16; x is fp32,
// zero-padded to K by the caller.
template <int M, typename S>
void int8_row(const float* x, int64_t K, const int8_t* w, const S* scales, int64_t group,
              float* out) {
  constexpr int U = M == 1 ? 4 : 2;
  const int shift = group ? __builtin_ctzll(group) : 0;
  __m512 acc[M][U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  auto weights = [&](int64_t k) {
    const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k))));
    return group ? _mm512_mul_ps(wv, _mm512_set1_ps((float)scales[k >> shift])) : wv;
  };
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U)
    for (int u = 0; u < U; ++u) {
      if (u % 4 == 0) _mm_prefetch((const char*)(w + k + 16 * u) + kPrefetch, _MM_HINT_T0);
      const __m512 wv = weights(k + 16 * u);
      for (int m = 0; m < M; ++m)
        acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k + 16 * u), acc[m][u]);
    }
  for (; k < K; k += 16) {
    const __m512 wv = weights(k);
    for (int m = 0; m < M; ++m)
      acc[m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
  }
  for (int m = 0; m < M; ++m) {
    __m512 t = acc[m][0];
    for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, acc[m][u]);
    out[m] = _mm512_reduce_add_ps(t) * (group ? 1.0f : (float)scales[0]);
  }
}

template <int M, typename S>
void int8_linear_m(const float* x, int64_t K, int64_t group, const std::vector<Matrix>& mats,
                   int64_t m0) {
  const int64_t G = group ? K / group : 1;
  for_units(mats, 1, 16, [=](const Matrix& a, int64_t n0, int64_t n1) {
    const int8_t* w = static_cast<const int8_t*>(a.w);
    const S* scales = static_cast<const S*>(a.s);
    const int64_t ld = a.ld, ldy = a.ldy;
    float* y = a.y + m0 * ldy;
    float out[M];
    for (int64_t n = n0; n < n1; ++n) {
      int8_row<M, S>(x, K, w + n * ld, scales + n * G, group, out);
      for (int m = 0; m < M; ++m) y[m * ldy + n] = out[m];
    }
  });
}

template <typename S>  // scales: fp32 or bf16, read as they are stored
void int8_linear(const float* x, int64_t M, int64_t K, int64_t group,
                 const std::vector<Matrix>& mats) {
  for (int64_t m = 0; m < M; m += 4) {
    const float* xm = x + m * K;
    switch (std::min<int64_t>(4, M - m)) {
      case 1: int8_linear_m<1, S>(xm, K, group, mats, m); break;
      case 2: int8_linear_m<2, S>(xm, K, group, mats, m); break;
      case 3: int8_linear_m<3, S>(xm, K, group, mats, m); break;
      default: int8_linear_m<4, S>(xm, K, group, mats, m); break;
    }
  }
}

// ---------------------------------------------------------------- int4 weights

// torch's CPU int4 layout (aten::_convert_weight_to_int4pack_for_cpu, [N, K/2] uint8): output
// rows in blocks of 64, each block stored k-major: for every k, 32 bytes whose low nibbles are
// rows 0-31 of the block and high nibbles rows 32-63. A last block of fewer rows (bs, a multiple
// of 16) stores bs/2 bytes per k, byte d holding rows 2d (low) and 2d+1 (high).
//
// The 64-row kernel takes two k at a time: widening the bytes of k and k+1 to 16 bits and
// interleaving them puts, in each 32-bit lane, the pair (k, k+1) of one row -- the operand layout
// of vdpbf16ps. OR-ing 0x4300 onto a code q (0..15) makes the bf16 number 128 + q exactly, so
// sum_k (128 + q_k) x_k - 128 sum_k x_k = sum_k q_k x_k with no int->float conversion.
// The interleave works within 128-bit lanes, so accumulator lane i holds block row kPerm[i].

#if defined(__AVX512BF16__)
constexpr bool kInt4Fast = true;
#else
constexpr bool kInt4Fast = false;
#endif

// Where group g's (scale, zero) pair of the rows from n0 (a block of bs rows) starts: torch's
// layout [G][N][2], or blocked: each block's pairs together, group after group ([G][bs][2] at
// n0 * G * 2). Blocked, a 64-row block's scales are one run of G * 256 bytes instead of G runs of
// 256 bytes N * 4 apart: from memory, 1.1x (one thread) to 1.2x (two) the int4 stream
// (2048 x 768 matrices, 80 MB).
template <bool Blocked>
inline int64_t int4_scale_offset(int64_t g, int64_t G, int64_t N, int64_t n0, int64_t bs) {
  return Blocked ? (n0 * G + g * bs) * 2 : (g * N + n0) * 2;
}

// One full 64-row block for one activation row. xb: bf16 activations (K), xsum: per-group sums
// of them; sz: (scale, zero) bf16 pairs as int4_scale_offset. Writes the 64 outputs in row order.
template <bool Blocked>
void int4_block64(const uint8_t* blk, const c10::BFloat16* xb, const float* xsum, int64_t K,
                  int64_t group, const c10::BFloat16* sz, int64_t N, int64_t n0, float* out) {
#if defined(__AVX512BF16__)
  const int64_t G = K / group;
  const __m512i nibble = _mm512_set1_epi32(0x000F000F);
  const __m512i magic = _mm512_set1_epi32(0x43004300);  // bf16 128.0 in both halves
  const __m512i high16 = _mm512_set1_epi32((int32_t)0xFFFF0000u);
  // Accumulator lanes -> rows: the 128-bit-lane interleave gives rows {0-3, 8-11, 16-19, 24-27}
  // (unpacklo) and {4-7, 12-15, 20-23, 28-31} (unpackhi), +32 for the high nibbles.
  const __m512i perm_lo = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i perm_hi = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const __m512 k136 = _mm512_set1_ps(136.0f);
  __m512 total[4];
  for (int i = 0; i < 4; ++i) total[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_ps();
    const int64_t kend = (g + 1) * group;
    if (g + 2 < G)  // scales of later groups (torch's layout: N * 4 bytes apart, no stream)
      for (int q = 0; q < 4; ++q)
        _mm_prefetch((const char*)(sz + int4_scale_offset<Blocked>(g + 2, G, N, n0, 64) + q * 32),
                     _MM_HINT_T0);
    for (int64_t k = g * group; k < kend; k += 2) {
      const uint8_t* a = blk + k * 32;
      _mm_prefetch((const char*)(a + kPrefetch), _MM_HINT_T0);
      const __m512i wa = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)a));
      const __m512i wb = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(a + 32)));
      const __m512i p0 = _mm512_unpacklo_epi16(wa, wb);  // lane: byte(k) | byte(k+1) << 16
      const __m512i p1 = _mm512_unpackhi_epi16(wa, wb);
      // 0xEA: (p & nibble) | magic
      const __m512bh lo0 = (__m512bh)_mm512_ternarylogic_epi32(p0, nibble, magic, 0xEA);
      const __m512bh lo1 = (__m512bh)_mm512_ternarylogic_epi32(p1, nibble, magic, 0xEA);
      const __m512bh hi0 =
          (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(p0, 4), nibble, magic, 0xEA);
      const __m512bh hi1 =
          (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(p1, 4), nibble, magic, 0xEA);
      int32_t pair;
      std::memcpy(&pair, xb + k, 4);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      acc[0] = _mm512_dpbf16_ps(acc[0], lo0, xv);
      acc[1] = _mm512_dpbf16_ps(acc[1], lo1, xv);
      acc[2] = _mm512_dpbf16_ps(acc[2], hi0, xv);
      acc[3] = _mm512_dpbf16_ps(acc[3], hi1, xv);
    }
    // total += scale * acc + (zero - 136 * scale) * xsum  (128 from the bf16 trick, 8 from the
    // codes' offset). (scale, zero) pairs of 16 rows fill one vector: scale in the low half of
    // each 32-bit lane, zero in the high half.
    const c10::BFloat16* szg = sz + int4_scale_offset<Blocked>(g, G, N, n0, 64);
    __m512 s[4], c[4];
    for (int q = 0; q < 4; ++q) {
      const __m512i v = _mm512_loadu_si512((const void*)(szg + q * 32));
      s[q] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      c[q] = _mm512_fnmadd_ps(k136, s[q], _mm512_castsi512_ps(_mm512_and_si512(v, high16)));
    }
    const __m512 xs = _mm512_set1_ps(xsum[g]);
    for (int h = 0; h < 2; ++h) {  // rows 0-31 (low nibbles), 32-63 (high nibbles)
      const __m512 s_lo = _mm512_permutex2var_ps(s[2 * h], perm_lo, s[2 * h + 1]);
      const __m512 s_hi = _mm512_permutex2var_ps(s[2 * h], perm_hi, s[2 * h + 1]);
      const __m512 c_lo = _mm512_permutex2var_ps(c[2 * h], perm_lo, c[2 * h + 1]);
      const __m512 c_hi = _mm512_permutex2var_ps(c[2 * h], perm_hi, c[2 * h + 1]);
      total[2 * h] = _mm512_fmadd_ps(c_lo, xs, _mm512_fmadd_ps(s_lo, acc[2 * h], total[2 * h]));
      total[2 * h + 1] =
          _mm512_fmadd_ps(c_hi, xs, _mm512_fmadd_ps(s_hi, acc[2 * h + 1], total[2 * h + 1]));
    }
  }
  for (int h = 0; h < 2; ++h) {
    alignas(64) float lo[16], hi[16];
    _mm512_store_ps(lo, total[2 * h]);
    _mm512_store_ps(hi, total[2 * h + 1]);
    for (int lane = 0; lane < 4; ++lane)
      for (int j = 0; j < 4; ++j) {
        out[32 * h + lane * 8 + j] = lo[lane * 4 + j];
        out[32 * h + lane * 8 + 4 + j] = hi[lane * 4 + j];
      }
  }
#endif
}

// A block of bs < 64 rows (the last one): bs/2 bytes per k, byte d = rows 2d (low), 2d+1 (high).
// Plain loops: only small layers whose row count is not a multiple of 64 have one.
template <bool Blocked>
void int4_block_tail(const uint8_t* blk, int64_t bs, const c10::BFloat16* xb, const float* xsum,
                     int64_t K, int64_t group, const c10::BFloat16* sz, int64_t N, int64_t n0,
                     float* out) {
  const int64_t G = K / group, half = bs / 2;
  for (int64_t r = 0; r < bs; ++r) out[r] = 0.0f;
  std::vector<float> acc(bs);
  for (int64_t g = 0; g < G; ++g) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const float xk = (float)xb[k];
      const uint8_t* row = blk + k * half;
      for (int64_t d = 0; d < half; ++d) {
        acc[2 * d] += (float)(row[d] & 15) * xk;
        acc[2 * d + 1] += (float)(row[d] >> 4) * xk;
      }
    }
    const c10::BFloat16* szg = sz + int4_scale_offset<Blocked>(g, G, N, n0, bs);
    for (int64_t r = 0; r < bs; ++r) {
      const float s = (float)szg[2 * r], z = (float)szg[2 * r + 1];
      out[r] += s * acc[r] + (z - 8.0f * s) * xsum[g];
    }
  }
}

// x: M x K bf16 (K a multiple of group); each matrix: w [N, K/2] packed, s: (scale, zero) bf16
// pairs in torch's layout [K/group, N, 2] or blocked (Matrix::blocked).
void int4_linear(const c10::BFloat16* x, int64_t M, int64_t K, int64_t group,
                 const std::vector<Matrix>& mats) {
  const int64_t G = K / group;
  std::vector<float> xsum(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float t = 0.0f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) t += (float)x[m * K + k];
      xsum[m * G + g] = t;
    }
  const float* xs = xsum.data();
  for_units(mats, 64, 1, [=](const Matrix& a, int64_t b0, int64_t b1) {
    const uint8_t* w = static_cast<const uint8_t*>(a.w);
    const c10::BFloat16* sz = static_cast<const c10::BFloat16*>(a.s);
    const int64_t N = a.N, ldy = a.ldy;
    const bool blocked = a.blocked;
    float* y = a.y;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 64, bs = std::min<int64_t>(64, N - n0);
      const uint8_t* blk = w + n0 * (K / 2);
      for (int64_t m = 0; m < M; ++m) {
        alignas(64) float out[64];
        if (bs == 64 && blocked)
          int4_block64<true>(blk, x + m * K, xs + m * G, K, group, sz, N, n0, out);
        else if (bs == 64)
          int4_block64<false>(blk, x + m * K, xs + m * G, K, group, sz, N, n0, out);
        else if (blocked)
          int4_block_tail<true>(blk, bs, x + m * K, xs + m * G, K, group, sz, N, n0, out);
        else
          int4_block_tail<false>(blk, bs, x + m * K, xs + m * G, K, group, sz, N, n0, out);
        std::memcpy(y + m * ldy + n0, out, bs * sizeof(float));
      }
    }
  });
}

#if defined(__AVX512BF16__)  // vcvtneps2bf16, and oneDNN's bf16 GEMM behind at::mm
// One block of an int4 matrix (rows n0..n0 + bs), transposed, as bf16: out[k * ldo + r] =
// (q - 8) * scale + zero of row n0 + r at k, rounded once. Transposed because torch's layout
// stores each k's 64 rows side by side: every k of a block becomes 64 contiguous outputs.
void int4_dequantize_block_t(const uint8_t* w, const c10::BFloat16* sz, int64_t N, int64_t K,
                             int64_t group, int64_t n0, c10::BFloat16* out, int64_t ldo) {
  const int64_t bs = std::min<int64_t>(64, N - n0), half = bs / 2;
  const uint8_t* blk = w + n0 * (K / 2);
  if (bs < 64) {  // a short last block: byte d of each k holds rows 2d (low), 2d + 1 (high)
    for (int64_t k = 0; k < K; ++k) {
      const c10::BFloat16* szg = sz + ((k / group) * N + n0) * 2;
      for (int64_t r = 0; r < bs; ++r) {
        const uint8_t byte = blk[k * half + r / 2];
        const int q = r % 2 ? byte >> 4 : byte & 15;
        out[k * ldo + r] = c10::BFloat16((q - 8) * (float)szg[2 * r] + (float)szg[2 * r + 1]);
      }
    }
    return;
  }
  const __m512i high16 = _mm512_set1_epi32((int32_t)0xFFFF0000u);
  const __m128i low4 = _mm_set1_epi8(15);
  const __m512 eight = _mm512_set1_ps(8.0f);
  for (int64_t g = 0; g < K / group; ++g) {
    __m512 s[4], c[4];  // rows 0-15, 16-31, 32-47, 48-63: scale, zero - 8 * scale
    for (int q = 0; q < 4; ++q) {
      const __m512i v = _mm512_loadu_si512((const void*)(sz + (g * N + n0) * 2 + q * 32));
      s[q] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      c[q] = _mm512_fnmadd_ps(eight, s[q], _mm512_castsi512_ps(_mm512_and_si512(v, high16)));
    }
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const __m128i a = _mm_loadu_si128((const __m128i*)(blk + k * 32));
      const __m128i b2 = _mm_loadu_si128((const __m128i*)(blk + k * 32 + 16));
      const __m128i nib[4] = {_mm_and_si128(a, low4), _mm_and_si128(b2, low4),
                              _mm_and_si128(_mm_srli_epi16(a, 4), low4),
                              _mm_and_si128(_mm_srli_epi16(b2, 4), low4)};
      for (int q = 0; q < 4; ++q) {
        const __m512 wq =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(nib[q])), s[q], c[q]);
        _mm256_storeu_si256((__m256i*)(out + k * ldo + 16 * q), (__m256i)_mm512_cvtneps_pbh(wq));
      }
    }
  }
}

// Prefill's many rows (int4 and int8 weights): x (M, K) bf16 @ W.T as bf16 GEMMs (oneDNN,
// AVX512-BF16) on tiles of W turned into bf16 just before -- up to kTileRows output rows at a
// time, each thread its own tiles (as many for each), so a tile goes from the conversion into
// the GEMM through the caches rather than through memory, and no matrix-sized buffer is
// allocated per call. Here (int4, 2 threads, 64 rows) that took tinyllama-1.1b's w1 from 2.8 to
// 2.1 ms and w2 (K = 5632) from 3.8 to 2.05 ms next to dequantizing the whole matrix first; 512
// rows: 14.1 -> 12.4 ms. Tiles of 128 and 512 rows ran about as fast as 256, of 64 slower.
constexpr int64_t kTileRows = 256;

// fill(n0, tn, buf, ld) writes rows n0..n0 + tn of W as bf16 into buf: transposed (K x ld,
// k_major) or not (ld x K). The result (M, N) bf16, each column times scale[n] if scale is given
// (the product rounded once more to bf16).
template <typename Fill>
at::Tensor bf16_gemm_tiles(const at::Tensor& xb, int64_t N, int64_t K, bool k_major,
                           const float* scale, Fill fill) {
  const int64_t M = xb.size(0), threads = at::get_num_threads();
  auto y = at::empty({M, N}, xb.options());
  auto up64 = [](int64_t n) { return (n + 63) / 64 * 64; };
  const int64_t per_thread = up64((N + threads - 1) / threads);
  const int64_t tiles_each = (per_thread + kTileRows - 1) / kTileRows;
  const int64_t rows = up64((per_thread + tiles_each - 1) / tiles_each);
  at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t t0, int64_t t1) {
    auto buf = k_major ? at::empty({K, rows}, xb.options()) : at::empty({rows, K}, xb.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, tn = std::min<int64_t>(rows, N - n0);
      fill(n0, tn, buf.data_ptr<c10::BFloat16>(), rows);
      const at::Tensor yt = k_major ? at::mm(xb, buf.narrow(1, 0, tn))
                                    : at::mm(xb, buf.narrow(0, 0, tn).t());  // (M, tn)
      const auto* src = yt.data_ptr<c10::BFloat16>();
      auto* dst = y.data_ptr<c10::BFloat16>();
      for (int64_t m = 0; m < M; ++m) {
        if (scale == nullptr) {
          std::memcpy(dst + m * N + n0, src + m * tn, tn * sizeof(c10::BFloat16));
        } else {
          for (int64_t j = 0; j < tn; ++j)
            dst[m * N + n0 + j] = c10::BFloat16((float)src[m * tn + j] * scale[n0 + j]);
        }
      }
    }
  });
  return y;
}

at::Tensor int4_gemm_tiled(const at::Tensor& xb, const uint8_t* w, const c10::BFloat16* sz,
                           int64_t N, int64_t K, int64_t group) {
  return bf16_gemm_tiles(xb, N, K, true, nullptr,
                         [&](int64_t n0, int64_t tn, c10::BFloat16* buf, int64_t ld) {
                           for (int64_t r = 0; r < tn; r += 64)
                             int4_dequantize_block_t(w, sz, N, K, group, n0 + r, buf + r, ld);
                         });
}

// int8 codes are exact in bf16: the tile is the codes, the row scales applied to the result.
at::Tensor int8_gemm_tiled(const at::Tensor& xb, const int8_t* w, const float* scale, int64_t N,
                           int64_t K) {
  return bf16_gemm_tiles(xb, N, K, false, scale,
                         [&](int64_t n0, int64_t tn, c10::BFloat16* buf, int64_t) {
                           for (int64_t r = 0; r < tn; ++r) {
                             const int8_t* src = w + (n0 + r) * K;
                             c10::BFloat16* dst = buf + r * K;
                             int64_t k = 0;
                             for (; k + 16 <= K; k += 16) {
                               const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                   _mm_loadu_si128((const __m128i*)(src + k))));
                               _mm256_storeu_si256((__m256i*)(dst + k),
                                                   (__m256i)_mm512_cvtneps_pbh(v));
                             }
                             for (; k < K; ++k) dst[k] = c10::BFloat16((float)src[k]);
                           }
                         });
}
#endif  // __AVX512BF16__

// ---------------------------------------------------------------- 8da4w prefill (VNNI)
//
// 8da4w's many-row GEMM in integers, as the format intends: activations quantized per token to
// int8 (q, scale s_a, zero z_a), weights int4 symmetric per group (codes c = q_w + 8, scale s_w).
// With u = q + 128 (unsigned) and w = c - 8 (signed), vpdpbusd sums 4 products u * w per 32-bit
// lane -- twice the products per instruction of vdpbf16ps --, so per group g
//   I_g = sum_k u_k w_k,   sum_k (q_k - z_a) w_k = I_g - (128 + z_a) W_g,   W_g = sum_k w_k
//   y = s_a * (sum_g s_w,g I_g - (128 + z_a) R),   R = sum_g s_w,g W_g  (per output row).
// The integer sums are exact; the float path (fake-quantized activations rounded to bf16, a bf16
// GEMM) rounds twice more. Each 64-row block of torch's int4 pack layout is first unpacked into
// a per-thread buffer in the operand layout (for every 4 k, 16 rows x 4 bytes per vector); a
// group of it then stays in L1 while every token passes over it.

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define TORCHCHAT_VNNI 1
constexpr bool kVnni = true;

// Block rows n0..n0 + 64 (bs of them real) -> wbuf[K/4][4][64 bytes] (rows 16v + lane, k 4kq + t
// at byte 4 lane + t), scales sbuf[G][64] fp32 and r[64] = sum_g s_w,g W_g.
void unpack_8da4w_block(const uint8_t* w, const c10::BFloat16* sz, int64_t N, int64_t K,
                        int64_t group, int64_t n0, int8_t* wbuf, float* sbuf, float* r) {
  const int64_t bs = std::min<int64_t>(64, N - n0), G = K / group;
  const uint8_t* blk = w + n0 * (K / 2);
  if (bs < 64) {  // a short last block: byte d of each k holds rows 2d (low), 2d + 1 (high)
    const int64_t half = bs / 2;
    std::memset(wbuf, 0, K * 64);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < bs; ++i) {
        const uint8_t byte = blk[k * half + i / 2];
        wbuf[(k / 4) * 256 + (i / 16) * 64 + (i % 16) * 4 + k % 4] =
            (int8_t)((i % 2 ? byte >> 4 : byte & 15) - 8);
      }
    for (int64_t i = 0; i < 64; ++i) {
      float t = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t wsum = 0;
        for (int64_t k = g * group; k < (g + 1) * group; ++k)
          wsum += wbuf[(k / 4) * 256 + (i / 16) * 64 + (i % 16) * 4 + k % 4];
        sbuf[g * 64 + i] = i < bs ? (float)sz[(g * N + n0 + i) * 2] : 0.0f;
        t += sbuf[g * 64 + i] * (float)wsum;
      }
      r[i] = t;
    }
    return;
  }
  // lane j of p0: bytes j and 32 + j (rows j, j + 32 in low/high nibbles) at k, k + 1 (from a)
  // and k + 2, k + 3 (from b); p1: rows 16 + j, 48 + j.
  alignas(64) uint8_t idx[2][64];
  for (int v = 0; v < 2; ++v)
    for (int j = 0; j < 16; ++j) {
      idx[v][4 * j] = (uint8_t)(16 * v + j);
      idx[v][4 * j + 1] = (uint8_t)(32 + 16 * v + j);
      idx[v][4 * j + 2] = (uint8_t)(64 + 16 * v + j);
      idx[v][4 * j + 3] = (uint8_t)(96 + 16 * v + j);
    }
  const __m512i i0 = _mm512_load_si512((const void*)idx[0]);
  const __m512i i1 = _mm512_load_si512((const void*)idx[1]);
  const __m512i low4 = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8), ones = _mm512_set1_epi8(1);
  __m512 rv[4];
  for (int v = 0; v < 4; ++v) rv[v] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i wsum[4];  // W_g of rows 16v + lane
    for (int v = 0; v < 4; ++v) wsum[v] = _mm512_setzero_si512();
    for (int64_t kq = g * group / 4; kq < (g + 1) * group / 4; ++kq) {
      const __m512i a = _mm512_loadu_si512((const void*)(blk + kq * 128));
      const __m512i b = _mm512_loadu_si512((const void*)(blk + kq * 128 + 64));
      const __m512i p0 = _mm512_permutex2var_epi8(a, i0, b);
      const __m512i p1 = _mm512_permutex2var_epi8(a, i1, b);
      const __m512i q[4] = {  // rows 0-15, 16-31, 32-47, 48-63
          _mm512_sub_epi8(_mm512_and_si512(p0, low4), eight),
          _mm512_sub_epi8(_mm512_and_si512(p1, low4), eight),
          _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(p0, 4), low4), eight),
          _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(p1, 4), low4), eight)};
      for (int v = 0; v < 4; ++v) {
        _mm512_store_si512(wbuf + kq * 256 + v * 64, q[v]);
        wsum[v] = _mm512_dpbusd_epi32(wsum[v], ones, q[v]);
      }
    }
    for (int v = 0; v < 4; ++v) {  // scales of rows 16v..: the low halves of (scale, zero) pairs
      const __m512i sv = _mm512_loadu_si512((const void*)(sz + (g * N + n0 + 16 * v) * 2));
      const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(sv, 16));
      _mm512_store_ps(sbuf + g * 64 + v * 16, sc);
      rv[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(wsum[v]), sc, rv[v]);
    }
  }
  for (int v = 0; v < 4; ++v) _mm512_storeu_ps(r + v * 16, rv[v]);
}

// One group (kq0..kq0 + group/4) of MR tokens x the 64 rows of an unpacked block, added into
// their fp32 sums f[m][0..64): 4 x MR integer sums in registers, the group's weights (2 KB for
// group 32) read from L1 by every MR tokens in turn.
template <int MR>
inline void gemm_8da4w_group(const uint8_t* u, int64_t K, int64_t kq0, int64_t nkq,
                             const int8_t* wbuf, const float* sw, float* f) {
  __m512i acc[MR][4];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int64_t kq = kq0; kq < kq0 + nkq; ++kq) {
    const int8_t* wq = wbuf + kq * 256;
    const __m512i w0 = _mm512_load_si512(wq), w1 = _mm512_load_si512(wq + 64);
    const __m512i w2 = _mm512_load_si512(wq + 128), w3 = _mm512_load_si512(wq + 192);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512i a = _mm512_set1_epi32(*(const int32_t*)(u + m * K + kq * 4));
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], a, w0);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], a, w1);
      acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], a, w2);
      acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], a, w3);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
    const __m512 s = _mm512_loadu_ps(sw + v * 16);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
      _mm512_store_ps(f + m * 64 + v * 16,
                      _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][v]), s,
                                      _mm512_load_ps(f + m * 64 + v * 16)));
  }
}

// x (M, Kx) fp32 -> u (M, K) = per-token int8 codes + 128 (columns past Kx: the zero point,
// they meet zero weights), scales sa and zero points za, exactly as
// torchchat.quant.primitives.quantize_per_token_int8: the same fp32 min/max, IEEE division and
// round half to even.
void quantize_rows_8da4w(const float* xp, int64_t M, int64_t Kx, int64_t K, uint8_t* u,
                         float* sa, float* za) {
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = xp + m * Kx;
      __m512 lo16 = _mm512_setzero_ps(), hi16 = _mm512_setzero_ps();
      for (int64_t k = 0; k < Kx; k += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(mask16(Kx - k), row + k);  // zeros past Kx
        lo16 = _mm512_min_ps(lo16, v);
        hi16 = _mm512_max_ps(hi16, v);
      }
      const float lo = _mm512_reduce_min_ps(lo16), hi = _mm512_reduce_max_ps(hi16);
      const float scale = std::max((hi - lo) / 255.0f, std::numeric_limits<float>::epsilon());
      const float zero = std::clamp(-128.0f - std::nearbyint(lo / scale), -128.0f, 127.0f);
      const __m512 sv = _mm512_set1_ps(scale), zv = _mm512_set1_ps(zero + 128.0f);
      const __m512 qmin = _mm512_setzero_ps(), qmax = _mm512_set1_ps(255.0f);
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 in = mask16(Kx - k);
        const __m512 v = _mm512_maskz_loadu_ps(in, row + k);
        const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, sv),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512 q = _mm512_mask_blend_ps(in, zv, _mm512_add_ps(r, zv));
        const __m512i qi = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, qmin), qmax));
        _mm_storeu_si128((__m128i*)(u + m * K + k), _mm512_cvtepi32_epi8(qi));
      }
      sa[m] = scale;
      za[m] = zero;
    }
  });
}

void gemm_8da4w(const uint8_t* u, int64_t M, int64_t K, const float* sa, const float* za,
                const uint8_t* w, const c10::BFloat16* sz, int64_t N, int64_t group, float* y) {
  constexpr int MR = 4;
  at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t b0, int64_t b1) {
    // torch's CPU allocator aligns to 64 bytes, as the aligned loads below need
    const auto wt = at::empty({K * 64}, at::kChar), ft = at::empty({M * 64}, at::kFloat);
    const auto st = at::empty({(K / group) * 64}, at::kFloat);
    int8_t* wbuf = wt.data_ptr<int8_t>();
    float *f = ft.data_ptr<float>(), *sbuf = st.data_ptr<float>();
    alignas(64) float r[64];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 64, bs = std::min<int64_t>(64, N - n0);
      unpack_8da4w_block(w, sz, N, K, group, n0, wbuf, sbuf, r);
      std::memset(f, 0, M * 64 * sizeof(float));
      // 64 tokens at a time: their fp32 sums (16 KB) stay in L1 across the groups
      for (int64_t mb = 0; mb < M; mb += 64) {
        const int64_t me = std::min<int64_t>(M, mb + 64);
        for (int64_t g = 0; g < K / group; ++g) {
          const int64_t kq0 = g * group / 4, nkq = group / 4;
          const float* sw = sbuf + g * 64;
          int64_t m = mb;
          for (; m + MR <= me; m += MR)
            gemm_8da4w_group<MR>(u + m * K, K, kq0, nkq, wbuf, sw, f + m * 64);
          switch (me - m) {
            case 3: gemm_8da4w_group<3>(u + m * K, K, kq0, nkq, wbuf, sw, f + m * 64); break;
            case 2: gemm_8da4w_group<2>(u + m * K, K, kq0, nkq, wbuf, sw, f + m * 64); break;
            case 1: gemm_8da4w_group<1>(u + m * K, K, kq0, nkq, wbuf, sw, f + m * 64); break;
            default: break;
          }
        }
      }
      for (int64_t m = 0; m < M; ++m) {  // y = s_a * (f - (128 + z_a) * R)
        const __m512 s = _mm512_set1_ps(sa[m]), c = _mm512_set1_ps(128.0f + za[m]);
        for (int v = 0; v < 4 && v * 16 < bs; ++v) {
          const __m512 out = _mm512_mul_ps(
              s, _mm512_fnmadd_ps(c, _mm512_load_ps(r + v * 16),
                                  _mm512_load_ps(f + m * 64 + v * 16)));
          _mm512_mask_storeu_ps(y + m * N + n0 + v * 16, mask16(bs - v * 16), out);
        }
      }
    }
  });
}
#else
constexpr bool kVnni = false;
#endif

// ---------------------------------------------------------------- attention

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

// [lo, hi): the span of a mask row of len positions that holds all its open ones (a long cache a
// few positions in is mostly closed: attention reads only this span).
inline std::pair<int64_t, int64_t> open_span(const bool* m, int64_t len) {
  int64_t lo = 0, hi = len;
  while (hi > lo && !m[hi - 1]) --hi;
  while (lo < hi && !m[lo]) ++lo;
  return {lo, hi};
}

// softmax(q k^T * scale, masked) v for one query row: k, v rows (`ts` apart), mask row m whose
// open positions all lie in [lo, hi); fp32 throughout, rounded once into out. D <= 16 C: the row's
// chunks of 16 lanes stay in registers (masks cut the last one short). Scores go 16 positions at
// a time (one vector of products per key, the 16 reduced together) into p (len + 16 floats);
// only the span the mask leaves open is read. A row with every position masked gets zeros (SDPA
// would give NaN; such rows are never read).
template <typename T, int C>
void attend_row(const T* q, const T* k, const T* v, int64_t ts, const bool* m, int64_t lo,
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
      const T* kr = k + (t0 + j) * ts;
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
      const T* vr = v + t * ts;
      for (int c = 0; c < C; ++c)
        acc[c] = _mm512_fmadd_ps(pt, Load<T>::masked(vr + 16 * c, dm[c]), acc[c]);
    }
  }
  const __m512 inv = _mm512_set1_ps(sum > 0.0f ? 1.0f / sum : 0.0f);
  alignas(64) float y[16 * C];
  for (int c = 0; c < C; ++c) _mm512_store_ps(y + 16 * c, _mm512_mul_ps(acc[c], inv));
  for (int64_t d = 0; d < D; ++d) out[d] = (T)y[d];
}

template <typename T, int C>
void attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& mask, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  const int64_t KVH = k.size(1), len = k.size(2), group = H / KVH;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const bool* mp = mask.data_ptr<bool>();
  T* op = out.data_ptr<T>();
  const int64_t mb = mask.size(0) == 1 ? 0 : mask.stride(0), ms = mask.stride(2);
  // Tasks of at least ~64K multiply-adds: a one-token step over a short cache stays on one
  // thread (waking the others costs more than the work).
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, len * D));
  // Each mask row's open span, found once for all heads.
  std::vector<std::pair<int64_t, int64_t>> span(B * S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) span[b * S + s] = open_span(mp + b * mb + s * ms, len);
  at::parallel_for(0, B * H * S, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(len + 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * S), h = (i / S) % H, s = i % S;
      const T* kb = kp + b * k.stride(0) + (h / group) * k.stride(1);
      const T* vb = vp + b * v.stride(0) + (h / group) * v.stride(1);
      attend_row<T, C>(qp + b * q.stride(0) + h * q.stride(1) + s * q.stride(2), kb, vb,
                       k.stride(2), mp + b * mb + s * ms, span[b * S + s].first,
                       span[b * S + s].second, D, (float)scale,
                       op + ((b * H + h) * S + s) * D, p.data());
    }
  });
}

template <typename T>
void attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& mask, double scale, at::Tensor& out) {
  const int64_t D = q.size(3);
  if (D <= 64)
    attention_rows<T, 4>(q, k, v, mask, scale, out);
  else if (D <= 128)
    attention_rows<T, 8>(q, k, v, mask, scale, out);
  else
    attention_rows<T, 16>(q, k, v, mask, scale, out);
}

// ---------------------------------------------------------------- a whole decode step
//
// One token through all of a model's layers in one call (torchchat::decode_layers): RMSNorm,
// q/k/v, RoPE, the cache write, attention, wo and the residual, RMSNorm, w1/w3, SiLU gate, w2 and
// the residual, layer after layer, on the kernels above. Eager modules spend ~2-3 ms a token of
// Python and dispatch on stories110M int4 (2 threads: 3.6-4.5 ms against this step's 1.6); the
// compiled graph of ~130 kernels measured 0-34% slower than this step on the same weights, after
// 25-90 s of compiling. The arithmetic is the eager modules': every value rounded to the
// activation dtype where they round it (after each linear, norm, RoPE, gate and residual add).

// Activations rounded to T and kept as float, as the eager modules hand them on.
template <typename T>
inline float round_to(float v) {
  return (float)T(v);
}

// 8da4w's activations: int8 per token, asymmetric, back to floats (quantize_per_token_int8).
template <typename T>
void fake_quantize_row(float* x, int64_t n) {
  float lo = 0.0f, hi = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const float scale = std::max((hi - lo) / 255.0f, std::numeric_limits<float>::epsilon());
  const float zero = std::min(127.0f, std::max(-128.0f, -128.0f - std::nearbyint(lo / scale)));
  for (int64_t i = 0; i < n; ++i) {
    const float q = std::min(127.0f, std::max(-128.0f, std::nearbyint(x[i] / scale) + zero));
    x[i] = round_to<T>((q - zero) * scale);
  }
}

struct StepScratch {  // a projection's input as its kernel takes it
  std::vector<float> xf;
  std::vector<c10::BFloat16> xb;
};

// y = x @ W.T for the projection's matrices (results in their Matrix.y); x has K0 values.
template <typename T>
void project_row(int64_t kind, int64_t group, bool bf16_scales, const Projection& p,
                 const float* x, int64_t K0, StepScratch& sc) {
  if (kind == kFloatW && std::is_same_v<T, float>) {
    float_linear<T>(reinterpret_cast<const T*>(x), 1, K0, p.mats);
  } else if (kind == kFloatW) {
    std::vector<T> xt(x, x + K0);  // T from float: exact (values are already T's)
    float_linear<T>(xt.data(), 1, K0, p.mats);
  } else if (kind == kInt8W) {
    sc.xf.assign(p.K, 0.0f);
    std::copy(x, x + K0, sc.xf.begin());
    if (bf16_scales)
      int8_linear<c10::BFloat16>(sc.xf.data(), 1, p.K, group, p.mats);
    else
      int8_linear<float>(sc.xf.data(), 1, p.K, group, p.mats);
  } else {
    sc.xb.assign(p.K, c10::BFloat16(0.0f));
    for (int64_t k = 0; k < K0; ++k) sc.xb[k] = c10::BFloat16(x[k]);
    int4_linear(sc.xb.data(), 1, p.K, group, p.mats);
  }
}

// out = RMSNorm(x) * w as the eager module: fp32 mean of squares, normalized value rounded to T,
// times the weight, rounded to T.
template <typename T>
void rms_norm_row(const float* x, const T* w, int64_t D, float eps, float* out) {
  float ss = 0.0f;
  for (int64_t d = 0; d < D; ++d) ss += x[d] * x[d];
  const float r = 1.0f / std::sqrt(ss / (float)D + eps);
  for (int64_t d = 0; d < D; ++d) out[d] = round_to<T>(round_to<T>(x[d] * r) * (float)w[d]);
}

// Rotates the interleaved pairs of n heads of D values by one position's (cos, sin) table.
template <typename T>
void rope_row(float* x, int64_t heads, int64_t D, const float* f) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < D / 2; ++i) {
      float* p = x + h * D + 2 * i;
      const float a = p[0], b = p[1], c = f[2 * i], s = f[2 * i + 1];
      p[0] = round_to<T>(a * c - b * s);
      p[1] = round_to<T>(b * c + a * s);
    }
}

template <typename T, int C>
void decode_layers_impl(const StepArgs& a, float* h, at::TensorList norms, const float* freqs,
                        const bool* mrow, at::TensorList kc, at::TensorList vc,
                        const std::vector<Projection>& proj, std::vector<float>& qkv,
                        std::vector<float>& o, std::vector<float>& g, std::vector<float>& y2) {
  const int64_t D = a.D, H = a.H, KVH = a.KVH, Dh = a.Dh, F = a.F;
  const int64_t Nq = H * Dh, Nkv = KVH * Dh, group = H / KVH;
  const bool dyn = a.kind == kInt4DynW;
  const auto span = open_span(mrow, a.len);
  const int64_t lo = span.first, hi = span.second;  // not a structured binding: lambdas take them
  const float scale = 1.0f / std::sqrt((float)Dh);
  const bool bf16_out = a.bf16_out;
  auto out = [bf16_out](float v) {  // a projection's output as the modules hand it on
    return round_to<T>(bf16_out ? round_to<c10::BFloat16>(v) : v);
  };
  std::vector<float> xn(std::max(D, F)), att(Nq), act(F);
  std::vector<T> qt(Nq), yt(Nq);
  StepScratch sc;
  for (int64_t l = 0; l < a.L; ++l) {
    const Projection* p = proj.data() + 4 * l;
    // attention
    rms_norm_row<T>(h, norms[2 * l].data_ptr<T>(), D, a.eps, xn.data());
    if (dyn) fake_quantize_row<T>(xn.data(), D);
    project_row<T>(a.kind, a.group, a.bf16_scales, p[0], xn.data(), D, sc);
    for (auto& v : qkv) v = out(v);
    rope_row<T>(qkv.data(), H + KVH, Dh, freqs);  // q and k heads: one run of rows
    T* kp = kc[l].data_ptr<T>();
    T* vp = vc[l].data_ptr<T>();
    for (int64_t j = 0; j < KVH; ++j)
      for (int64_t d = 0; d < Dh; ++d) {
        kp[(j * a.len + a.pos) * Dh + d] = T(qkv[Nq + j * Dh + d]);
        vp[(j * a.len + a.pos) * Dh + d] = T(qkv[Nq + Nkv + j * Dh + d]);
      }
    for (int64_t i = 0; i < Nq; ++i) qt[i] = T(qkv[i]);
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, (hi - lo) * Dh));
    const T* q0 = qt.data();
    T* y0 = yt.data();
    at::parallel_for(0, H, grain, [=](int64_t h0, int64_t h1) {
      std::vector<float> pbuf(hi - lo + 16);
      for (int64_t hh = h0; hh < h1; ++hh) {
        const int64_t j = hh / group;
        attend_row<T, C>(q0 + hh * Dh, kp + j * a.len * Dh, vp + j * a.len * Dh, Dh, mrow, lo, hi,
                         Dh, scale, y0 + hh * Dh, pbuf.data());
      }
    });
    for (int64_t i = 0; i < Nq; ++i) att[i] = (float)yt[i];
    if (dyn) fake_quantize_row<T>(att.data(), Nq);
    project_row<T>(a.kind, a.group, a.bf16_scales, p[1], att.data(), Nq, sc);
    for (int64_t d = 0; d < D; ++d) h[d] = round_to<T>(h[d] + out(o[d]));
    // feed-forward
    rms_norm_row<T>(h, norms[2 * l + 1].data_ptr<T>(), D, a.eps, xn.data());
    if (dyn) fake_quantize_row<T>(xn.data(), D);
    project_row<T>(a.kind, a.group, a.bf16_scales, p[2], xn.data(), D, sc);
    for (int64_t i = 0; i < F; ++i) {
      const float g1 = out(g[i]), g3 = out(g[F + i]);
      act[i] = round_to<T>(round_to<T>(g1 / (1.0f + std::exp(-g1))) * g3);
    }
    if (dyn) fake_quantize_row<T>(act.data(), F);
    project_row<T>(a.kind, a.group, a.bf16_scales, p[3], act.data(), F, sc);
    for (int64_t d = 0; d < D; ++d) h[d] = round_to<T>(h[d] + out(y2[d]));
  }
}

#else
constexpr bool kAvx512 = false;
constexpr bool kInt4Fast = false;
constexpr bool kVnni = false;
#endif  // AVX-512

}  // namespace

// ---------------------------------------------------------------- torch ops

namespace {

// Bit 0: AVX-512 kernels built (fp32, bf16, fp16, int8); bit 1: AVX512-BF16 (int4, fast bf16);
// bit 2: AVX512-VNNI and AVX512-VBMI (8da4w prefill).
int64_t simd_level() {
  return (kAvx512 ? 1 : 0) | (kAvx512 && kInt4Fast ? 2 : 0) | (kAvx512 && kVnni ? 4 : 0);
}

void check_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows, "torchchat: x must be (M <= ", kMaxRows,
              ", K), got ", x.sizes());
  TORCH_CHECK(x.size(1) <= K, "torchchat: x has ", x.size(1), " columns, weights ", K);
}

// The ops below convert their few activation rows and outputs with plain loops into scratch
// vectors: a decode step calls them ~100 times, and each aten op spent on a cast, a pad or an
// allocation costs about a microsecond of dispatch (0.3 ms a token on stories110M).

// x (M, K) of any float dtype -> dst (M, Kpad) of type T, zero-padded.
template <typename T>
void rows_to(const at::Tensor& x, int64_t Kpad, std::vector<T>& dst) {
  const int64_t M = x.size(0), K = x.size(1);
  dst.assign(M * Kpad, T(0.0f));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rows_to", [&] {
    const auto* src = x.data_ptr<scalar_t>();
    const int64_t sm = x.stride(0), sk = x.stride(1);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) dst[m * Kpad + k] = T((float)src[m * sm + k * sk]);
  });
}

// fp32 results (M, N) -> a new tensor of x's dtype.
at::Tensor rows_from(const std::vector<float>& y, int64_t M, int64_t N, const at::Tensor& x) {
  auto out = at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "rows_from", [&] {
    auto* dst = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < M * N; ++i) dst[i] = scalar_t(y[i]);
  });
  return out;
}

int64_t total_rows(at::TensorList w) {
  int64_t rows = 0;
  for (const auto& t : w) rows += t.size(0);
  return rows;
}

// The matrices of a grouped call, w[i] with scales s[i] (none for float weights); their fp32
// results side by side in y, (M, all their rows).
std::vector<Matrix> matrices(at::TensorList w, at::TensorList s, int64_t M,
                             std::vector<float>& y) {
  const int64_t rows = total_rows(w);
  y.resize(M * rows);
  std::vector<Matrix> mats;
  int64_t off = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    const int64_t N = w[i].size(0);
    mats.push_back({w[i].data_ptr(), w[i].stride(0), s.empty() ? nullptr : s[i].data_ptr(), N,
                    y.data() + off, rows});
    off += N;
  }
  return mats;
}

// A grouped call's lists: one or more weights, and as many scales tensors where the op takes them.
void check_group(const char* op, at::TensorList w, at::TensorList s, bool scaled) {
  TORCH_CHECK(!w.empty(), op, ": no weights");
  TORCH_CHECK(!scaled || s.size() == w.size(), op, ": ", w.size(), " weights but ", s.size(),
              " scales tensors");
}

// x (M, K) @ w[i] (N_i, K).T for fp32, bf16 or fp16 x and weights of the same dtype.
at::Tensor linear_cpu(const at::Tensor& x, at::TensorList ws) {
  TORCH_CHECK(kAvx512, "torchchat::linear needs AVX-512");
  check_group("torchchat::linear", ws, {}, false);
  const int64_t M = x.size(0), K = x.size(1);
  for (const auto& w : ws) {
    TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "torchchat::linear: w must be (N, K) row-major");
    TORCH_CHECK(x.scalar_type() == w.scalar_type(), "torchchat::linear: dtypes differ");
    check_rows(x, w.size(1));
    TORCH_CHECK(K == w.size(1), "torchchat::linear: K differs");
  }
  const auto xc = x.contiguous();
  std::vector<float> y;
  const auto mats = matrices(ws, {}, M, y);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  switch (x.scalar_type()) {
    case at::kFloat: float_linear(xc.data_ptr<float>(), M, K, mats); break;
    case at::kBFloat16: float_linear(xc.data_ptr<c10::BFloat16>(), M, K, mats); break;
    case at::kHalf: float_linear(xc.data_ptr<c10::Half>(), M, K, mats); break;
    default: TORCH_CHECK(false, "torchchat::linear: unsupported dtype ", x.scalar_type());
  }
#endif
  return rows_from(y, M, total_rows(ws), x);
}

// int8 weights w[i] (N_i, Kw) with scales (N_i,) or (N_i, Kw / group), all of one dtype;
// x (M, K <= Kw) of any float dtype.
at::Tensor linear_int8_cpu(const at::Tensor& x, at::TensorList ws, at::TensorList scales,
                           int64_t group) {
  TORCH_CHECK(kAvx512, "torchchat::linear_int8 needs AVX-512");
  check_group("torchchat::linear_int8", ws, scales, true);
  const int64_t M = x.size(0), Kw = ws[0].size(1);
  check_rows(x, Kw);
  TORCH_CHECK(group == 0 || (group >= 16 && (group & (group - 1)) == 0 && Kw % group == 0),
              "torchchat::linear_int8: group ", group, " must be 0 or a power of two >= 16 dividing ",
              Kw);
  TORCH_CHECK(Kw % 16 == 0, "torchchat::linear_int8: K ", Kw, " must be a multiple of 16");
  const auto sdt = scales[0].scalar_type();
  for (size_t i = 0; i < ws.size(); ++i) {
    const auto &w = ws[i], &s = scales[i];
    const int64_t N = w.size(0);
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar &&
                    w.size(1) == Kw,
                "torchchat::linear_int8: w must be contiguous int8 (N, ", Kw, ")");
    TORCH_CHECK((sdt == at::kBFloat16 || sdt == at::kFloat) && s.scalar_type() == sdt &&
                    s.is_contiguous() && s.numel() == N * (group ? Kw / group : 1),
                "torchchat::linear_int8: scales must be contiguous fp32 or bf16, ", s.sizes());
  }
  std::vector<float> xf, y;
  rows_to(x, Kw, xf);
  const auto mats = matrices(ws, scales, M, y);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  if (sdt == at::kFloat)
    int8_linear<float>(xf.data(), M, Kw, group, mats);
  else
    int8_linear<c10::BFloat16>(xf.data(), M, Kw, group, mats);
#endif
  return rows_from(y, M, total_rows(ws), x);
}

// int4 weights in torch's CPU pack layout: w (N, K/2) uint8, sz (K/group, N, 2) bf16 (scale,
// zero), N a multiple of 16, group (a multiple of `step`) dividing K. Returns K.
int64_t check_int4(const char* op, const at::Tensor& w, const at::Tensor& sz, int64_t group,
                   int64_t step) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kByte, op,
              ": w must be contiguous uint8 (N, K/2)");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(N % 16 == 0 && group > 0 && group % step == 0 && K % group == 0, op, ": N ", N,
              " must be a multiple of 16, K ", K, " of group ", group, " (a multiple of ", step,
              ")");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() &&
                  sz.numel() == (K / group) * N * 2,
              op, ": scales_and_zeros must be contiguous bf16 (K/group, N, 2)");
  return K;
}

// int4 weights w[i] (N_i, Kw/2), sz[i] as check_int4; x (M, K <= Kw). Activations are rounded
// to bf16 first, as the aten kernel's callers do.
at::Tensor linear_int4_cpu(const at::Tensor& x, at::TensorList ws, at::TensorList sz,
                           int64_t group) {
  TORCH_CHECK(kAvx512 && kInt4Fast, "torchchat::linear_int4 needs AVX512-BF16");
  check_group("torchchat::linear_int4", ws, sz, true);
  const int64_t Kw = check_int4("torchchat::linear_int4", ws[0], sz[0], group, 2);
  for (size_t i = 1; i < ws.size(); ++i)
    TORCH_CHECK(check_int4("torchchat::linear_int4", ws[i], sz[i], group, 2) == Kw,
                "torchchat::linear_int4: K differs");
  const int64_t M = x.size(0);
  check_rows(x, Kw);
  std::vector<c10::BFloat16> xb;
  std::vector<float> y;
  rows_to(x, Kw, xb);
  const auto mats = matrices(ws, sz, M, y);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  int4_linear(xb.data(), M, Kw, group, mats);
#endif
  return rows_from(y, M, total_rows(ws), x);
}

// x (M, K) bf16 @ int4 weights in torch's CPU pack layout (N, K/2), sz (K/group, N, 2) bf16
// -> bf16 (M, N): prefill's GEMM on tiles of the weights dequantized on the fly.
at::Tensor gemm_int4_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz,
                         int64_t group) {
  TORCH_CHECK(kAvx512 && kInt4Fast, "torchchat::gemm_int4 needs AVX512-BF16");
  const int64_t K = check_int4("torchchat::gemm_int4", w, sz, group, 1), N = w.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kBFloat16,
              "torchchat::gemm_int4: x must be bf16 (M, ", K, "), got ", x.sizes());
#if defined(__AVX512BF16__)
  return int4_gemm_tiled(x.contiguous(), w.data_ptr<uint8_t>(), sz.data_ptr<c10::BFloat16>(), N,
                         K, group);
#else
  return at::Tensor();
#endif
}

// x (M, K) bf16 @ int8 weights (N, K) with per-row scales (N) -> bf16 (M, N), rounded as
// bf16(bf16(x @ codes.T) * bf16(scale)): prefill's GEMM on tiles of the codes.
at::Tensor gemm_int8_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(kAvx512 && kInt4Fast, "torchchat::gemm_int8 needs AVX512-BF16");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar,
              "torchchat::gemm_int8: w must be contiguous int8 (N, K)");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(scales.numel() == N, "torchchat::gemm_int8: scales must have N = ", N, " values");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kBFloat16,
              "torchchat::gemm_int8: x must be bf16 (M, ", K, "), got ", x.sizes());
  // the scales as the GEMM's bf16 epilogue sees them: rounded to bf16
  const auto s = scales.reshape({N}).to(at::kBFloat16).to(at::kFloat).contiguous();
#if defined(__AVX512BF16__)
  return int8_gemm_tiled(x.contiguous(), w.data_ptr<int8_t>(), s.data_ptr<float>(), N, K);
#else
  return at::Tensor();
#endif
}

// 8da4w prefill: x (M, Kx <= K) of any float dtype, quantized here per token to int8 exactly as
// torchchat.quant.primitives.quantize_per_token_int8 does (fp32 arithmetic, round half to even;
// missing columns count as zeros); int4 weights in torch's CPU pack layout with zero points 0.
// Returns (M, N) in x's dtype.
at::Tensor gemm_8da4w_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz,
                          int64_t group) {
  TORCH_CHECK(kAvx512 && kVnni, "torchchat::gemm_8da4w needs AVX512-VNNI and AVX512-VBMI");
  const int64_t K = check_int4("torchchat::gemm_8da4w", w, sz, group, 4), N = w.size(0);
  TORCH_CHECK(K % 16 == 0, "torchchat::gemm_8da4w: K ", K, " must be a multiple of 16");
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= K && at::isFloatingType(x.scalar_type()),
              "torchchat::gemm_8da4w: x must be float (M, <= ", K, "), got ", x.sizes());
  const int64_t M = x.size(0);
  const auto xf = x.to(at::kFloat).contiguous();
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
#if defined(TORCHCHAT_VNNI)
  std::vector<uint8_t> u(M * K);
  std::vector<float> sa(M), za(M);
  quantize_rows_8da4w(xf.data_ptr<float>(), M, x.size(1), K, u.data(), sa.data(), za.data());
  gemm_8da4w(u.data(), M, K, sa.data(), za.data(), w.data_ptr<uint8_t>(),
             sz.data_ptr<c10::BFloat16>(), N, group, y.data_ptr<float>());
#endif
  return y.to(x.scalar_type());
}

// softmax(q k^T * scale + mask) v: q (B, H, S, D); k, v (B, KVH, T, D) with H a multiple of KVH
// (grouped-query attention) and unit stride along D, T rows D apart; mask bool (1 or B, 1, S, T).
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& mask, double scale) {
  TORCH_CHECK(kAvx512, "torchchat::attention needs AVX-512");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4,
              "torchchat::attention: 4-d q, k, v, mask");
  TORCH_CHECK(k.sizes() == v.sizes() && k.strides() == v.strides(), "torchchat::attention: k, v");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0,
              "torchchat::attention: shapes ", q.sizes(), " ", k.sizes());
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == k.size(3) && q.stride(3) == 1,
              "torchchat::attention: rows of k, v must be contiguous");
  TORCH_CHECK(q.size(3) <= 256, "torchchat::attention: head dim ", q.size(3), " > 256");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "torchchat::attention: dtypes differ");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.size(2) == q.size(2) &&
                  mask.size(3) == k.size(2) && mask.stride(3) == 1 &&
                  (mask.size(0) == 1 || mask.size(0) == q.size(0)),
              "torchchat::attention: mask ", mask.sizes());
  auto out = at::empty(q.sizes(), q.options());
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  switch (q.scalar_type()) {
    case at::kFloat: attention_impl<float>(q, k, v, mask, scale, out); break;
    case at::kBFloat16: attention_impl<c10::BFloat16>(q, k, v, mask, scale, out); break;
    case at::kHalf: attention_impl<c10::Half>(q, k, v, mask, scale, out); break;
    default: TORCH_CHECK(false, "torchchat::attention: unsupported dtype ", q.scalar_type());
  }
#endif
  return out;
}

// One token through L layers (decode_layers_impl): x (1, 1, D), the token's embedding; norms 2L
// weights (attention, feed-forward) of x's dtype; freqs (len, Dh/2, 2) fp32; mask (len, len)
// bool; pos (1,) int64; caches (1, KVH, len, Dh) of x's dtype, written at pos; w 7 weights a
// layer (wq, wk, wv, wo, w1, w3, w2) of one kind, s their scales (none for float weights; int4's
// blocked, see int4_scale_offset).
at::Tensor decode_layers_cpu(const at::Tensor& x, at::TensorList norms, double eps,
                             const at::Tensor& freqs, const at::Tensor& mask,
                             const at::Tensor& pos, at::TensorList kc, at::TensorList vc,
                             at::TensorList w, at::TensorList s, int64_t kind, int64_t group,
                             int64_t n_heads) {
  const char* op = "torchchat::decode_layers";
  TORCH_CHECK(kind >= kFloatW && kind <= kInt4DynW, op, ": unknown weight kind ", kind);
  TORCH_CHECK(kAvx512 && (kind < kInt4W || kInt4Fast), op, " needs AVX-512",
              kind >= kInt4W ? " and AVX512-BF16" : "");
  const int64_t L = kc.size();
  TORCH_CHECK(L > 0 && (int64_t)vc.size() == L && (int64_t)norms.size() == 2 * L &&
                  (int64_t)w.size() == 7 * L &&
                  (int64_t)s.size() == (kind == kFloatW ? 0 : 7 * L),
              op, ": ", L, " layers need ", L, " v caches, ", 2 * L, " norms, ", 7 * L,
              " weights and ", kind == kFloatW ? 0 : 7 * L, " scales tensors");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": unsupported dtype ", dt);
  const int64_t D = x.size(-1);
  TORCH_CHECK(x.numel() == D && x.is_contiguous(), op, ": x must be one row, got ", x.sizes());
  const auto& k0 = kc[0];
  TORCH_CHECK(k0.dim() == 4 && k0.size(0) == 1, op, ": caches must be (1, KVH, len, Dh)");
  const int64_t KVH = k0.size(1), len = k0.size(2), Dh = k0.size(3);
  for (int64_t l = 0; l < L; ++l)
    TORCH_CHECK(kc[l].sizes() == k0.sizes() && vc[l].sizes() == k0.sizes() &&
                    kc[l].is_contiguous() && vc[l].is_contiguous() &&
                    kc[l].scalar_type() == dt && vc[l].scalar_type() == dt,
                op, ": caches must all be contiguous ", k0.sizes(), " of x's dtype");
  for (const auto& n : norms)
    TORCH_CHECK(n.numel() == D && n.is_contiguous() && n.scalar_type() == dt, op,
                ": norm weights must be (", D, ") of x's dtype");
  TORCH_CHECK(Dh <= 256 && Dh % 2 == 0 && n_heads > 0 && n_heads % KVH == 0, op, ": ", n_heads,
              " heads over ", KVH, " kv heads of ", Dh);
  TORCH_CHECK(pos.numel() == 1 && pos.scalar_type() == at::kLong, op, ": pos must be one int64");
  const int64_t p = pos.data_ptr<int64_t>()[0];
  TORCH_CHECK(p >= 0 && p < len, op, ": position ", p, " is outside the cache (", len, ")");
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.is_contiguous() && freqs.dim() == 3 &&
                  freqs.size(0) >= len && freqs.size(1) == Dh / 2 && freqs.size(2) == 2,
              op, ": freqs must be fp32 (", len, ", ", Dh / 2, ", 2)");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) >= len &&
                  mask.size(1) == len && mask.stride(1) == 1,
              op, ": mask must be bool (", len, ", ", len, ")");
  const int64_t Nq = n_heads * Dh, Nkv = KVH * Dh, F = w[4].size(0);
  const bool bf16_scales = kind != kFloatW && s[0].scalar_type() == at::kBFloat16;
  // Each weight's shape (out N, in K0) and kind; returns the columns its kernel reads.
  auto check = [&](int64_t i, int64_t N, int64_t K0) -> int64_t {
    const auto& m = w[i];
    if (kind == kFloatW) {
      TORCH_CHECK(m.dim() == 2 && m.scalar_type() == dt && m.stride(1) == 1 && m.size(0) == N &&
                      m.size(1) == K0,
                  op, ": weight ", i, " must be (", N, ", ", K0, ") of x's dtype, got ", m.sizes());
      return K0;
    }
    if (kind == kInt8W) {
      const int64_t Kw = m.size(1);
      TORCH_CHECK(m.dim() == 2 && m.is_contiguous() && m.scalar_type() == at::kChar &&
                      m.size(0) == N && Kw >= K0 && Kw % 16 == 0 &&
                      (group == 0 || (group >= 16 && (group & (group - 1)) == 0 && Kw % group == 0)),
                  op, ": int8 weight ", i, " must be contiguous (", N, ", >= ", K0, "), got ",
                  m.sizes());
      TORCH_CHECK(s[i].is_contiguous() && s[i].numel() == N * (group ? Kw / group : 1) &&
                      s[i].scalar_type() == (bf16_scales ? at::kBFloat16 : at::kFloat),
                  op, ": scales ", i, " do not match their weight");
      return Kw;
    }
    const int64_t Kw = check_int4(op, m, s[i], group, 2);
    TORCH_CHECK(m.size(0) == N && Kw >= K0, op, ": int4 weight ", i, " must be (", N, ", >= ",
                K0, " / 2), got ", m.sizes());
    return Kw;
  };
  std::vector<float> qkv(Nq + 2 * Nkv), o(D), g(2 * F), y2(D);
  std::vector<Projection> proj;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t b = 7 * l;
    auto mat = [&](int64_t i, int64_t N, float* y, int64_t ldy) {
      return Matrix{w[i].data_ptr(), w[i].stride(0), kind == kFloatW ? nullptr : s[i].data_ptr(),
                    N, y, ldy, kind >= kInt4W};
    };
    const int64_t Kq = check(b, Nq, D);
    TORCH_CHECK(check(b + 1, Nkv, D) == Kq && check(b + 2, Nkv, D) == Kq, op,
                ": q, k, v weights differ in width");
    const int64_t Ko = check(b + 3, D, Nq);
    const int64_t K1 = check(b + 4, F, D);
    TORCH_CHECK(check(b + 5, F, D) == K1, op, ": w1, w3 differ in width");
    const int64_t K2 = check(b + 6, D, F);
    const int64_t ldq = Nq + 2 * Nkv;
    proj.push_back({{mat(b, Nq, qkv.data(), ldq), mat(b + 1, Nkv, qkv.data() + Nq, ldq),
                     mat(b + 2, Nkv, qkv.data() + Nq + Nkv, ldq)}, Kq});
    proj.push_back({{mat(b + 3, D, o.data(), D)}, Ko});
    proj.push_back({{mat(b + 4, F, g.data(), 2 * F), mat(b + 5, F, g.data() + F, 2 * F)}, K1});
    proj.push_back({{mat(b + 6, D, y2.data(), D)}, K2});
  }
  const bool bf16_out = kind >= kInt4W && dt == at::kFloat;
  [[maybe_unused]] const StepArgs a{L, D, n_heads, KVH, Dh, F, len, p, kind, group, bf16_scales, bf16_out,
                   (float)eps};
  [[maybe_unused]] const float* fr = freqs.data_ptr<float>() + p * Dh;
  [[maybe_unused]] const bool* mrow = mask.data_ptr<bool>() + p * mask.stride(0);
  std::vector<float> h(D);
  auto out = at::empty(x.sizes(), x.options());
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const T* xp = x.data_ptr<T>();
    for (int64_t d = 0; d < D; ++d) h[d] = (float)xp[d];
    if (Dh <= 64)
      decode_layers_impl<T, 4>(a, h.data(), norms, fr, mrow, kc, vc, proj, qkv, o, g, y2);
    else if (Dh <= 128)
      decode_layers_impl<T, 8>(a, h.data(), norms, fr, mrow, kc, vc, proj, qkv, o, g, y2);
    else
      decode_layers_impl<T, 16>(a, h.data(), norms, fr, mrow, kc, vc, proj, qkv, o, g, y2);
    T* dst = out.data_ptr<T>();
    for (int64_t d = 0; d < D; ++d) dst[d] = T(h[d]);
  };
  if (dt == at::kFloat)
    run(0.0f);
  else if (dt == at::kBFloat16)
    run(c10::BFloat16(0.0f));
  else
    run(c10::Half(0.0f));
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY(torchchat, m) {
  m.def("simd_level() -> int", &simd_level);
  // linear*: x times each weight of the list; their results side by side, (M, all their rows)
  m.def("linear(Tensor x, Tensor[] w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor[] w, Tensor[] scales, int group) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor[] w, Tensor[] scales_and_zeros, int group) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def(
      "decode_layers(Tensor x, Tensor[] norms, float eps, Tensor freqs, Tensor mask, Tensor pos, "
      "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor[] w, Tensor[] scales, int kind, "
      "int group, int n_heads) -> Tensor");
  m.def("gemm_int4(Tensor x, Tensor w, Tensor scales_and_zeros, int group) -> Tensor");
  m.def("gemm_int8(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("gemm_8da4w(Tensor x, Tensor w, Tensor scales_and_zeros, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchchat, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("linear_int8", &linear_int8_cpu);
  m.impl("linear_int4", &linear_int4_cpu);
  m.impl("attention", &attention_cpu);
  m.impl("decode_layers", &decode_layers_cpu);
  m.impl("gemm_int4", &gemm_int4_cpu);
  m.impl("gemm_int8", &gemm_int8_cpu);
  m.impl("gemm_8da4w", &gemm_8da4w_cpu);
}
