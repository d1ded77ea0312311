// Pre-norm transformer blocks (SPEC section 2), forward and backward side by side, with
// activations in buffers allocated once by reserve(). Used by the baseline and by every
// stack of the DLCM (encoder, concept backbone, decoder).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "core/params.h"

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

// Attention sub-layer building blocks shared with the DLCM cross-attention: per-head
// RMSNorm over head_dim (QK-norm) on x [N, H, hd].
void head_rmsnorm_forward(float* y, float* rstd, const float* x, const float* w, i64 N, i64 H,
                          i64 hd, float eps);
void head_rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                           const float* rstd, i64 N, i64 H, i64 hd);

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
};

class TransformerStack {
 public:
  TransformerStack() = default;
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
  void backward(float* dx, const float* dout, i64 B, i64 L,
                const std::function<void(i64 offset)>& block_done = {});

  i64 n_layers() const { return (i64)layers_.size(); }
  const BlockDims& dims() const { return dims_; }
  const BlockParams& layer(i64 i) const { return layers_[i]; }

 private:
  void block_forward(i64 l, const float* x, const i32* pos, i64 B, i64 L);
  void block_backward(i64 l, float* dx, const float* dout, const float* x, i64 B, i64 L);

  BlockDims dims_;
  std::vector<BlockParams> layers_;
  std::vector<BlockActs> acts_;
  const float* input_ = nullptr;
  const i32* pos_ = nullptr;
  i64 cap_rows_ = 0, cap_B_ = 0, cap_L_ = 0;
  // Backward scratch shared by all layers (one layer at a time).
  Buf g_res_, g_res2_, g_xn_, g_mid_, g_q_, g_k_, g_v_, g_att_, g_a_, g_b_, g_h_, g_raw_;
};

}  // namespace dlcm
