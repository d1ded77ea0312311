// The DLCM's concept side (SPEC 4.4 and 4.6-4.7, variants 4.9), forward and backward side by
// side, used by training (models/dlcm.cpp) and streaming (models/dlcm_stream.cpp):
//
//   ConceptPool:            H [N, d] -> pool per concept -> W_up -> C [B*Mc, dc]
//   ConceptCrossAttention:  Z [B*Mc, dc] (backbone.norm output) -> smoother (gate P from p) = ZS
//                           [z_null, ZS] -> K, V (QK-norm); Q from xattn.norm(H), QK-norm
//                           leak-free concept attention (compact or replicate)
//                           xattn_rope: q, k rotated before the kernels (augmented heads)
//                           Psi = H + Wo att;  X = Psi + ffn(ffn_norm(Psi))
//
// ConceptOptions select how a concept is represented (concept_repr) and which concepts a token
// sees (concept_visibility); concept_path = false drops the concept term (Psi = H).
#pragma once
#include <string>
#include <vector>

#include "core/params.h"
#include "kernels/dlcm_ops.h"

namespace dlcm {

// concept_repr: "mean" (c_j = W_up mean of S_j), "first" (W_up h_{start(S_j)}), "prefix_mean"
// (token t in S_j sees c_j(t) = W_up mean_{i in S_j, i <= t} h_i).
enum class ConceptRepr { Mean, First, PrefixMean };
// concept_visibility: "shifted" (token t sees the concepts closed before its own began) or
// "inclusive" (also its own concept, evaluated on what is known at t).
enum class ConceptVisibility { Shifted, Inclusive };

struct ConceptOptions {
  ConceptRepr repr = ConceptRepr::Mean;
  ConceptVisibility visibility = ConceptVisibility::Shifted;
  bool replicate = false;    // xattn_impl "replicate" (else "compact"): same function
  bool concept_path = true;  // false: no concept term, Psi = H (control)
  bool smoother = true;      // false: every gate is 1, ZS = Z (control; p is then unused)
  // xattn_rope: RoPE in the concept attention (docs/dlcm.md): query of token t at t, key of
  // concept j at start_j, z_null at the query's own position (its score position-free).
  bool rope = false;
  float rope_theta = 10000.f;
  bool inclusive() const { return visibility == ConceptVisibility::Inclusive; }
  // prefix_mean + inclusive: a token's own concept is evaluated on its prefix, one extra
  // backbone row per token (the prefix rows of TransformerStack).
  bool prefix_rows() const { return inclusive() && repr == ConceptRepr::PrefixMean; }
};
// Evaluation-only replacement of the concepts the decoder sees (concept-usage diagnostics,
// python/dlcm_ref/diagnostics.py): Null = every list entry is z_null; Shuffle = row r's list
// [z_null, zs_0 .. zs_{M_r - 1}] takes row (r + 1) mod B's zs, truncated to M_r entries or
// padded at the end with z_null. Queries, segmentation and multiplicities stay the row's own.
enum class ConceptAblation { None, Null, Shuffle };

// Sums over the positions of one forward of ||Wo att_t||_2 and ||H_t||_2 (float64).
struct XAttnNorms {
  double xo = 0, h = 0;
  i64 n = 0;
};

// Parses the config strings (names as in SPEC 4.9); throws Error naming `what` otherwise.
ConceptRepr parse_concept_repr(const std::string& s, const std::string& what);
ConceptVisibility parse_concept_visibility(const std::string& s, const std::string& what);

// Pooling + W_up. For prefix_mean with shifted visibility every concept a token sees is closed,
// so its prefix is the whole concept: the mean pooling (the same function, same arithmetic).
class ConceptPool {
 public:
  // Registers `name` [dc, d] (µP group TokenHidden: fan-in d_token).
  void init(ParamStore& ps, const std::string& name, i64 d, i64 dc, ConceptRepr repr);
  void reserve(i64 n_concepts);  // concept rows B*Mc (grows only)
  // H [B*L, d] -> C [B*Mmax, dc] (owned; padded slots 0). H must stay alive until backward.
  const float* forward(const float* H, const ops::Segments& sg);
  // dC [B*Mmax, dc] -> dH += ; W_up gradient +=.
  void backward(float* dH, const float* dC, const ops::Segments& sg);
  // prefix_mean + inclusive: every token's own concept on its prefix, Cp [B*L, dc] = W_up
  // (mean of its concept's tokens up to itself) (owned). H must stay alive until
  // backward_prefix(); reserve_prefix(B*L) first.
  void reserve_prefix(i64 n_tokens);  // grows only
  const float* forward_prefix(const float* H, const ops::Segments& sg);
  // dCp [B*L, dc] -> dH +=; W_up gradient +=.
  void backward_prefix(float* dH, const float* dCp, const ops::Segments& sg);
  // Streaming: C [n, dc] = W_up pooled [n, d] (pooled rows made by the caller per repr()).
  void project(float* C, const float* pooled, i64 n) const;
  ConceptRepr repr() const { return repr_; }

 private:
  Param* w_up_ = nullptr;
  i64 d_ = 0, dc_ = 0;
  ConceptRepr repr_ = ConceptRepr::Mean;
  const float* H_ = nullptr;
  Buf pooled_, C_, g_pooled_;
  Buf ppooled_, Cp_, g_ppooled_;  // prefix rows [B*L, ...]
  i64 cap_ = 0, cap_prefix_ = 0;
};

struct XAttnDims {
  i64 d = 0;           // token width (queries, output)
  i64 dc = 0;          // concept width (keys/values input)
  i64 n_heads = 0;     // x_heads
  i64 n_kv_heads = 0;  // x_kv_heads
  i64 head_dim = 64;
  i64 d_ff = 0;        // x_d_ff (cross FFN)
  float norm_eps = 1e-5f;
  i64 q_dim() const { return n_heads * head_dim; }
  i64 kv_dim() const { return n_kv_heads * head_dim; }
};

// Streaming state of the concept list of up to max_seqs sequences: entry 0 is z_null, entry
// e >= 1 is zs_{e-1}; k/v [max_seqs, max_entries, kv_dim] after QK-norm (xattn_rope: the
// augmented heads of 2 head_dim, keys rotated once at their concept's start), mult [max_seqs,
// max_entries] the multiplicity each entry has for the next token (the last visible entry's is
// given per token instead), zs_last [max_seqs, dc] the smoother's last value. With prefix
// rows (prefix_mean + inclusive) zs [max_seqs, max_entries, dc] also keeps each entry's
// smoother value (entry 0: zs_{-1} = 0), the one a token's own concept continues from.
struct ConceptCache {
  i64 max_seqs = 0, max_entries = 0, kv_dim = 0, dc = 0;
  Buf k, v, mult, zs_last, zs;
  std::vector<i64> n;  // entries held per sequence (>= 1)
  float* k_at(i64 seq, i64 e) { return k.data() + (seq * max_entries + e) * kv_dim; }
  float* v_at(i64 seq, i64 e) { return v.data() + (seq * max_entries + e) * kv_dim; }
  float* mult_of(i64 seq) { return mult.data() + seq * max_entries; }
  float* zs_at(i64 seq, i64 e) { return zs.data() + (seq * max_entries + e) * dc; }
};

class ConceptCrossAttention {
 public:
  // Registers, under prefix ("xattn."): null_concept, norm, wq, wk, wv, wo, q_norm, k_norm,
  // ffn_norm, ffn.w1/w2/w3 (in this order). With concept_path = false only ffn_norm and
  // ffn.w1/w2/w3 (nothing else would run).
  void init(ParamStore& ps, const std::string& prefix, const XAttnDims& dims,
            const ConceptOptions& opt);
  void reserve(i64 B, i64 L);            // token rows
  void reserve_concepts(i64 B, i64 Mc);  // concept slots per row (grows only)

  // H [B*L, d] encoder output; Z [B*Mmax, dc] backbone.norm output; p [B*L] router
  // probabilities (the smoother's gate) -> X [B*L, d] (owned, valid until the next forward).
  // With concept_path = false, Z and p are not read (may be nullptr). Zp [B*L, dc]
  // (options().prefix_rows() only): backbone.norm output of every token's prefix row, z_j(t).
  // H, Z, Zp, p and sg must stay alive until backward(). Evaluation only: `ablation` replaces
  // the concept list (with prefix rows, the own entry then comes from the ablated list too;
  // backward() refuses to follow an ablated forward); `norms`, when given, receives += the
  // residual norms (xo = 0 without the concept path).
  const float* forward(const float* H, const float* Z, const float* p, const ops::Segments& sg,
                       i64 B, i64 L, const float* Zp = nullptr,
                       ConceptAblation ablation = ConceptAblation::None,
                       XAttnNorms* norms = nullptr);
  // dX [B*L, d] -> dH +=, dZ += [B*Mmax, dc], dZp += [B*L, dc] (prefix rows only), dp += (the
  // smoother gate's share; nullptr keeps P detached). Parameter gradients +=.
  void backward(float* dH, float* dZ, float* dp, const float* dX, i64 B, i64 L,
                float* dZp = nullptr);

  // ---- streaming (no gradients; buffers apart from the training activations) ----
  void reserve_infer(i64 max_rows);  // new tokens / new concepts per call (grows only)
  ConceptCache make_cache(i64 max_seqs, i64 max_entries) const;
  // Empties a sequence: entry 0 = z_null, the smoother restarts.
  void reset(ConceptCache& c, i64 seq) const;
  // The list entry whose multiplicity counts the tokens of a sequence's open concept when
  // `closed` concepts are closed before it; a token there sees entries 0..open_entry.
  i64 open_entry(i64 closed) const { return opt_.inclusive() ? closed + 1 : closed; }
  // Appends n concepts in order: Z [n, dc] (backbone.norm rows), gate [n] (smoother P), seqs
  // [n] their sequences, start [n] the position of each concept's first token (xattn_rope). zs = P z + (1 - P) zs_last of the sequence; K/V become the
  // sequence's next entry. Multiplicities are the caller's: it zeroes open_entry() when a
  // concept opens and counts that concept's tokens into it.
  void append_concepts(const float* Z, const float* gate, const i64* seqs, const i64* start,
                       i64 n, ConceptCache& c);
  // R new tokens: H [R, d] at positions pos [R] (xattn_rope); token r of sequence seqs[r] sees entries 0..last[r] with their
  // cached multiplicities, except entry last[r] with own[r]. -> X [R, d] (owned, valid until
  // the next call). Prefix rows: own_z [R, dc] (backbone.norm of the token's prefix row) and
  // own_gate [R] (its concept's smoother gate) give entry last[r] per token, continuing the
  // smoother from the cached entry last[r] - 1; it is not stored.
  const float* forward_cached(const float* H, const i64* seqs, const i64* pos, const i64* last,
                              const float* own, i64 R, ConceptCache& c,
                              const float* own_z = nullptr, const float* own_gate = nullptr);

  const ConceptOptions& options() const { return opt_; }
  // Offset of the first registered parameter: from there on, gradients are complete after
  // backward() (ParamStore order).
  i64 param_offset() const;

 private:
  void ffn_forward(float* X, float* psi, float* pn, float* pn_rstd, float* fa, float* fb,
                   float* fh, i64 N) const;
  void kv_forward(float* k_raw, float* k, float* k_rstd, float* v, const float* list,
                  i64 n) const;
  void ablate_list(ConceptAblation a, const ops::Segments& sg, i64 B);
  void query_forward(float* hn, float* hn_rstd, float* q_raw, float* q, float* q_rstd,
                     const float* H, i64 N) const;
  // xattn_rope: the attention's head width (2 head_dim with RoPE, else head_dim) and the
  // augmented rows (see concept_xattn.cpp).
  i64 att_hd() const { return opt_.rope ? 2 * dims_.head_dim : dims_.head_dim; }
  void rope_rows(float* xa, const float* x, const i32* pos, i64 n, i64 H, bool both,
                 float* scratch) const;
  void rope_forward_rows(const ops::Segments& sg, i64 B, i64 L, bool own);
  void rope_backward_rows(i64 B, i64 Mc, i64 N, bool own);
  void rope_rows_backward(float* dx, const float* dxa, const i32* pos, i64 n, i64 H, bool both,
                          float* scratch) const;

  XAttnDims dims_;
  ConceptOptions opt_;
  Param *null_ = nullptr, *norm_ = nullptr, *wq_ = nullptr, *wk_ = nullptr, *wv_ = nullptr;
  Param *wo_ = nullptr, *qn_ = nullptr, *kn_ = nullptr;
  Param *ffn_norm_ = nullptr, *w1_ = nullptr, *w2_ = nullptr, *w3_ = nullptr;

  // Inputs of the last forward.
  const float* H_ = nullptr;
  const float* Z_ = nullptr;
  const float* Zp_ = nullptr;
  const float* p_ = nullptr;
  const ops::Segments* sg_ = nullptr;
  ConceptAblation ablation_ = ConceptAblation::None;
  // Token-level activations [N, ...].
  Buf hn_, hn_rstd_, qx_raw_, qx_, qx_rstd_;  // queries
  Buf att_, lse_, krep_, vrep_;               // attention output, lse [B, Hq, L], replicate K/V
  Buf psi_, pn_, pn_rstd_, fa_, fb_, fh_, X_;  // cross FFN block
  // Concept-level activations [B*Mc, ...] and [B*(Mc+1), ...].
  Buf zs_, list_, kx_raw_, kx_, kx_rstd_, vx_;
  // Prefix rows: every token's own concept [N, ...] and its keys/values.
  Buf zso_, ko_raw_, ko_, ko_rstd_, vo_, g_zso_, g_ko_, g_koraw_, g_vo_;
  // The attention kernels' operands: the plain heads, or with xattn_rope the augmented ones.
  struct KernelOperands {
    const float *q, *k, *v, *ko, *vo;
    float* att;
  };
  KernelOperands kernel_operands();
  // xattn_rope: augmented q/k/v/att (and own k/v), their gradients, positions, scratch.
  Buf qa_, ka_, va_, atta_, koa_, voa_, g_qa_, g_ka_, g_va_, g_atta_, g_koa_, g_voa_, rot_;
  std::vector<i32> tpos_, kpos_, opos_;
  // Gradients.
  Buf g_fh_, g_fa_, g_fb_, g_pn_, g_psi_, g_att_, g_q_, g_qraw_, g_hn_, g_krep_, g_vrep_;
  Buf g_k_, g_kraw_, g_v_, g_list_, g_zs_;
  i64 cap_B_ = 0, cap_L_ = 0, conc_B_ = 0, cap_Mc_ = 0;
  // Streaming scratch.
  Buf i_hn_, i_hn_rstd_, i_qraw_, i_q_, i_q_rstd_, i_att_, i_psi_, i_pn_, i_pn_rstd_;
  Buf i_fa_, i_fb_, i_fh_, i_X_, i_zs_, i_kraw_, i_k_, i_krstd_, i_v_;
  Buf i_qa_, i_atta_, i_ka_, i_va_, i_rot_;
  std::vector<i32> i_pos_;
  std::vector<i64> step_rows_;  // forward_cached: the rows attended token by token
  // forward_cached: a run of at least this many consecutive positions of one sequence goes
  // through ops::concept_attention_list_forward (below it, per-token steps are as fast)
  static constexpr i64 kListMinRows = 8;
  i64 inf_rows_ = 0;
};

}  // namespace dlcm
