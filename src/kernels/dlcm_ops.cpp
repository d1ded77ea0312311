#include "kernels/dlcm_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/rng.h"

namespace dlcm::ops {

namespace {

// Spawning a parallel region costs microseconds (much more on a loaded machine); small calls
// (decode steps, tests) run on the calling thread.
inline bool parallel_worth(i64 work) { return work >= (i64(1) << 15); }

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
    float c = 0.f;
    if (t > 0) {
      const float na = std::max(cache[(n - 1) * 3 + 0], kRouterNormEps);
      const float nb = std::max(cache[n * 3 + 1], kRouterNormEps);
      c = dotf(q + (n - 1) * ds, k + n * ds, ds) / (na * nb);
    }
    cache[n * 3 + 2] = c;
    if (is_forced(tokens, bos_id, n, t)) {
      p[n] = 1.f;
    } else {
      p[n] = std::clamp((1.f - c) * 0.5f, 0.f, 1.f);
    }
  }
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

void Segments::build(const uint8_t* b, const i32* tokens, i32 bos_id, i64 B_, i64 L_) {
  DLCM_CHECK(B_ > 0 && L_ > 0, "Segments::build: need B > 0 and L > 0, got B=", B_, " L=", L_);
  DLCM_CHECK(L_ < std::numeric_limits<i32>::max(), "Segments::build: L too large");
  B = B_;
  L = L_;
  seg.assign(B * L, 0);
  count.assign(B, 0);
  Mmax = 0;
  for (i64 r = 0; r < B; ++r) {
    const uint8_t* br = b + r * L;
    DLCM_CHECK(br[0] == 1, "Segments::build: row ", r, " does not start a concept at t = 0 (b=",
               int(br[0]), ")");
    i32 c = -1;
    for (i64 t = 0; t < L; ++t) {
      DLCM_CHECK(br[t] <= 1, "Segments::build: b[", r, ",", t, "] = ", int(br[t]),
                 ", expected 0 or 1");
      if (tokens && tokens[r * L + t] == bos_id)
        DLCM_CHECK(br[t] == 1, "Segments::build: BOS token at row ", r, ", position ", t,
                   " does not start a concept");
      c += br[t];
      seg[r * L + t] = c;
    }
    count[r] = c + 1;
    Mmax = std::max<i64>(Mmax, c + 1);
  }
  start.assign(B * Mmax, i32(L));
  len.assign(B * Mmax, 0);
  forced.assign(B * Mmax, 0);
  for (i64 r = 0; r < B; ++r) {
    for (i64 t = 0; t < L; ++t) {
      const i64 j = seg[r * L + t];
      if (b[r * L + t]) {
        start[r * Mmax + j] = i32(t);
        forced[r * Mmax + j] = (t == 0 || (tokens && tokens[r * L + t] == bos_id)) ? 1 : 0;
      }
      len[r * Mmax + j] += 1;
    }
  }
}

i64 Segments::total() const {
  i64 s = 0;
  for (i32 c : count) s += c;
  return s;
}

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
        const float P = smoother_gate(p[r * L + sg.start[sl]], sg.forced[sl] != 0);
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
        const float pj = p[r * L + sg.start[sl]];
        const float P = smoother_gate(pj, fz);
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

void concept_gather(float* rep, const float* list, const Segments& sg, i64 width) {
  check_segments(sg, sg.B, sg.L, "concept_gather");
  DLCM_CHECK(width > 0, "concept_gather: width must be > 0");
  const i64 L = sg.L, K1 = sg.Mmax + 1, N = sg.B * sg.L;
#pragma omp parallel for schedule(static) if(parallel_worth(N * width))
  for (i64 n = 0; n < N; ++n) {
    const i64 r = n / L;
    std::memcpy(rep + n * width, list + (r * K1 + sg.seg[n]) * width, sizeof(float) * width);
  }
}

void concept_scatter_add(float* dlist, const float* drep, const Segments& sg, i64 width) {
  check_segments(sg, sg.B, sg.L, "concept_scatter_add");
  DLCM_CHECK(width > 0, "concept_scatter_add: width must be > 0");
  const i64 B = sg.B, L = sg.L, Mmax = sg.Mmax, K1 = Mmax + 1;
  // Positions carrying list index k are exactly segment k's tokens.
#pragma omp parallel for collapse(2) schedule(dynamic, 16) if(parallel_worth(B * L * width))
  for (i64 r = 0; r < B; ++r) {
    for (i64 kk = 0; kk < Mmax; ++kk) {
      if (kk >= sg.count[r]) continue;
      const i64 sl = r * Mmax + kk;
      float* o = dlist + (r * K1 + kk) * width;
      const i64 st = sg.start[sl], ln = sg.len[sl];
      for (i64 t = st; t < st + ln; ++t) axpy(o, 1.f, drep + (r * L + t) * width, width);
    }
  }
}

namespace {

constexpr i64 kTQ = 16;

// Rough multiply-add count of the compact attention (for the parallel_worth decision).
i64 attn_work(const Segments& sg, i64 Hq, i64 hd) {
  return sg.B * sg.L * Hq * hd * std::max<i64>(1, (sg.Mmax + 1) / 2);
}  // tokens of one segment processed together (they share a key set)

void check_attention_args(const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd,
                          const char* who) {
  check_segments(sg, B, L, who);
  DLCM_CHECK(Hq > 0 && Hkv > 0 && hd > 0, who, ": bad head shape Hq=", Hq, " Hkv=", Hkv,
             " hd=", hd);
  DLCM_CHECK(Hq % Hkv == 0, who, ": n_kv_heads (", Hkv, ") must divide n_heads (", Hq, ")");
}

// Scores S[r, kk] (r = it*G + hh: token t0+it, head g*G+hh; kk = 0..j) for one chunk of
// segment j: scale * q.k + log(mult).
inline void chunk_scores(float* S, const float* q, const float* k, const float* logm, i64 r0,
                         i64 t0, i64 nt, i64 j, i64 st, i64 g, i64 G, i64 L, i64 Hq, i64 Hkv,
                         i64 hd, i64 K1, float scale) {
  const i64 nk = j + 1;
  const i64 b = r0;
  for (i64 kk = 0; kk < nk; ++kk) {
    const float* kr = k + ((b * K1 + kk) * Hkv + g) * hd;
    for (i64 it = 0; it < nt; ++it) {
      const float bias = (kk < j) ? logm[kk] : std::log(float(t0 + it - st + 1));
      for (i64 hh = 0; hh < G; ++hh) {
        const float* qr = q + ((b * L + t0 + it) * Hq + g * G + hh) * hd;
        S[(it * G + hh) * nk + kk] = dotf(qr, kr, hd) * scale + bias;
      }
    }
  }
}

}  // namespace

void concept_attention_forward(float* out, float* lse, const float* q, const float* k,
                               const float* v, const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv,
                               i64 hd, float scale) {
  check_attention_args(sg, B, L, Hq, Hkv, hd, "concept_attention_forward");
  const i64 G = Hq / Hkv, Mmax = sg.Mmax, K1 = Mmax + 1;
#pragma omp parallel if(parallel_worth(attn_work(sg, Hq, hd)))
  {
    std::vector<float> S(kTQ * G * K1), logm(K1);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (i64 b = 0; b < B; ++b) {
      for (i64 g = 0; g < Hkv; ++g) {
        const i64 M = sg.count[b];
        for (i64 kk = 0; kk < M; ++kk) logm[kk] = std::log(float(sg.len[b * Mmax + kk]));
        for (i64 j = 0; j < M; ++j) {
          const i64 st = sg.start[b * Mmax + j], ln = sg.len[b * Mmax + j];
          const i64 nk = j + 1;
          for (i64 t0 = st; t0 < st + ln; t0 += kTQ) {
            const i64 nt = std::min(kTQ, st + ln - t0);
            const i64 nr = nt * G;
            chunk_scores(S.data(), q, k, logm.data(), b, t0, nt, j, st, g, G, L, Hq, Hkv, hd, K1,
                         scale);
            for (i64 r = 0; r < nr; ++r) {
              float* s = S.data() + r * nk;
              float m = -std::numeric_limits<float>::infinity();
              for (i64 kk = 0; kk < nk; ++kk) m = std::max(m, s[kk]);
              float l = 0.f;
              for (i64 kk = 0; kk < nk; ++kk) {
                s[kk] = std::exp(s[kk] - m);
                l += s[kk];
              }
              const float inv = 1.f / l;
              for (i64 kk = 0; kk < nk; ++kk) s[kk] *= inv;
              const i64 it = r / G, hh = r % G;
              lse[(b * Hq + g * G + hh) * L + t0 + it] = m + std::log(l);
              float* o = out + ((b * L + t0 + it) * Hq + g * G + hh) * hd;
              std::fill(o, o + hd, 0.f);
            }
            for (i64 kk = 0; kk < nk; ++kk) {
              const float* vr = v + ((b * K1 + kk) * Hkv + g) * hd;
              for (i64 r = 0; r < nr; ++r) {
                const i64 it = r / G, hh = r % G;
                float* o = out + ((b * L + t0 + it) * Hq + g * G + hh) * hd;
                axpy(o, S[r * nk + kk], vr, hd);
              }
            }
          }
        }
      }
    }
  }
}

void concept_attention_backward(float* dq, float* dk, float* dv, const float* dout,
                                const float* out, const float* lse, const float* q,
                                const float* k, const float* v, const Segments& sg, i64 B, i64 L,
                                i64 Hq, i64 Hkv, i64 hd, float scale) {
  check_attention_args(sg, B, L, Hq, Hkv, hd, "concept_attention_backward");
  const i64 G = Hq / Hkv, Mmax = sg.Mmax, K1 = Mmax + 1;
#pragma omp parallel if(parallel_worth(attn_work(sg, Hq, hd)))
  {
    std::vector<float> S(kTQ * G * K1), dP(kTQ * G * K1), logm(K1), D(kTQ * G);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (i64 b = 0; b < B; ++b) {
      for (i64 g = 0; g < Hkv; ++g) {
        const i64 M = sg.count[b];
        for (i64 kk = 0; kk < M; ++kk) logm[kk] = std::log(float(sg.len[b * Mmax + kk]));
        for (i64 j = 0; j < M; ++j) {
          const i64 st = sg.start[b * Mmax + j], ln = sg.len[b * Mmax + j];
          const i64 nk = j + 1;
          for (i64 t0 = st; t0 < st + ln; t0 += kTQ) {
            const i64 nt = std::min(kTQ, st + ln - t0);
            const i64 nr = nt * G;
            chunk_scores(S.data(), q, k, logm.data(), b, t0, nt, j, st, g, G, L, Hq, Hkv, hd, K1,
                         scale);
            // P = exp(S - lse); D_r = dO_r . O_r
            for (i64 r = 0; r < nr; ++r) {
              const i64 it = r / G, hh = r % G;
              const i64 row = (b * L + t0 + it) * Hq + g * G + hh;
              const float ls = lse[(b * Hq + g * G + hh) * L + t0 + it];
              float* s = S.data() + r * nk;
              for (i64 kk = 0; kk < nk; ++kk) s[kk] = std::exp(s[kk] - ls);
              D[r] = dotf(dout + row * hd, out + row * hd, hd);
            }
            // dP = dO . V, dv += P^T dO
            for (i64 kk = 0; kk < nk; ++kk) {
              const float* vr = v + ((b * K1 + kk) * Hkv + g) * hd;
              float* dvr = dv + ((b * K1 + kk) * Hkv + g) * hd;
              for (i64 r = 0; r < nr; ++r) {
                const i64 it = r / G, hh = r % G;
                const float* dor = dout + ((b * L + t0 + it) * Hq + g * G + hh) * hd;
                dP[r * nk + kk] = dotf(dor, vr, hd);
                axpy(dvr, S[r * nk + kk], dor, hd);
              }
            }
            // dS = P (dP - D) * scale (scale folded here)
            for (i64 r = 0; r < nr; ++r)
              for (i64 kk = 0; kk < nk; ++kk)
                dP[r * nk + kk] = S[r * nk + kk] * (dP[r * nk + kk] - D[r]) * scale;
            // dq += dS K ; dk += dS^T Q
            for (i64 kk = 0; kk < nk; ++kk) {
              const float* kr = k + ((b * K1 + kk) * Hkv + g) * hd;
              float* dkr = dk + ((b * K1 + kk) * Hkv + g) * hd;
              for (i64 r = 0; r < nr; ++r) {
                const i64 it = r / G, hh = r % G;
                const i64 row = (b * L + t0 + it) * Hq + g * G + hh;
                const float ds = dP[r * nk + kk];
                axpy(dq + row * hd, ds, kr, hd);
                axpy(dkr, ds, q + row * hd, hd);
              }
            }
          }
        }
      }
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

}  // namespace dlcm::ops
