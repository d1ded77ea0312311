// Dynamic Large Concept Model (SPEC section 4), forward and backward side by side:
//
//   tokens -> tok_embeddings -> encoder blocks -> encoder.norm = H          [N, d_token]
//   H -> router (q = Wq H, k = Wk H) -> p [N] -> b [N] (sampled or thresholded)
//   b -> segments; pool H per concept -> W_up -> C (ConceptPool)          [B, Mc, d_concept]
//   C -> backbone blocks (causal over concepts) -> backbone.norm = Z
//   (prefix_mean + inclusive: also one prefix row per token, W_up of its concept's mean up to
//   itself, through the same backbone pass after its closed concepts -> backbone.norm = Zp)
//   H, Z -> ConceptCrossAttention (smoother, [z_null, ZS] K/V, leak-free concept attention,
//   Psi = H + Wo att, X = Psi + ffn(ffn_norm(Psi))) -> decoder blocks -> decoder.norm -> lm_head
//
// N = B*L token rows; Mc = the concept capacity per row of the current batch (max concepts
// of a row, rows with fewer are padded with zero concepts that never reach a real one).
// Loss = CE + aux_weight * L_aux, the Global Parser loss over the whole optimizer step (per row
// with aux_kind "sequence", none for the rule routers "fixed"/"word", models/boundary_rule.h): the
// step's boundaries are sampled for every micro-batch in prepare_step() before any backward.
#pragma once
#include <vector>

#include "kernels/dlcm_ops.h"
#include "models/boundary_rule.h"
#include "models/model.h"
#include "nn/concept_xattn.h"
#include "nn/lm_head.h"
#include "nn/transformer.h"

namespace dlcm {

class DlcmModel : public LanguageModel {
 public:
  explicit DlcmModel(const ModelConfig& cfg);
  void reserve(i64 B, i64 L) override;
  double prepare_step(const std::vector<Batch>& micro, const StepContext& ctx) override;
  MicroStats train_micro(const Batch& b, i64 index, const StepContext& ctx) override;
  // Auxiliary loss (weighted by aux_weight: the Global Parser, the per-row mean for aux_kind
  // "sequence", 0 for rule routers) and the log's aux, F, G, compression and
  // compression_thresholded (sampled and inference-rule boundaries).
  LossTerms loss_terms(const MicroStats& step) const override;
  // Thresholded boundaries, or the batch's given ones (Batch::boundaries).
  MicroStats eval_micro(const Batch& b, float* row_loss) override;
  void logits(const i32* tokens, i64 B, i64 L, float* out) override;
  // Logits at chosen positions only: the head runs on those rows (scoring, evaluation).
  void logits_at(const i32* tokens, i64 B, i64 L, const i64* pos, i64 n, float* out) override;
  bool boundaries(const i32* tokens, i64 B, i64 L, float* p, uint8_t* b, float tau) override;
  // Runs the decoder three times on one encoder pass and segmentation: as is (with residual
  // norms and per-position CE), with z_null concepts, with shuffled concepts. Without the
  // concept path the decoder sees no concept: ce_null = ce_shuffle = ce exactly.
  bool concept_usage(const Batch& b, ConceptUsageSums& acc) override;
  // The streaming state of SPEC 5 (models/dlcm_stream.cpp).
  std::unique_ptr<InferenceStream> new_stream(const StreamOptions& o) override;
  double flops_per_token(i64 L) const override;
  // router.kind = "word": the tokenizer's word-start flags (Tokenizer::word_starts()).
  void set_word_starts(std::vector<uint8_t> w) override { decider_.set_word_starts(std::move(w)); }
  // µP coordinate check: tok_embeddings, encoder (before its norm), concepts (after W_up),
  // backbone (before its norm; both over real concepts only), cross_attention (X, the
  // decoder's input), decoder (before its norm), of the last forward pass.
  std::vector<std::pair<std::string, double>> activation_rms() const override;

  // The segments of the last forward pass (tests, diagnostics).
  const ops::Segments& segments() const { return sg_; }
  // Router probabilities of the last forward pass [B*L].
  const float* last_p() const { return p_.data(); }

  // The model's parts in pipeline order, for the streaming state (models/dlcm_stream.cpp),
  // which runs the same layer objects with its own caches. Router projections are nullptr
  // for router.kind "raw" (q = k = H, ds = d_token); pool and backbone are unused (and their
  // parameters unregistered) without the concept path.
  struct Parts {
    const Param* tok_embeddings;
    TransformerStack* encoder;
    const Param* encoder_norm;
    const Param *router_wq, *router_wk;
    i64 ds;
    ConceptPool* pool;
    TransformerStack* backbone;
    const Param* backbone_norm;
    ConceptCrossAttention* xattn;
    TransformerStack* decoder;
    LMHead* head;
    const BoundaryDecider* decider;  // rule routers decide b in place of the router's p
  };
  Parts parts();

 private:
  // Encoder + router: fills x0_, H_, p_ (and the router's q/k). Validates tokens.
  void encode(const i32* tokens, i64 B, i64 L);
  // Everything after the boundary decisions b [B*L] (already OR-ed with forced positions):
  // segments, pooling, backbone, cross-attention layer, decoder. Returns the decoder output
  // before decoder.norm [N, d].
  // ablation and norms: evaluation only (ConceptCrossAttention::forward).
  const float* decode(const i32* tokens, const uint8_t* b, i64 B, i64 L,
                      ConceptAblation ablation = ConceptAblation::None,
                      XAttnNorms* norms = nullptr);
  // Backward of decode() and encode() from the gradient of the decoder output, plus the
  // router's dp (aux_dp [N], the aux loss's, and with smooth_grad the smoother's).
  // Parameter gradients +=.
  void backward(const i32* tokens, const float* g_dec_out, const float* aux_dp, i64 B, i64 L);
  void reserve_concepts(i64 B, i64 Mc);
  void given_boundaries(uint8_t* b, const Batch& mb) const;
  void check_tokens(const i32* tokens, i64 N, i64 L) const;

  bool projected_ = true;
  BoundaryDecider decider_;  // sampling/thresholding, rule routers, aux loss (boundary_rule.h)
  Buf aux_dp_;               // the aux loss's gradient w.r.t. p [N]
  ConceptOptions copt_;
  i64 ds_ = 0;
  Param *tok_emb_, *enc_norm_, *r_wq_ = nullptr, *r_wk_ = nullptr, *bb_norm_ = nullptr;
  Param *dec_norm_, *lm_head_;
  TransformerStack enc_, bb_, dec_;
  ConceptPool pool_;
  ConceptCrossAttention xattn_;
  LMHead head_;

  // Token-level activations [N, ...] (allocated by reserve).
  Buf x0_, H_, enc_rstd_;
  Buf rq_, rk_, rcache_, p_;               // router q/k [N, ds], cache [N, 3], p [N]
  std::vector<uint8_t> b_;                 // boundaries of the current forward [N]
  std::vector<i32> pos_;
  Buf picked_;  // decoder outputs gathered for logits_at
  Buf nll_;     // per-position CE of concept_usage [N]
  // Concept-level activations [B*Mc, ...] (grow with the batch's Mc).
  Buf Z_, z_rstd_;
  std::vector<i32> pos_c_;
  ops::Segments sg_;
  // Prefix rows (prefix_mean + inclusive) [N, ...]: one backbone row per token.
  Buf Zp_, zp_rstd_, g_Zp_, g_bbp_, g_Cp_;
  std::vector<i32> pos_p_, seq_p_;  // concept position and row of each token's prefix row
  const float* bbp_out_ = nullptr;
  const float* enc_out_ = nullptr;
  const float* C_ = nullptr;
  const float* bb_out_ = nullptr;
  const float* X_ = nullptr;
  const float* dec_out_ = nullptr;
  i64 last_N_ = 0;
  // Gradients (token level and concept level).
  Buf g_out_, g_X_, g_H_, g_rq_, g_rk_, dp_, g_enc_, g_x0_;
  Buf g_Z_, g_bb_, g_C_;
  i64 cap_B_ = 0, cap_L_ = 0, conc_B_ = 0, cap_Mc_ = 0;

  // Boundaries sampled by prepare_step for each micro-batch of the step [K][B*L], and which
  // micro-batch's encoder activations are still live in H_ (so train_micro can skip the
  // repeated encoder pass for it).
  std::vector<std::vector<uint8_t>> step_b_;
  i64 live_step_ = -1, live_micro_ = -1;
  const i32* live_tokens_ = nullptr;
};

}  // namespace dlcm
