// LLaMA-style dense decoder (SPEC section 3):
// tok_embeddings -> n_layers pre-norm blocks -> norm -> lm_head (untied), logits * logit_mult.
//
// baseline_extras (the control that isolates the DLCM's concept path): the DLCM's token-path
// extras between the two halves of the stack, named as in the DLCM:
//   x -> encoder.layers.0..k-1 -> H = encoder.norm(.)
//     -> X = H + w2(silu(w1 pn) * w3 pn), pn = xattn.ffn_norm(H)   (xattn.ffn.*, width x_d_ff)
//     -> decoder.layers.0..n_layers-k-1 -> norm -> lm_head,          k = n_layers_pre
// i.e. a DLCM with concept_path = false and no router. The extras are per token, so the
// streaming KV caches stay those of the two stacks.
#pragma once
#include "models/model.h"
#include "nn/lm_head.h"
#include "nn/transformer.h"

namespace dlcm {

class BaselineModel : public LanguageModel {
 public:
  explicit BaselineModel(const ModelConfig& cfg);
  void reserve(i64 B, i64 L) override;
  MicroStats train_micro(const Batch& b, i64 index, const StepContext& ctx) override;
  MicroStats eval_micro(const Batch& b, float* row_loss) override;
  void logits(const i32* tokens, i64 B, i64 L, float* out) override;
  void logits_at(const i32* tokens, i64 B, i64 L, const i64* pos, i64 n, float* out) override;
  double flops_per_token(i64 L) const override;
  std::unique_ptr<InferenceStream> new_stream(const StreamOptions& o) override;
  // tok_embeddings (embedding output) and layers (last block output, before the final norm).
  std::vector<std::pair<std::string, double>> activation_rms() const override;
  // the layer stacks (with extras: the blocks before and after the cross FFN)
  const TransformerStack& layer_stack() const { return layers_; }
  const TransformerStack& post_stack() const { return post_; }

 private:
  friend class BaselineStream;
  const float* run_forward(const i32* tokens, i64 B, i64 L);
  // The extras on N rows: mid [N, d] -> X [N, d], keeping H, pn, fa, fb, fh (and rstds) in the
  // given buffers; used by the full forward and the stream.
  void extras_forward(float* X, float* H, float* h_rstd, float* pn, float* pn_rstd, float* fa,
                      float* fb, float* fh, const float* mid, i64 N) const;
  // dX [N, d] -> dmid [N, d] (overwritten), parameter gradients +=.
  void extras_backward(float* dmid, const float* dX, const float* mid, i64 N);

  Param *tok_emb_, *norm_, *lm_head_;
  Param *mid_norm_ = nullptr, *ffn_norm_ = nullptr, *w1_ = nullptr, *w2_ = nullptr, *w3_ = nullptr;
  bool extras_ = false;
  TransformerStack layers_;  // all n_layers blocks; with extras the first n_layers_pre
  TransformerStack post_;    // with extras: the blocks after them
  // extras activations [N, d] / [N, x_d_ff] / [N] and their gradients
  Buf H_, h_rstd_, pn_, pn_rstd_, fa_, fb_, fh_, X_;
  Buf g_X_, g_fh_, g_fa_, g_fb_, g_pn_, g_H_, g_mid_;
  const float* mid_ = nullptr;  // the first stack's output of the last forward
  LMHead head_;
  Buf x_, g_x_, g_out_, picked_;  // picked_: hidden rows gathered for logits_at
  std::vector<i32> pos_;
  i64 cap_B_ = 0, cap_L_ = 0;
  const float* last_out_ = nullptr;  // stack output of the last forward
  i64 last_rows_ = 0;
};

}  // namespace dlcm
