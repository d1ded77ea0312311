// The hand-written kernels behind ops.h, dlcm_ops.h and tile_gemm.h, as one list:
// X(return type, name, (parameters), (arguments)). Each instruction-set variant of the kernel
// sources (kernels/isa_target.h) defines these functions in its own namespace, and
// kernels/dispatch.cpp defines the public dlcm::ops functions as forwarders to the variant in use.
// A new kernel in those files goes here too (a missing entry is an undefined reference).
// Default arguments live only in the public headers.
#pragma once

#define DLCM_KERNEL_OPS(X) \
  X(void, embedding_forward, (float* out, const i32* ids, const float* table, i64 N, i64 d), (out, ids, table, N, d)) \
  X(void, embedding_backward, (float* dtable, const float* dout, const i32* ids, i64 N, i64 d), (dtable, dout, ids, N, d)) \
  X(void, rmsnorm_forward, (float* y, float* rstd, const float* x, const float* w, i64 N, i64 d, float eps, uint16_t* y16), (y, rstd, x, w, N, d, eps, y16)) \
  X(void, rmsnorm_backward, (float* dx, float* dw, const float* dy, const float* x, const float* w, const float* rstd, i64 N, i64 d, const float* res, bool accumulate, uint16_t* dx16), (dx, dw, dy, x, w, rstd, N, d, res, accumulate, dx16)) \
  X(void, head_rmsnorm_forward, (float* y, float* rstd, const float* x, const float* w, i64 N, i64 H, i64 hd, float eps), (y, rstd, x, w, N, H, hd, eps)) \
  X(void, head_rmsnorm_backward, (float* dx, float* dw, const float* dy, const float* x, const float* w, const float* rstd, i64 N, i64 H, i64 hd), (dx, dw, dy, x, w, rstd, N, H, hd)) \
  X(void, rope_apply, (float* x, const i32* pos, i64 N, i64 H, i64 hd, float theta, bool inverse, uint16_t* x16, bool write_x), (x, pos, N, H, hd, theta, inverse, x16, write_x)) \
  X(void, swiglu_forward, (float* h, const float* a, const float* b, i64 n, uint16_t* h16), (h, a, b, n, h16)) \
  X(void, swiglu_rows, (float* h, i64 ldh, const float* a, i64 lda, const float* b, i64 ldb, i64 rows, i64 n), (h, ldh, a, lda, b, ldb, rows, n)) \
  X(void, swiglu_backward, (float* da, float* db, const float* dh, const float* a, const float* b, i64 n, bool accumulate, uint16_t* da16, uint16_t* db16), (da, db, dh, a, b, n, accumulate, da16, db16)) \
  X(void, attention_forward, (float* out, float* lse, const float* q, const float* k, const float* v, i64 B, i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset, float scale, i64 window), (out, lse, q, k, v, B, Lq, Lk, Hq, Hkv, hd, q_offset, scale, window)) \
  X(void, attention_backward, (float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse, const float* q, const float* k, const float* v, i64 B, i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset, float scale, i64 window, bool accumulate), (dq, dk, dv, dout, out, lse, q, k, v, B, Lq, Lk, Hq, Hkv, hd, q_offset, scale, window, accumulate)) \
  X(double, cross_entropy_fused, (float* logits, const i32* targets, i64 N, i64 V, float grad_scale), (logits, targets, N, V, grad_scale)) \
  X(double, cross_entropy_forward, (const float* logits, const i32* targets, i64 N, i64 V, float* row_loss), (logits, targets, N, V, row_loss)) \
  X(double, logsumexp, (const float* x, i64 n, float* max_out), (x, n, max_out)) \
  X(bool, adamw_update, (float* w, const float* g, float* m, float* v, i64 n, float lr, float beta1, float beta2, float eps, float wd, i64 t), (w, g, m, v, n, lr, beta1, beta2, eps, wd, t)) \
  X(double, sum_squares, (const float* x, i64 n), (x, n)) \
  X(void, add_inplace, (float* y, const float* x, i64 n), (y, x, n)) \
  X(void, scale_inplace, (float* x, i64 n, float s), (x, n, s)) \
  X(void, tile_mm, (float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb, i64 M, i64 N, i64 K, float alpha, bool acc), (C, ldc, A, rsa, csa, B, ldb, M, N, K, alpha, acc)) \
  X(void, tile_mm_amx, (float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb, i64 M, i64 N, i64 K, float alpha, bool acc), (C, ldc, A, rsa, csa, B, ldb, M, N, K, alpha, acc)) \
  X(void, router_prob_forward, (float* p, float* cache, const float* q, const float* k, const i32* tokens, i32 bos_id, i64 B, i64 L, i64 ds), (p, cache, q, k, tokens, bos_id, B, L, ds)) \
  X(void, router_prob_rows, (float* p, const float* q_prev, const float* q, const float* k, i64 n, i64 ds), (p, q_prev, q, k, n, ds)) \
  X(void, router_prob_backward, (float* dq, float* dk, const float* dp, const float* cache, const float* q, const float* k, const i32* tokens, i32 bos_id, i64 B, i64 L, i64 ds), (dq, dk, dp, cache, q, k, tokens, bos_id, B, L, ds)) \
  X(float, boundary_prob, (float p, float alpha), (p, alpha)) \
  X(void, sample_boundaries, (uint8_t* b, const float* p, const i32* tokens, i32 bos_id, i64 B, i64 L, float alpha, uint64_t seed, uint64_t step, i64 row_offset), (b, p, tokens, bos_id, B, L, alpha, seed, step, row_offset)) \
  X(void, threshold_boundaries, (uint8_t* b, const float* p, const i32* tokens, i32 bos_id, i64 B, i64 L, float tau), (b, p, tokens, bos_id, B, L, tau)) \
  X(void, pool_mean_forward, (float* pooled, const float* H, const Segments& sg, i64 d), (pooled, H, sg, d)) \
  X(void, pool_mean_backward, (float* dH, const float* dpooled, const Segments& sg, i64 d), (dH, dpooled, sg, d)) \
  X(void, pool_first_forward, (float* pooled, const float* H, const Segments& sg, i64 d), (pooled, H, sg, d)) \
  X(void, pool_first_backward, (float* dH, const float* dpooled, const Segments& sg, i64 d), (dH, dpooled, sg, d)) \
  X(void, pool_prefix_mean_forward, (float* pref, const float* H, const Segments& sg, i64 d), (pref, H, sg, d)) \
  X(void, pool_prefix_mean_backward, (float* dH, const float* dpref, const Segments& sg, i64 d), (dH, dpref, sg, d)) \
  X(float, smoother_gate, (float p, bool forced), (p, forced)) \
  X(void, smoother_forward, (float* zs, const float* z, const float* p, const Segments& sg, i64 d), (zs, z, p, sg, d)) \
  X(void, smoother_backward, (float* dz, float* dp, const float* dzs, const float* zs, const float* z, const float* p, const Segments& sg, i64 d), (dz, dp, dzs, zs, z, p, sg, d)) \
  X(void, smoother_own_forward, (float* zso, const float* zp, const float* zs, const float* p, const Segments& sg, i64 d), (zso, zp, zs, p, sg, d)) \
  X(void, smoother_own_backward, (float* dzp, float* dzs, float* dp, const float* dzso, const float* zp, const float* zs, const float* p, const Segments& sg, i64 d), (dzp, dzs, dp, dzso, zp, zs, p, sg, d)) \
  X(void, concept_list_forward, (float* list, const float* z_null, const float* zs, i64 B, i64 Mmax, i64 d), (list, z_null, zs, B, Mmax, d)) \
  X(void, concept_list_backward, (float* dz_null, float* dzs, const float* dlist, i64 B, i64 Mmax, i64 d), (dz_null, dzs, dlist, B, Mmax, d)) \
  X(void, concept_gather, (float* rep, const float* list, const Segments& sg, i64 width, bool inclusive), (rep, list, sg, width, inclusive)) \
  X(void, concept_scatter_add, (float* dlist, const float* drep, const Segments& sg, i64 width, bool inclusive), (dlist, drep, sg, width, inclusive)) \
  X(void, concept_attention_forward, (float* out, float* lse, const float* q, const float* k, const float* v, const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd, float scale, bool inclusive), (out, lse, q, k, v, sg, B, L, Hq, Hkv, hd, scale, inclusive)) \
  X(void, concept_attention_backward, (float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse, const float* q, const float* k, const float* v, const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd, float scale, bool inclusive), (dq, dk, dv, dout, out, lse, q, k, v, sg, B, L, Hq, Hkv, hd, scale, inclusive)) \
  X(void, concept_attention_masked_forward, (float* out, float* lse, const float* q, const float* k, const float* v, const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd, float scale), (out, lse, q, k, v, sg, B, L, Hq, Hkv, hd, scale)) \
  X(void, concept_attention_masked_backward, (float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse, const float* q, const float* k, const float* v, const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd, float scale), (dq, dk, dv, dout, out, lse, q, k, v, sg, B, L, Hq, Hkv, hd, scale)) \
  X(void, concept_attention_step, (float* out, const float* q, const float* k, const float* v, i64 ld, const float* mult, i64 nk, i64 Hq, i64 Hkv, i64 hd, float scale, const float* k_own, const float* v_own, float* s), (out, q, k, v, ld, mult, nk, Hq, Hkv, hd, scale, k_own, v_own, s)) \
  X(void, concept_attention_list_forward, (float* out, const float* q, const float* k, const float* v, i64 ld, const float* mult, i64 K1, const i64* last, const float* own, i64 L, i64 Hq, i64 Hkv, i64 hd, float scale), (out, q, k, v, ld, mult, K1, last, own, L, Hq, Hkv, hd, scale)) \
  X(void, concept_attention_step_backward, (float* dq, float* dk, float* dv, float* dk_own, float* dv_own, const float* dout, const float* q, const float* k, const float* v, i64 ld, const float* mult, i64 nk, i64 Hq, i64 Hkv, i64 hd, float scale, i64 g, const float* k_own, const float* v_own, float* s), (dq, dk, dv, dk_own, dv_own, dout, q, k, v, ld, mult, nk, Hq, Hkv, hd, scale, g, k_own, v_own, s)) \
  X(void, concept_attention_own_forward, (float* out, const float* q, const float* k, const float* v, const float* k_own, const float* v_own, const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd, float scale), (out, q, k, v, k_own, v_own, sg, B, L, Hq, Hkv, hd, scale)) \
  X(void, concept_attention_own_backward, (float* dq, float* dk, float* dv, float* dk_own, float* dv_own, const float* dout, const float* q, const float* k, const float* v, const float* k_own, const float* v_own, const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd, float scale), (dq, dk, dv, dk_own, dv_own, dout, q, k, v, k_own, v_own, sg, B, L, Hq, Hkv, hd, scale)) \
  X(AuxLoss, global_parser_loss, (double sum_b, double sum_p, double count, double R, double weight), (sum_b, sum_p, count, R, weight)) \
  X(void, aux_loss_backward, (float* dp, i64 n, float grad_p), (dp, n, grad_p)) \
  X(double, sequence_parser_loss_forward, (const uint8_t* b, const float* p, i64 B, i64 L, double R), (b, p, B, L, R)) \
  X(void, sequence_parser_loss_backward, (float* dp, const uint8_t* b, i64 B, i64 L, i64 rows, double R, double weight), (dp, b, B, L, rows, R, weight)) \
  X(int, kernel_variant, (), ())
