// Simple, obviously-correct reference versions of the kernels in ops.h (same signatures and
// conventions: forward overwrites, backward accumulates). Serial loops, double accumulation,
// no blocking. Tests use them as the ground truth for the fast paths; nothing else should.
// The forwards are templates instantiated for float and double: the double versions give
// finite-difference checks a loss free of float rounding noise.
#pragma once
#include "core/common.h"

namespace dlcm::ops::ref {

template <class T>
void embedding_forward(T* out, const i32* ids, const T* table, i64 N, i64 d);
void embedding_backward(float* dtable, const float* dout, const i32* ids, i64 N, i64 d);

template <class T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, i64 N, i64 d, float eps);
void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                      const float* rstd, i64 N, i64 d);

template <class T>
void rope_apply(T* x, const i32* pos, i64 N, i64 H, i64 hd, float theta, bool inverse);

template <class T>
void swiglu_forward(T* h, const T* a, const T* b, i64 n);
void swiglu_backward(float* da, float* db, const float* dh, const float* a, const float* b, i64 n);

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

void adamw_update(float* w, const float* g, float* m, float* v, i64 n, float lr, float beta1,
                  float beta2, float eps, float wd, i64 t);
double sum_squares(const float* x, i64 n);
void scale_inplace(float* x, i64 n, float s);

}  // namespace dlcm::ops::ref
