#include "kernels/dlcm_ops.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/parallel.h"
#include "core/rng.h"
#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "kernels/tile_gemm.h"

#include "kernels/isa_target.h"  // last include: the variant's target and namespace
#include "kernels/simd.h"
#include "kernels/amx.h"

namespace dlcm::ops::DLCM_ISA_NS {

namespace {

inline bool is_forced(const i32* tokens, i32 bos_id, i64 n, i64 t) {
  return t == 0 || (tokens != nullptr && tokens[n] == bos_id);
}

inline float dotf(const float* a, const float* b, i64 n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (i64 i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float a, const float* x, i64 n) {
#pragma omp simd
  for (i64 i = 0; i < n; ++i) y[i] += a * x[i];
}

void check_segments(const Segments& sg, i64 B, i64 L, const char* who) {
  DLCM_CHECK(sg.B == B && sg.L == L, who, ": Segments were built for B=", sg.B, ", L=", sg.L,
             " but the call has B=", B, ", L=", L);
  DLCM_CHECK(i64(sg.seg.size()) == B * L && i64(sg.count.size()) == B &&
                 i64(sg.start.size()) == B * sg.Mmax && i64(sg.len.size()) == B * sg.Mmax &&
                 i64(sg.forced.size()) == B * sg.Mmax,
             who, ": Segments are inconsistent (call Segments::build)");
}

}  // namespace

// ============================================================================================
// 1. Router probability
// ============================================================================================

// The router's cosine with floored norms (|a| = na, |b| = nb) and its probability: one
// definition for router_prob_forward and router_prob_rows, so their bits agree.
static inline float router_cos(const float* a, float na, const float* b, float nb, i64 ds) {
  return dotf(a, b, ds) / (std::max(na, kRouterNormEps) * std::max(nb, kRouterNormEps));
}
static inline float router_p(float c) { return std::clamp((1.f - c) * 0.5f, 0.f, 1.f); }

void router_prob_forward(float* p, float* cache, const float* q, const float* k, const i32* tokens,
                         i32 bos_id, i64 B, i64 L, i64 ds) {
  DLCM_CHECK(B >= 0 && L >= 0 && ds > 0, "router_prob_forward: bad shape B=", B, " L=", L,
             " ds=", ds);
  const i64 N = B * L;
#pragma omp parallel for schedule(static) if(parallel_worth(N * ds))
  for (i64 n = 0; n < N; ++n) {
    cache[n * 3 + 0] = std::sqrt(dotf(q + n * ds, q + n * ds, ds));
    cache[n * 3 + 1] = std::sqrt(dotf(k + n * ds, k + n * ds, ds));
  }
#pragma omp parallel for schedule(static) if(parallel_worth(N * ds))
  for (i64 n = 0; n < N; ++n) {
    const i64 t = n % L;
    const float c = t > 0 ? router_cos(q + (n - 1) * ds, cache[(n - 1) * 3 + 0], k + n * ds,
                                       cache[n * 3 + 1], ds)
                          : 0.f;
    cache[n * 3 + 2] = c;
    p[n] = is_forced(tokens, bos_id, n, t) ? 1.f : router_p(c);
  }
}

void router_prob_rows(float* p, const float* q_prev, const float* q, const float* k, i64 n,
                      i64 ds) {
  DLCM_CHECK(n >= 0 && ds > 0, "router_prob_rows: bad shape n=", n, " ds=", ds);
  parallel_for(n, parallel_worth(n * ds), [&](i64 t) {
    const float* a = t == 0 ? q_prev : q + (t - 1) * ds;
    const float* b = k + t * ds;
    p[t] = router_p(router_cos(a, std::sqrt(dotf(a, a, ds)), b, std::sqrt(dotf(b, b, ds)), ds));
  });
}

void router_prob_backward(float* dq, float* dk, const float* dp, const float* cache,
                          const float* q, const float* k, const i32* tokens, i32 bos_id, i64 B,
                          i64 L, i64 ds) {
  DLCM_CHECK(B >= 0 && L >= 0 && ds > 0, "router_prob_backward: bad shape B=", B, " L=", L,
             " ds=", ds);
  const i64 N = B * L;
  // gc[n] = dL/dcos for the pair (q_{n-1}, k_n); 0 where forced or clamped.
  std::vector<float> gc(N);
#pragma omp parallel for schedule(static) if(parallel_worth(N * ds))
  for (i64 n = 0; n < N; ++n) {
    const i64 t = n % L;
    float g = 0.f;
    if (!is_forced(tokens, bos_id, n, t)) {
      const float raw = (1.f - cache[n * 3 + 2]) * 0.5f;
      if (raw >= 0.f && raw <= 1.f) g = -0.5f * dp[n];
    }
    gc[n] = g;
  }
  // Output row n receives dq from the pair at n+1 and dk from the pair at n; each row is
  // written by one iteration only, so dq == dk (aliasing) is safe.
#pragma omp parallel for schedule(static) if(parallel_worth(N * ds))
  for (i64 n = 0; n < N; ++n) {
    const i64 t = n % L;
    if (t + 1 < L && gc[n + 1] != 0.f) {  // pair (a = q_n, b = k_{n+1})
      const float ra = cache[n * 3 + 0], rb = cache[(n + 1) * 3 + 1];
      const float na = std::max(ra, kRouterNormEps), nb = std::max(rb, kRouterNormEps);
      const float c = cache[(n + 1) * 3 + 2];
      const float g = gc[n + 1];
      const float cb = g / (na * nb);
      const float ca = (ra > kRouterNormEps) ? -g * c / (na * na) : 0.f;
      const float* a = q + n * ds;
      const float* bb = k + (n + 1) * ds;
      float* o = dq + n * ds;
#pragma omp simd
      for (i64 i = 0; i < ds; ++i) o[i] += cb * bb[i] + ca * a[i];
    }
    if (t > 0 && gc[n] != 0.f) {  // pair (a = q_{n-1}, b = k_n)
      const float ra = cache[(n - 1) * 3 + 0], rb = cache[n * 3 + 1];
      const float na = std::max(ra, kRouterNormEps), nb = std::max(rb, kRouterNormEps);
      const float c = cache[n * 3 + 2];
      const float g = gc[n];
      const float ca = g / (na * nb);
      const float cb = (rb > kRouterNormEps) ? -g * c / (nb * nb) : 0.f;
      const float* a = q + (n - 1) * ds;
      const float* bb = k + n * ds;
      float* o = dk + n * ds;
#pragma omp simd
      for (i64 i = 0; i < ds; ++i) o[i] += ca * a[i] + cb * bb[i];
    }
  }
}

// ============================================================================================
// 2. Boundary decisions
// ============================================================================================

float boundary_prob(float p, float alpha) {
  if (!(p > 0.f)) return 0.f;  // also NaN
  if (p >= 1.f) return 1.f;
  const double lp = std::log(double(p)) - std::log1p(-double(p));
  const double x = lp / double(alpha);
  return float(1.0 / (1.0 + std::exp(-x)));
}

void sample_boundaries(uint8_t* b, const float* p, const i32* tokens, i32 bos_id, i64 B, i64 L,
                       float alpha, uint64_t seed, uint64_t step, i64 row_offset) {
  DLCM_CHECK(alpha > 0.f && std::isfinite(alpha), "router.alpha must be a positive number, got ",
             alpha);
  DLCM_CHECK(B >= 0 && L >= 0 && row_offset >= 0, "sample_boundaries: bad shape");
#pragma omp parallel for schedule(static) if(parallel_worth(B * L * 16))
  for (i64 r = 0; r < B; ++r) {
    for (i64 t = 0; t < L; ++t) {
      const i64 n = r * L + t;
      if (is_forced(tokens, bos_id, n, t)) {
        b[n] = 1;
        continue;
      }
      const float pr = boundary_prob(p[n], alpha);
      const float u = counter_uniform(seed, step, uint64_t(row_offset + r), uint64_t(t));
      b[n] = (u < pr) ? 1 : 0;
    }
  }
}

void threshold_boundaries(uint8_t* b, const float* p, const i32* tokens, i32 bos_id, i64 B, i64 L,
                          float tau) {
  DLCM_CHECK(B >= 0 && L >= 0, "threshold_boundaries: bad shape");
  DLCM_CHECK(!std::isnan(tau), "router.tau must be a number");
  const i64 N = B * L;
#pragma omp parallel for schedule(static) if(parallel_worth(N))
  for (i64 n = 0; n < N; ++n)
    b[n] = (is_forced(tokens, bos_id, n, n % L) || p[n] >= tau) ? 1 : 0;
}

// ============================================================================================
// 3. Segments
// ============================================================================================

// Segments::build and Segments::total are in segments.cpp (compiled once: members of a
// class outside the per-variant namespace).

// ============================================================================================
// 4. Mean pooling
// ============================================================================================

void pool_mean_forward(float* pooled, const float* H, const Segments& sg, i64 d) {
  check_segments(sg, sg.B, sg.L, "pool_mean_forward");
  DLCM_CHECK(d > 0, "pool_mean_forward: d must be > 0");
  const i64 B = sg.B, L = sg.L, Mmax = sg.Mmax;
#pragma omp parallel for schedule(dynamic, 16) if(parallel_worth(B * L * d))
  for (i64 sl = 0; sl < B * Mmax; ++sl) {
    const i64 r = sl / Mmax;
    float* o = pooled + sl * d;
    std::fill(o, o + d, 0.f);
    const i64 ln = sg.len[sl];
    if (ln == 0) continue;
    const i64 st = sg.start[sl];
    for (i64 t = st; t < st + ln; ++t) axpy(o, 1.f, H + (r * L + t) * d, d);
    const float inv = 1.f / float(ln);
#pragma omp simd
    for (i64 i = 0; i < d; ++i) o[i] *= inv;
  }
}

void pool_first_forward(float* pooled, const float* H, const Segments& sg, i64 d) {
  check_segments(sg, sg.B, sg.L, "pool_first_forward");
  DLCM_CHECK(d > 0, "pool_first_forward: d must be > 0");
  const i64 L = sg.L, Mmax = sg.Mmax;
#pragma omp parallel for schedule(static) if(parallel_worth(sg.B * Mmax * d))
  for (i64 sl = 0; sl < sg.B * Mmax; ++sl) {
    float* o = pooled + sl * d;
    if (sg.len[sl] == 0)
      std::fill(o, o + d, 0.f);
    else
      std::memcpy(o, H + ((sl / Mmax) * L + sg.start[sl]) * d, sizeof(float) * d);
  }
}

void pool_first_backward(float* dH, const float* dpooled, const Segments& sg, i64 d) {
  check_segments(sg, sg.B, sg.L, "pool_first_backward");
  DLCM_CHECK(d > 0, "pool_first_backward: d must be > 0");
  const i64 L = sg.L, Mmax = sg.Mmax;
  // Distinct concepts start at distinct tokens: every dH row is written at most once.
#pragma omp parallel for schedule(static) if(parallel_worth(sg.B * Mmax * d))
  for (i64 sl = 0; sl < sg.B * Mmax; ++sl)
    if (sg.len[sl] > 0) axpy(dH + ((sl / Mmax) * L + sg.start[sl]) * d, 1.f, dpooled + sl * d, d);
}

void pool_mean_backward(float* dH, const float* dpooled, const Segments& sg, i64 d) {
  check_segments(sg, sg.B, sg.L, "pool_mean_backward");
  DLCM_CHECK(d > 0, "pool_mean_backward: d must be > 0");
  const i64 L = sg.L, Mmax = sg.Mmax, N = sg.B * sg.L;
#pragma omp parallel for schedule(static) if(parallel_worth(N * d))
  for (i64 n = 0; n < N; ++n) {
    const i64 sl = (n / L) * Mmax + sg.seg[n];
    axpy(dH + n * d, 1.f / float(sg.len[sl]), dpooled + sl * d, d);
  }
}

void pool_prefix_mean_forward(float* pref, const float* H, const Segments& sg, i64 d) {
  check_segments(sg, sg.B, sg.L, "pool_prefix_mean_forward");
  DLCM_CHECK(d > 0, "pool_prefix_mean_forward: d must be > 0");
  const i64 L = sg.L, Mmax = sg.Mmax;
  // One concept per task: its running sum, then each prefix row = sum * (1 / count).
#pragma omp parallel if(parallel_worth(sg.B * L * d))
  {
    std::vector<float> sum(d);
#pragma omp for schedule(dynamic, 16)
    for (i64 sl = 0; sl < sg.B * Mmax; ++sl) {
      const i64 ln = sg.len[sl], st = sg.start[sl], r = sl / Mmax;
      std::fill(sum.begin(), sum.end(), 0.f);
      for (i64 c = 0; c < ln; ++c) {
        const i64 n = r * L + st + c;
        const float* h = H + n * d;
        float* o = pref + n * d;
        const float inv = 1.f / float(c + 1);
        for (i64 i = 0; i < d; ++i) {
          sum[i] += h[i];
          o[i] = sum[i] * inv;
        }
      }
    }
  }
}

void pool_prefix_mean_backward(float* dH, const float* dpref, const Segments& sg, i64 d) {
  check_segments(sg, sg.B, sg.L, "pool_prefix_mean_backward");
  DLCM_CHECK(d > 0, "pool_prefix_mean_backward: d must be > 0");
  const i64 L = sg.L, Mmax = sg.Mmax;
  // dH[i] = sum_{t >= i} dpref[t] / count(t): a suffix sum, walked backwards per concept.
#pragma omp parallel if(parallel_worth(sg.B * L * d))
  {
    std::vector<float> acc(d);
#pragma omp for schedule(dynamic, 16)
    for (i64 sl = 0; sl < sg.B * Mmax; ++sl) {
      const i64 ln = sg.len[sl], st = sg.start[sl], r = sl / Mmax;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (i64 c = ln - 1; c >= 0; --c) {
        const i64 n = r * L + st + c;
        axpy(acc.data(), 1.f / float(c + 1), dpref + n * d, d);
        axpy(dH + n * d, 1.f, acc.data(), d);
      }
    }
  }
}

// ============================================================================================
// 5. Smoother
// ============================================================================================

float smoother_gate(float p, bool forced) {
  if (forced) return 1.f;
  return std::clamp(p, kSmootherClamp, 1.f - kSmootherClamp);
}

void smoother_forward(float* zs, const float* z, const float* p, const Segments& sg, i64 d) {
  check_segments(sg, sg.B, sg.L, "smoother_forward");
  DLCM_CHECK(d > 0, "smoother_forward: d must be > 0");
  const i64 B = sg.B, L = sg.L, Mmax = sg.Mmax;
  // Parallel over (row, feature block): the recurrence runs along concepts only.
  const i64 DB = 64;
  const i64 nblk = (d + DB - 1) / DB;
#pragma omp parallel for collapse(2) schedule(static) if(parallel_worth(B * Mmax * d))
  for (i64 r = 0; r < B; ++r) {
    for (i64 blk = 0; blk < nblk; ++blk) {
      const i64 i0 = blk * DB, i1 = std::min(d, i0 + DB);
      const i64 M = sg.count[r];
      for (i64 j = 0; j < Mmax; ++j) {
        const i64 sl = r * Mmax + j;
        float* o = zs + sl * d;
        if (j >= M) {
          for (i64 i = i0; i < i1; ++i) o[i] = 0.f;
          continue;
        }
        const float P = p ? smoother_gate(p[r * L + sg.start[sl]], sg.forced[sl] != 0) : 1.f;
        const float* zj = z + sl * d;
        if (j == 0) {
          for (i64 i = i0; i < i1; ++i) o[i] = P * zj[i];
        } else {
          const float* prev = zs + (sl - 1) * d;
          for (i64 i = i0; i < i1; ++i) o[i] = P * zj[i] + (1.f - P) * prev[i];
        }
      }
    }
  }
}

void smoother_backward(float* dz, float* dp, const float* dzs, const float* zs, const float* z,
                       const float* p, const Segments& sg, i64 d) {
  check_segments(sg, sg.B, sg.L, "smoother_backward");
  DLCM_CHECK(p != nullptr || dp == nullptr, "smoother_backward: dp needs p (smoother off has no gate)");
  DLCM_CHECK(d > 0, "smoother_backward: d must be > 0");
  const i64 B = sg.B, L = sg.L, Mmax = sg.Mmax;
#pragma omp parallel if(parallel_worth(B * Mmax * d))
  {
    std::vector<float> g(d);
#pragma omp for schedule(dynamic, 1)
    for (i64 r = 0; r < B; ++r) {
      const i64 M = sg.count[r];
      std::fill(g.begin(), g.end(), 0.f);
      // g_j = dzs_j + (1 - P_{j+1}) g_{j+1}; walk backwards.
      float Pnext = 1.f;
      for (i64 j = M - 1; j >= 0; --j) {
        const i64 sl = r * Mmax + j;
        const bool fz = sg.forced[sl] != 0;
        const float pj = p ? p[r * L + sg.start[sl]] : 1.f;
        const float P = p ? smoother_gate(pj, fz) : 1.f;
        const float* dzj = dzs + sl * d;
        const float keep = 1.f - Pnext;
#pragma omp simd
        for (i64 i = 0; i < d; ++i) g[i] = dzj[i] + keep * g[i];
        axpy(dz + sl * d, P, g.data(), d);
        if (dp != nullptr && !fz && pj >= kSmootherClamp && pj <= 1.f - kSmootherClamp) {
          // dzs_j/dP_j = z_j - zs_{j-1}
          const float* zj = z + sl * d;
          double s = 0;
          if (j > 0) {
            const float* prev = zs + (sl - 1) * d;
            for (i64 i = 0; i < d; ++i) s += double(g[i]) * (zj[i] - prev[i]);
          } else {
            for (i64 i = 0; i < d; ++i) s += double(g[i]) * zj[i];
          }
          dp[r * L + sg.start[sl]] += float(s);
        }
        Pnext = P;
      }
    }
  }
}

void smoother_own_forward(float* zso, const float* zp, const float* zs, const float* p,
                          const Segments& sg, i64 d) {
  check_segments(sg, sg.B, sg.L, "smoother_own_forward");
  DLCM_CHECK(d > 0, "smoother_own_forward: d must be > 0");
  const i64 L = sg.L, Mmax = sg.Mmax, N = sg.B * L;
#pragma omp parallel for schedule(static) if(parallel_worth(N * d))
  for (i64 n = 0; n < N; ++n) {
    const i64 r = n / L, j = sg.seg[n], sl = r * Mmax + j;
    const float P = p ? smoother_gate(p[r * L + sg.start[sl]], sg.forced[sl] != 0) : 1.f;
    const float* z = zp + n * d;
    float* o = zso + n * d;
    if (j == 0) {
      for (i64 i = 0; i < d; ++i) o[i] = P * z[i];
    } else {
      const float* prev = zs + (sl - 1) * d;
      for (i64 i = 0; i < d; ++i) o[i] = P * z[i] + (1.f - P) * prev[i];
    }
  }
}

void smoother_own_backward(float* dzp, float* dzs, float* dp, const float* dzso, const float* zp,
                           const float* zs, const float* p, const Segments& sg, i64 d) {
  check_segments(sg, sg.B, sg.L, "smoother_own_backward");
  DLCM_CHECK(p != nullptr || dp == nullptr,
             "smoother_own_backward: dp needs p (smoother off has no gate)");
  DLCM_CHECK(d > 0, "smoother_own_backward: d must be > 0");
  const i64 L = sg.L, Mmax = sg.Mmax;
  // One concept per task: its tokens write dzs of the concept before it and dp at its start.
#pragma omp parallel for schedule(dynamic, 16) if(parallel_worth(sg.B * L * d))
  for (i64 sl = 0; sl < sg.B * Mmax; ++sl) {
    const i64 r = sl / Mmax, j = sl % Mmax, ln = sg.len[sl], st = sg.start[sl];
    if (ln == 0) continue;
    const bool fz = sg.forced[sl] != 0;
    const float pj = p ? p[r * L + st] : 1.f;
    const float P = p ? smoother_gate(pj, fz) : 1.f;
    const bool live = dp != nullptr && p != nullptr && !fz && pj >= kSmootherClamp && pj <= 1.f - kSmootherClamp;
    const float* prev = j > 0 ? zs + (sl - 1) * d : nullptr;
    double s = 0;
    for (i64 n = r * L + st; n < r * L + st + ln; ++n) {
      const float* g = dzso + n * d;
      axpy(dzp + n * d, P, g, d);
      if (prev) axpy(dzs + (sl - 1) * d, 1.f - P, g, d);
      if (live) {  // dzso/dP = zp - zs_{j-1}
        const float* z = zp + n * d;
        for (i64 i = 0; i < d; ++i) s += double(g[i]) * (z[i] - (prev ? prev[i] : 0.f));
      }
    }
    if (live) dp[r * L + st] += float(s);
  }
}

// ============================================================================================
// 6. Concept cross-attention
// ============================================================================================

void concept_list_forward(float* list, const float* z_null, const float* zs, i64 B, i64 Mmax,
                          i64 d) {
  DLCM_CHECK(B >= 0 && Mmax >= 0 && d > 0, "concept_list_forward: bad shape");
#pragma omp parallel for schedule(static) if(parallel_worth(B * Mmax * d))
  for (i64 r = 0; r < B; ++r) {
    float* o = list + r * (Mmax + 1) * d;
    std::memcpy(o, z_null, sizeof(float) * d);
    if (Mmax > 0) std::memcpy(o + d, zs + r * Mmax * d, sizeof(float) * Mmax * d);
  }
}

void concept_list_backward(float* dz_null, float* dzs, const float* dlist, i64 B, i64 Mmax,
                           i64 d) {
  DLCM_CHECK(B >= 0 && Mmax >= 0 && d > 0, "concept_list_backward: bad shape");
  if (dz_null) {
    for (i64 r = 0; r < B; ++r) axpy(dz_null, 1.f, dlist + r * (Mmax + 1) * d, d);
  }
  if (dzs) {
#pragma omp parallel for collapse(2) schedule(static) if(parallel_worth(B * Mmax * d))
    for (i64 r = 0; r < B; ++r)
      for (i64 j = 0; j < Mmax; ++j)
        axpy(dzs + (r * Mmax + j) * d, 1.f, dlist + (r * (Mmax + 1) + 1 + j) * d, d);
  }
}

void concept_gather(float* rep, const float* list, const Segments& sg, i64 width,
                    bool inclusive) {
  check_segments(sg, sg.B, sg.L, "concept_gather");
  DLCM_CHECK(width > 0, "concept_gather: width must be > 0");
  const i64 L = sg.L, K1 = sg.Mmax + 1, N = sg.B * sg.L, sh = inclusive ? 1 : 0;
  const i64 Lr = L + sh;  // replicated positions per row
#pragma omp parallel for schedule(static) if(parallel_worth(N * width))
  for (i64 n = 0; n < N; ++n) {
    const i64 r = n / L, t = n % L;
    std::memcpy(rep + (r * Lr + sh + t) * width, list + (r * K1 + sg.seg[n] + sh) * width,
                sizeof(float) * width);
  }
  if (inclusive)  // the leading z_null slot of every row
    for (i64 r = 0; r < sg.B; ++r)
      std::memcpy(rep + r * Lr * width, list + r * K1 * width, sizeof(float) * width);
}

void concept_scatter_add(float* dlist, const float* drep, const Segments& sg, i64 width,
                         bool inclusive) {
  check_segments(sg, sg.B, sg.L, "concept_scatter_add");
  DLCM_CHECK(width > 0, "concept_scatter_add: width must be > 0");
  const i64 B = sg.B, L = sg.L, Mmax = sg.Mmax, K1 = Mmax + 1, sh = inclusive ? 1 : 0;
  const i64 Lr = L + sh;
  // Positions carrying list index k + sh are exactly segment k's tokens.
#pragma omp parallel for collapse(2) schedule(dynamic, 16) if(parallel_worth(B * L * width))
  for (i64 r = 0; r < B; ++r) {
    for (i64 kk = 0; kk < Mmax; ++kk) {
      if (kk >= sg.count[r]) continue;
      const i64 sl = r * Mmax + kk;
      float* o = dlist + (r * K1 + kk + sh) * width;
      const i64 st = sg.start[sl], ln = sg.len[sl];
      for (i64 t = st; t < st + ln; ++t) axpy(o, 1.f, drep + (r * Lr + sh + t) * width, width);
    }
  }
  if (inclusive)
    for (i64 r = 0; r < B; ++r) axpy(dlist + r * K1 * width, 1.f, drep + r * Lr * width, width);
}

// ---- compact concept attention, blockwise ----------------------------------------------------
// A block of BQ consecutive query tokens (of one head) spans segments j0..j1. Its keys are the
// list indices 0..j1: indices < j0 are visible to every query of the block with bias
// log(len_k); indices j0..j1 follow the per-query rule (k < seg(t): log len_k, k == seg(t):
// log(t - start + 1), k > seg(t): masked). Scores go into a transposed tile S^T [BK, BQ]
// (= K Q^T with Q^T packed once per block), so softmax statistics are vertical vector ops, and
// all tile products go through one register-blocked microkernel, tile_mm(). The work is
// O(L * M * hd) plus at most one key tile of waste per query block.
namespace {

// Query tokens per block. A block computes every key up to its last token's entry, so the waste
// of a block is about half its tokens' worth of entries: 32 against 64 runs dlcm-small's training
// shape (B=8, L=256, 4 heads of 64) ~5% faster forward and 5-10% backward, and the 128-token
// prefill's list 10%; 16 loses the gain to per-block work (Zen 4, test_ops --perf, session 39).
constexpr i64 BQ = 32;
constexpr i64 BK = 64;  // keys per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rough multiply-add count of the compact attention (for the parallel_worth decision).
i64 attn_work(const Segments& sg, i64 Hq, i64 hd) {
  return sg.B * sg.L * Hq * hd * std::max<i64>(1, (sg.Mmax + 1) / 2);
}

#if defined(DLCM_AVX512)

// exp(x) shared with the attention kernel: exactly 0 for -inf (masked) inputs.
using simd::exp_ps;

#endif


// dst[c*BQ + i] = src[i*ld + c] for i < n, c < hd.
void pack_t(float* dst, const float* src, i64 ld, i64 n, i64 hd) {
  for (i64 i = 0; i < n; ++i) {
    const float* s = src + i * ld;
    for (i64 c = 0; c < hd; ++c) dst[c * BQ + i] = s[c];
  }
}

// log(t - start(seg(t)) + 1) for every token [B*L]: the bias of a token's own concept,
// computed once per call rather than once per head.
std::vector<float> own_concept_log_mult(const Segments& sg) {
  std::vector<float> r(sg.B * sg.L);
  for (i64 n = 0; n < sg.B * sg.L; ++n) {
    const i64 b = n / sg.L, t = n % sg.L;
    r[n] = std::log(float(t - sg.start[b * sg.Mmax + sg.seg[n]] + 1));
  }
  return r;
}

// Per-query facts of one block of row b: s(t), the last list entry token t sees (nondecreasing
// along a row), and the log multiplicity of that, its own, entry.
struct QueryBlock {
  i64 t0 = 0, nq = 0, j0 = 0, j1 = 0;
  alignas(64) float segf[BQ];  // s(t) as float (exact below 2^24), for vector compares
  alignas(64) float logd[BQ];
  // sf, own_log: [B*L] (ConceptFacts).
  void set(const float* sf, const float* own_log, i64 L, i64 b, i64 qb) {
    t0 = qb * BQ;
    nq = std::min<i64>(BQ, L - t0);
    const float* sr = sf + b * L;
    j0 = i64(sr[t0]);
    j1 = i64(sr[t0 + nq - 1]);
    for (i64 i = 0; i < BQ; ++i) {
      if (i < nq) {
        segf[i] = sr[t0 + i];
        logd[i] = own_log[b * L + t0 + i];
      } else {
        segf[i] = -1.f;  // padding columns: everything masked
        logd[i] = 0.f;
      }
    }
  }
};

// Adds the log-multiplicity bias (and the -inf mask) to a score tile S^T [nk, BQ] whose rows
// are keys kt0..kt0+nk-1. logm[k] = log(len_k).
void add_bias(float* st, i64 kt0, i64 nk, const QueryBlock& qb, const float* logm) {
  for (i64 r = 0; r < nk; ++r) {
    const i64 kk = kt0 + r;
    float* row = st + r * BQ;
    if (kk < qb.j0) {
      const float lb = logm[kk];
      for (i64 i = 0; i < BQ; ++i) row[i] += lb;
    } else {
      const float kf = float(kk), lb = logm[kk];
      for (i64 i = 0; i < BQ; ++i) {
        const float s = qb.segf[i];
        row[i] = (kf < s) ? row[i] + lb : (kf == s ? row[i] + qb.logd[i] : kNegInf);
      }
    }
  }
}

// Online softmax over the columns of S^T [nk, BQ]: m_new = max(m, max_r st), corr =
// exp(m - m_new), st = exp(st - m_new), l = l * corr + sum_r st.
void softmax_cols(float* st, i64 nk, float* m, float* l, float* corr) {
#if defined(DLCM_AVX512)
  for (i64 i = 0; i < BQ; i += 16) {
    const __m512 mo = _mm512_load_ps(m + i);
    __m512 mx = mo;
    for (i64 r = 0; r < nk; ++r) mx = _mm512_max_ps(mx, _mm512_loadu_ps(st + r * BQ + i));
    // Columns with nothing visible yet keep m = -inf; use 0 as the reference there so that
    // exp(-inf - ref) = 0 instead of NaN.
    const __mmask16 fin = _mm512_cmp_ps_mask(mx, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ);
    const __m512 ref = _mm512_maskz_mov_ps(fin, mx);
    const __m512 c = exp_ps(_mm512_sub_ps(mo, ref));
    __m512 sum = _mm512_setzero_ps();
    for (i64 r = 0; r < nk; ++r) {
      float* p = st + r * BQ + i;
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(p), ref));
      _mm512_storeu_ps(p, e);
      sum = _mm512_add_ps(sum, e);
    }
    _mm512_store_ps(m + i, mx);
    _mm512_store_ps(corr + i, c);
    _mm512_store_ps(l + i, _mm512_fmadd_ps(_mm512_load_ps(l + i), c, sum));
  }
#else
  for (i64 i = 0; i < BQ; ++i) {
    float mx = m[i];
    for (i64 r = 0; r < nk; ++r) mx = std::max(mx, st[r * BQ + i]);
    const float ref = (mx == kNegInf) ? 0.f : mx;
    const float c = std::exp(m[i] - ref);
    float sum = 0.f;
    for (i64 r = 0; r < nk; ++r) sum += (st[r * BQ + i] = std::exp(st[r * BQ + i] - ref));
    m[i] = mx;
    corr[i] = c;
    l[i] = l[i] * c + sum;
  }
#endif
}

// st = exp(st - lse[i]) per column (lse of padding columns is +inf -> 0).
void exp_minus_lse(float* st, i64 nk, const float* lsev) {
#if defined(DLCM_AVX512)
  for (i64 r = 0; r < nk; ++r)
    for (i64 i = 0; i < BQ; i += 16) {
      float* p = st + r * BQ + i;
      _mm512_storeu_ps(p, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(p), _mm512_load_ps(lsev + i))));
    }
#else
  for (i64 r = 0; r < nk; ++r)
    for (i64 i = 0; i < BQ; ++i) st[r * BQ + i] = std::exp(st[r * BQ + i] - lsev[i]);
#endif
}

void check_attention_args(const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd,
                          const char* who) {
  check_segments(sg, B, L, who);
  DLCM_CHECK(Hq > 0 && Hkv > 0 && hd > 0, who, ": bad head shape Hq=", Hq, " Hkv=", Hkv,
             " hd=", hd);
  DLCM_CHECK(Hq % Hkv == 0, who, ": n_kv_heads (", Hkv, ") must divide n_heads (", Hq, ")");
}

// logm[k] = log(len_k) (shifted); inclusive: logm[0] = log 1 (z_null), logm[k+1] = log(len_k).
void log_lengths(float* logm, const Segments& sg, i64 b, i64 sh) {
  if (sh) logm[0] = 0.f;
  for (i64 kk = 0; kk < sg.count[b]; ++kk)
    logm[kk + sh] = std::log(float(sg.len[b * sg.Mmax + kk]));
}

// What the compact kernels' concept mask reads (the FP32 kernels below, the AMX path of
// kernels/amx.h, the streaming list form): s(t) = seg(t) + sh as float and log(t - start + 1)
// per token [B*L]; per row the list entries' log lengths [B*K1].
struct ConceptFacts {
  std::vector<float> sf, logd, logm;
  ConceptFacts(const Segments& sg, i64 sh)
      : sf(sg.B * sg.L), logd(own_concept_log_mult(sg)), logm(sg.B * (sg.Mmax + 1), 0.f) {
    for (i64 n = 0; n < sg.B * sg.L; ++n) sf[n] = float(sg.seg[n] + sh);
    for (i64 b = 0; b < sg.B; ++b) log_lengths(logm.data() + b * (sg.Mmax + 1), sg, b, sh);
  }
};

// The compact forward from the facts: list entry e of row b, kv head g at
// k + (b*K1 + e)*ldk + g*hd (ldk >= Hkv*hd); q, out [B, L, Hq, hd]; lse [B, Hq, L].
void compact_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                     i64 ldk, i64 B, i64 L, i64 K1, i64 Hq, i64 Hkv, i64 hd, float scale,
                     const float* sf, const float* own_log, const float* logm_all, bool par) {
  const i64 G = Hq / Hkv, nqb = (L + BQ - 1) / BQ;
  const i64 ldq = Hq * hd;
  parallel_region(par, [&] {
    Buf QT(hd * BQ), ST(BK * BQ), O(BQ * hd), m(BQ), l(BQ), corr(BQ);
    QueryBlock qbk;
    // Later query blocks see more keys: hand them out first.
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (i64 b = 0; b < B; ++b)
      for (i64 h = 0; h < Hq; ++h)
        for (i64 qr = 0; qr < nqb; ++qr) {
          const i64 qb = nqb - 1 - qr, g = h / G;
          const float* logm = logm_all + b * K1;
          qbk.set(sf, own_log, L, b, qb);
          const i64 t0 = qbk.t0, nq = qbk.nq;
          const float* qbase = q + ((b * L + t0) * Hq + h) * hd;
          std::fill(QT.begin(), QT.end(), 0.f);
          pack_t(QT.data(), qbase, ldq, nq, hd);
          std::fill(m.begin(), m.end(), kNegInf);
          std::fill(l.begin(), l.end(), 0.f);
          std::fill(O.begin(), O.end(), 0.f);
          for (i64 kt0 = 0; kt0 <= qbk.j1; kt0 += BK) {
            const i64 nk = std::min<i64>(BK, qbk.j1 + 1 - kt0);
            const float* kb = k + (b * K1 + kt0) * ldk + g * hd;
            const float* vb = v + (b * K1 + kt0) * ldk + g * hd;
            tile_mm(ST.data(), BQ, kb, ldk, 1, QT.data(), BQ, nk, BQ, hd, scale, false);
            add_bias(ST.data(), kt0, nk, qbk, logm);
            softmax_cols(ST.data(), nk, m.data(), l.data(), corr.data());
            for (i64 i = 0; i < nq; ++i) {
              float* o = O.data() + i * hd;
              const float c = corr[i];
              for (i64 x = 0; x < hd; ++x) o[x] *= c;
            }
            tile_mm(O.data(), hd, ST.data(), 1, BQ, vb, ldk, nq, hd, nk, 1.f, true);
          }
          for (i64 i = 0; i < nq; ++i) {
            const float inv = 1.f / l[i];
            float* dst = out + ((b * L + t0 + i) * Hq + h) * hd;
            const float* o = O.data() + i * hd;
            for (i64 x = 0; x < hd; ++x) dst[x] = o[x] * inv;
            lse[(b * Hq + h) * L + t0 + i] = m[i] + std::log(l[i]);
          }
        }
  });
}

}  // namespace

void concept_attention_forward(float* out, float* lse, const float* q, const float* k,
                               const float* v, const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv,
                               i64 hd, float scale, bool inclusive) {
  check_attention_args(sg, B, L, Hq, Hkv, hd, "concept_attention_forward");
  const ConceptFacts f(sg, inclusive ? 1 : 0);
  const bool par = parallel_worth(attn_work(sg, Hq, hd));
#ifdef DLCM_AVX512
  // BF16 GEMMs on the native units: bf16 operands in the tiles' layouts, on AMX tiles or as
  // AVX512-BF16 dot products
  if (const AttentionUnits u = attention_units(); u != AttentionUnits::Fp32 && scale > 0)
    return concept_attention_forward_bf16(u, out, lse, q, k, v, B, L, sg.Mmax + 1, Hq, Hkv, hd,
                                          scale, f.sf.data(), f.logd.data(), f.logm.data(), par);
#endif
  compact_forward(out, lse, q, k, v, Hkv * hd, B, L, sg.Mmax + 1, Hq, Hkv, hd, scale, f.sf.data(),
                  f.logd.data(), f.logm.data(), par);
}

void concept_attention_list_forward(float* out, const float* q, const float* k, const float* v,
                                    i64 ld, const float* mult, i64 K1, const i64* last,
                                    const float* own, i64 L, i64 Hq, i64 Hkv, i64 hd,
                                    float scale) {
  DLCM_CHECK(Hq > 0 && Hkv > 0 && hd > 0 && Hq % Hkv == 0,
             "concept_attention_list_forward: bad head shape Hq=", Hq, " Hkv=", Hkv, " hd=", hd);
  DLCM_CHECK(ld >= Hkv * hd, "concept_attention_list_forward: ld (", ld, ") < Hkv*hd");
  DLCM_CHECK(L > 0 && K1 > 0, "concept_attention_list_forward: empty call (L=", L, ", K1=", K1,
             ")");
  std::vector<float> sf(L), logd(L), logm(K1), lse(Hq * L);
  for (i64 t = 0; t < L; ++t) {
    DLCM_CHECK(last[t] >= 0 && last[t] < K1 && (t == 0 || last[t] >= last[t - 1]) && own[t] >= 1,
               "concept_attention_list_forward: token ", t, " has last entry ", last[t],
               " and own multiplicity ", own[t], " (want nondecreasing entries below ", K1,
               ", multiplicity >= 1)");
    sf[t] = float(last[t]);
    logd[t] = std::log(own[t]);
  }
  // an entry is read with its own multiplicity only below a token's last entry, where it is
  // closed (>= 1); the open entry's count (0 before its first token) is never read
  for (i64 e = 0; e < K1; ++e) logm[e] = std::log(std::max(mult[e], 1.f));
  compact_forward(out, lse.data(), q, k, v, ld, 1, L, K1, Hq, Hkv, hd, scale, sf.data(),
                  logd.data(), logm.data(), parallel_worth(L * Hq * hd * std::max<i64>(1, K1 / 2)));
}

void concept_attention_backward(float* dq, float* dk, float* dv, const float* dout,
                                const float* out, const float* lse, const float* q,
                                const float* k, const float* v, const Segments& sg, i64 B, i64 L,
                                i64 Hq, i64 Hkv, i64 hd, float scale, bool inclusive) {
  check_attention_args(sg, B, L, Hq, Hkv, hd, "concept_attention_backward");
  const ConceptFacts f(sg, inclusive ? 1 : 0);
#ifdef DLCM_AVX512
  if (const AttentionUnits u = attention_units(); u != AttentionUnits::Fp32 && scale > 0)
    return concept_attention_backward_bf16(u, dq, dk, dv, dout, out, lse, q, k, v, B, L,
                                           sg.Mmax + 1, Hq, Hkv, hd, scale, f.sf.data(),
                                           f.logd.data(), f.logm.data(),
                                           parallel_worth(attn_work(sg, Hq, hd)));
#endif
  const i64 G = Hq / Hkv, K1 = sg.Mmax + 1, nqb = (L + BQ - 1) / BQ;
  const i64 ldq = Hq * hd, ldk = Hkv * hd;
  // One task per (row, kv head): it owns dk/dv of its list entries and dq of its query heads.
#pragma omp parallel if(parallel_worth(attn_work(sg, Hq, hd)))
  {
    Buf QT(hd * BQ), dOT(hd * BQ), ST(BK * BQ), dPT(BK * BQ), lsev(BQ), D(BQ);
    QueryBlock qbk;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (i64 b = 0; b < B; ++b)
      for (i64 g = 0; g < Hkv; ++g) {
        const float* logm = f.logm.data() + b * K1;
        for (i64 qb = 0; qb < nqb; ++qb) {
          qbk.set(f.sf.data(), f.logd.data(), L, b, qb);
          const i64 t0 = qbk.t0, nq = qbk.nq;
          for (i64 hh = 0; hh < G; ++hh) {
            const i64 h = g * G + hh;
            const float* qbase = q + ((b * L + t0) * Hq + h) * hd;
            const float* dobase = dout + ((b * L + t0) * Hq + h) * hd;
            const float* obase = out + ((b * L + t0) * Hq + h) * hd;
            float* dqbase = dq + ((b * L + t0) * Hq + h) * hd;
            std::fill(QT.begin(), QT.end(), 0.f);
            std::fill(dOT.begin(), dOT.end(), 0.f);
            pack_t(QT.data(), qbase, ldq, nq, hd);
            pack_t(dOT.data(), dobase, ldq, nq, hd);
            for (i64 i = 0; i < BQ; ++i) {
              if (i < nq) {
                lsev[i] = lse[(b * Hq + h) * L + t0 + i];
                D[i] = dotf(dobase + i * ldq, obase + i * ldq, hd);
              } else {
                lsev[i] = std::numeric_limits<float>::infinity();
                D[i] = 0.f;
              }
            }
            for (i64 kt0 = 0; kt0 <= qbk.j1; kt0 += BK) {
              const i64 nk = std::min<i64>(BK, qbk.j1 + 1 - kt0);
              const float* kb = k + ((b * K1 + kt0) * Hkv + g) * hd;
              const float* vb = v + ((b * K1 + kt0) * Hkv + g) * hd;
              float* dkb = dk + ((b * K1 + kt0) * Hkv + g) * hd;
              float* dvb = dv + ((b * K1 + kt0) * Hkv + g) * hd;
              // P^T = exp(scale K Q^T + bias - lse)
              tile_mm(ST.data(), BQ, kb, ldk, 1, QT.data(), BQ, nk, BQ, hd, scale, false);
              add_bias(ST.data(), kt0, nk, qbk, logm);
              exp_minus_lse(ST.data(), nk, lsev.data());
              // dV += P^T dO
              tile_mm(dvb, ldk, ST.data(), BQ, 1, dobase, ldq, nk, hd, nq, 1.f, true);
              // dP^T = V dO^T ; dS^T = P^T (dP^T - D) * scale
              tile_mm(dPT.data(), BQ, vb, ldk, 1, dOT.data(), BQ, nk, BQ, hd, 1.f, false);
              for (i64 r = 0; r < nk; ++r) {
                float* dp = dPT.data() + r * BQ;
                const float* p = ST.data() + r * BQ;
#pragma omp simd
                for (i64 i = 0; i < BQ; ++i) dp[i] = p[i] * (dp[i] - D[i]) * scale;
              }
              // dK += dS^T Q ; dQ += dS K
              tile_mm(dkb, ldk, dPT.data(), BQ, 1, qbase, ldq, nk, hd, nq, 1.f, true);
              tile_mm(dqbase, ldq, dPT.data(), 1, BQ, kb, ldk, nq, hd, nk, 1.f, true);
            }
          }
        }
      }
  }
}

void concept_attention_step(float* out, const float* q, const float* k, const float* v, i64 ld,
                            const float* mult, i64 nk, i64 Hq, i64 Hkv, i64 hd, float scale,
                            const float* k_own, const float* v_own, float* s) {
  DLCM_CHECK(Hq > 0 && Hkv > 0 && hd > 0 && Hq % Hkv == 0,
             "concept_attention_step: bad head shape Hq=", Hq, " Hkv=", Hkv, " hd=", hd);
  DLCM_CHECK(nk > 0, "concept_attention_step: the concept list is empty");
  DLCM_CHECK(ld >= Hkv * hd, "concept_attention_step: ld (", ld, ") < Hkv*hd");
  std::vector<float> local;
  if (s == nullptr) {
    local.resize(nk);
    s = local.data();
  }
  const i64 G = Hq / Hkv;
  for (i64 h = 0; h < Hq; ++h) {
    const i64 g = h / G;
    const float* qh = q + h * hd;
    auto key = [&](i64 e) { return k_own && e == nk - 1 ? k_own + g * hd : k + e * ld + g * hd; };
    auto val = [&](i64 e) { return v_own && e == nk - 1 ? v_own + g * hd : v + e * ld + g * hd; };
    float m = kNegInf;
    for (i64 e = 0; e < nk; ++e) {
      s[e] = dotf(qh, key(e), hd) * scale + (mult ? std::log(mult[e]) : 0.f);
      m = std::max(m, s[e]);
    }
    float l = 0.f;
    for (i64 e = 0; e < nk; ++e) l += (s[e] = std::exp(s[e] - m));
    float* o = out + h * hd;
    std::fill(o, o + hd, 0.f);
    for (i64 e = 0; e < nk; ++e) axpy(o, s[e] / l, val(e), hd);
  }
}

void concept_attention_step_backward(float* dq, float* dk, float* dv, float* dk_own,
                                     float* dv_own, const float* dout, const float* q,
                                     const float* k, const float* v, i64 ld, const float* mult,
                                     i64 nk, i64 Hq, i64 Hkv, i64 hd, float scale, i64 g,
                                     const float* k_own, const float* v_own, float* s) {
  const i64 G = Hq / Hkv;
  float* dpv = s + nk;
  const bool own = k_own != nullptr;
  auto key = [&](i64 e) { return own && e == nk - 1 ? k_own + g * hd : k + e * ld + g * hd; };
  auto val = [&](i64 e) { return own && e == nk - 1 ? v_own + g * hd : v + e * ld + g * hd; };
  auto dkey = [&](i64 e) { return own && e == nk - 1 ? dk_own + g * hd : dk + e * ld + g * hd; };
  auto dval = [&](i64 e) { return own && e == nk - 1 ? dv_own + g * hd : dv + e * ld + g * hd; };
  for (i64 h = g * G; h < (g + 1) * G; ++h) {
    const float* qh = q + h * hd;
    const float* doh = dout + h * hd;
    // probabilities p_e, and dp_e = dout . v_e; D = sum_e p_e dp_e (= dout . out)
    float m = kNegInf;
    for (i64 e = 0; e < nk; ++e) {
      s[e] = dotf(qh, key(e), hd) * scale + (mult ? std::log(mult[e]) : 0.f);
      m = std::max(m, s[e]);
    }
    float l = 0.f;
    for (i64 e = 0; e < nk; ++e) l += (s[e] = std::exp(s[e] - m));
    float D = 0.f;
    for (i64 e = 0; e < nk; ++e) {
      s[e] /= l;
      dpv[e] = dotf(doh, val(e), hd);
      D += s[e] * dpv[e];
    }
    // dv_e += p_e dout; dS_e = p_e (dp_e - D); dq += scale dS_e k_e; dk_e += scale dS_e q
    float* dqh = dq + h * hd;
    for (i64 e = 0; e < nk; ++e) {
      const float ds = s[e] * (dpv[e] - D) * scale;
      axpy(dval(e), s[e], doh, hd);
      axpy(dqh, ds, key(e), hd);
      axpy(dkey(e), ds, qh, hd);
    }
  }
}

namespace {

// Multiplicities of token n's visible entries for concept_attention_own_*: [1, len_0, ...,
// len_{j-1}, t - start_j + 1], j = seg(n); returns their count j + 2.
i64 own_mults(float* mt, const Segments& sg, i64 n) {
  const i64 r = n / sg.L, t = n % sg.L, j = sg.seg[n];
  mt[0] = 1.f;
  for (i64 kk = 0; kk < j; ++kk) mt[kk + 1] = float(sg.len[r * sg.Mmax + kk]);
  mt[j + 1] = float(t - sg.start[r * sg.Mmax + j] + 1);
  return j + 2;
}

}  // namespace

void concept_attention_own_forward(float* out, const float* q, const float* k, const float* v,
                                   const float* k_own, const float* v_own, const Segments& sg,
                                   i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd, float scale) {
  check_attention_args(sg, B, L, Hq, Hkv, hd, "concept_attention_own_forward");
  const i64 K1 = sg.Mmax + 1, ldk = Hkv * hd;
#pragma omp parallel if(parallel_worth(attn_work(sg, Hq, hd)))
  {
    std::vector<float> mt(K1 + 1), sc(K1 + 1);
#pragma omp for schedule(dynamic, 16)
    for (i64 n = 0; n < B * L; ++n) {
      const i64 nk = own_mults(mt.data(), sg, n), r = n / L;
      concept_attention_step(out + n * Hq * hd, q + n * Hq * hd, k + r * K1 * ldk,
                             v + r * K1 * ldk, ldk, mt.data(), nk, Hq, Hkv, hd, scale,
                             k_own + n * ldk, v_own + n * ldk, sc.data());
    }
  }
}

void concept_attention_own_backward(float* dq, float* dk, float* dv, float* dk_own, float* dv_own,
                                    const float* dout, const float* q, const float* k,
                                    const float* v, const float* k_own, const float* v_own,
                                    const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd,
                                    float scale) {
  check_attention_args(sg, B, L, Hq, Hkv, hd, "concept_attention_own_backward");
  const i64 K1 = sg.Mmax + 1, ldk = Hkv * hd, ldq = Hq * hd;
  // One task per (row, kv head): it owns that slice of the row's list gradients.
#pragma omp parallel if(parallel_worth(attn_work(sg, Hq, hd)))
  {
    std::vector<float> mt(K1 + 1), sc(2 * (K1 + 1));
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (i64 r = 0; r < B; ++r)
      for (i64 g = 0; g < Hkv; ++g)
        for (i64 n = r * L; n < (r + 1) * L; ++n) {
          const i64 nk = own_mults(mt.data(), sg, n);
          concept_attention_step_backward(
              dq + n * ldq, dk + r * K1 * ldk, dv + r * K1 * ldk, dk_own + n * ldk,
              dv_own + n * ldk, dout + n * ldq, q + n * ldq, k + r * K1 * ldk, v + r * K1 * ldk,
              ldk, mt.data(), nk, Hq, Hkv, hd, scale, g, k_own + n * ldk, v_own + n * ldk,
              sc.data());
        }
  }
}

// ============================================================================================
// 7. Global Parser auxiliary loss
// ============================================================================================

AuxLoss global_parser_loss(double sum_b, double sum_p, double count, double R, double weight) {
  DLCM_CHECK(R > 1.0 && std::isfinite(R), "target_R must be > 1, got ", R);
  DLCM_CHECK(count > 0, "global_parser_loss: need at least one token position");
  AuxLoss a;
  a.F = sum_b / count;
  a.G = sum_p / count;
  a.value = R / (R - 1.0) * ((R - 1.0) * a.F * a.G + (1.0 - a.F) * (1.0 - a.G)) - 1.0;
  a.grad_p = weight * R * (R * a.F - 1.0) / ((R - 1.0) * count);
  return a;
}

void aux_loss_backward(float* dp, i64 n, float grad_p) {
#pragma omp parallel for schedule(static) if(parallel_worth(n))
  for (i64 i = 0; i < n; ++i) dp[i] += grad_p;
}

namespace {
void check_sequence_loss(i64 B, i64 L, i64 rows, double R, const char* who) {
  DLCM_CHECK(R > 1.0 && std::isfinite(R), who, ": target_R must be > 1, got ", R);
  DLCM_CHECK(B >= 1 && L >= 1 && rows >= B, who, ": need B >= 1, L >= 1 and rows >= B, got B=",
             B, " L=", L, " rows=", rows);
}
// F_r of one row: the share of boundaries.
double row_mean_b(const uint8_t* b, i64 L) {
  i64 s = 0;
  for (i64 t = 0; t < L; ++t) s += b[t];
  return double(s) / double(L);
}
}  // namespace

double sequence_parser_loss_forward(const uint8_t* b, const float* p, i64 B, i64 L, double R) {
  check_sequence_loss(B, L, B, R, "sequence_parser_loss_forward");
  double total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total) if (parallel_worth(B * L))
  for (i64 r = 0; r < B; ++r) {
    const double F = row_mean_b(b + r * L, L);
    double sp = 0;
    for (i64 t = 0; t < L; ++t) sp += p[r * L + t];
    const double G = sp / double(L);
    total += R / (R - 1.0) * ((R - 1.0) * F * G + (1.0 - F) * (1.0 - G)) - 1.0;
  }
  return total;
}

void sequence_parser_loss_backward(float* dp, const uint8_t* b, i64 B, i64 L, i64 rows, double R,
                                   double weight) {
  check_sequence_loss(B, L, rows, R, "sequence_parser_loss_backward");
#pragma omp parallel for schedule(static) if (parallel_worth(B * L))
  for (i64 r = 0; r < B; ++r) {
    const double F = row_mean_b(b + r * L, L);
    const float g = float(weight * R * (R * F - 1.0) / ((R - 1.0) * double(L) * double(rows)));
    for (i64 t = 0; t < L; ++t) dp[r * L + t] += g;
  }
}

}  // namespace dlcm::ops::DLCM_ISA_NS
