// Simple, obviously-correct reference versions of the kernels in ops.h, gemm.h (linear) and
// dlcm_ops.h (same signatures and conventions: forward overwrites, backward accumulates).
// Serial loops, double accumulation, no blocking. Tests use them as the ground truth for the fast paths; nothing else should.
// The forwards are templates instantiated for float and double: the double versions give
// finite-difference checks a loss free of float rounding noise.
#pragma once
#include "core/common.h"
#include "kernels/dlcm_ops.h"

namespace dlcm::ops::ref {

template <class T>
void embedding_forward(T* out, const i32* ids, const T* table, i64 N, i64 d);
void embedding_backward(float* dtable, const float* dout, const i32* ids, i64 N, i64 d);

template <class T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, i64 N, i64 d, float eps);
void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                      const float* rstd, i64 N, i64 d);

// One RMSNorm per (token, head) of x [N, H, hd], written as its own loop over heads.
template <class T>
void head_rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, i64 N, i64 H, i64 hd,
                          float eps);
void head_rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                           const float* rstd, i64 N, i64 H, i64 hd);

// y[N,out] = x[N,in] W[out,in]^T as a triple loop (the fast path is a oneDNN GEMM).
template <class T>
void linear_forward(T* y, const T* x, const T* W, i64 N, i64 in, i64 out);
void linear_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, i64 N,
                     i64 in, i64 out);

template <class T>
void rope_apply(T* x, const i32* pos, i64 N, i64 H, i64 hd, float theta, bool inverse);

template <class T>
void swiglu_forward(T* h, const T* a, const T* b, i64 n);
void swiglu_backward(float* da, float* db, const float* dh, const float* a, const float* b, i64 n,
                     bool accumulate = true);

// Materialises each query's full score row (fine for tests); backward recomputes the softmax
// from scratch rather than from lse, so it does not share the fast path's assumptions.
// window > 0: query i sees keys (q_offset + i - window, q_offset + i] only.
template <class T>
void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v, i64 B, i64 Lq, i64 Lk,
                       i64 Hq, i64 Hkv, i64 hd, i64 q_offset, float scale, i64 window = 0);
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                        const float* lse, const float* q, const float* k, const float* v, i64 B,
                        i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset, float scale,
                        i64 window = 0);

double cross_entropy_fused(float* logits, const i32* targets, i64 N, i64 V, float grad_scale);
template <class T>
double cross_entropy_forward(const T* logits, const i32* targets, i64 N, i64 V, T* row_loss);

bool adamw_update(float* w, const float* g, float* m, float* v, i64 n, float lr, float beta1,
                  float beta2, float eps, float wd, i64 t);
double sum_squares(const float* x, i64 n);
void add_inplace(float* y, const float* x, i64 n);
void scale_inplace(float* x, i64 n, float s);

// ---- DLCM kernels (dlcm_ops.h) ----
// Router: the cosine straight from its definition in double. The backward recomputes norms and
// cosines from q and k (cache is not read); dq and dk may alias (serial loops).
template <class T>
void router_prob_forward(T* p, T* cache, const T* q, const T* k, const i32* tokens, i32 bos_id,
                         i64 B, i64 L, i64 ds);
void router_prob_backward(float* dq, float* dk, const float* dp, const float* cache,
                          const float* q, const float* k, const i32* tokens, i32 bos_id, i64 B,
                          i64 L, i64 ds);
// Boundary decisions, with sigmoid(logit(p)/alpha) written as p^(1/a) / (p^(1/a) + (1-p)^(1/a)).
void sample_boundaries(uint8_t* b, const float* p, const i32* tokens, i32 bos_id, i64 B, i64 L,
                       float alpha, uint64_t seed, uint64_t step, i64 row_offset);
void threshold_boundaries(uint8_t* b, const float* p, const i32* tokens, i32 bos_id, i64 B, i64 L,
                          float tau);
// Segments from one scan per row (no validation: feed it valid b).
Segments build_segments(const uint8_t* b, const i32* tokens, i32 bos_id, i64 B, i64 L);
template <class T>
void pool_mean_forward(T* pooled, const T* H, const Segments& sg, i64 d);
void pool_mean_backward(float* dH, const float* dpooled, const Segments& sg, i64 d);
template <class T>
void smoother_forward(T* zs, const T* z, const T* p, const Segments& sg, i64 d);
void smoother_backward(float* dz, float* dp, const float* dzs, const float* zs, const float* z,
                       const float* p, const Segments& sg, i64 d);
template <class T>
void concept_list_forward(T* list, const T* z_null, const T* zs, i64 B, i64 Mmax, i64 d);
void concept_list_backward(float* dz_null, float* dzs, const float* dlist, i64 B, i64 Mmax,
                           i64 d);
template <class T>
void concept_gather(T* rep, const T* list, const Segments& sg, i64 width);
void concept_scatter_add(float* dlist, const float* drep, const Segments& sg, i64 width);
// Concept attention by its definition (the replicate form): gather K/V to token positions,
// run the reference causal attention, scatter the K/V gradients back. Reference for the
// compact, replicate and masked kernels alike.
template <class T>
void concept_attention_forward(T* out, T* lse, const T* q, const T* k, const T* v,
                               const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd,
                               float scale);
void concept_attention_backward(float* dq, float* dk, float* dv, const float* dout,
                                const float* out, const float* lse, const float* q,
                                const float* k, const float* v, const Segments& sg, i64 B, i64 L,
                                i64 Hq, i64 Hkv, i64 hd, float scale);
// Global Parser loss from SPEC's unsimplified formula; grad_p = weight * dL/dG / count with
// dL/dG = R/(R-1) [(R-1) F - (1-F)] (the fast path uses the simplified R (R F - 1)/(R-1)).
AuxLoss global_parser_loss(double sum_b, double sum_p, double count, double R,
                           double weight = 1.0);
void aux_loss_backward(float* dp, i64 n, float grad_p);
// Per-sequence loss: (1/rows) sum_r L_r is left to the caller as in the fast path; the
// gradient from the unsimplified dL_r/dG_r = R/(R-1) [(R-1) F_r - (1-F_r)] times dG_r/dp = 1/L.
template <class T>
double sequence_parser_loss_forward(const uint8_t* b, const T* p, i64 B, i64 L, double R);
void sequence_parser_loss_backward(float* dp, const uint8_t* b, i64 B, i64 L, i64 rows, double R,
                                   double weight);

}  // namespace dlcm::ops::ref
