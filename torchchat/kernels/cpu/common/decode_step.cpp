// A whole decode step: one token through all of a model's layers in one call
// (torchchat::decode_layers), or one token of each of up to kMaxRows sequences in a paged pool
// (torchchat::decode_layers_paged): RMSNorm, q/k/v, RoPE, the cache write, attention, wo and the
// residual, RMSNorm, w1/w3, SiLU gate, w2 and the residual, layer after layer, on the kernel
// table's linears and attention. Eager modules spend ~2-3 ms a token of Python and dispatch on
// stories110M int4 (2 threads: 3.6-4.5 ms against this step's 1.6); the compiled graph of ~130
// kernels measured 0-34% slower than this step on the same weights, after 25-90 s of compiling.
// The arithmetic is the eager modules': every value rounded to the activation dtype where they
// round it (after each linear, norm, RoPE, gate and residual add).
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "layer_math.h"
#include "step.h"
#include "team.h"

namespace torchchat::cpu {
namespace {

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
  std::vector<bf16_t> xb;
};

// y = x @ W.T for the projection's matrices (results in their Matrix.y) for M rows of x, K0
// values each (int8 and int4 kernels take them zero-padded to the projection's K).
template <typename T>
void project(const Kernels& kt, ParallelFor pf, const StepArgs& a, const Projection& p,
             const float* x, int64_t K0, StepScratch& sc) {
  const int64_t M = a.M;
  if (a.kind == kFloatW && std::is_same_v<T, float>) {
    linear_float(kt, pf, DType::f32, x, M, K0, p.mats);
  } else if (a.kind == kFloatW) {
    std::vector<T> xt(x, x + M * K0);  // T from float: exact (values are already T's)
    linear_float(kt, pf, std::is_same_v<T, bf16_t> ? DType::bf16 : DType::f16, xt.data(), M, K0,
                 p.mats);
  } else if (a.kind == kGgmlW) {
    linear_ggml(kt, pf, x, M, K0, p.mats);
  } else if (a.kind == kInt8W) {
    sc.xf.assign(M * p.K, 0.0f);
    for (int64_t m = 0; m < M; ++m) std::copy(x + m * K0, x + (m + 1) * K0, &sc.xf[m * p.K]);
    linear_int8(kt, pf, a.bf16_scales, sc.xf.data(), M, p.K, a.group, p.mats);
  } else if (a.q8) {
    linear_int4_q8(kt, pf, a.kind == kInt4DynW, x, M, K0, p.K, a.group, p.mats);
  } else {
    sc.xb.assign(M * p.K, bf16_t(0.0f));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K0; ++k) sc.xb[m * p.K + k] = bf16_t(x[m * K0 + k]);
    linear_int4(kt, pf, sc.xb.data(), M, p.K, a.group, p.mats);
  }
}

template <typename T>
auto attend_kernel(const Kernels& kt) {
  if constexpr (std::is_same_v<T, float>)
    return kt.attend_f32;
  else if constexpr (std::is_same_v<T, bf16_t>)
    return kt.attend_bf16;
  else
    return kt.attend_f16;
}

// The buffers a step's members share: the normed rows, the attention's input and output, the
// feed-forward's gated activations.
template <typename T>
struct Shared {
  explicit Shared(const StepArgs& a)
      : xn(a.M * std::max(a.D, a.F)), att(a.M * a.H * a.Dh), act(a.M * a.F), qt(a.M * a.H * a.Dh),
        yt(a.M * a.H * a.Dh) {}
  std::vector<float> xn, att, act;
  std::vector<T> qt, yt;
};

// The layers, run alike by every member of a team (team.h): the loops split over the members,
// the serial parts on member 0.
template <typename T>
void layers(const Kernels& kt, const StepArgs& a, const StepData& data,
            const std::vector<Projection>& proj, float* h, float* qkv, float* o, float* g,
            float* y2, Shared<T>& s) {
  const ParallelFor pf = team_for;
  const int64_t D = a.D, H = a.H, KVH = a.KVH, Dh = a.Dh, F = a.F, M = a.M;
  const int64_t Nq = H * Dh, Nkv = KVH * Dh, group = H / KVH, ldq = Nq + 2 * Nkv;
  const bool dyn = a.kind == kInt4DynW && !a.q8;  // fake-quantized for the bf16 kernel
  // Each row's open span of its mask row, and its cache rows; attention tasks of at least ~64K
  // multiply-adds (a short cache stays on one thread: waking the others costs more).
  std::vector<std::pair<int64_t, int64_t>> span(M);
  std::vector<CacheRows> rows(M);
  int64_t widest = 1;
  for (int64_t m = 0; m < M; ++m) {
    span[m] = open_span(data.mask + m * data.mask_ld, data.len);
    rows[m] = CacheRows{data.row_stride, data.index ? data.index + m * data.index_ld : nullptr};
    widest = std::max(widest, span[m].second - span[m].first);
  }
  const int64_t grain = std::max<int64_t>(1, 65536 / (widest * Dh));
  const float scale = 1.0f / std::sqrt((float)Dh);
  auto out = [](float v) { return round_to<T>(v); };  // a projection's output as the modules'
  const auto attend = attend_kernel<T>(kt);
  float *xn = s.xn.data(), *att = s.att.data(), *act = s.act.data();
  T *qt = s.qt.data(), *yt = s.yt.data();
  StepScratch sc;  // each member's own
  auto norm_rows = [&](const void* w) {
    for (int64_t m = 0; m < M; ++m) {
      rms_norm_row<T>(h + m * D, static_cast<const T*>(w), D, a.eps, xn + m * D);
      if (dyn) fake_quantize_row<T>(xn + m * D, D);
    }
  };
  team_one([&] { norm_rows(data.norms[0]); });
  for (int64_t l = 0; l < a.L; ++l) {
    const Projection* p = proj.data() + 4 * l;
    // attention
    project<T>(kt, pf, a, p[0], xn, D, sc);
    T* kp = static_cast<T*>(data.k_caches[l]);
    T* vp = static_cast<T*>(data.v_caches[l]);
    team_one([&] {
      for (int64_t i = 0; i < M * ldq; ++i) qkv[i] = out(qkv[i]);
      for (int64_t m = 0; m < M; ++m) {
        float* r = qkv + m * ldq;
        rope_row<T>(r, H + KVH, Dh, data.freqs + data.pos[m] * Dh);  // q and k heads: one run
        const int64_t at = rows[m].at(kp, data.pos[m]) - kp;
        for (int64_t j = 0; j < KVH; ++j)
          for (int64_t d = 0; d < Dh; ++d) {
            kp[at + j * data.head_stride + d] = T(r[Nq + j * Dh + d]);
            vp[at + j * data.head_stride + d] = T(r[Nq + Nkv + j * Dh + d]);
          }
        for (int64_t i = 0; i < Nq; ++i) qt[m * Nq + i] = T(r[i]);
      }
    });
    const bool* mask = data.mask;
    const int64_t mask_ld = data.mask_ld, hs = data.head_stride;
    const auto* sp = span.data();
    const auto* rw = rows.data();
    pf(M * H, grain, [=](int64_t i0, int64_t i1) {
      std::vector<float> pbuf(widest + 16);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t m = i / H, hh = i % H, j = hh / group, lo = sp[m].first;
        attend(qt + m * Nq + hh * Dh, kp + j * hs, vp + j * hs, rw[m], mask + m * mask_ld, lo,
               sp[m].second, Dh, scale, yt + m * Nq + hh * Dh, pbuf.data());
      }
    });
    team_one([&] {
      for (int64_t i = 0; i < M * Nq; ++i) att[i] = (float)yt[i];
      if (dyn)
        for (int64_t m = 0; m < M; ++m) fake_quantize_row<T>(att + m * Nq, Nq);
    });
    project<T>(kt, pf, a, p[1], att, Nq, sc);
    // the residual, then feed-forward
    team_one([&] {
      for (int64_t i = 0; i < M * D; ++i) h[i] = round_to<T>(h[i] + out(o[i]));
      norm_rows(data.norms[2 * l + 1]);
    });
    project<T>(kt, pf, a, p[2], xn, D, sc);
    // The gate over the members, SiLU on the level's vector exp (F exps a token: with
    // std::exp ~10 us a layer on stories110M, 2 threads)
    pf(M * F, 512, [&](int64_t i0, int64_t i1) {
      float g1[256], s1[256];
      for (int64_t c0 = i0; c0 < i1; c0 += 256) {
        const int64_t c1 = std::min(i1, c0 + 256);
        for (int64_t i = c0; i < c1; ++i) g1[i - c0] = out(g[(i / F) * 2 * F + i % F]);
        kt.silu(g1, c1 - c0, s1);
        for (int64_t i = c0; i < c1; ++i) {
          const float g3 = out(g[(i / F) * 2 * F + F + i % F]);
          act[i] = round_to<T>(round_to<T>(s1[i - c0]) * g3);
        }
      }
    });
    if (dyn)
      team_one([&] {
        for (int64_t m = 0; m < M; ++m) fake_quantize_row<T>(act + m * F, F);
      });
    project<T>(kt, pf, a, p[3], act, F, sc);
    team_one([&] {  // the residual, then the next layer's attention norm
      for (int64_t i = 0; i < M * D; ++i) h[i] = round_to<T>(h[i] + out(y2[i]));
      if (l + 1 < a.L) norm_rows(data.norms[2 * (l + 1)]);
    });
  }
}

template <typename T>
void run_layers(const Kernels& kt, RunTeam run, int threads, const StepArgs& a,
                const StepData& data, const std::vector<Projection>& proj, float* h, float* qkv,
                float* o, float* g, float* y2) {
  Shared<T> shared(a);
  Team team;
  run(threads, [&](int id, int size) {
    Member member(team, id, size);
    layers<T>(kt, a, data, proj, h, qkv, o, g, y2, shared);
  });
}

}  // namespace

void decode_step(const Kernels& kt, RunTeam run, int threads, DType dt, const StepArgs& a,
                 const StepData& data, const std::vector<Projection>& proj, float* h, float* qkv,
                 float* o, float* g, float* y2) {
  switch (dt) {
    case DType::f32: run_layers<float>(kt, run, threads, a, data, proj, h, qkv, o, g, y2); break;
    case DType::bf16: run_layers<bf16_t>(kt, run, threads, a, data, proj, h, qkv, o, g, y2); break;
    case DType::f16: run_layers<fp16_t>(kt, run, threads, a, data, proj, h, qkv, o, g, y2); break;
  }
}

}  // namespace torchchat::cpu
