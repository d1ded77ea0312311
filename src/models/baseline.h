// LLaMA-style dense decoder (SPEC section 3):
// tok_embeddings -> n_layers pre-norm blocks -> norm -> lm_head (untied), logits * logit_mult.
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

 private:
  friend class BaselineStream;
  const float* run_forward(const i32* tokens, i64 B, i64 L);

  Param *tok_emb_, *norm_, *lm_head_;
  TransformerStack layers_;
  LMHead head_;
  Buf x_, g_x_, g_out_, picked_;  // picked_: hidden rows gathered for logits_at
  std::vector<i32> pos_;
  i64 cap_B_ = 0, cap_L_ = 0;
  const float* last_out_ = nullptr;  // stack output of the last forward
  i64 last_rows_ = 0;
};

}  // namespace dlcm
