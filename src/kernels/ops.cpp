// Elementwise, normalisation, RoPE, loss and optimizer kernels. Attention is in attention.cpp.
#include "kernels/ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>

#include "core/parallel.h"
#include "kernels/gemm.h"        // round_row_to_bf16
#include "kernels/isa_target.h"  // last include: the variant's target and namespace
#include "kernels/simd.h"

namespace dlcm::ops::DLCM_ISA_NS {

int kernel_variant() {
#if defined(DLCM_ISA_NATIVE)  // the level -march=native gave (dispatch.cpp's kNativeLevel)
#if defined(__AVX512F__)
  return 2;
#elif defined(__AVX2__) && defined(__FMA__)
  return 1;
#else
  return 0;
#endif
#else
  return DLCM_ISA_LEVEL;
#endif
}

// ---- embedding ----

void embedding_forward(float* out, const i32* ids, const float* table, i64 N, i64 d) {
  parallel_for(N, parallel_worth(N * d),
               [&](i64 n) { std::copy_n(table + i64(ids[n]) * d, d, out + n * d); });
}

// Scatter-add. Threads own disjoint column ranges, so repeated ids never race and the sum
// order per element is the token order (deterministic for any thread count).
void embedding_backward(float* dtable, const float* dout, const i32* ids, i64 N, i64 d) {
#pragma omp parallel if (parallel_worth(N * d))
  {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    // Chunks of 16 columns keep each thread on whole cache lines.
    i64 chunks = (d + 15) / 16;
    i64 c0 = std::min(d, chunks * t / nt * 16), c1 = std::min(d, chunks * (t + 1) / nt * 16);
    if (c0 < c1)
      for (i64 n = 0; n < N; ++n) {
        float* dst = dtable + i64(ids[n]) * d;
        const float* src = dout + n * d;
#pragma omp simd
        for (i64 c = c0; c < c1; ++c) dst[c] += src[c];
      }
  }
}

// ---- RMSNorm ----

// sum_c x_c^2 in double. AVX-512: four independent accumulators and one horizontal add; the
// plain `omp simd` reduction compiled to one FMA chain and sixteen scalar adds per row, which
// made a 256-wide row ~250 cycles and a head's 64-wide row ~140 (latency, not bandwidth).
DLCM_GCC105593_BEGIN
static inline double row_sum_squares(const float* x, i64 d) {
#if defined(DLCM_AVX512)
  __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  i64 c = 0;
  for (; c + 32 <= d; c += 32) {
    const __m512 u = _mm512_loadu_ps(x + c), v = _mm512_loadu_ps(x + c + 16);
    const __m512d u0 = _mm512_cvtps_pd(_mm512_castps512_ps256(u));
    const __m512d u1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(u, 1));
    const __m512d v0 = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d v1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
    a0 = _mm512_fmadd_pd(u0, u0, a0);
    a1 = _mm512_fmadd_pd(u1, u1, a1);
    a2 = _mm512_fmadd_pd(v0, v0, a2);
    a3 = _mm512_fmadd_pd(v1, v1, a3);
  }
  for (; c < d; c += 8) {  // tail: 8 at a time, masked
    const __mmask8 m = __mmask8(d - c >= 8 ? 0xFF : (1u << (d - c)) - 1);
    const __m512d u = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, x + c));
    a0 = _mm512_fmadd_pd(u, u, a0);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3)));
#else
  double ss = 0;
#pragma omp simd reduction(+ : ss)
  for (i64 c = 0; c < d; ++c) ss += double(x[c]) * double(x[c]);
  return ss;
#endif
}

// sum_c double(g_c w_c) x_c (the backward's row term; each term exactly as the plain loop's).
static inline double row_sum_gwx(const float* g, const float* w, const float* x, i64 d) {
#if defined(DLCM_AVX512)
  __m512d a0 = _mm512_setzero_pd(), a1 = a0;
  const auto step = [&](__m512 gv, __m512 wv, __m512 xv) {
    const __m512 gw = _mm512_mul_ps(gv, wv);
    a0 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(gw)),
                         _mm512_cvtps_pd(_mm512_castps512_ps256(xv)), a0);
    a1 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(gw, 1)),
                         _mm512_cvtps_pd(_mm512_extractf32x8_ps(xv, 1)), a1);
  };
  i64 c = 0;
  for (; c + 16 <= d; c += 16)
    step(_mm512_loadu_ps(g + c), _mm512_loadu_ps(w + c), _mm512_loadu_ps(x + c));
  if (c < d) {
    const __mmask16 m = simd::tail_mask(d - c);
    step(_mm512_maskz_loadu_ps(m, g + c), _mm512_maskz_loadu_ps(m, w + c),
         _mm512_maskz_loadu_ps(m, x + c));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
#else
  double dot = 0;
#pragma omp simd reduction(+ : dot)
  for (i64 c = 0; c < d; ++c) dot += double(g[c] * w[c]) * double(x[c]);
  return dot;
#endif
}
DLCM_GCC105593_END

// y null (y16 given): the rows go through a per-thread row in L1, their rounding alone is written.
void rmsnorm_forward(float* y, float* rstd, const float* x, const float* w, i64 N, i64 d,
                     float eps, uint16_t* y16) {
  DLCM_CHECK(y || y16, "rmsnorm_forward: no output (y and y16 both null)");
  parallel_for(N, parallel_worth(N * d), [&](i64 n) {
    thread_local Buf row;
    const float* xr = x + n * d;
    const double ss = row_sum_squares(xr, d);
    float r = float(1.0 / std::sqrt(ss / double(d) + double(eps)));
    rstd[n] = r;
    if (!y && row.size() < size_t(d)) row.resize(d);
    float* yr = y ? y + n * d : row.data();
#pragma omp simd
    for (i64 c = 0; c < d; ++c) yr[c] = xr[c] * r * w[c];
    if (y16) round_row_to_bf16(y16 + n * d, yr, d);  // the row is still in L1
  });
}

// dx_c += r w_c dy_c - x_c r^3/d * sum_k dy_k w_k x_k;  dw_c += sum_n dy_c x_c r.
// dw: each thread sums its rows into a private row, then the partials are added column-wise
// in thread order (deterministic for a fixed thread count).
void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                      const float* rstd, i64 N, i64 d, const float* res, bool accumulate,
                      uint16_t* dx16) {
  int nt_max = parallel_worth(N * d) ? omp_get_max_threads() : 1;
  Buf part(size_t(nt_max) * d, 0.0f);
#pragma omp parallel num_threads(nt_max)
  {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    float* pw = part.data() + i64(t) * d;
#pragma omp for schedule(static)
    for (i64 n = 0; n < N; ++n) {
      const float* xr = x + n * d;
      const float* g = dy + n * d;
      float r = rstd[n];
      const double dot = row_sum_gwx(g, w, xr, d);
      float k = float(dot / double(d)) * r * r * r;
      float* dxr = dx + n * d;
      const float* rr = res ? res + n * d : nullptr;
      // The four forms of dx = (base) + grad, base = dx, res, dx + res or 0: one pass each.
      if (accumulate && rr) {
#pragma omp simd
        for (i64 c = 0; c < d; ++c) dxr[c] = (dxr[c] + rr[c]) + (r * w[c] * g[c] - k * xr[c]);
      } else if (accumulate) {
#pragma omp simd
        for (i64 c = 0; c < d; ++c) dxr[c] += r * w[c] * g[c] - k * xr[c];
      } else if (rr) {
#pragma omp simd
        for (i64 c = 0; c < d; ++c) dxr[c] = rr[c] + (r * w[c] * g[c] - k * xr[c]);
      } else {
#pragma omp simd
        for (i64 c = 0; c < d; ++c) dxr[c] = r * w[c] * g[c] - k * xr[c];
      }
#pragma omp simd
      for (i64 c = 0; c < d; ++c) pw[c] += g[c] * xr[c] * r;
      if (dx16) round_row_to_bf16(dx16 + n * d, dxr, d);
    }
    // implicit barrier after omp for
#pragma omp for schedule(static)
    for (i64 c = 0; c < d; ++c) {
      float s = 0;
      for (int u = 0; u < nt; ++u) s += part[size_t(u) * d + c];
      dw[c] += s;
    }
  }
}

// ---- per-head RMSNorm ----
// [N, H, hd] is [N*H, hd] rows: one RMSNorm per (token, head).
void head_rmsnorm_forward(float* y, float* rstd, const float* x, const float* w, i64 N, i64 H,
                          i64 hd, float eps) {
  rmsnorm_forward(y, rstd, x, w, N * H, hd, eps, nullptr);
}

void head_rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                           const float* rstd, i64 N, i64 H, i64 hd) {
  rmsnorm_backward(dx, dw, dy, x, w, rstd, N * H, hd, nullptr, true, nullptr);
}

// ---- RoPE ----

// cos/sin table for positions [0, npos) and the hd/2 frequencies of one (theta, hd). Angles
// are formed in double: at position 16384 a float angle would be off by ~1e-3 rad.
struct RopeTable {
  i64 npos, half;
  Buf cs;  // [npos, 2, half]: cos row then sin row
};

static std::shared_ptr<const RopeTable> rope_table(float theta, i64 hd, i64 need_pos) {
  static std::mutex mu;
  static std::map<std::pair<float, i64>, std::shared_ptr<const RopeTable>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[{theta, hd}];
  if (slot && slot->npos >= need_pos) return slot;
  // Grow geometrically so that a slowly increasing decode position rebuilds rarely.
  i64 npos = std::max<i64>(need_pos, slot ? slot->npos * 2 : 1024);
  auto t = std::make_shared<RopeTable>();
  t->npos = npos;
  t->half = hd / 2;
  t->cs.resize(size_t(npos) * hd);
  std::vector<double> inv(t->half);
  for (i64 i = 0; i < t->half; ++i)
    inv[i] = std::pow(double(theta), -2.0 * double(i) / double(hd));
#pragma omp parallel for schedule(static) if (parallel_worth(npos * hd))
  for (i64 p = 0; p < npos; ++p)
    for (i64 i = 0; i < t->half; ++i) {
      double a = double(p) * inv[i];
      t->cs[p * hd + i] = float(std::cos(a));
      t->cs[p * hd + t->half + i] = float(std::sin(a));
    }
  slot = t;
  return t;
}

// x16: each rotated row's rounding too, while the row is in L1; write_x = false: that alone
// (the rows go through a per-thread row, x keeps its values).
void rope_apply(float* x, const i32* pos, i64 N, i64 H, i64 hd, float theta, bool inverse,
                uint16_t* x16, bool write_x) {
  DLCM_CHECK(hd % 2 == 0, "rope_apply: head_dim must be even, got ", hd);
  DLCM_CHECK(write_x || x16, "rope_apply: no output (write_x false without x16)");
  if (N == 0) return;
  i32 pmax = 0;
  for (i64 n = 0; n < N; ++n) {
    DLCM_CHECK(pos[n] >= 0, "rope_apply: negative position ", pos[n], " at token ", n);
    pmax = std::max(pmax, pos[n]);
  }
  auto tab = rope_table(theta, hd, i64(pmax) + 1);
  const i64 half = hd / 2;
  const float sgn = inverse ? -1.0f : 1.0f;
  const i64 w = H * hd;  // one token's row
  parallel_for(N, parallel_worth(N * w), [&](i64 n) {
    thread_local Buf row;
    const float* cs = tab->cs.data() + i64(pos[n]) * hd;
    const float* sn = cs + half;
    float* xr = x + n * w;
    if (!write_x && row.size() < size_t(w)) row.resize(w);
    float* yr = write_x ? xr : row.data();  // in place, or the row only
    for (i64 h = 0; h < H; ++h) {
      const float* a = xr + h * hd;
      const float* b = a + half;
      float* ya = yr + h * hd;
      float* yb = ya + half;
#pragma omp simd
      for (i64 i = 0; i < half; ++i) {
        float c = cs[i], s = sgn * sn[i];
        float x1 = a[i], x2 = b[i];
        ya[i] = x1 * c - x2 * s;
        yb[i] = x2 * c + x1 * s;
      }
    }
    if (x16) round_row_to_bf16(x16 + n * w, yr, w);
  });
}

// ---- SwiGLU ----

// h = silu(a) * b over n elements: each element's arithmetic alone, so any split of a span
// gives the same bits (swiglu_forward's chunks, swiglu_rows' rows).
static inline void swiglu_span(float* h, const float* a, const float* b, i64 n) {
#ifdef DLCM_AVX512
  for (i64 i = 0; i < n; i += 16) {
    __mmask16 k = simd::tail_mask(n - i);
    __m512 av = _mm512_maskz_loadu_ps(k, a + i), bv = _mm512_maskz_loadu_ps(k, b + i);
    __m512 e = simd::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), av));  // e^-a
    __m512 s = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_mask_storeu_ps(h + i, k, _mm512_mul_ps(_mm512_mul_ps(av, s), bv));
  }
#else
  for (i64 i = 0; i < n; ++i) h[i] = a[i] / (1.0f + std::exp(-a[i])) * b[i];
#endif
}

#ifdef DLCM_AVX512
// dst[0, n) = src[0, n), with non-temporal stores where dst is 64-byte aligned (the caller
// fences), ordinary ones otherwise.
static inline void stream_copy(float* dst, const float* src, i64 n) {
  i64 i = 0;
  if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0)
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
  std::copy(src + i, src + n, dst + i);
}
#endif

// A large h (a layer's activation, with its rounding: lines no cache holds) is written with
// non-temporal stores from a chunk computed in L1 (ops::stream_output): an ordinary store
// would first read each line. The pass 1.15-1.38x in the BF16 training step (session 44).
// h null (h16 given): each chunk stays in L1, its rounding alone is written.
void swiglu_forward(float* h, const float* a, const float* b, i64 n, uint16_t* h16) {
  DLCM_CHECK(h || h16, "swiglu_forward: no output (h and h16 both null)");
#ifdef DLCM_AVX512
  const bool nt = stream_output(n * i64(sizeof(float)));
  if (nt) count_streamed_output();
#else
  const bool nt = false;
#endif
#pragma omp parallel if (parallel_worth(n))
  {
    alignas(64) float chunk[1024];
#pragma omp for schedule(static)
    for (i64 i0 = 0; i0 < n; i0 += 1024) {
      const i64 i1 = std::min(n, i0 + 1024);
      float* hc = nt || !h ? chunk : h + i0;
      swiglu_span(hc, a + i0, b + i0, i1 - i0);
#ifdef DLCM_AVX512
      if (nt) {
        if (h) stream_copy(h + i0, chunk, i1 - i0);
        if (h16) round_row_to_bf16_stream(h16 + i0, chunk, i1 - i0);
        continue;
      }
#endif
      if (h16) round_row_to_bf16(h16 + i0, hc, i1 - i0);  // while the chunk is in L1
    }
#ifdef DLCM_AVX512
    if (nt) _mm_sfence();  // this thread's streamed lines before the region's barrier
#endif
  }
}

void swiglu_rows(float* h, i64 ldh, const float* a, i64 lda, const float* b, i64 ldb, i64 rows,
                 i64 n) {
  for (i64 r = 0; r < rows; ++r) swiglu_span(h + r * ldh, a + r * lda, b + r * ldb, n);
}

// silu'(a) = s (1 + a (1 - s)), s = sigmoid(a).
// BF16: large roundings of da and db are written with non-temporal stores as in swiglu_forward
// (the pass 1.07-1.25x); da and db themselves, a scratch that every layer's backward
// overwrites, keep ordinary stores (streaming them too made the pass 1.1x slower, session 44).
// da (db) null, with da16 (db16) given and accumulate false: the gradient goes through a chunk
// in L1 and its rounding alone is written.
void swiglu_backward(float* da, float* db, const float* dh, const float* a, const float* b,
                     i64 n, bool accumulate, uint16_t* da16, uint16_t* db16) {
  DLCM_CHECK((da || (da16 && !accumulate)) && (db || (db16 && !accumulate)),
             "swiglu_backward: da / db may be null only with their rounding given and "
             "accumulate false");
#ifdef DLCM_AVX512
  const bool nt = (da16 || db16) && stream_output(n * i64(sizeof(uint16_t)));
  if (nt) count_streamed_output();
#else
  const bool nt = false;
#endif
#pragma omp parallel if (parallel_worth(n))
  {
    alignas(64) float ca[1024], cb[1024];  // a chunk's da, db where they are not kept
#pragma omp for schedule(static)
    for (i64 i0 = 0; i0 < n; i0 += 1024) {
      const i64 m = std::min(n, i0 + 1024) - i0;
      // this chunk: elements i0 + i, i < m
      float* dac = da ? da + i0 : ca;
      float* dbc = db ? db + i0 : cb;
      const float *ac = a + i0, *bc = b + i0, *gc = dh + i0;
#ifdef DLCM_AVX512
      const __m512 one = _mm512_set1_ps(1.0f);
      for (i64 i = 0; i < m; i += 16) {
        __mmask16 k = simd::tail_mask(m - i);
        __m512 av = _mm512_maskz_loadu_ps(k, ac + i), bv = _mm512_maskz_loadu_ps(k, bc + i);
        __m512 g = _mm512_maskz_loadu_ps(k, gc + i);
        __m512 e = simd::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), av));
        __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, e));
        __m512 silu = _mm512_mul_ps(av, s);
        __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(av, _mm512_sub_ps(one, s), one));
        __m512 gb = _mm512_mul_ps(g, bv);
        // without accumulate, da/db are not read (they may hold anything)
        const __mmask16 ka = accumulate ? k : __mmask16(0);
        _mm512_mask_storeu_ps(dac + i, k,
                              _mm512_fmadd_ps(gb, dsilu, _mm512_maskz_loadu_ps(ka, dac + i)));
        _mm512_mask_storeu_ps(dbc + i, k,
                              _mm512_fmadd_ps(g, silu, _mm512_maskz_loadu_ps(ka, dbc + i)));
      }
#else
      for (i64 i = 0; i < m; ++i) {
        float s = 1.0f / (1.0f + std::exp(-ac[i]));
        float silu = ac[i] * s;
        const float ga = gc[i] * bc[i] * s * (1.0f + ac[i] * (1.0f - s)), gb = gc[i] * silu;
        dac[i] = accumulate ? dac[i] + ga : ga;
        dbc[i] = accumulate ? dbc[i] + gb : gb;
      }
#endif
      const auto round = nt ? round_row_to_bf16_stream : round_row_to_bf16;
      if (da16) round(da16 + i0, dac, m);
      if (db16) round(db16 + i0, dbc, m);
    }
#ifdef DLCM_AVX512
    if (nt) _mm_sfence();  // this thread's streamed lines before the region's barrier
#endif
  }
}

// ---- cross-entropy ----

static void check_targets(const i32* targets, i64 N, i64 V, const char* who) {
  for (i64 n = 0; n < N; ++n)
    DLCM_CHECK(targets[n] < V, who, ": target ", targets[n], " at row ", n,
               " is outside the vocabulary of size ", V);
}

// loss_n = logsumexp(x_n) - x_n[t];  dloss/dx = softmax(x_n) - onehot(t).
double cross_entropy_fused(float* logits, const i32* targets, i64 N, i64 V, float grad_scale) {
  check_targets(targets, N, V, "cross_entropy_fused");
  double total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total) if (parallel_worth(N * V))
  for (i64 n = 0; n < N; ++n) {
    float* x = logits + n * V;
    i32 t = targets[n];
    if (t < 0) {
      std::fill(x, x + V, 0.0f);
      continue;
    }
    float xt = x[t];
    float mx = simd::hmax(x, V);
    double sum = simd::exp_sub_sum(x, V, mx);
    total += std::log(sum) + double(mx) - double(xt);
    float k = float(double(grad_scale) / sum);
#pragma omp simd
    for (i64 c = 0; c < V; ++c) x[c] *= k;
    x[t] -= grad_scale;
  }
  return total;
}

double cross_entropy_forward(const float* logits, const i32* targets, i64 N, i64 V,
                             float* row_loss) {
  check_targets(targets, N, V, "cross_entropy_forward");
  double total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total) if (parallel_worth(N * V))
  for (i64 n = 0; n < N; ++n) {
    const float* x = logits + n * V;
    double l = 0;
    if (targets[n] >= 0) {
      float mx = simd::hmax(x, V);
      l = std::log(simd::exp_sum(x, V, mx)) + double(mx) - double(x[targets[n]]);
    }
    if (row_loss) row_loss[n] = float(l);
    total += l;
  }
  return total;
}

double logsumexp(const float* x, i64 n, float* max_out) {
  const float mx = simd::hmax(x, n);
  if (max_out) *max_out = mx;
  return double(mx) + std::log(simd::exp_sum(x, n, mx));
}

// ---- optimizer ----

// PyTorch AdamW (foreach=False) order of operations: decay, moments, bias-corrected step
// w -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps). The finiteness of the new w and v rides along:
// 0 * x is 0 for a finite x and NaN otherwise, summed per block (no fast-math here, so the
// product is not folded away).
bool adamw_update(float* w, const float* g, float* m, float* v, i64 n, float lr, float beta1,
                  float beta2, float eps, float wd, i64 t) {
  DLCM_CHECK(t >= 1, "adamw_update: step must be >= 1, got ", t);
  const double bc1 = 1.0 - std::pow(double(beta1), double(t));
  const double bc2 = 1.0 - std::pow(double(beta2), double(t));
  const float decay = float(1.0 - double(lr) * double(wd));
  const float step = float(double(lr) / bc1);
  const float inv_sqrt_bc2 = float(1.0 / std::sqrt(bc2));
  const float b1 = beta1, b2 = beta2, c1 = 1.0f - beta1, c2 = 1.0f - beta2;
  int bad = 0;
  // Explicit vectors: with errno-setting sqrt the compiler keeps this loop scalar (4x slower).
  // IEEE sqrt and division in both paths; the scalar loop handles the tail.
#pragma omp parallel for schedule(static) reduction(| : bad) if (parallel_worth(n))
  for (i64 i0 = 0; i0 < n; i0 += 4096) {
    const i64 i1 = std::min(n, i0 + 4096);
    i64 i = i0;
    float zero_sum = 0;  // 0 * (every new w and v): NaN once one of them is not finite
#ifdef DLCM_AVX512
    __m512 vzero_sum = _mm512_setzero_ps();
    const __m512 vzero = _mm512_setzero_ps();
    const __m512 vb1 = _mm512_set1_ps(b1), vb2 = _mm512_set1_ps(b2), vc1 = _mm512_set1_ps(c1),
                 vc2 = _mm512_set1_ps(c2), vdec = _mm512_set1_ps(decay),
                 vstep = _mm512_set1_ps(step), vibc = _mm512_set1_ps(inv_sqrt_bc2),
                 veps = _mm512_set1_ps(eps);
    for (; i + 16 <= i1; i += 16) {
      const __m512 gi = _mm512_loadu_ps(g + i);
      const __m512 mi = _mm512_add_ps(_mm512_mul_ps(vb1, _mm512_loadu_ps(m + i)),
                                      _mm512_mul_ps(vc1, gi));
      const __m512 vi = _mm512_add_ps(_mm512_mul_ps(vb2, _mm512_loadu_ps(v + i)),
                                      _mm512_mul_ps(_mm512_mul_ps(vc2, gi), gi));
      _mm512_storeu_ps(m + i, mi);
      _mm512_storeu_ps(v + i, vi);
      const __m512 den = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vi), vibc), veps);
      const __m512 upd = _mm512_div_ps(_mm512_mul_ps(vstep, mi), den);
      const __m512 wi = _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(w + i), vdec), upd);
      _mm512_storeu_ps(w + i, wi);
      vzero_sum = _mm512_add_ps(vzero_sum, _mm512_add_ps(_mm512_mul_ps(vzero, wi),
                                                         _mm512_mul_ps(vzero, vi)));
    }
    zero_sum = _mm512_reduce_add_ps(vzero_sum);
#endif
    for (; i < i1; ++i) {
      const float gi = g[i];
      const float mi = b1 * m[i] + c1 * gi;
      const float vi = b2 * v[i] + c2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      w[i] = w[i] * decay - step * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
      zero_sum += 0.0f * w[i] + 0.0f * vi;
    }
    bad |= zero_sum != 0.0f;  // NaN != 0
  }
  return bad == 0;
}

double sum_squares(const float* x, i64 n) {
  double s = 0;
#pragma omp parallel for simd schedule(static) reduction(+ : s) if (parallel_worth(n))
  for (i64 i = 0; i < n; ++i) s += double(x[i]) * double(x[i]);
  return s;
}

void add_inplace(float* y, const float* x, i64 n) {
  constexpr i64 kChunk = 4096;  // 16 KiB of each operand per chunk
  parallel_for((n + kChunk - 1) / kChunk, parallel_worth(n), [&](i64 c) {
    const i64 i1 = std::min(n, (c + 1) * kChunk);
#pragma omp simd
    for (i64 i = c * kChunk; i < i1; ++i) y[i] += x[i];
  });
}

void scale_inplace(float* x, i64 n, float s) {
#pragma omp parallel for simd schedule(static) if (parallel_worth(n))
  for (i64 i = 0; i < n; ++i) x[i] *= s;
}

}  // namespace dlcm::ops::DLCM_ISA_NS
