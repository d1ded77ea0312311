// DLCM-specific kernels (SPEC section 4): router probability, boundary decisions, segment
// bookkeeping, mean pooling, the smoother, the causal concept cross-attention (compact and
// replicate forms of the same function) and the Global Parser auxiliary loss.
//
// Conventions as in kernels/ops.h: raw float pointers, row-major, token-major [B, L, ...];
// forward functions OVERWRITE their outputs, backward functions ACCUMULATE (+=) into every
// gradient; OpenMP inside; bad shapes/arguments throw dlcm::Error (checked before any parallel
// region). Rows of a batch never mix: every op works per row, and padded concept slots
// (j >= M_b) are written as 0 and never read by another row.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/common.h"
#include "kernels/ops.h"

namespace dlcm::ops {

// ============================================================================================
// 1. Router probability
// ============================================================================================
// q, k: [B*L, ds] (already projected; for router.kind "raw" pass H as both q and k).
// p[b,t] = clamp((1 - cos(q_{t-1}, k_t)) / 2, 0, 1), with p = 1 at t = 0 and wherever
// tokens[n] == bos_id (forced boundaries). tokens may be nullptr (then only t = 0 is forced).
// Cosine with a floored norm: cos(a, b) = a.b / (max(|a|, eps) * max(|b|, eps)),
// eps = kRouterNormEps, so a zero vector gives cos = 0 (p = 1/2) instead of NaN.
// cache [B*L, kRouterCacheStride] is written for backward: (|q_n|, |k_n|, cos at n) (cos = 0 at
// t = 0). It is also handy for diagnostics.
constexpr float kRouterNormEps = 1e-6f;
constexpr i64 kRouterCacheStride = 3;
void router_prob_forward(float* p, float* cache, const float* q, const float* k, const i32* tokens,
                         i32 bos_id, i64 B, i64 L, i64 ds);
// The stream's form for n consecutive new tokens of one sequence: p[t] from (q_{t-1}, k_t),
// where q_{-1} = q_prev is the sequence's last q before them; bit for bit router_prob_forward's
// rows 1..n on [q_prev; q] (forced tokens are the caller's business), without that copy.
void router_prob_rows(float* p, const float* q_prev, const float* q, const float* k, i64 n,
                      i64 ds);
// dq, dk += chain rule from dp. No gradient at forced positions, nor where the clamp is active
// (raw value outside [0, 1], only possible through rounding). dq and dk MAY ALIAS (raw kind:
// both are dH); every output row is written by exactly one thread.
void router_prob_backward(float* dq, float* dk, const float* dp, const float* cache,
                          const float* q, const float* k, const i32* tokens, i32 bos_id, i64 B,
                          i64 L, i64 ds);

// ============================================================================================
// 2. Boundary decisions (b is a discrete decision: no gradient)
// ============================================================================================
// Probability that b_t = 1 in training: sigmoid(logit(p) / alpha), computed stably as
// 1 / (1 + exp(-(log p - log1p(-p)) / alpha)) in double. p <= 0 -> 0, p >= 1 -> 1 exactly
// (no infinities reach the arithmetic); NaN -> 0. alpha > 0.
float boundary_prob(float p, float alpha);
// Training: b[n] = [u < boundary_prob(p[n], alpha)] with
// u = counter_uniform(seed, step, row_offset + b, t) in [0, 1), so a step can be recomputed
// exactly; row_offset is the global index of this batch's first row (micro-batch/rank
// offset). b = 1 at forced positions (t = 0, tokens == bos_id) whatever p says.
void sample_boundaries(uint8_t* b, const float* p, const i32* tokens, i32 bos_id, i64 B, i64 L,
                       float alpha, uint64_t seed, uint64_t step, i64 row_offset);
// Inference / evaluation: b[n] = [p[n] >= tau], forced positions always 1.
void threshold_boundaries(uint8_t* b, const float* p, const i32* tokens, i32 bos_id, i64 B, i64 L,
                          float tau);

// ============================================================================================
// 3. Segment bookkeeping
// ============================================================================================
// Built from b [B, L] (values 0/1, b[row, 0] must be 1). Per row, seg(t) = cumsum(b)-1 counts
// concepts within the row only. Concept j of row r occupies tokens start..start+len-1.
// Padded slots (j >= count[r]) have start = L, len = 0, forced = 0.
struct Segments {
  i64 B = 0, L = 0;
  i64 Mmax = 0;                 // max over rows of count
  std::vector<i32> seg;         // [B*L]   concept index of each token within its row
  std::vector<i32> count;       // [B]     M_b
  std::vector<i32> start;       // [B*Mmax]
  std::vector<i32> len;         // [B*Mmax]
  std::vector<uint8_t> forced;  // [B*Mmax] 1 if the concept starts at t = 0 or at a BOS token

  // tokens may be nullptr (then only t = 0 counts as a forced start). Throws if b[row,0] != 1,
  // if a value is not 0/1, or if a BOS token does not start a concept.
  void build(const uint8_t* b, const i32* tokens, i32 bos_id, i64 B, i64 L);
  i64 total() const;  // sum of count (number of real concepts in the batch)
  // Concept slot index into [B, Mmax, ...] arrays.
  i64 slot(i64 row, i64 j) const { return row * Mmax + j; }
};

// ============================================================================================
// 4. Mean pooling
// ============================================================================================
// pooled [B, Mmax, d]: mean of H [B*L, d] over each segment; padded slots = 0.
void pool_mean_forward(float* pooled, const float* H, const Segments& sg, i64 d);
// dH[n] += dpooled[b, seg(n)] / len.
void pool_mean_backward(float* dH, const float* dpooled, const Segments& sg, i64 d);
// concept_repr "first" (SPEC 4.9): pooled [B, Mmax, d] = H at each segment's first token;
// padded slots = 0. Backward: dH[start(S_j)] += dpooled[b, j].
void pool_first_forward(float* pooled, const float* H, const Segments& sg, i64 d);
void pool_first_backward(float* dH, const float* dpooled, const Segments& sg, i64 d);
// concept_repr "prefix_mean" with inclusive visibility (SPEC 4.9): every token's own concept on
// its prefix, pref [B*L, d]: pref[t] = (sum_{start <= i <= t} H_i) * (1 / (t - start + 1)), the
// sum running in token order (as the stream keeps it). Backward: dH[i] += sum over tokens t >= i
// of the same concept of dpref[t] / (t - start + 1).
void pool_prefix_mean_forward(float* pref, const float* H, const Segments& sg, i64 d);
void pool_prefix_mean_backward(float* dH, const float* dpref, const Segments& sg, i64 d);

// ============================================================================================
// 5. Smoother
// ============================================================================================
// zs_j = P_j z_j + (1 - P_j) zs_{j-1}, zs_{-1} = 0, per row over its count[b] concepts.
// P_j = smoother_gate(p[start(S_j)], forced_j): clamp(p, kSmootherClamp, 1 - kSmootherClamp),
// or exactly 1 at forced-start concepts (the smoother restarts at every document).
// z, zs: [B, Mmax, d]; p: [B*L]. Padded slots of zs are 0. p == nullptr turns the smoother
// off (config smoother = false): every gate is 1, so zs = z exactly and dz += dzs (dp must
// then be nullptr too).
constexpr float kSmootherClamp = 1e-4f;
float smoother_gate(float p, bool forced);
void smoother_forward(float* zs, const float* z, const float* p, const Segments& sg, i64 d);
// dz += dL/dz. If dp != nullptr: dp[start(S_j)] += dL/dP_j for non-forced concepts whose p lies
// inside the clamp's pass-through range [kSmootherClamp, 1 - kSmootherClamp]. The caller passes
// dp only when router.smooth_grad is on. zs is the forward output.
void smoother_backward(float* dz, float* dp, const float* dzs, const float* zs, const float* z,
                       const float* p, const Segments& sg, i64 d);
// The own concept of every token (prefix_mean + inclusive): zso[n] = P_j zp[n] + (1 - P_j)
// zs_{j-1}, j = seg(n), P_j the gate of concept j, zs_{-1} = 0. zp, zso [B*L, d] (zp: the
// backbone output of the token's prefix row); zs [B, Mmax, d] the closed concepts' smoother.
// p == nullptr: smoother off, every gate 1 (and smoother_own_backward's dp must be nullptr).
void smoother_own_forward(float* zso, const float* zp, const float* zs, const float* p,
                          const Segments& sg, i64 d);
// dzp += P_j dzso; dzs[j-1] += (1 - P_j) dzso; dp as smoother_backward (non-forced concepts in
// the clamp's pass-through range, dp may be nullptr). Parallel over concepts (race-free).
void smoother_own_backward(float* dzp, float* dzs, float* dp, const float* dzso, const float* zp,
                           const float* zs, const float* p, const Segments& sg, i64 d);

// ============================================================================================
// 6. Causal concept cross-attention (SPEC 4.7)
// ============================================================================================
// Concept list per row: [z_null, zs_0, ..., zs_{M_b-1}] (list index 0 = null), padded to
// Mmax + 1 entries. Helpers to assemble it (the caller then projects it with Wk_x / Wv_x):
//   list [B, Mmax+1, d]: list[b,0] = z_null, list[b,1+j] = zs[b,j].
void concept_list_forward(float* list, const float* z_null, const float* zs, i64 B, i64 Mmax,
                          i64 d);
//   dz_null += sum_b dlist[b,0];  dzs[b,j] += dlist[b,1+j]. (dz_null or dzs may be nullptr.)
void concept_list_backward(float* dz_null, float* dzs, const float* dlist, i64 B, i64 Mmax,
                           i64 d);

// The canonical function: position s carries list index seg(s) (concept seg(s)-1, null for
// the first segment); token t attends positions s <= t with the causal mask, scale `scale`,
// GQA (head h uses kv head h / (Hq/Hkv)), no RoPE.
//   q, out: [B, L, Hq, hd]; k, v: [B, Mmax+1, Hkv, hd]; lse: [B, Hq, L] (as ops::attention_*).
//
// replicate: Krep[b,s] = K[b, seg(s)] into [B, L, width] (width = Hkv*hd), then the caller
// runs ops::attention_forward/backward(causal, Lq = Lk = L, q_offset 0) on (q, Krep, Vrep)
// and scatter-adds dKrep / dVrep back into the list gradients.
//
// inclusive (concept_visibility "inclusive", SPEC 4.9): token t also sees its own concept's
// entry: list index 0 (z_null) with multiplicity 1, index k+1 (zs_k) with len_k for k < seg(t)
// and index seg(t)+1 with t - start + 1. Replicated: Krep [B, L+1, width], position 0 carries
// z_null and position s+1 carries list index seg(s)+1; attention with Lk = L+1, q_offset 1.
void concept_gather(float* rep, const float* list, const Segments& sg, i64 width,
                    bool inclusive = false);
// dlist[b, k] += sum over positions s carrying list index k of drep[b, s]. (Race-free.)
void concept_scatter_add(float* dlist, const float* drep, const Segments& sg, i64 width,
                         bool inclusive = false);

// The replicate path in one call, on ops::attention_forward/backward (inline so that this header
// adds no link dependency for callers that only use the compact path). krep/vrep/dkrep/dvrep
// are caller scratch [B, L, Hkv*hd]; keep krep/vrep from the forward for the backward (or
// gather again). The backward overwrites dkrep/dvrep and accumulates into dq, dk, dv.
inline void concept_attention_replicate_forward(float* out, float* lse, float* krep, float* vrep,
                                                const float* q, const float* k, const float* v,
                                                const Segments& sg, i64 B, i64 L, i64 Hq,
                                                i64 Hkv, i64 hd, float scale,
                                                bool inclusive = false) {
  DLCM_CHECK(sg.B == B && sg.L == L, "concept_attention_replicate_forward: Segments shape");
  const i64 sh = inclusive ? 1 : 0;
  concept_gather(krep, k, sg, Hkv * hd, inclusive);
  concept_gather(vrep, v, sg, Hkv * hd, inclusive);
  attention_forward(out, lse, q, krep, vrep, B, L, L + sh, Hq, Hkv, hd, sh, scale);
}
inline void concept_attention_replicate_backward(float* dq, float* dk, float* dv, float* dkrep,
                                                 float* dvrep, const float* dout,
                                                 const float* out, const float* lse,
                                                 const float* q, const float* krep,
                                                 const float* vrep, const Segments& sg, i64 B,
                                                 i64 L, i64 Hq, i64 Hkv, i64 hd, float scale,
                                                 bool inclusive = false) {
  DLCM_CHECK(sg.B == B && sg.L == L, "concept_attention_replicate_backward: Segments shape");
  const i64 sh = inclusive ? 1 : 0, n = B * (L + sh) * Hkv * hd;
  std::fill(dkrep, dkrep + n, 0.f);
  std::fill(dvrep, dvrep + n, 0.f);
  attention_backward(dq, dkrep, dvrep, dout, out, lse, q, krep, vrep, B, L, L + sh, Hq, Hkv, hd,
                     sh, scale);
  concept_scatter_add(dk, dkrep, sg, Hkv * hd, inclusive);
  concept_scatter_add(dv, dvrep, sg, Hkv * hd, inclusive);
}

// compact: attend over list indices k = 0..seg(t) with additive bias log(mult(t,k)),
// mult(t,k) = len(S_k) for k < seg(t), t - start(S_{seg(t)}) + 1 for k = seg(t).
// inclusive: list indices 0..seg(t)+1 with multiplicities 1, len(S_0), ..., len(S_{seg(t)-1}),
// t - start(S_{seg(t)}) + 1 (see concept_gather).
// O(L * M * hd) work. Saves lse for backward.
void concept_attention_forward(float* out, float* lse, const float* q, const float* k,
                               const float* v, const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv,
                               i64 hd, float scale, bool inclusive = false);
// Recomputes the probabilities from q, k and lse. dq, dk, dv accumulate; parallel over
// (row, kv head), so dk/dv accumulation is race-free.
void concept_attention_backward(float* dq, float* dk, float* dv, const float* dout,
                                const float* out, const float* lse, const float* q,
                                const float* k, const float* v, const Segments& sg, i64 B, i64 L,
                                i64 Hq, i64 Hkv, i64 hd, float scale, bool inclusive = false);

// masked: the same function computed the way a flexible masked-attention implementation
// (Flex Attention's role in the paper's Table 6) does it: per head, the score matrix
// S = scale Q K^T + log mult, masked to -inf where k > seg(t), is materialised densely in
// chunks of kMaskedChunk query rows (only the key columns 0..seg(last query of the chunk)
// are formed: the block mask skips fully masked key blocks), softmaxed row-wise, and
// multiplied by V, all products through oneDNN sgemm. O(L * M * hd) work like compact, but
// with [chunk, M+1] score matrices in memory and separate passes for scores, mask/bias,
// softmax and the products. The backward recomputes S from q, k and lse. Benchmark baseline;
// shapes and accumulation as concept_attention_forward/backward.
constexpr i64 kMaskedChunk = 256;
void concept_attention_masked_forward(float* out, float* lse, const float* q, const float* k,
                                      const float* v, const Segments& sg, i64 B, i64 L, i64 Hq,
                                      i64 Hkv, i64 hd, float scale);
void concept_attention_masked_backward(float* dq, float* dk, float* dv, const float* dout,
                                       const float* out, const float* lse, const float* q,
                                       const float* k, const float* v, const Segments& sg,
                                       i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd, float scale);

// One query token against an explicit concept list with multiplicities (streaming decode,
// SPEC 5): out[h] = sum_e softmax_e(scale q_h.k_e + log mult[e]) v_e over e < nk, kv head
// h / (Hq/Hkv). q, out: [Hq, hd]; entry e of kv head g is at k + e*ld + g*hd (ld >= Hkv*hd;
// ld = Hkv*hd for a dense [nk, Hkv, hd] cache). mult[e] >= 1. For token t the list is
// 0..seg(t) with mult = len_e for e < seg(t) and t - start(S_seg(t)) + 1 for e = seg(t).
// Serial (decode batches parallelise over sequences).
// mult nullptr: every multiplicity 1 (plain attention over the entries). k_own/v_own
// ([Hkv, hd], optional): the last entry nk-1 is read from there instead of the list: an entry
// that exists for this query only (the own concept on its prefix; a backbone prefix row's own
// key). s: scratch of nk floats (nullptr: allocated per call).
void concept_attention_step(float* out, const float* q, const float* k, const float* v, i64 ld,
                            const float* mult, i64 nk, i64 Hq, i64 Hkv, i64 hd, float scale,
                            const float* k_own = nullptr, const float* v_own = nullptr,
                            float* s = nullptr);
// The streaming prefill's form (SPEC 5): the L consecutive new tokens of one sequence against
// its cached list, in one pass of the compact kernel (as training runs it) instead of L steps.
// Entry e of kv head g at k + e*ld + g*hd, e < K1; token t sees entries 0..last[t]
// (nondecreasing in t), entry e < last[t] with multiplicity mult[e] and its own entry last[t]
// with own[t] (>= 1). q, out [L, Hq, hd]. Each token's result is concept_attention_step's with
// that list (to FP32 rounding). FP32 in every precision.
void concept_attention_list_forward(float* out, const float* q, const float* k, const float* v,
                                    i64 ld, const float* mult, i64 K1, const i64* last,
                                    const float* own, i64 L, i64 Hq, i64 Hkv, i64 hd,
                                    float scale);
// Its backward for the query heads of kv head g only, so that callers parallelise over
// (sequence, kv head) without races on the list gradients: recomputes the probabilities;
// dq (heads of g), dk/dv (kv head g of every list entry read, stride ld), dk_own/dv_own (kv
// head g, when k_own is given) accumulate. s: scratch of 2*nk floats.
void concept_attention_step_backward(float* dq, float* dk, float* dv, float* dk_own,
                                     float* dv_own, const float* dout, const float* q,
                                     const float* k, const float* v, i64 ld, const float* mult,
                                     i64 nk, i64 Hq, i64 Hkv, i64 hd, float scale, i64 g,
                                     const float* k_own, const float* v_own, float* s);

// prefix_mean + inclusive (SPEC 4.9): token t (j = seg(t)) attends list entries 0..j (z_null
// with multiplicity 1, zs_k with len_k) and its own entry, read per token from k_own/v_own
// [B*L, Hkv, hd], with multiplicity t - start_j + 1. k, v: [B, Mmax+1, Hkv, hd] as above; q, out
// [B, L, Hq, hd]. Per-token loops over concept_attention_step, O(L * M * hd) like compact; the
// backward recomputes the probabilities (no lse) and is parallel over (row, kv head).
void concept_attention_own_forward(float* out, const float* q, const float* k, const float* v,
                                   const float* k_own, const float* v_own, const Segments& sg,
                                   i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd, float scale);
void concept_attention_own_backward(float* dq, float* dk, float* dv, float* dk_own, float* dv_own,
                                    const float* dout, const float* q, const float* k,
                                    const float* v, const float* k_own, const float* v_own,
                                    const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd,
                                    float scale);

// ============================================================================================
// 7. Global Parser auxiliary loss
// ============================================================================================
// F = sum_b / count, G = sum_p / count, over EVERY token position of the whole optimizer step
// (all micro-batches, all ranks; forced positions included). R > 1.
//   L_aux = R/(R-1) * [ F G + (1-F)(1-G) ] - 1
// F carries no gradient; dL_aux/dG = R/(R-1) * [(R-1) F - (1-F)] = R (R F - 1) / (R-1), and
// G = sum_p / count, so every p_t receives grad_p = weight * R (R F - 1) / ((R-1) count).
// `value` is the unweighted L_aux (multiply by weight yourself for the total loss).
struct AuxLoss {
  double value = 0;   // L_aux (unweighted)
  double F = 0, G = 0;
  double grad_p = 0;  // weight * dL_aux/dp_t, identical for every position
};
AuxLoss global_parser_loss(double sum_b, double sum_p, double count, double R,
                           double weight = 1.0);
// dp[i] += grad_p for i < n (forced positions included; the router's backward drops them).
void aux_loss_backward(float* dp, i64 n, float grad_p);

// The per-sequence variant (aux_kind = "sequence", the paper's "Normal" ratio loss): the same
// formula per row r of L positions, averaged over the step's rows:
//   F_r = (1/L) sum_t b[r,t],  G_r = (1/L) sum_t p[r,t],
//   L_r = R/(R-1) * [ F_r G_r + (1-F_r)(1-G_r) ] - 1,   L_aux = (1/rows) sum_r L_r,
// with `rows` every row of the optimizer step (all micro-batches and ranks; this batch holds B
// of them). F_r carries no gradient, so
//   dL_aux/dp[r,t] = R (R F_r - 1) / ((R-1) L rows).
// Forward: sum over this batch's B rows of L_r (unweighted; divide the step's sum by rows).
double sequence_parser_loss_forward(const uint8_t* b, const float* p, i64 B, i64 L, double R);
// dp[r,t] += weight * R (R F_r - 1) / ((R-1) L rows). rows >= B.
void sequence_parser_loss_backward(float* dp, const uint8_t* b, i64 B, i64 L, i64 rows, double R,
                                   double weight);

}  // namespace dlcm::ops
