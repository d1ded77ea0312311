#include "kernels/ops_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/rng.h"

namespace dlcm::ops::ref {

template <class T>
void embedding_forward(T* out, const i32* ids, const T* table, i64 N, i64 d) {
  for (i64 n = 0; n < N; ++n)
    for (i64 c = 0; c < d; ++c) out[n * d + c] = table[i64(ids[n]) * d + c];
}

void embedding_backward(float* dtable, const float* dout, const i32* ids, i64 N, i64 d) {
  for (i64 n = 0; n < N; ++n)
    for (i64 c = 0; c < d; ++c) dtable[i64(ids[n]) * d + c] += dout[n * d + c];
}

template <class T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, i64 N, i64 d, float eps) {
  for (i64 n = 0; n < N; ++n) {
    const T* xr = x + n * d;
    double ss = 0;
    for (i64 c = 0; c < d; ++c) ss += double(xr[c]) * xr[c];
    double r = 1.0 / std::sqrt(ss / d + eps);
    rstd[n] = T(r);
    for (i64 c = 0; c < d; ++c) y[n * d + c] = T(xr[c] * r * w[c]);
  }
}

// y_c = x_c r w_c with r = (mean(x^2)+eps)^-1/2, dr/dx_c = -r^3 x_c / d.
void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                      const float* rstd, i64 N, i64 d) {
  for (i64 n = 0; n < N; ++n) {
    const float* xr = x + n * d;
    const float* g = dy + n * d;
    double r = rstd[n];
    double dot = 0;  // sum_c dy_c w_c x_c
    for (i64 c = 0; c < d; ++c) dot += double(g[c]) * w[c] * xr[c];
    for (i64 c = 0; c < d; ++c) {
      dx[n * d + c] += float(double(g[c]) * w[c] * r - xr[c] * r * r * r * dot / d);
      dw[c] += float(double(g[c]) * xr[c] * r);
    }
  }
}

template <class T>
void head_rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, i64 N, i64 H, i64 hd,
                          float eps) {
  for (i64 n = 0; n < N; ++n)
    for (i64 h = 0; h < H; ++h) {
      const i64 row = n * H + h;
      rmsnorm_forward(y + row * hd, rstd + row, x + row * hd, w, 1, hd, eps);
    }
}

void head_rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                           const float* rstd, i64 N, i64 H, i64 hd) {
  for (i64 n = 0; n < N; ++n)
    for (i64 h = 0; h < H; ++h) {
      const i64 row = n * H + h;
      rmsnorm_backward(dx + row * hd, dw, dy + row * hd, x + row * hd, w, rstd + row, 1, hd);
    }
}

template <class T>
void linear_forward(T* y, const T* x, const T* W, i64 N, i64 in, i64 out) {
  for (i64 n = 0; n < N; ++n)
    for (i64 o = 0; o < out; ++o) {
      double s = 0;
      for (i64 i = 0; i < in; ++i) s += double(x[n * in + i]) * W[o * in + i];
      y[n * out + o] = T(s);
    }
}

// dx[n,i] += sum_o dy[n,o] W[o,i];  dW[o,i] += sum_n dy[n,o] x[n,i].
void linear_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, i64 N,
                     i64 in, i64 out) {
  if (dx)
    for (i64 n = 0; n < N; ++n)
      for (i64 i = 0; i < in; ++i) {
        double s = 0;
        for (i64 o = 0; o < out; ++o) s += double(dy[n * out + o]) * W[o * in + i];
        dx[n * in + i] += float(s);
      }
  if (dW)
    for (i64 o = 0; o < out; ++o)
      for (i64 i = 0; i < in; ++i) {
        double s = 0;
        for (i64 n = 0; n < N; ++n) s += double(dy[n * out + o]) * x[n * in + i];
        dW[o * in + i] += float(s);
      }
}

template <class T>
void rope_apply(T* x, const i32* pos, i64 N, i64 H, i64 hd, float theta, bool inverse) {
  i64 half = hd / 2;
  for (i64 n = 0; n < N; ++n)
    for (i64 h = 0; h < H; ++h) {
      T* xr = x + (n * H + h) * hd;
      for (i64 i = 0; i < half; ++i) {
        double ang = double(pos[n]) * std::pow(double(theta), -2.0 * double(i) / double(hd));
        double c = std::cos(ang), s = std::sin(ang);
        if (inverse) s = -s;
        double a = xr[i], b = xr[i + half];
        xr[i] = T(a * c - b * s);
        xr[i + half] = T(b * c + a * s);
      }
    }
}

static double sigmoid(double a) { return 1.0 / (1.0 + std::exp(-a)); }

template <class T>
void swiglu_forward(T* h, const T* a, const T* b, i64 n) {
  for (i64 i = 0; i < n; ++i) h[i] = T(a[i] * sigmoid(a[i]) * b[i]);
}

void swiglu_backward(float* da, float* db, const float* dh, const float* a, const float* b,
                     i64 n, bool accumulate) {
  for (i64 i = 0; i < n; ++i) {
    double s = sigmoid(a[i]);
    double silu = a[i] * s;
    double dsilu = s * (1.0 + a[i] * (1.0 - s));
    da[i] = (accumulate ? da[i] : 0.0f) + float(double(dh[i]) * b[i] * dsilu);
    db[i] = (accumulate ? db[i] : 0.0f) + float(double(dh[i]) * silu);
  }
}

// Softmax row of query (b, i, h): p[j] for lo <= j < n_vis (keys visible to it; *lo_out =
// the first, 0 without a window), p[j] = 0 for j < lo.
template <class T>
static i64 attn_probs(std::vector<double>& p, const T* q, const T* k, i64 b, i64 i,
                      i64 h, i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset, float scale,
                      i64 window, i64* lo_out, double* lse_out) {
  i64 kvh = h / (Hq / Hkv);
  i64 n_vis = std::min(Lk, q_offset + i + 1);
  i64 lo = window > 0 ? std::max<i64>(0, q_offset + i - window + 1) : 0;
  DLCM_CHECK(lo < n_vis, "ref::attention: query ", i, " sees no key (window ", window,
             ", q_offset ", q_offset, ", Lk ", Lk, ")");
  *lo_out = lo;
  const T* qr = q + ((b * Lq + i) * Hq + h) * hd;
  p.assign(n_vis, 0.0);
  double mx = -std::numeric_limits<double>::infinity();
  for (i64 j = lo; j < n_vis; ++j) {
    const T* kr = k + ((b * Lk + j) * Hkv + kvh) * hd;
    double s = 0;
    for (i64 c = 0; c < hd; ++c) s += double(qr[c]) * kr[c];
    p[j] = s * scale;
    mx = std::max(mx, p[j]);
  }
  double sum = 0;
  for (i64 j = lo; j < n_vis; ++j) sum += std::exp(p[j] - mx);
  for (i64 j = lo; j < n_vis; ++j) p[j] = std::exp(p[j] - mx) / sum;
  if (lse_out) *lse_out = mx + std::log(sum);
  return n_vis;
}

template <class T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, i64 B, i64 Lq, i64 Lk,
                       i64 Hq, i64 Hkv, i64 hd, i64 q_offset, float scale, i64 window) {
  std::vector<double> p, o(hd);
  for (i64 b = 0; b < B; ++b)
    for (i64 i = 0; i < Lq; ++i)
      for (i64 h = 0; h < Hq; ++h) {
        double l;
        i64 lo;
        i64 n_vis =
            attn_probs(p, q, k, b, i, h, Lq, Lk, Hq, Hkv, hd, q_offset, scale, window, &lo, &l);
        i64 kvh = h / (Hq / Hkv);
        std::fill(o.begin(), o.end(), 0.0);
        for (i64 j = lo; j < n_vis; ++j) {
          const T* vr = v + ((b * Lk + j) * Hkv + kvh) * hd;
          for (i64 c = 0; c < hd; ++c) o[c] += p[j] * vr[c];
        }
        T* orow = out + ((b * Lq + i) * Hq + h) * hd;
        for (i64 c = 0; c < hd; ++c) orow[c] = T(o[c]);
        lse[(b * Hq + h) * Lq + i] = T(l);
      }
}

// dP_j = dO.v_j; dS_j = P_j (dP_j - sum_l P_l dP_l); dq += scale sum_j dS_j k_j,
// dk_j += scale dS_j q, dv_j += P_j dO.
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                        const float* lse, const float* q, const float* k, const float* v, i64 B,
                        i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset, float scale,
                        i64 window) {
  std::vector<double> p, dp;
  for (i64 b = 0; b < B; ++b)
    for (i64 i = 0; i < Lq; ++i)
      for (i64 h = 0; h < Hq; ++h) {
        i64 lo;
        i64 n_vis = attn_probs(p, q, k, b, i, h, Lq, Lk, Hq, Hkv, hd, q_offset, scale, window,
                               &lo, nullptr);
        i64 kvh = h / (Hq / Hkv);
        i64 row = (b * Lq + i) * Hq + h;
        const float* g = dout + row * hd;
        const float* qr = q + row * hd;
        dp.assign(n_vis, 0.0);
        double D = 0;
        for (i64 j = lo; j < n_vis; ++j) {
          const float* vr = v + ((b * Lk + j) * Hkv + kvh) * hd;
          for (i64 c = 0; c < hd; ++c) dp[j] += double(g[c]) * vr[c];
          D += p[j] * dp[j];
        }
        for (i64 j = lo; j < n_vis; ++j) {
          i64 kr = ((b * Lk + j) * Hkv + kvh) * hd;
          double ds = p[j] * (dp[j] - D) * scale;
          for (i64 c = 0; c < hd; ++c) {
            dq[row * hd + c] += float(ds * k[kr + c]);
            dk[kr + c] += float(ds * qr[c]);
            dv[kr + c] += float(p[j] * g[c]);
          }
        }
      }
}

template <class T>
static double ce_row(const T* x, i64 V, i32 t, double* sum_out, double* max_out) {
  double mx = -std::numeric_limits<double>::infinity();
  for (i64 c = 0; c < V; ++c) mx = std::max(mx, double(x[c]));
  double sum = 0;
  for (i64 c = 0; c < V; ++c) sum += std::exp(x[c] - mx);
  *sum_out = sum;
  *max_out = mx;
  return std::log(sum) + mx - x[t];
}

double cross_entropy_fused(float* logits, const i32* targets, i64 N, i64 V, float grad_scale) {
  double total = 0;
  for (i64 n = 0; n < N; ++n) {
    float* x = logits + n * V;
    if (targets[n] < 0) {
      std::fill(x, x + V, 0.0f);
      continue;
    }
    double sum, mx;
    total += ce_row(x, V, targets[n], &sum, &mx);
    for (i64 c = 0; c < V; ++c) {
      double g = std::exp(x[c] - mx) / sum - (c == targets[n] ? 1.0 : 0.0);
      x[c] = float(g * grad_scale);
    }
  }
  return total;
}

template <class T>
double cross_entropy_forward(const T* logits, const i32* targets, i64 N, i64 V, T* row_loss) {
  double total = 0;
  for (i64 n = 0; n < N; ++n) {
    double l = 0;
    if (targets[n] >= 0) {
      double sum, mx;
      l = ce_row(logits + n * V, V, targets[n], &sum, &mx);
    }
    if (row_loss) row_loss[n] = T(l);
    total += l;
  }
  return total;
}

bool adamw_update(float* w, const float* g, float* m, float* v, i64 n, float lr, float beta1,
                  float beta2, float eps, float wd, i64 t) {
  double bc1 = 1.0 - std::pow(double(beta1), double(t));
  double bc2 = 1.0 - std::pow(double(beta2), double(t));
  bool finite = true;
  for (i64 i = 0; i < n; ++i) {
    double wi = double(w[i]) * (1.0 - double(lr) * wd);
    double mi = double(beta1) * m[i] + (1.0 - beta1) * g[i];
    double vi = double(beta2) * v[i] + (1.0 - beta2) * double(g[i]) * g[i];
    wi -= double(lr) * (mi / bc1) / (std::sqrt(vi / bc2) + eps);
    w[i] = float(wi);
    m[i] = float(mi);
    v[i] = float(vi);
    finite = finite && std::isfinite(w[i]) && std::isfinite(v[i]);
  }
  return finite;
}

double sum_squares(const float* x, i64 n) {
  double s = 0;
  for (i64 i = 0; i < n; ++i) s += double(x[i]) * x[i];
  return s;
}

void add_inplace(float* y, const float* x, i64 n) {
  for (i64 i = 0; i < n; ++i) y[i] += x[i];
}

void scale_inplace(float* x, i64 n, float s) {
  for (i64 i = 0; i < n; ++i) x[i] *= s;
}

// ---- DLCM kernels ----

static bool forced_at(const i32* tokens, i32 bos_id, i64 n, i64 t) {
  return t == 0 || (tokens != nullptr && tokens[n] == bos_id);
}

static double floored_norm(double sq) { return std::max(std::sqrt(sq), double(kRouterNormEps)); }

template <class T>
void router_prob_forward(T* p, T* cache, const T* q, const T* k, const i32* tokens, i32 bos_id,
                         i64 B, i64 L, i64 ds) {
  for (i64 n = 0; n < B * L; ++n) {
    double qq = 0, kk = 0;
    for (i64 i = 0; i < ds; ++i) {
      qq += double(q[n * ds + i]) * q[n * ds + i];
      kk += double(k[n * ds + i]) * k[n * ds + i];
    }
    cache[n * kRouterCacheStride + 0] = T(std::sqrt(qq));
    cache[n * kRouterCacheStride + 1] = T(std::sqrt(kk));
  }
  for (i64 n = 0; n < B * L; ++n) {
    const i64 t = n % L;
    double c = 0;
    if (t > 0) {  // cos(q_{t-1}, k_t)
      double dot = 0, aa = 0, bb = 0;
      for (i64 i = 0; i < ds; ++i) {
        dot += double(q[(n - 1) * ds + i]) * k[n * ds + i];
        aa += double(q[(n - 1) * ds + i]) * q[(n - 1) * ds + i];
        bb += double(k[n * ds + i]) * k[n * ds + i];
      }
      c = dot / (floored_norm(aa) * floored_norm(bb));
    }
    cache[n * kRouterCacheStride + 2] = T(c);
    p[n] = forced_at(tokens, bos_id, n, t) ? T(1) : T(std::clamp((1 - c) / 2, 0.0, 1.0));
  }
}

// p = (1 - c)/2, c = a.b / (|a| |b|): dc/da = b/(|a||b|) - c a/|a|^2 (no second term where the
// norm is floored, as the floor is a constant there), symmetrically for b.
void router_prob_backward(float* dq, float* dk, const float* dp, const float* /*cache*/,
                          const float* q, const float* k, const i32* tokens, i32 bos_id, i64 B,
                          i64 L, i64 ds) {
  std::vector<double> ga(ds), gb(ds);
  for (i64 n = 0; n < B * L; ++n) {
    const i64 t = n % L;
    if (forced_at(tokens, bos_id, n, t)) continue;
    const float* a = q + (n - 1) * ds;
    const float* b = k + n * ds;
    double dot = 0, aa = 0, bb = 0;
    for (i64 i = 0; i < ds; ++i) {
      dot += double(a[i]) * b[i];
      aa += double(a[i]) * a[i];
      bb += double(b[i]) * b[i];
    }
    const double na = floored_norm(aa), nb = floored_norm(bb), c = dot / (na * nb);
    const double raw = (1 - c) / 2;
    if (raw < 0 || raw > 1) continue;  // the clamp is active: no gradient
    const double g = -0.5 * dp[n];
    const bool fa = std::sqrt(aa) > kRouterNormEps, fb = std::sqrt(bb) > kRouterNormEps;
    for (i64 i = 0; i < ds; ++i) {
      ga[i] = g * (b[i] / (na * nb) - (fa ? c * a[i] / (na * na) : 0.0));
      gb[i] = g * (a[i] / (na * nb) - (fb ? c * b[i] / (nb * nb) : 0.0));
    }
    for (i64 i = 0; i < ds; ++i) dq[(n - 1) * ds + i] += float(ga[i]);
    for (i64 i = 0; i < ds; ++i) dk[n * ds + i] += float(gb[i]);
  }
}

void sample_boundaries(uint8_t* b, const float* p, const i32* tokens, i32 bos_id, i64 B, i64 L,
                       float alpha, uint64_t seed, uint64_t step, i64 row_offset) {
  for (i64 r = 0; r < B; ++r)
    for (i64 t = 0; t < L; ++t) {
      const i64 n = r * L + t;
      if (forced_at(tokens, bos_id, n, t)) {
        b[n] = 1;
        continue;
      }
      const double pc = std::isnan(p[n]) ? 0.0 : std::clamp(double(p[n]), 0.0, 1.0);
      const double x = std::pow(pc, 1.0 / alpha), y = std::pow(1.0 - pc, 1.0 / alpha);
      const double u = counter_uniform(seed, step, uint64_t(row_offset + r), uint64_t(t));
      b[n] = u < x / (x + y) ? 1 : 0;
    }
}

void threshold_boundaries(uint8_t* b, const float* p, const i32* tokens, i32 bos_id, i64 B, i64 L,
                          float tau) {
  for (i64 n = 0; n < B * L; ++n) b[n] = forced_at(tokens, bos_id, n, n % L) || p[n] >= tau;
}

Segments build_segments(const uint8_t* b, const i32* tokens, i32 bos_id, i64 B, i64 L) {
  Segments sg;
  sg.B = B;
  sg.L = L;
  std::vector<std::vector<i32>> starts(B);
  for (i64 r = 0; r < B; ++r)
    for (i64 t = 0; t < L; ++t) {
      if (b[r * L + t]) starts[r].push_back(i32(t));
      sg.seg.push_back(i32(starts[r].size()) - 1);
    }
  for (i64 r = 0; r < B; ++r) {
    sg.count.push_back(i32(starts[r].size()));
    sg.Mmax = std::max<i64>(sg.Mmax, i64(starts[r].size()));
  }
  for (i64 r = 0; r < B; ++r)
    for (i64 j = 0; j < sg.Mmax; ++j) {
      if (j >= sg.count[r]) {  // padded slot
        sg.start.push_back(i32(L));
        sg.len.push_back(0);
        sg.forced.push_back(0);
        continue;
      }
      const i32 st = starts[r][j];
      const i32 end = j + 1 < sg.count[r] ? starts[r][j + 1] : i32(L);
      sg.start.push_back(st);
      sg.len.push_back(end - st);
      sg.forced.push_back(forced_at(tokens, bos_id, r * L + st, st) ? 1 : 0);
    }
  return sg;
}

template <class T>
void pool_mean_forward(T* pooled, const T* H, const Segments& sg, i64 d) {
  for (i64 r = 0; r < sg.B; ++r)
    for (i64 j = 0; j < sg.Mmax; ++j) {
      const i64 sl = sg.slot(r, j);
      for (i64 i = 0; i < d; ++i) {
        double s = 0;
        for (i64 t = sg.start[sl]; t < sg.start[sl] + sg.len[sl]; ++t)
          s += H[(r * sg.L + t) * d + i];
        pooled[sl * d + i] = sg.len[sl] > 0 ? T(s / sg.len[sl]) : T(0);
      }
    }
}

void pool_mean_backward(float* dH, const float* dpooled, const Segments& sg, i64 d) {
  for (i64 r = 0; r < sg.B; ++r)
    for (i64 t = 0; t < sg.L; ++t) {
      const i64 sl = sg.slot(r, sg.seg[r * sg.L + t]);
      for (i64 i = 0; i < d; ++i)
        dH[(r * sg.L + t) * d + i] += float(double(dpooled[sl * d + i]) / sg.len[sl]);
    }
}

// The gate P_j in double: 1 at forced starts, else p clamped to [kSmootherClamp,
// 1 - kSmootherClamp].
template <class T>
static double gate(const T* p, const Segments& sg, i64 r, i64 j) {
  if (p == nullptr) return 1.0;  // smoother off
  const i64 sl = sg.slot(r, j);
  if (sg.forced[sl]) return 1.0;
  return std::clamp(double(p[r * sg.L + sg.start[sl]]), double(kSmootherClamp),
                    double(1.f - kSmootherClamp));
}

template <class T>
void smoother_forward(T* zs, const T* z, const T* p, const Segments& sg, i64 d) {
  for (i64 r = 0; r < sg.B; ++r) {
    std::vector<double> prev(d, 0.0);
    for (i64 j = 0; j < sg.Mmax; ++j) {
      const i64 sl = sg.slot(r, j);
      if (j >= sg.count[r]) {
        for (i64 i = 0; i < d; ++i) zs[sl * d + i] = T(0);
        continue;
      }
      const double P = gate(p, sg, r, j);
      for (i64 i = 0; i < d; ++i) {
        prev[i] = P * z[sl * d + i] + (1 - P) * prev[i];
        zs[sl * d + i] = T(prev[i]);
      }
    }
  }
}

// Reverse sweep: g_j = dzs_j + (1 - P_{j+1}) g_{j+1} is dL/dzs_j through the whole recurrence;
// dz_j += P_j g_j; dP_j = g_j . (z_j - zs_{j-1}), passed to p only inside the clamp's range.
void smoother_backward(float* dz, float* dp, const float* dzs, const float* zs, const float* z,
                       const float* p, const Segments& sg, i64 d) {
  for (i64 r = 0; r < sg.B; ++r) {
    std::vector<double> g(d, 0.0);
    for (i64 j = sg.count[r] - 1; j >= 0; --j) {
      const i64 sl = sg.slot(r, j);
      const double keep = j + 1 < sg.count[r] ? 1 - gate(p, sg, r, j + 1) : 0.0;
      for (i64 i = 0; i < d; ++i) g[i] = dzs[sl * d + i] + keep * g[i];
      const double P = gate(p, sg, r, j);
      for (i64 i = 0; i < d; ++i) dz[sl * d + i] += float(P * g[i]);
      const double pj = p ? double(p[r * sg.L + sg.start[sl]]) : 1.0;
      if (dp && p && !sg.forced[sl] && pj >= kSmootherClamp && pj <= 1.f - kSmootherClamp) {
        double s = 0;
        for (i64 i = 0; i < d; ++i)
          s += g[i] * (double(z[sl * d + i]) - (j > 0 ? double(zs[(sl - 1) * d + i]) : 0.0));
        dp[r * sg.L + sg.start[sl]] += float(s);
      }
    }
  }
}

template <class T>
void concept_list_forward(T* list, const T* z_null, const T* zs, i64 B, i64 Mmax, i64 d) {
  for (i64 r = 0; r < B; ++r)
    for (i64 e = 0; e <= Mmax; ++e)
      for (i64 i = 0; i < d; ++i)
        list[(r * (Mmax + 1) + e) * d + i] = e == 0 ? z_null[i] : zs[(r * Mmax + e - 1) * d + i];
}

void concept_list_backward(float* dz_null, float* dzs, const float* dlist, i64 B, i64 Mmax,
                           i64 d) {
  for (i64 r = 0; r < B; ++r)
    for (i64 e = 0; e <= Mmax; ++e)
      for (i64 i = 0; i < d; ++i) {
        const float g = dlist[(r * (Mmax + 1) + e) * d + i];
        if (e == 0 && dz_null) dz_null[i] += g;
        if (e > 0 && dzs) dzs[(r * Mmax + e - 1) * d + i] += g;
      }
}

template <class T>
void concept_gather(T* rep, const T* list, const Segments& sg, i64 width) {
  for (i64 r = 0; r < sg.B; ++r)
    for (i64 s = 0; s < sg.L; ++s)
      for (i64 i = 0; i < width; ++i)
        rep[(r * sg.L + s) * width + i] =
            list[(r * (sg.Mmax + 1) + sg.seg[r * sg.L + s]) * width + i];
}

void concept_scatter_add(float* dlist, const float* drep, const Segments& sg, i64 width) {
  for (i64 r = 0; r < sg.B; ++r)
    for (i64 s = 0; s < sg.L; ++s)
      for (i64 i = 0; i < width; ++i)
        dlist[(r * (sg.Mmax + 1) + sg.seg[r * sg.L + s]) * width + i] +=
            drep[(r * sg.L + s) * width + i];
}

template <class T>
void concept_attention_forward(T* out, T* lse, const T* q, const T* k, const T* v,
                               const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd,
                               float scale) {
  std::vector<T> krep(B * L * Hkv * hd), vrep(B * L * Hkv * hd);
  ref::concept_gather<T>(krep.data(), k, sg, Hkv * hd);
  ref::concept_gather<T>(vrep.data(), v, sg, Hkv * hd);
  ref::attention_forward<T>(out, lse, q, krep.data(), vrep.data(), B, L, L, Hq, Hkv, hd, 0, scale);
}

void concept_attention_backward(float* dq, float* dk, float* dv, const float* dout,
                                const float* out, const float* lse, const float* q,
                                const float* k, const float* v, const Segments& sg, i64 B, i64 L,
                                i64 Hq, i64 Hkv, i64 hd, float scale) {
  const i64 n = B * L * Hkv * hd;
  std::vector<float> krep(n), vrep(n), dkrep(n, 0.f), dvrep(n, 0.f);
  ref::concept_gather<float>(krep.data(), k, sg, Hkv * hd);
  ref::concept_gather<float>(vrep.data(), v, sg, Hkv * hd);
  ref::attention_backward(dq, dkrep.data(), dvrep.data(), dout, out, lse, q, krep.data(),
                          vrep.data(), B, L, L, Hq, Hkv, hd, 0, scale);
  ref::concept_scatter_add(dk, dkrep.data(), sg, Hkv * hd);
  ref::concept_scatter_add(dv, dvrep.data(), sg, Hkv * hd);
}

AuxLoss global_parser_loss(double sum_b, double sum_p, double count, double R, double weight) {
  AuxLoss a;
  a.F = sum_b / count;
  a.G = sum_p / count;
  a.value = R / (R - 1) * ((R - 1) * a.F * a.G + (1 - a.F) * (1 - a.G)) - 1;
  a.grad_p = weight * R / (R - 1) * ((R - 1) * a.F - (1 - a.F)) / count;
  return a;
}

void aux_loss_backward(float* dp, i64 n, float grad_p) {
  for (i64 i = 0; i < n; ++i) dp[i] += grad_p;
}

template <class T>
double sequence_parser_loss_forward(const uint8_t* b, const T* p, i64 B, i64 L, double R) {
  double total = 0;
  for (i64 r = 0; r < B; ++r) {
    double sb = 0, sp = 0;
    for (i64 t = 0; t < L; ++t) {
      sb += b[r * L + t];
      sp += double(p[r * L + t]);
    }
    const double F = sb / L, G = sp / L;
    total += R / (R - 1) * ((R - 1) * F * G + (1 - F) * (1 - G)) - 1;
  }
  return total;
}

void sequence_parser_loss_backward(float* dp, const uint8_t* b, i64 B, i64 L, i64 rows, double R,
                                   double weight) {
  for (i64 r = 0; r < B; ++r) {
    double sb = 0;
    for (i64 t = 0; t < L; ++t) sb += b[r * L + t];
    const double F = sb / L;
    const double dG = R / (R - 1) * ((R - 1) * F - (1 - F));
    for (i64 t = 0; t < L; ++t) dp[r * L + t] += float(weight * dG / L / rows);
  }
}

#define DLCM_REF_INSTANTIATE(T)                                                              \
  template void embedding_forward<T>(T*, const i32*, const T*, i64, i64);                     \
  template void rmsnorm_forward<T>(T*, T*, const T*, const T*, i64, i64, float);              \
  template void rope_apply<T>(T*, const i32*, i64, i64, i64, float, bool);                    \
  template void swiglu_forward<T>(T*, const T*, const T*, i64);                               \
  template void attention_forward<T>(T*, T*, const T*, const T*, const T*, i64, i64, i64, i64, \
                                     i64, i64, i64, float, i64);                              \
  template double cross_entropy_forward<T>(const T*, const i32*, i64, i64, T*);              \
  template void head_rmsnorm_forward<T>(T*, T*, const T*, const T*, i64, i64, i64, float);    \
  template void linear_forward<T>(T*, const T*, const T*, i64, i64, i64);                     \
  template void router_prob_forward<T>(T*, T*, const T*, const T*, const i32*, i32, i64, i64, \
                                       i64);                                                  \
  template void pool_mean_forward<T>(T*, const T*, const Segments&, i64);                     \
  template void smoother_forward<T>(T*, const T*, const T*, const Segments&, i64);            \
  template void concept_list_forward<T>(T*, const T*, const T*, i64, i64, i64);               \
  template void concept_gather<T>(T*, const T*, const Segments&, i64);                        \
  template void concept_attention_forward<T>(T*, T*, const T*, const T*, const T*,            \
                                             const Segments&, i64, i64, i64, i64, i64, float); \
  template double sequence_parser_loss_forward<T>(const uint8_t*, const T*, i64, i64, double);
DLCM_REF_INSTANTIATE(float)
DLCM_REF_INSTANTIATE(double)

}  // namespace dlcm::ops::ref
