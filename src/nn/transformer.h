// Pre-norm transformer blocks (SPEC section 2), forward and backward side by side, with
// activations in buffers allocated once by reserve(). Used by the baseline and by every
// stack of the DLCM (encoder, concept backbone, decoder).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/params.h"
#include "kernels/gemm.h"

namespace dlcm {

struct BlockDims {
  i64 d = 0;        // model width
  i64 n_heads = 0;  // query heads
  i64 n_kv_heads = 0;
  i64 head_dim = 64;
  i64 d_ff = 0;
  bool qk_norm = false;
  float norm_eps = 1e-5f;
  float rope_theta = 10000.f;
  // Sliding-window self-attention: position t attends (t - window, t]; 0 = full causal. The
  // KV cache still keeps every position; only the mask changes.
  i64 window = 0;
  i64 q_dim() const { return n_heads * head_dim; }
  i64 kv_dim() const { return n_kv_heads * head_dim; }
};

// Parameters of one block: attn_norm, attn.{wq,wk,wv,wo}, attn.{q_norm,k_norm}, ffn_norm,
// ffn.{w1,w2,w3}, under `prefix` (e.g. "layers.3.").
struct BlockParams {
  Param *attn_norm, *wq, *wk, *wv, *wo, *q_norm = nullptr, *k_norm = nullptr;
  Param *ffn_norm, *w1, *w2, *w3;
};
BlockParams add_block_params(ParamStore& ps, const std::string& prefix, const BlockDims& d,
                             ParamGroup group);

// Per-layer saved activations for backward. Shapes use N = B*L rows.
struct BlockActs {
  Buf xn1, rstd1;          // [N,d], [N]
  Buf q_raw, k_raw;        // [N,q_dim], [N,kv_dim]  (before QK-norm; only with qk_norm)
  Buf q_rstd, k_rstd;      // [N*H], [N*Hkv]
  Buf q, k, v;             // after QK-norm and RoPE
  Buf att, lse;            // [N,q_dim], [B,H,L]
  Buf mid;                 // residual after attention [N,d]
  Buf xn2, rstd2;          // [N,d], [N]
  Buf a, b, h;             // [N,d_ff] gate, up, silu(a)*b
  Buf out;                 // block output [N,d]
  // BF16: the inputs of the block's products (xn1, att, xn2, h) as their forward rounded them,
  // read again by the backward's dW products, and the weights as the forward rounded them, read
  // again by the backward's dx products (ops::Bf16Copy; empty in FP32)
  ops::Bf16Copy xn1_16, att_16, xn2_16, h_16;
  ops::Bf16Copy wq_16, wk_16, wv_16, wo_16, w1_16, w3_16, w2_16;
};

// Backward scratch of one block's rows (shared by all layers, one layer at a time).
struct BlockGrads {
  Buf res, res2;           // [N,d] gradient ping-pong between layers
  Buf xn, mid;             // [N,d]
  Buf q, k, v, att, raw;   // [N,q_dim] / [N,kv_dim]; raw: QK-norm scratch
  Buf a, b, h;             // [N,d_ff]
  // BF16: dy of the products whose dy a producer writes (the SwiGLU backward's a and b, the
  // ffn norm's mid, the attention norm's dx for the block below, RoPE's backward's q and k
  // without QK-norm), rounded by that producer
  ops::Bf16Copy a_16, b_16, mid_16, res_16, q_16, k_16;
};

// ---- inference with a KV cache ----
// Keys (after QK-norm and RoPE) and values of every layer of one stack for up to max_seqs
// sequences of up to max_len positions each. Sequence s holds len[s] positions; k[l] and v[l]
// are [max_seqs, max_len, Hkv, hd], so one sequence's keys are a dense [len, Hkv, hd] block
// that ops::attention_forward reads directly (B = 1).
struct KVCache {
  i64 n_layers = 0, max_seqs = 0, max_len = 0, kv_dim = 0;
  std::vector<Buf> k, v;
  std::vector<i64> len;
  i64 positions_run = 0;  // positions ever run through the stack with this cache (never reset):
                          // counts the stack's steps (the DLCM backbone: one per closed concept)
  void init(i64 n_layers, i64 kv_dim, i64 max_seqs, i64 max_len);
  void reset(i64 seq) { len[seq] = 0; }
  float* k_at(i64 l, i64 seq, i64 pos) { return k[l].data() + (seq * max_len + pos) * kv_dim; }
  float* v_at(i64 l, i64 seq, i64 pos) { return v[l].data() + (seq * max_len + pos) * kv_dim; }
};

// n new positions of sequence `seq`, appended after its cached ones in one forward_cached call.
struct CacheChunk {
  i64 seq = 0;
  i64 n = 0;
};

class TransformerStack {
 public:
  TransformerStack() = default;
  TransformerStack(const TransformerStack&) = delete;  // would share its inference scratch
  TransformerStack& operator=(const TransformerStack&) = delete;
  // Registers n_layers blocks named `<prefix><i>.` ("layers.", "encoder.layers.", ...).
  void init(ParamStore& ps, const std::string& prefix, i64 n_layers, const BlockDims& dims,
            ParamGroup group);
  // Allocates activations for up to max_rows = B*L token rows (and B rows of lse).
  void reserve(i64 B, i64 L);

  // x [B*L, d] -> returns pointer to output [B*L, d] (owned by the stack, valid until the
  // next forward). pos [B*L]: RoPE positions. x must stay alive until backward().
  const float* forward(const float* x, const i32* pos, i64 B, i64 L);
  // dout [B*L, d] (gradient of the stack output) -> dx [B*L, d] accumulated (+=).
  // block_done (optional) is called after each block's backward with the block's first
  // parameter offset: from there on, this stack's parameter gradients are complete (blocks
  // finish from the last to the first; used to start gradient all-reduces early).
  // With prefix rows (below) after the forward, dxe [n, d] += and doute [n, d] are theirs.
  void backward(float* dx, const float* dout, i64 B, i64 L,
                const std::function<void(i64 offset)>& block_done = {}, float* dxe = nullptr,
                const float* doute = nullptr);

  // ---- prefix rows (the DLCM's concept_repr "prefix_mean" with inclusive visibility) ----
  // n extra rows evaluated against the sequences of the last forward(): row i stands at
  // position pos[i] of batch row seq[i] (RoPE position pos[i]); at every layer it attends that
  // row's keys/values at positions < pos[i], exactly those of the real sequence, and its own
  // key/value; nothing attends it. seq must be non-decreasing (the backward runs per row).
  // xe [n, d] must stay alive until backward(); returns [n, d] (owned, valid until the next
  // forward). The backward adds the rows' key/value gradients into the positions they read,
  // layer by layer. Full causal attention only (window 0).
  void reserve_prefix_rows(i64 n);  // grows only
  const float* forward_prefix_rows(const float* xe, const i32* seq, const i32* pos, i64 n);

  // ---- inference (no gradients; buffers apart from the training activations) ----
  // Scratch for up to max_rows new positions per forward_cached call (idempotent, grows only).
  void reserve_infer(i64 max_rows);
  // Uses `with`'s inference scratch from now on (grown to fit both), for stacks that one stream
  // runs one after another: a stack's first layer then writes into buffers the stack before it
  // has just used, still in cache, instead of its own, written one call ago (each stack's
  // first-layer products ran 2-3% slower on cold outputs, docs/performance.md). The output of
  // forward_cached / forward_cached_prefix_rows then lives until the next call of either
  // stack. Not for stacks that run at the same time.
  void share_infer(TransformerStack& with);
  bool shares_infer_with(const TransformerStack& o) const { return inf_ == o.inf_; }
  // A cache shaped for this stack.
  KVCache make_cache(i64 max_seqs, i64 max_len) const;
  // Runs the stack over new positions of several sequences at once and appends their keys and
  // values to `cache`. x [R, d] holds the chunks' positions in order (chunk 0's n rows, then
  // chunk 1's, ...), R = sum of n <= the reserved rows. Position i of a chunk gets RoPE position
  // cache.len[seq] + i and attends to the sequence's cached positions and to the chunk's
  // positions <= i, exactly as row position len + i of forward(). Chunks must name distinct
  // sequences and fit (len + n <= max_len); both are checked (Error). Prefill is one chunk of
  // many positions; a decode step is one chunk of one position per sequence. The GEMMs run over
  // all R rows at once; attention runs per chunk (in parallel over chunks when all are short).
  // Returns the output [R, d] (owned by the stack, valid until the next forward_cached).
  // last_rows: only each chunk's last position is wanted from the output, which is then
  // [n_chunks, d] (chunk c's last position in row c): the final layer still appends every
  // position's keys and values, but runs its q, attention, output projection and FFN for those
  // rows alone (a prefill that wants the next-token distribution only; the same values).
  const float* forward_cached(const float* x, const CacheChunk* chunks, i64 n_chunks,
                              KVCache& cache, bool last_rows = false);
  // Prefix rows against a cache (as forward_prefix_rows): row i at position pos[i] <=
  // cache.len[seq[i]] of sequence seq[i] attends its cached positions < pos[i] and itself; the
  // cache keeps its length and contents (positions_run counts the rows). Returns [n, d]
  // (valid until the next forward_cached or forward_cached_prefix_rows).
  const float* forward_cached_prefix_rows(const float* x, const i32* seq, const i32* pos, i64 n,
                                          KVCache& cache);

  i64 n_layers() const { return (i64)layers_.size(); }
  const BlockDims& dims() const { return dims_; }
  const BlockParams& layer(i64 i) const { return layers_[i]; }

 private:
  void block_forward(i64 l, const float* x, const i32* pos, i64 B, i64 L);
  double attention_pairs(i64 B, i64 L) const;
  // The two halves of a block around its attention core, shared by forward and forward_cached:
  // attn_norm, q/k/v projections, QK-norm, RoPE into A.xn1/q/k/v; then wo, residual and the
  // FFN sub-layer into `out` (A's mid/xn2/a/b/h as scratch).
  // K / V (nullptr: A.k / A.v) [N, kv_dim] receive the keys and values: a KV cache's rows,
  // where one sequence's new positions are consecutive there (no copy after).
  void block_qkv(i64 l, const float* x, const i32* pos, i64 N, BlockActs& A, float* K = nullptr,
                 float* V = nullptr);
  // block_qkv for the final layer of a last_rows call: keys and values of all N rows, queries
  // of the n_last rows listed in `last` only, into A.q's first n_last rows (a row's q is
  // what block_qkv gives it, bit for bit, on the packed products).
  void block_qkv_last(i64 l, const float* x, const i32* pos, i64 N, const i64* last,
                      i64 n_last, BlockActs& A, float* K = nullptr, float* V = nullptr);
  // Their shared tail: QK-norm and RoPE of A's first nq queries (positions qpos) and the nk
  // keys in K (positions kpos).
  void qk_norm_rope(i64 l, const i32* qpos, i64 nq, const i32* kpos, i64 nk, BlockActs& A,
                    float* K);
  void block_out(i64 l, const float* x, float* out, i64 N, BlockActs& A);
  // Backward of one block, split around its attention core like the forward: block_out's
  // half (dout -> G.att, G.mid) and block_qkv's half (G.q/k/v -> dx += or, without
  // dx_accumulate, dx =: the stack's scratch gradients of the inner blocks need no clearing).
  void block_backward(i64 l, float* dx, const float* dout, const float* x, i64 B, i64 L,
                      float* dxe, const float* doute, const float* xe, bool dx_accumulate);
  void block_backward_out(i64 l, const float* dout, i64 N, BlockActs& A, BlockGrads& G);
  void block_backward_qkv(i64 l, float* dx, const float* x, const i32* pos, i64 N, BlockActs& A,
                          BlockGrads& G, bool dx_accumulate);

  BlockDims dims_;
  std::vector<BlockParams> layers_;
  std::vector<BlockActs> acts_;
  const float* input_ = nullptr;
  const i32* pos_ = nullptr;
  i64 cap_rows_ = 0, cap_B_ = 0, cap_L_ = 0;
  // Inference: one set of block buffers shared by all layers, ping-pong outputs; stacks that
  // a stream runs one after another can share one set (share_infer).
  struct InferBuffers {
    BlockActs acts;
    Buf out[2];
    Buf last;  // last_rows: the final layer's input rows it runs, [n_chunks, d]
    Buf xq;    // last_rows: their normed rows, the final layer's q product input
    std::vector<i32> pos;
  };
  std::shared_ptr<InferBuffers> inf_ = std::make_shared<InferBuffers>();
  i64 inf_rows_ = 0;  // rows this stack reserved in them
  // Backward scratch shared by all layers (one layer at a time).
  BlockGrads grads_;
  // Prefix rows: their activations per layer, rows, backward scratch.
  std::vector<BlockActs> ext_acts_;
  std::vector<i32> ext_pos_, ext_seq_;
  BlockGrads ext_grads_;
  const float* ext_input_ = nullptr;
  i64 n_ext_ = 0, cap_ext_ = 0, last_B_ = 0, last_L_ = 0;
};

}  // namespace dlcm
