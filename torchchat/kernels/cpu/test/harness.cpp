// Every instruction set's kernels against the scalar reference (cpu/common/reference.cpp), with
// no torch: random inputs, odd sizes, edge values (zeros, large and tiny magnitudes, fully
// masked rows). Prints "N kernels, M cases, F failures" per level and exits non-zero on any
// failure. Built by cpu/test/build.py (plain g++, optionally under sanitizers; or cross-built
// for aarch64 and run under qemu). A level whose table depends on optional CPU features is run
// as dispatch picks it, and once more with its base table if that differs ("neon_base": NEON
// without I8MM and BF16, from neon::kernels(false, false); "avx512_base": AVX-512 without BF16
// and VNNI, its int4 and 8da4w entries from the AVX2 table), so a CPU or an emulator that has
// every feature tests both. First, the decode step's team of threads (team.h) on std::threads.
//
// Tolerances, per kernel (the reference sums in index order; SIMD kernels in other orders):
//   linear_f32/bf16/f16, int8         |got - ref| <= 1e-5 * sum_k |w_k x_k| (fp32 sums reordered)
//   linear_int4                       |got - ref| <= 2e-6 * 152 * 0.1 * sum_k |x_k| (codes as 128 + q,
//                                     scales <= 0.1)
//   attend_f32                        |got - ref| <= (2e-6 + 1.2e-6 * max_t sum|q k_t| / sqrt(D))
//                                     * max |v| (exp polynomial ~2e-7; scores summed in
//                                     another order)
//   attend_bf16 / attend_f16          one ulp of the output type + the attend_f32 bound
//   int4_dequantize_block_t           one bf16 ulp (an FMA against a multiply and an add)
//   int8_to_bf16, quantize_rows_8da4w bit-exact (same arithmetic)
//   gemm_8da4w                        |got - ref| <= 1e-5 * s_a (sum |s_w u w| + |128 + z_a| |R|)
//   quantize_rows_q8, gemm_int4_q8    bit-exact (same arithmetic, the same fma order); NaN where
//   gemm_ggml_q8                      the reference has NaN (a block holding an inf or a NaN)
//   ggml_dequantize                   exact (and the reference bit-equal to ggml: tests/gguf)
//   linear_ggml                       |got - ref| <= 2e-5 * sum_k |w_k x_k| (w, x dequantized), and
//                                     the reference within 1e-5 of that of the exact float64 sum
//                                     (plus Q4_1/Q5_1's fp16 s term: ggml_ref.cpp)
//   gemm_f32                          bit-exact (one FMA chain an output, k ascending)
//   linear_int8_q8                    |got - ref| <= 1e-5 * sum_b |d_b s| sum_{k in b} |w_k q_k|
//                                     (exact block sums, fp32 sums over blocks reordered)
//   gemm_int8_q8                      bit-exact (the same fma order)
//   silu                              |got - ref| <= 1e-6 |ref| + 1e-30 (exp polynomial ~2e-7)
//   gemm_ggml (through the common      |got - ref| <= 2e-5 * sum_k |w_k x_k|, ref the reference's
//   driver: x quantized there)         linear_ggml on the same Q8_K rows; nothing past the rows
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../common/ggml.h"
#include "../common/kernels.h"
#include "../common/step.h"
#include "../common/team.h"

namespace torchchat::cpu::neon {  // test-only: the base tables (null where not built)
__attribute__((weak)) const Kernels* kernels(bool i8mm, bool bf16);
}
namespace torchchat::cpu::avx512 {
__attribute__((weak)) const Kernels* kernels(bool bf16, bool vnni, const Kernels* fill);
}

namespace {

using namespace torchchat::cpu;

std::mt19937 rng(1234);

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
int64_t pick(std::initializer_list<int64_t> v) { return v.begin()[rng() % v.size()]; }

// Random values with edge cases mixed in: zeros, large and tiny magnitudes.
std::vector<float> values(int64_t n, float scale = 1.0f) {
  std::vector<float> v(n);
  for (auto& x : v) {
    const int kind = rng() % 20;
    x = kind == 0 ? 0.0f : kind == 1 ? uniform(-1e3f, 1e3f) : kind == 2 ? uniform(-1e-6f, 1e-6f)
                                                            : uniform(-scale, scale);
  }
  return v;
}

template <typename T>
std::vector<T> as(const std::vector<float>& v) {
  std::vector<T> out;
  for (float x : v) out.push_back(T(x));
  return out;
}

template <typename T>
struct Aligned {  // 64-byte aligned buffer, as the caller of gemm_8da4w provides
  T* p;
  explicit Aligned(int64_t n) : p((T*)std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64)) {}
  ~Aligned() { std::free(p); }
};

struct Tally {
  const char* level;
  int kernels = 0;
  long cases = 0, failures = 0;
  std::string kernel;

  void start(const char* name) {
    kernel = name;
    ++kernels;
  }
  // One output: got against the reference want within bound.
  void check(float got, float want, float bound, const std::string& where) {
    ++cases;
    if (std::fabs(got - want) <= bound || (got == want)) return;
    if (++failures <= 10)
      std::printf("FAIL %s %s %s: got %.9g, reference %.9g, bound %.3g\n", level, kernel.c_str(),
                  where.c_str(), got, want, bound);
  }
};

std::string shape(std::initializer_list<int64_t> dims) {
  std::string s;
  for (int64_t d : dims) s += (s.empty() ? "" : "x") + std::to_string(d);
  return s;
}

template <typename T, typename Fn>
void check_float(Tally& t, const char* name, Fn kernel, Fn reference) {
  t.start(name);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t M = 1 + rng() % kMaxRows, K = pick({1, 15, 16, 17, 64, 100, 257, 768}),
                  N = pick({1, 5, 37, 70}), ld = K + rng() % 3;
    const auto x = as<T>(values(M * K)), w = as<T>(values(N * ld));
    std::vector<float> y(M * N), yr(M * N);
    Matrix a{w.data(), ld, nullptr, N, y.data(), N}, ar = a;
    ar.y = yr.data();
    const int64_t n0 = rng() % N;
    kernel(x.data(), M, K, a, n0, N);
    reference(x.data(), M, K, ar, n0, N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < N; ++n) {
        float mag = 0.0f;
        for (int64_t k = 0; k < K; ++k) mag += std::fabs((float)x[m * K + k] * (float)w[n * ld + k]);
        t.check(y[m * N + n], yr[m * N + n], 1e-5f * mag + 1e-30f, shape({M, K, N, m, n}));
      }
  }
}

template <typename S, typename Fn>
void check_int8(Tally& t, const char* name, Fn kernel, Fn reference) {
  t.start(name);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t M = 1 + rng() % kMaxRows, K = pick({16, 48, 64, 256, 768}),
                  group = pick({0, 16, 32, 64}), N = pick({1, 7, 40});
    if (group && K % group) continue;
    const int64_t G = group ? K / group : 1;
    const auto x = values(M * K);
    std::vector<int8_t> w(N * K);
    for (auto& v : w) v = (int8_t)(int)(rng() % 256 - 128);
    const auto s = as<S>(values(N * G, 0.05f));
    std::vector<float> y(M * N), yr(M * N);
    Matrix a{w.data(), K, s.data(), N, y.data(), N}, ar = a;
    ar.y = yr.data();
    kernel(x.data(), M, K, group, a, 0, N);
    reference(x.data(), M, K, group, ar, 0, N);
    ++t.cases;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float mag = 0.0f;
        for (int64_t k = 0; k < K; ++k)
          mag += std::fabs(w[n * K + k] * (float)s[n * G + (group ? k / group : 0)] * x[m * K + k]);
        t.check(y[m * N + n], yr[m * N + n], 1e-5f * mag + 1e-30f, shape({M, K, N, group, m, n}));
      }
  }
}

// An int8 case on 8-bit activations: x (M, K) quantized by the reference's quantize_rows_q8
// (edge blocks where M > 2: zeros, a full-scale code, an inf), int8 weights (N, K) of every code
// -128..127, scales S (N, G).
template <typename S>
struct Int8Q8Case {
  Int8Q8Case(const Kernels& ref, int64_t M, int64_t K, int64_t N, int64_t G)
      : q(M * K), w(N * K), d(M * K / 32), e(M * K / 32), s(as<S>(values(N * G, 0.05f))) {
    auto x = values(M * K, 3.0f);
    if (M > 2) {
      for (int64_t k = 0; k < 32; ++k) x[k] = 0.0f;
      x[K] = 127.0f;
      x[2 * K + K - 1] = INFINITY;
    }
    ref.quantize_rows_q8(x.data(), K, K, q.data(), d.data(), e.data(), 0, M);
    for (auto& v : w) v = (int8_t)(int)(rng() % 256 - 128);
  }
  std::vector<int8_t> q, w;
  std::vector<float> d, e;
  std::vector<S> s;
};

// int8 decode in integers, on Int8Q8Case's inputs.
template <typename S>
void check_int8_q8(Tally& t, const Kernels& kt, const Kernels& ref, bool bf16_scales) {
  t.kernel = bf16_scales ? "linear_int8_q8 (bf16 scales)" : "linear_int8_q8";
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t M = 1 + rng() % kMaxRows, K = pick({32, 96, 256, 288, 768}),
                  group = pick({0, 32, 64, 128, 256}), N = pick({1, 7, 40}), nb = K / 32;
    if (group && K % group) continue;
    const int64_t G = group ? K / group : 1;
    const Int8Q8Case<S> c(ref, M, K, N, G);
    const auto &q = c.q, &w = c.w;
    const auto &d = c.d, &e = c.e;
    const auto& s = c.s;
    std::vector<float> y(M * N, -7.0f), yr(M * N);
    Matrix a{w.data(), K, s.data(), N, y.data(), N}, ar = a;
    ar.y = yr.data();
    const int64_t n0 = N > 1 ? 1 : 0;  // a range that does not start at row 0
    kt.linear_int8_q8(q.data(), d.data(), M, K, group, bf16_scales, a, n0, N);
    ref.linear_int8_q8(q.data(), d.data(), M, K, group, bf16_scales, ar, n0, N);
    ++t.cases;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const std::string where = shape({M, K, N, group, m, n});
        if (n < n0) {
          t.check(y[m * N + n], -7.0f, 0.0f, where + " outside the range");
          continue;
        }
        float mag = 0.0f;  // sum_b |d_b s I_b| with |I_b| bounded by the sum of |products|
        for (int64_t b = 0; b < nb; ++b) {
          float blk = 0.0f;
          for (int64_t k = 32 * b; k < 32 * b + 32; ++k)
            blk += std::fabs((float)w[n * K + k] * (float)q[m * K + k]);
          const float sc = (float)s[n * G + (group ? 32 * b / group : 0)];
          mag += std::fabs(d[m * nb + b] * sc) * blk;
        }
        const float a = y[m * N + n], b = yr[m * N + n];
        t.check(std::isnan(b) ? (float)!std::isnan(a) : a, std::isnan(b) ? 0.0f : b,
                1e-5f * mag + 1e-30f, where);
      }
  }
}

// int8 prefill in integers: bit-exact against the reference (the same fma order), on x quantized
// by quantize_rows_q8 (edge blocks as above), a block range not starting at block 0 and a short
// last block; rows outside the range untouched.
template <typename S>
void check_int8_q8_gemm(Tally& t, const Kernels& kt, const Kernels& ref, bool bf16_scales) {
  t.kernel = bf16_scales ? "gemm_int8_q8 (bf16 scales)" : "gemm_int8_q8";
  for (int trial = 0; trial < 30; ++trial) {
    const int64_t M = pick({1, 3, 9, 64, 70}), K = pick({32, 96, 256, 768}),
                  group = pick({0, 32, 64, 128, 256}), N = pick({7, 64, 80, 130}), nb = K / 32;
    if (group && K % group) continue;
    const int64_t G = group ? K / group : 1, blocks = (N + 63) / 64, b0 = blocks > 1 ? 1 : 0;
    const Int8Q8Case<S> c(ref, M, K, N, G);
    const auto &q = c.q, &w = c.w;
    const auto &d = c.d, &e = c.e;
    const auto& s = c.s;
    std::vector<float> y(M * N, -7.0f), yr(M * N, -7.0f);
    Aligned<int8_t> wbuf(K * 64);
    Aligned<float> f(M * 64), sbuf(G * 128);
    const Buffers8da4w buf{wbuf.p, f.p, sbuf.p};
    Matrix a{w.data(), K, s.data(), N, y.data(), N}, ar = a;
    ar.y = yr.data();
    kt.gemm_int8_q8(q.data(), d.data(), e.data(), M, K, group, bf16_scales, a, b0, blocks, buf);
    ref.gemm_int8_q8(q.data(), d.data(), e.data(), M, K, group, bf16_scales, ar, b0, blocks, buf);
    ++t.cases;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const float a = y[m * N + n], b = yr[m * N + n];
        const std::string where = shape({M, K, N, group, m, n});
        if (n < b0 * 64) t.check(a, -7.0f, 0.0f, where + " outside the range");
        t.check(std::isnan(b) ? (float)!std::isnan(a) : a, std::isnan(b) ? 0.0f : b, 0.0f, where);
      }
  }
}

// SiLU: within 1e-6 relative (+1e-30) of x / (1 + exp(-x)) for finite x of every magnitude
// (the reference gives -0 where exp(-x) overflows, the kernels ~1e-36), NaN kept NaN; odd
// lengths, and nothing written past n.
void check_silu(Tally& t, const Kernels& kt, const Kernels& ref) {
  t.start("silu");
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t n = pick({1, 3, 7, 8, 15, 16, 17, 100, 2048});
    auto x = values(n, (float)pick({1, 5, 30, 100}));
    if (n > 4) x[0] = 0.0f, x[1] = NAN, x[2] = -88.5f, x[3] = 1e-30f, x[4] = -1e-30f;
    std::vector<float> y(n + 1, -7.0f), yr(n);
    kt.silu(x.data(), n, y.data());
    ref.silu(x.data(), n, yr.data());
    for (int64_t i = 0; i < n; ++i) {
      const float a = y[i], b = yr[i];
      const std::string where = shape({n, i});
      if (std::isnan(b)) {
        t.check((float)!std::isnan(a), 0.0f, 0.0f, where + " NaN");
        continue;
      }
      t.check(a, b, 1e-6f * std::fabs(b) + 1e-30f, where);
    }
    t.check(y[n], -7.0f, 0.0f, shape({n}) + " past n");
  }
}

std::vector<bf16_t> int4_scales(int64_t n) {  // (scale, zero) pairs
  std::vector<bf16_t> sz;
  for (int64_t i = 0; i < n; ++i) {
    sz.push_back(bf16_t(uniform(1e-3f, 0.1f)));
    sz.push_back(bf16_t(uniform(-0.5f, 0.5f)));
  }
  return sz;
}

std::vector<uint8_t> bytes(int64_t n) {
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = (uint8_t)rng();
  return v;
}

void check_int4(Tally& t, const Kernels& kt, const Kernels& ref) {
  t.start("linear_int4");
  for (int trial = 0; trial < 30; ++trial) {
    const int64_t M = 1 + rng() % kMaxRows, group = pick({32, 64, 128}), K = group * pick({1, 3, 6}),
                  N = pick({16, 48, 64, 80, 176}), G = K / group;
    const bool blocked = rng() % 2;
    const auto x = as<bf16_t>(values(M * K));
    const auto w = bytes(N * K / 2);
    const auto sz = int4_scales(G * N);
    std::vector<float> xsum(M * G, 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xsum[m * G + k / group] += (float)x[m * K + k];
    std::vector<float> y(M * N), yr(M * N);
    Matrix a{w.data(), K / 2, sz.data(), N, y.data(), N, blocked}, ar = a;
    ar.y = yr.data();
    const int64_t blocks = (N + 63) / 64;
    kt.linear_int4(x.data(), xsum.data(), M, K, group, a, 0, blocks);
    ref.linear_int4(x.data(), xsum.data(), M, K, group, ar, 0, blocks);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float mag = 0.0f;  // the 128 + q trick: every |x| counted up to 152 times a scale <= 0.1
        for (int64_t k = 0; k < K; ++k) mag += 152.0f * std::fabs((float)x[m * K + k]);
        t.check(y[m * N + n], yr[m * N + n], 2e-6f * mag * 0.1f + 1e-30f,
                shape({M, K, N, group, blocked, m, n}));
      }
  }
}

template <typename T, typename Fn>
void check_attend(Tally& t, const char* name, Fn kernel, Fn reference, float ulp) {
  t.start(name);
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t D = pick({16, 48, 64, 100, 128, 200, 256}), len = pick({1, 5, 16, 33, 300}),
                  ts = D + rng() % 4;
    // Every third trial reads scattered rows (a paged pool): position i at row index[i] of a
    // pool of twice the positions, in shuffled order.
    const bool paged = trial % 3 == 2;
    const int64_t pool = paged ? 2 * len : len;
    std::vector<int64_t> index(pool);
    for (int64_t i = 0; i < pool; ++i) index[i] = i;
    if (paged)
      for (int64_t i = pool - 1; i > 0; --i) std::swap(index[i], index[rng() % (i + 1)]);
    const CacheRows rows{ts, paged ? index.data() : nullptr};
    const auto q = as<T>(values(D, 0.5f)), k = as<T>(values(pool * ts, 0.5f)),
               v = as<T>(values(pool * ts));
    std::vector<char> mc(len);
    const int mode = rng() % 4;  // causal-like prefix, holes, everything closed, everything open
    for (int64_t i = 0; i < len; ++i)
      mc[i] = mode == 0 ? i <= len / 2 : mode == 1 ? rng() % 3 == 0 : mode == 2 ? 0 : 1;
    const bool* m = reinterpret_cast<const bool*>(mc.data());
    const auto span = open_span(m, len);
    std::vector<T> out(D), outr(D);
    std::vector<float> p(len + 16), pr(len + 16);
    kernel(q.data(), k.data(), v.data(), rows, m, span.first, span.second, D,
           1.0f / std::sqrt((float)D), out.data(), p.data());
    // the reference reads a gathered copy: scattered rows must give what contiguous ones give
    std::vector<T> kc(len * ts), vc(len * ts);
    for (int64_t i = 0; i < len; ++i)
      for (int64_t d = 0; d < ts; ++d) {
        kc[i * ts + d] = rows.at(k.data(), i)[d];
        vc[i * ts + d] = rows.at(v.data(), i)[d];
      }
    reference(q.data(), kc.data(), vc.data(), CacheRows{ts}, m, span.first, span.second, D,
              1.0f / std::sqrt((float)D), outr.data(), pr.data());
    // A score summed in another order moves by up to a few ulps of sum |q k| (x scale): the
    // output, a softmax-weighted mean of v rows, by up to twice that times max |v|.
    float vmax = 0.0f, qk = 0.0f;
    for (int64_t i = span.first; i < span.second; ++i) {
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        vmax = std::max(vmax, std::fabs((float)vc[i * ts + d]));
        s += std::fabs((float)q[d] * (float)kc[i * ts + d]);
      }
      qk = std::max(qk, s / std::sqrt((float)D));
    }
    const float score = 6e-7f * qk;
    for (int64_t d = 0; d < D; ++d)
      t.check((float)out[d], (float)outr[d],
              ulp * std::fabs((float)outr[d]) + (2e-6f + 2 * score) * vmax + 1e-30f,
              shape({D, len, mode, paged, d}));
  }
}

void check_prefill_bf16(Tally& t, const Kernels& kt, const Kernels& ref) {
  t.start("int4_dequantize_block_t");
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t group = pick({32, 64}), K = group * pick({1, 2, 5}), N = pick({64, 80, 176}),
                  ldo = 64 + rng() % 8;
    const auto w = bytes(N * K / 2);
    const auto sz = int4_scales((K / group) * N);
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
      const int64_t bs = std::min<int64_t>(64, N - n0);
      std::vector<bf16_t> out(K * ldo, bf16_t(0.0f)), outr(K * ldo, bf16_t(0.0f));
      kt.int4_dequantize_block_t(w.data(), sz.data(), N, K, group, n0, out.data(), ldo);
      ref.int4_dequantize_block_t(w.data(), sz.data(), N, K, group, n0, outr.data(), ldo);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = 0; r < bs; ++r)
          t.check(out[k * ldo + r], outr[k * ldo + r], std::fabs((float)outr[k * ldo + r]) / 128,
                  shape({N, K, group, n0, k, r}));
    }
  }
  t.start("int8_to_bf16");
  for (int64_t K : {1, 15, 16, 17, 100, 4000}) {
    std::vector<int8_t> w(K);
    for (auto& v : w) v = (int8_t)(int)(rng() % 256 - 128);
    std::vector<bf16_t> out(K), outr(K);
    kt.int8_to_bf16(w.data(), K, out.data());
    ref.int8_to_bf16(w.data(), K, outr.data());
    for (int64_t k = 0; k < K; ++k) t.check(out[k], outr[k], 0.0f, shape({K, k}));
  }
}

void check_8da4w(Tally& t, const Kernels& kt, const Kernels& ref) {
  t.kernels += kt.features & kQ8Decode ? 3 : 2;  // quantize_rows_8da4w, gemm_8da4w, linear_8da4w
  for (int trial = 0; trial < 30; ++trial) {
    const int64_t M = pick({1, 2, 3, 4, 9, 64, 70}), group = pick({32, 64}),
                  K = group * pick({1, 2, 4}), Kx = K - pick({0, 0, 5, 16}),
                  N = pick({16, 64, 80, 128});
    auto x = values(M * Kx, 3.0f);
    for (int64_t m = 0; m < M; ++m)  // skewed rows: zero points far from 0
      for (int64_t k = 0; k < Kx; ++k) x[m * Kx + k] += (float)(m % 5);
    std::vector<uint8_t> u(M * K), ur(M * K);
    std::vector<float> sa(M), za(M), sar(M), zar(M);
    t.kernel = "quantize_rows_8da4w";
    kt.quantize_rows_8da4w(x.data(), Kx, K, u.data(), sa.data(), za.data(), 0, M);
    ref.quantize_rows_8da4w(x.data(), Kx, K, ur.data(), sar.data(), zar.data(), 0, M);
    for (int64_t m = 0; m < M; ++m) {
      t.check(sa[m], sar[m], 0.0f, shape({M, K, m}) + " scale");
      t.check(za[m], zar[m], 0.0f, shape({M, K, m}) + " zero");
      for (int64_t k = 0; k < K; ++k) t.check(u[m * K + k], ur[m * K + k], 0.0f, shape({M, K, m, k}));
    }
    const auto w = bytes(N * K / 2);
    auto sz = int4_scales((K / group) * N);
    Aligned<int8_t> wbuf(K * 64);
    Aligned<float> f(M * 64), sbuf((K / group) * 64);
    const Buffers8da4w buf{wbuf.p, f.p, sbuf.p};
    std::vector<float> y(M * N), yr(M * N);
    const int64_t blocks = (N + 63) / 64;
    t.kernel = "gemm_8da4w";
    kt.gemm_8da4w(ur.data(), M, K, sar.data(), zar.data(), w.data(), sz.data(), N, group, y.data(),
                  0, blocks, buf);
    ref.gemm_8da4w(ur.data(), M, K, sar.data(), zar.data(), w.data(), sz.data(), N, group,
                   yr.data(), 0, blocks, buf);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float mag = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
          const float s = std::fabs((float)sz[((k / group) * N + n) * 2]);
          mag += s * 15.0f * (ur[m * K + k] + std::fabs(128.0f + zar[m]));
        }
        t.check(y[m * N + n], yr[m * N + n], 1e-5f * sar[m] * mag + 1e-30f,
                   shape({M, K, N, group, m, n}));
      }
    if (!(kt.features & kQ8Decode) || M > kMaxRows) continue;
    t.kernel = "linear_8da4w";  // decode's entry: the reference's sums, either scale layout
    for (const bool blocked : {false, true}) {
      std::vector<float> yd(M * N), ydr(M * N);
      Matrix a{w.data(), K / 2, sz.data(), N, yd.data(), N, blocked}, ar = a;
      ar.y = ydr.data();
      kt.linear_8da4w(ur.data(), sar.data(), zar.data(), M, K, group, a, 0, blocks);
      ref.linear_8da4w(ur.data(), sar.data(), zar.data(), M, K, group, ar, 0, blocks);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          float mag = 0.0f;
          for (int64_t k = 0; k < K; ++k) {
            const float s = std::fabs((float)sz[int4_scale_offset(blocked, k / group, K / group, N,
                                                                  n / 64 * 64,
                                                                  std::min<int64_t>(64, N - n / 64 * 64)) +
                                                2 * (n % 64)]);
            mag += s * 15.0f * (ur[m * K + k] + std::fabs(128.0f + zar[m]));
          }
          t.check(yd[m * N + n], ydr[m * N + n], 1e-5f * sar[m] * mag + 1e-30f,
                  shape({M, K, N, group, blocked, m, n}));
        }
    }
  }
}

void check_int4_q8(Tally& t, const Kernels& kt, const Kernels& ref) {
  t.kernels += kt.features & kQ8Decode ? 3 : 2;  // quantize_rows_q8, gemm_int4_q8, linear_int4_q8
  for (int trial = 0; trial < 30; ++trial) {
    const int64_t M = pick({1, 2, 3, 4, 9, 64, 70}), group = pick({32, 64, 128}),
                  K = group * pick({1, 2, 4}), Kx = K - pick({0, 0, 5, 16, 40}) % K,
                  N = pick({16, 64, 80, 128}), nb = K / 32;
    auto x = values(M * Kx, 3.0f);
    if (M > 2) {  // a zero block, a tie (x / d = 0.5 * odd), an inf and a NaN
      for (int64_t k = 0; k < std::min<int64_t>(32, Kx); ++k) x[k] = 0.0f;
      x[Kx] = 127.0f, x[Kx + 1] = 2.5f;
      x[2 * Kx] = INFINITY, x[2 * Kx + Kx - 1] = NAN;
    }
    std::vector<int8_t> q(M * K), qr(M * K);
    std::vector<float> d(M * nb), e(M * nb), dr(M * nb), er(M * nb);
    t.kernel = "quantize_rows_q8";
    kt.quantize_rows_q8(x.data(), Kx, K, q.data(), d.data(), e.data(), 0, M);
    ref.quantize_rows_q8(x.data(), Kx, K, qr.data(), dr.data(), er.data(), 0, M);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t b = 0; b < nb; ++b) {  // bit-exact, NaN where the reference has NaN
        const float dd = d[m * nb + b], ddr = dr[m * nb + b];
        t.check(std::isnan(ddr) ? (float)!std::isnan(dd) : dd, std::isnan(ddr) ? 0.0f : ddr, 0.0f,
                shape({M, K, m, b}) + " d");
        t.check(std::isnan(ddr) ? 0.0f : e[m * nb + b], std::isnan(ddr) ? 0.0f : er[m * nb + b],
                0.0f, shape({M, K, m, b}) + " e");
      }
      for (int64_t k = 0; k < K; ++k) t.check(q[m * K + k], qr[m * K + k], 0.0f, shape({M, K, m, k}));
    }
    const auto w = bytes(N * K / 2);
    auto sz = int4_scales((K / group) * N);
    Aligned<int8_t> wbuf(K * 64);
    Aligned<float> f(M * 64), sbuf((K / group) * 128);
    const Buffers8da4w buf{wbuf.p, f.p, sbuf.p};
    std::vector<float> y(M * N), yr(M * N);
    const int64_t blocks = (N + 63) / 64;
    t.kernel = "gemm_int4_q8";  // the same fma order as the reference: bit-exact
    kt.gemm_int4_q8(qr.data(), dr.data(), er.data(), M, K, w.data(), sz.data(), N, group, y.data(),
                    0, blocks, buf);
    ref.gemm_int4_q8(qr.data(), dr.data(), er.data(), M, K, w.data(), sz.data(), N, group,
                     yr.data(), 0, blocks, buf);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const float a = y[m * N + n], b = yr[m * N + n];
        t.check(std::isnan(b) ? (float)!std::isnan(a) : a, std::isnan(b) ? 0.0f : b, 0.0f,
                shape({M, K, N, group, m, n}));
      }
    if (!(kt.features & kQ8Decode) || M > kMaxRows) continue;
    t.kernel = "linear_int4_q8";  // decode's entry: bit-exact too, either scale layout
    for (const bool blocked : {false, true}) {
      std::vector<float> yd(M * N), ydr(M * N);
      Matrix a{w.data(), K / 2, sz.data(), N, yd.data(), N, blocked}, ar = a;
      ar.y = ydr.data();
      kt.linear_int4_q8(qr.data(), dr.data(), er.data(), M, K, group, a, 0, blocks);
      ref.linear_int4_q8(qr.data(), dr.data(), er.data(), M, K, group, ar, 0, blocks);
      for (int64_t i = 0; i < M * N; ++i) {
        const float a = yd[i], b = ydr[i];
        t.check(std::isnan(b) ? (float)!std::isnan(a) : a, std::isnan(b) ? 0.0f : b, 0.0f,
                shape({M, K, N, group, blocked, i / N, i % N}));
        if (!blocked)  // = the prefill entry's sums
          t.check(std::isnan(b) ? 0.0f : yr[i], std::isnan(b) ? 0.0f : b, 0.0f,
                  shape({M, K, N, group, i / N, i % N}) + " vs gemm");
      }
    }
  }
}

// The weight types and the offsets of their blocks' fp16 scales (random bits there could be
// NaN or infinite: they get finite values, zero among them).
const std::vector<std::pair<int32_t, std::vector<size_t>>> kGgmlTypes = {
    {kGgmlQ4_0, {offsetof(BlockQ4_0, d)}},
    {kGgmlQ4_1, {offsetof(BlockQ4_1, d), offsetof(BlockQ4_1, m)}},
    {kGgmlQ5_0, {offsetof(BlockQ5_0, d)}},
    {kGgmlQ5_1, {offsetof(BlockQ5_1, d), offsetof(BlockQ5_1, m)}},
    {kGgmlQ8_0, {offsetof(BlockQ8_0, d)}},
    {kGgmlQ2_K, {offsetof(BlockQ2_K, d), offsetof(BlockQ2_K, dmin)}},
    {kGgmlQ3_K, {offsetof(BlockQ3_K, d)}},
    {kGgmlQ4_K, {offsetof(BlockQ4_K, d), offsetof(BlockQ4_K, dmin)}},
    {kGgmlQ5_K, {offsetof(BlockQ5_K, d), offsetof(BlockQ5_K, dmin)}},
    {kGgmlQ6_K, {offsetof(BlockQ6_K, d)}},
};

// N rows of K values of a weight type, ld bytes apart: random codes, finite scales.
std::vector<uint8_t> ggml_weights(int32_t type, const std::vector<size_t>& halves, int64_t N,
                                  int64_t K, int64_t ld) {
  const GgmlLayout& l = *ggml_layout(type);
  auto w = bytes(N * ld);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < K / l.block; ++b)
      for (size_t off : halves) {
        const uint16_t h = fp16_t(rng() % 8 ? uniform(-0.1f, 0.1f) : 0.0f).bits;
        std::memcpy(&w[n * ld + b * l.bytes + off], &h, 2);
      }
  return w;
}

// A row of activation blocks (Q8_0, Q8_1, Q8_K) back to K floats: d * q.
std::vector<float> ggml_activations(int32_t act, const uint8_t* row, int64_t K) {
  std::vector<float> x(K);
  for (int64_t k = 0; k < K; ++k) {
    if (act == kGgmlQ8_K) {
      const auto& b = reinterpret_cast<const BlockQ8_K*>(row)[k / 256];
      x[k] = b.d * (float)b.qs[k % 256];
    } else if (act == kGgmlQ8_1) {
      const auto& b = reinterpret_cast<const BlockQ8_1*>(row)[k / 32];
      x[k] = half_to_float(b.d) * (float)b.qs[k % 32];
    } else {
      const auto& b = reinterpret_cast<const BlockQ8_0*>(row)[k / 32];
      x[k] = half_to_float(b.d) * (float)b.qs[k % 32];
    }
  }
  return x;
}

// Q4_1 and Q5_1's min term takes s = d * sum(q) with d before its fp16 rounding, then rounded
// itself: |m| (2^-10 |s| + 2^-25 (|sum q| + 1)) a block away from the dequantized values' sum.
double ggml_s_error(int32_t type, const uint8_t* w, const uint8_t* xrow, int64_t K) {
  if (type != kGgmlQ4_1 && type != kGgmlQ5_1) return 0.0;
  const int64_t wbytes = ggml_layout(type)->bytes;
  double e = 0.0;
  for (int64_t b = 0; b < K / 32; ++b) {
    const auto& x = reinterpret_cast<const BlockQ8_1*>(xrow)[b];
    uint16_t m;  // Q4_1 and Q5_1 both start d, m
    std::memcpy(&m, w + b * wbytes + 2, 2);
    int sum = 0;
    for (int k = 0; k < 32; ++k) sum += x.qs[k];
    e += std::fabs(half_to_float(m)) *
         (std::ldexp(std::fabs(half_to_float(x.s)), -10) + std::ldexp(std::abs(sum) + 1.0, -25));
  }
  return e;
}

void check_ggml(Tally& t, const Kernels& kt, const Kernels& ref) {
  t.kernels += 2;  // ggml_dequantize, linear_ggml
  for (const auto& [type, halves] : kGgmlTypes) {
    const GgmlLayout& l = *ggml_layout(type);
    for (int trial = 0; trial < 6; ++trial) {
      const int64_t M = 1 + rng() % kMaxRows, N = pick({1, 5, 16, 37}), n0 = rng() % N,
                    K = l.block == 32 ? 32 * pick({1, 3, 8, 24, 64}) : 256 * pick({1, 2, 3, 8}),
                    ld = ggml_row_bytes(type, K) + 2 * (rng() % 3),  // rows via a.ld
                    xld = ggml_row_bytes(l.act, K) + 4 * (rng() % 2);
      const auto w = ggml_weights(type, halves, N, K, ld);
      const std::string name = shape({type, M, K, N});
      // Rows [n0, N) and one float past them: a kernel must write no further.
      std::vector<float> wf((N - n0 + 1) * K, -7.0f), wr = wf;
      t.kernel = "ggml_dequantize";
      kt.ggml_dequantize(type, w.data(), ld, K, n0, N, wf.data());
      ref.ggml_dequantize(type, w.data(), ld, K, n0, N, wr.data());
      for (int64_t i = 0; i < (N - n0 + 1) * K; ++i)
        t.check(wf[i], wr[i], 0.0f, name + " " + std::to_string(i));

      const auto x = values(M * K);
      std::vector<uint8_t> xq(M * xld);
      for (int64_t m = 0; m < M; ++m) ggml_quantize_row(l.act, &x[m * K], K, &xq[m * xld]);
      const int64_t ldy = N + 3;
      std::vector<float> y(M * ldy, -7.0f), yr = y;
      Matrix a{w.data(), ld, nullptr, N, y.data(), ldy}, ar = a;
      a.type = ar.type = type;
      ar.y = yr.data();
      t.kernel = "linear_ggml";
      kt.linear_ggml(xq.data(), xld, M, K, a, n0, N);
      ref.linear_ggml(xq.data(), xld, M, K, ar, n0, N);
      for (int64_t m = 0; m < M; ++m) {
        const auto xf = ggml_activations(l.act, &xq[m * xld], K);
        for (int64_t n = 0; n < ldy; ++n) {
          const std::string where = name + " " + shape({m, n});
          if (n < n0 || n >= N) {  // outside the rows asked for: untouched
            t.check(y[m * ldy + n], -7.0f, 0.0f, where);
            continue;
          }
          double exact = 0.0, mag = 0.0;
          for (int64_t k = 0; k < K; ++k) {
            exact += (double)wr[(n - n0) * K + k] * xf[k];
            mag += std::fabs((double)wr[(n - n0) * K + k] * xf[k]);
          }
          t.check(y[m * ldy + n], yr[m * ldy + n], 2e-5f * (float)mag + 1e-30f, where);
          const double s_error = ggml_s_error(type, &w[n * ld], &xq[m * xld], K);
          t.check(yr[m * ldy + n], (float)exact, (float)(1e-5 * mag + s_error) + 1e-30f,
                  where + " reference against the exact sum");
        }
      }
    }
  }
}

void serial(int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& f) { f(0, n); }

// Prefill's integer GEMM through cpu::gemm_ggml (which quantizes x as ggml_quantize_row does)
// against the reference's linear_ggml on those rows: tokens in partial 16s, every type it runs.
void check_ggml_gemm(Tally& t, const Kernels& kt, const Kernels& ref) {
  t.kernels += 1;
  t.kernel = "gemm_ggml";
  for (const auto& [type, halves] : kGgmlTypes) {
    if (!(kt.gemm_ggml_types >> type & 1)) continue;
    for (int trial = 0; trial < 6; ++trial) {
      const int64_t M = pick({9, 16, 17, 40, 70}), N = pick({1, 5, 16, 37}),
                    K = 256 * pick({1, 2, 3, 8}), ld = ggml_row_bytes(type, K) + 2 * (rng() % 3),
                    xld = ggml_row_bytes(kGgmlQ8_K, K), ldy = N + 3;
      const auto w = ggml_weights(type, halves, N, K, ld);
      const auto x = values(M * K);
      std::vector<float> y(M * ldy, -7.0f), yr = y;
      Matrix a{w.data(), ld, nullptr, N, y.data(), ldy}, ar = a;
      a.type = ar.type = type;
      ar.y = yr.data();
      if (!gemm_ggml(kt, serial, x.data(), M, K, a)) {
        t.check(0.0f, 1.0f, 0.0f, shape({type}) + " not run though gemm_ggml_types has it");
        continue;
      }
      std::vector<uint8_t> xq(M * xld);
      for (int64_t m = 0; m < M; ++m) ggml_quantize_row(kGgmlQ8_K, &x[m * K], K, &xq[m * xld]);
      ref.linear_ggml(xq.data(), xld, M, K, ar, 0, N);
      std::vector<float> wr(N * K);
      ref.ggml_dequantize(type, w.data(), ld, K, 0, N, wr.data());
      for (int64_t m = 0; m < M; ++m) {
        const auto xf = ggml_activations(kGgmlQ8_K, &xq[m * xld], K);
        for (int64_t n = 0; n < ldy; ++n) {
          const std::string where = shape({type, M, K, N, m, n});
          if (n >= N) {
            t.check(y[m * ldy + n], -7.0f, 0.0f, where);
            continue;
          }
          double mag = 0.0;
          for (int64_t k = 0; k < K; ++k) mag += std::fabs((double)wr[n * K + k] * xf[k]);
          t.check(y[m * ldy + n], yr[m * ldy + n], 2e-5f * (float)mag + 1e-30f, where);
        }
      }
    }
  }
}

// GGUF prefill in integers (gemm_ggml_q8, each type of the table's gemm_ggml_q8_types): random
// blocks (finite fp16 scales, zero among them), rows ld >= the row's bytes apart, outputs ldy
// apart (the columns past N must stay untouched), x quantized by the reference quantize_rows_q8
// (per 32 values; for 16-value blocks each half keeps its d, e from its own codes); bit-exact
// against the reference (the same fma order).
void check_gemm_ggml_q8(Tally& t, const Kernels& kt, const Kernels& ref) {
  t.kernels += 1;
  t.kernel = "gemm_ggml_q8";
  for (const auto& [type, halves] : kGgmlTypes) {
    if (!(kt.gemm_ggml_q8_types >> type & 1)) continue;
    for (int trial = 0; trial < 12; ++trial) {
      const int64_t sb = ggml_layout(type)->block, bk = ggml_q8_block(type);
      const int64_t M = pick({9, 16, 17, 40, 70}), N = pick({1, 5, 16, 37, 64, 100}),
                    K = sb * (sb == 256 ? pick({1, 2, 3}) : pick({1, 2, 3, 8})), nb = K / bk,
                    ld = ggml_row_bytes(type, K) + 2 * (rng() % 3), ldy = N + 3;
      const auto w = ggml_weights(type, halves, N, K, ld);
      const auto x = values(M * K);
      std::vector<int8_t> q(M * K);
      std::vector<float> d32(M * K / 32), e32(M * K / 32), d(M * nb), e(M * nb);
      ref.quantize_rows_q8(x.data(), K, K, q.data(), d32.data(), e32.data(), 0, M);
      for (int64_t i = 0; i < M * nb; ++i) {
        int32_t sum = 0;
        for (int64_t k = 0; k < bk; ++k) sum += q[i * bk + k];
        d[i] = d32[i * bk / 32];
        e[i] = bk == 32 ? e32[i] : d[i] * (float)sum;
      }
      std::vector<float> y(M * ldy, -7.0f), yr = y;
      Matrix a{w.data(), ld, nullptr, N, y.data(), ldy}, ar = a;
      a.type = ar.type = type;
      ar.y = yr.data();
      Aligned<int8_t> wbuf(K * 64);
      Aligned<float> f(M * 64), sbuf(nb * 128);
      const Buffers8da4w buf{wbuf.p, f.p, sbuf.p};
      kt.gemm_ggml_q8(q.data(), d.data(), e.data(), M, K, a, 0, (N + 63) / 64, buf);
      ref.gemm_ggml_q8(q.data(), d.data(), e.data(), M, K, ar, 0, (N + 63) / 64, buf);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < ldy; ++n)
          t.check(y[m * ldy + n], yr[m * ldy + n], 0.0f, shape({type, M, K, N, m, n}));
    }
  }
}

// Prefill's fp32 GEMM (gemm_f32): random and edge values, odd token counts (panels of 16 part
// full), rows ldw >= K apart, outputs ldy apart (the columns past N stay untouched); bit-exact
// against the reference, and the reference against one FMA chain a output over x as given (the
// packing, pack_x_f32, checked with it).
void check_gemm_f32(Tally& t, const Kernels& kt, const Kernels& ref) {
  t.start("gemm_f32");
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t M = pick({1, 7, 16, 17, 33, 64}), K = pick({0, 1, 15, 16, 17, 100, 257, 768}),
                  N = pick({1, 5, 6, 7, 37, 70}), ldw = K + rng() % 3, ldy = N + rng() % 3;
    const auto x = values(M * K), w = values(N * ldw);
    const int64_t panels = (M + kF32Panel - 1) / kF32Panel;
    Aligned<float> xp(panels * kF32Panel * K + 1);
    pack_x_f32(x.data(), M, K, xp.p, 0, panels);
    std::vector<float> y(M * ldy, -7.0f), yr(M * ldy, -7.0f);
    kt.gemm_f32(xp.p, M, K, w.data(), ldw, N, y.data(), ldy);
    ref.gemm_f32(xp.p, M, K, w.data(), ldw, N, yr.data(), ldy);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < ldy; ++n) {
        const std::string where = shape({M, K, N, m, n});
        if (n >= N) {
          t.check(y[m * ldy + n], -7.0f, 0.0f, where + " past N");
          continue;
        }
        float f = 0.0f;
        for (int64_t k = 0; k < K; ++k) f = std::fma(x[m * K + k], w[n * ldw + k], f);
        t.check(yr[m * ldy + n], f, 0.0f, where + " reference");
        t.check(y[m * ldy + n], yr[m * ldy + n], 0.0f, where);
      }
  }
}

// One level's table against the reference: every entry its feature bits turn on.
Tally run(const Kernels& kt, const Kernels& ref) {
  Tally t{kt.name};
  if (kt.features & kFewRows) {
    check_float<float>(t, "linear_f32", kt.linear_f32, ref.linear_f32);
    check_float<bf16_t>(t, "linear_bf16", kt.linear_bf16, ref.linear_bf16);
    check_float<fp16_t>(t, "linear_f16", kt.linear_f16, ref.linear_f16);
    check_int8<float>(t, "linear_int8_f32s", kt.linear_int8_f32s, ref.linear_int8_f32s);
    check_int8<bf16_t>(t, "linear_int8_bf16s", kt.linear_int8_bf16s, ref.linear_int8_bf16s);
    check_attend<float>(t, "attend_f32", kt.attend_f32, ref.attend_f32, 0.0f);
    check_attend<bf16_t>(t, "attend_bf16", kt.attend_bf16, ref.attend_bf16, 1.0f / 128);
    check_attend<fp16_t>(t, "attend_f16", kt.attend_f16, ref.attend_f16, 1.0f / 1024);
    check_silu(t, kt, ref);
  }
  if (kt.features & kBf16) {
    check_int4(t, kt, ref);
    check_prefill_bf16(t, kt, ref);
  }
  if (kt.features & kInt8Gemm) check_8da4w(t, kt, ref);
  if (kt.features & kInt4Q8Gemm) check_int4_q8(t, kt, ref);
  if ((kt.features & kInt4Q8Gemm) && kt.gemm_ggml_q8_types) check_gemm_ggml_q8(t, kt, ref);
  if (kt.features & kGgml) check_ggml(t, kt, ref);
  if (kt.features & kGgmlGemm) check_ggml_gemm(t, kt, ref);
  if (kt.features & kF32Gemm) check_gemm_f32(t, kt, ref);
  if (kt.features & kInt8Q8) {
    t.start("linear_int8_q8");
    check_int8_q8<float>(t, kt, ref, false);
    check_int8_q8<bf16_t>(t, kt, ref, true);
  }
  if (kt.features & kInt8Q8Gemm) {
    t.start("gemm_int8_q8");
    check_int8_q8_gemm<float>(t, kt, ref, false);
    check_int8_q8_gemm<bf16_t>(t, kt, ref, true);
  }
  return t;
}

}  // namespace

// The decode step's team (team.h) on std::threads of 1-3 members: each loop's indices run once
// (the grain respected), and what member 0 writes alone is what every member reads after.
long team_failures() {
  long failures = 0;
  for (int size : {1, 2, 3}) {
    Team team;
    std::vector<int> hits(1000, 0), few(5, 0);
    std::atomic<long> wrong{0};
    int value = -1;
    auto body = [&](int id) {
      Member member(team, id, size);
      for (int round = 0; round < 200; ++round) {
        team_one([&] { value = round; });
        if (value != round) ++wrong;
        team_for(1000, 7, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) ++hits[i];
        });
        team_for(5, 10, [&](int64_t b, int64_t e) {  // under one grain: member 0 alone
          if (id != 0) ++wrong;
          for (int64_t i = b; i < e; ++i) ++few[i];
        });
      }
    };
    std::vector<std::thread> threads;
    for (int id = 1; id < size; ++id) threads.emplace_back(body, id);
    body(0);
    for (auto& t : threads) t.join();
    long bad = wrong;
    for (int h : hits) bad += h != 200;
    for (int h : few) bad += h != 200;
    std::printf("team of %d: %ld failures\n", size, bad);
    failures += bad;
  }
  return failures;
}

int main() {
  const Kernels& ref = scalar_kernels();
  long failures = team_failures();
  auto report = [&](const std::string& label, const Kernels& kt) {
    Tally t = run(kt, ref);  // the scalar level against itself checks the harness's own setup
    std::printf("%s: %d kernels, %ld cases, %ld failures\n", label.c_str(), t.kernels, t.cases,
                t.failures);
    failures += t.failures;
  };
  for (const auto& level : levels()) {
    const Kernels* kt = select_kernels(level);
    report(level, *kt);
    if (level == "neon" && torchchat::cpu::neon::kernels != nullptr &&
        torchchat::cpu::neon::kernels(false, false) != kt)
      report("neon_base", *torchchat::cpu::neon::kernels(false, false));
    if (level == "avx512") {
      const Kernels* base = torchchat::cpu::avx512::kernels(false, false, select_kernels("avx2"));
      if (base != kt) report("avx512_base", *base);
    }
  }
  return failures ? 1 : 0;
}
