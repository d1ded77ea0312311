#include "kernels/ops_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>

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
                     i64 n) {
  for (i64 i = 0; i < n; ++i) {
    double s = sigmoid(a[i]);
    double silu = a[i] * s;
    double dsilu = s * (1.0 + a[i] * (1.0 - s));
    da[i] += float(double(dh[i]) * b[i] * dsilu);
    db[i] += float(double(dh[i]) * silu);
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

void adamw_update(float* w, const float* g, float* m, float* v, i64 n, float lr, float beta1,
                  float beta2, float eps, float wd, i64 t) {
  double bc1 = 1.0 - std::pow(double(beta1), double(t));
  double bc2 = 1.0 - std::pow(double(beta2), double(t));
  for (i64 i = 0; i < n; ++i) {
    double wi = double(w[i]) * (1.0 - double(lr) * wd);
    double mi = double(beta1) * m[i] + (1.0 - beta1) * g[i];
    double vi = double(beta2) * v[i] + (1.0 - beta2) * double(g[i]) * g[i];
    wi -= double(lr) * (mi / bc1) / (std::sqrt(vi / bc2) + eps);
    w[i] = float(wi);
    m[i] = float(mi);
    v[i] = float(vi);
  }
}

double sum_squares(const float* x, i64 n) {
  double s = 0;
  for (i64 i = 0; i < n; ++i) s += double(x[i]) * x[i];
  return s;
}

void scale_inplace(float* x, i64 n, float s) {
  for (i64 i = 0; i < n; ++i) x[i] *= s;
}

#define DLCM_REF_INSTANTIATE(T)                                                              \
  template void embedding_forward<T>(T*, const i32*, const T*, i64, i64);                     \
  template void rmsnorm_forward<T>(T*, T*, const T*, const T*, i64, i64, float);              \
  template void rope_apply<T>(T*, const i32*, i64, i64, i64, float, bool);                    \
  template void swiglu_forward<T>(T*, const T*, const T*, i64);                               \
  template void attention_forward<T>(T*, T*, const T*, const T*, const T*, i64, i64, i64, i64, \
                                     i64, i64, i64, float, i64);                              \
  template double cross_entropy_forward<T>(const T*, const i32*, i64, i64, T*);
DLCM_REF_INSTANTIATE(float)
DLCM_REF_INSTANTIATE(double)

}  // namespace dlcm::ops::ref
