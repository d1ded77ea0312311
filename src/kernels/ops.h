// CPU kernels (OpenMP; AVX-512 intrinsics in the avx512 variant, picked at run time: see
// kernels/isa.h). Each op has its forward and backward side by side. Conventions (llm.c style):
//   - raw float pointers, shapes passed explicitly, row-major, token-major activations;
//   - backward functions ACCUMULATE (+=) into every gradient output (dx, dw, ...), so the
//     caller zeroes gradients once per step and branches simply add up;
//   - forward functions OVERWRITE their outputs.
// N below is a number of token positions (B*L flattened).
#pragma once
#include "core/common.h"

namespace dlcm::ops {

// ---- embedding: out[N,d] = table[ids[n], :] ----
void embedding_forward(float* out, const i32* ids, const float* table, i64 N, i64 d);
void embedding_backward(float* dtable, const float* dout, const i32* ids, i64 N, i64 d);

// ---- RMSNorm: y = x * rstd * w, rstd[n] = 1/sqrt(mean(x^2)+eps) (saved for backward) ----
// The producers of linear layers' inputs (RMSNorm forward and backward, SwiGLU forward and
// backward) optionally write their output's bf16 rounding too (y16 etc., [same shape]; the
// rounding of the BF16 products, bit for bit; see ops::CopyProducer in kernels/gemm.h).
void rmsnorm_forward(float* y, float* rstd, const float* x, const float* w, i64 N, i64 d,
                     float eps, uint16_t* y16 = nullptr);
// dx += the input's gradient, dw += the weight's. A residual branch's gradient res [N, d]
// (optional) joins in the same pass: dx (+)= res + the gradient, computed as (dx + res) + grad,
// the order of adding res first. accumulate = false writes dx without reading it.
void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                      const float* rstd, i64 N, i64 d, const float* res = nullptr,
                      bool accumulate = true, uint16_t* dx16 = nullptr);

// ---- per-head RMSNorm (QK-norm): x [N, H, hd] is normalised over head_dim, one RMSNorm per
// (token, head) sharing the weight w [hd]; rstd [N*H] ----
void head_rmsnorm_forward(float* y, float* rstd, const float* x, const float* w, i64 N, i64 H,
                          i64 hd, float eps);
void head_rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                           const float* rstd, i64 N, i64 H, i64 hd);

// ---- RoPE, rotate-half layout (dim i pairs with i + hd/2), in place ----
// x is [N, H, hd]; pos[n] is the position of token n. inverse=true applies the transpose
// rotation, which is the backward of the forward rotation.
// BF16: x16 (optional, [N, H, hd]) gets the rotated values' rounding too (a producer of the
// q/k products' dy, ops::CopyProducer); write_x = false leaves x as it was and writes x16 alone.
void rope_apply(float* x, const i32* pos, i64 N, i64 H, i64 hd, float theta, bool inverse,
                uint16_t* x16 = nullptr, bool write_x = true);

// ---- SwiGLU gate: h = silu(a) * b, elementwise over n elements ----
void swiglu_forward(float* h, const float* a, const float* b, i64 n, uint16_t* h16 = nullptr);
// swiglu_forward on `rows` rows of n (strided; the calling thread alone, no parallel region:
// the fused epilogue of a stream's gate/up product), the same bits per element.
void swiglu_rows(float* h, i64 ldh, const float* a, i64 lda, const float* b, i64 ldb, i64 rows,
                 i64 n);
// da/db += the gradients; with accumulate = false, da/db = the gradients (no clearing needed).
void swiglu_backward(float* da, float* db, const float* dh, const float* a, const float* b, i64 n,
                     bool accumulate = true, uint16_t* da16 = nullptr, uint16_t* db16 = nullptr);

// ---- causal multi-head attention with grouped-query heads, blockwise (flash style) ----
// q [B, Lq, Hq, hd], k/v [B, Lk, Hkv, hd], out [B, Lq, Hq, hd], lse [B, Hq, Lq].
// Query i (0-based within its row) sits at absolute position q_offset + i and attends keys
// j <= q_offset + i (j < Lk). Self-attention: Lq == Lk, q_offset = 0. Head h uses kv head
// h / (Hq / Hkv). Never materialises a full Lq x Lk score matrix; saves lse for backward.
// window > 0: sliding window, query i sees only keys q_offset + i - window < j <= q_offset + i
// (needs q_offset + Lq <= Lk); work O(Lq * window). window = 0: full causal.
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       i64 B, i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset, float scale,
                       i64 window = 0);
// Few queries (decoding, short prefills): the forward takes its per-row path, which keeps
// ordinary stores for the output (the tests ask which path ran through this predicate).
inline bool attention_forward_uses_rows(i64 Lq, i64 Hq, i64 Hkv) {
  return Lq < 16 && Lq * (Hq / Hkv) <= 64;  // 64: the blockwise path's query rows per tile
}
// Recomputes the probabilities from q, k and lse. dq/dk/dv accumulate; with accumulate =
// false they are written without being read (no clearing needed; keys no query sees get 0).
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                        const float* lse, const float* q, const float* k, const float* v, i64 B,
                        i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset, float scale,
                        i64 window = 0, bool accumulate = true);

// ---- softmax cross-entropy fused with the logits' gradient ----
// logits [N, V] are overwritten in place by dloss/dlogits * grad_scale (no separate probability
// copy). targets[n] < 0 means "ignore" (gradient row zero, no loss). Returns the SUM of the
// per-token losses over non-ignored rows.
double cross_entropy_fused(float* logits, const i32* targets, i64 N, i64 V, float grad_scale);
// Forward only: sum of losses; optionally per-row loss (nullptr to skip). Logits untouched.
double cross_entropy_forward(const float* logits, const i32* targets, i64 N, i64 V,
                             float* row_loss);

// ---- log-sum-exp of one row: log(sum_j exp(x[j])) of x [n], computed as max + log(sum
// exp(x - max)) (the log-softmax of entry j is x[j] - result); *max_out gets max_j x[j] ----
double logsumexp(const float* x, i64 n, float* max_out = nullptr);

// ---- optimizer pieces ----
// AdamW with decoupled weight decay wd (0 for non-matrices); step t is 1-based. Returns whether
// every updated weight and second moment is finite (checked in the same pass, so a trainer
// needs no second read of w and v to find an update that overflowed).
bool adamw_update(float* w, const float* g, float* m, float* v, i64 n, float lr, float beta1,
                  float beta2, float eps, float wd, i64 t);
double sum_squares(const float* x, i64 n);
// y[n] += x[n] (residual adds; in parallel chunks when large, no region when small).
void add_inplace(float* y, const float* x, i64 n);
void scale_inplace(float* x, i64 n, float s);

}  // namespace dlcm::ops
