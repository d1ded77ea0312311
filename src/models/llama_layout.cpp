#include "models/llama_layout.h"

#include <algorithm>
#include <cstring>

namespace dlcm {

i64 NamedTensor::numel() const {
  i64 n = 1;
  for (i64 d : shape) n *= d;
  return n;
}

void check_llama_expressible(const ModelConfig& m, const std::string& source) {
  DLCM_CHECK(!m.is_dlcm(), source, ": 'arch' is \"dlcm\"; only a baseline has the plain LLaMA "
             "layout (a DLCM needs its own modeling code)");
  DLCM_CHECK(!m.qk_norm, source, ": 'qk_norm' is true; LLaMA has no RMSNorm on queries and "
             "keys, and it cannot be folded into the weights (train with qk_norm=false to export)");
  DLCM_CHECK(!m.baseline_extras, source, ": 'baseline_extras' is true; the extra encoder.norm "
             "and cross FFN between the two halves of the stack are not LLaMA blocks");
}

LlamaHParams llama_hparams(const ModelConfig& m) {
  LlamaHParams hp;
  hp.hidden = m.d_token;
  hp.intermediate = m.d_ff;
  hp.n_heads = m.n_heads;
  hp.n_kv_heads = m.n_kv_heads;
  hp.head_dim = m.head_dim;
  hp.n_layers = m.n_layers;
  hp.vocab = m.vocab_size;
  hp.max_pos = m.max_seq_len;
  hp.rms_eps = m.norm_eps;
  hp.rope_theta = m.rope_theta;
  hp.tied = false;
  hp.bos = m.bos_id;
  hp.eos = m.eos_id;
  hp.pad = m.pad_id;
  return hp;
}

std::vector<std::pair<std::string, std::string>> llama_name_map(const ModelConfig& m) {
  std::vector<std::pair<std::string, std::string>> map;
  map.push_back({"tok_embeddings.weight", "model.embed_tokens.weight"});
  for (i64 l = 0; l < m.n_layers; ++l) {
    const std::string d = "layers." + std::to_string(l) + ".";
    const std::string h = "model.layers." + std::to_string(l) + ".";
    map.push_back({d + "attn_norm.weight", h + "input_layernorm.weight"});
    map.push_back({d + "attn.wq.weight", h + "self_attn.q_proj.weight"});
    map.push_back({d + "attn.wk.weight", h + "self_attn.k_proj.weight"});
    map.push_back({d + "attn.wv.weight", h + "self_attn.v_proj.weight"});
    map.push_back({d + "attn.wo.weight", h + "self_attn.o_proj.weight"});
    map.push_back({d + "ffn_norm.weight", h + "post_attention_layernorm.weight"});
    map.push_back({d + "ffn.w1.weight", h + "mlp.gate_proj.weight"});
    map.push_back({d + "ffn.w3.weight", h + "mlp.up_proj.weight"});
    map.push_back({d + "ffn.w2.weight", h + "mlp.down_proj.weight"});
  }
  map.push_back({"norm.weight", "model.norm.weight"});
  map.push_back({"lm_head.weight", "lm_head.weight"});
  return map;
}

std::vector<NamedTensor> to_llama_layout(const ModelConfig& m, const ParamStore& ps,
                                         const std::string& source) {
  check_llama_expressible(m, source);
  std::vector<NamedTensor> out;
  for (const auto& [ours, hf] : llama_name_map(m)) {
    const Param* p = ps.find(ours);
    DLCM_CHECK(p && p->w, "internal: to_llama_layout: the model has no parameter '", ours, "'");
    NamedTensor t{hf, p->shape, p->w, {}};
    if (ours == "lm_head.weight" && m.logit_mult != 1.0f) {
      // logits = (W h) * mult = (W * mult) h
      t.owned.resize(size_t(p->numel));
      for (i64 i = 0; i < p->numel; ++i) t.owned[i] = p->w[i] * m.logit_mult;
    }
    out.push_back(std::move(t));
  }
  return out;
}

Config llama_dlcm_config(const LlamaHParams& hp, const std::string& source) {
  Config c;
  ModelConfig& m = c.model;
  m.arch = "baseline";
  m.vocab_size = hp.vocab;
  m.d_token = hp.hidden;
  m.n_heads = hp.n_heads;
  m.n_kv_heads = hp.n_kv_heads;
  m.head_dim = hp.head_dim;
  m.d_ff = hp.intermediate;
  m.n_layers = hp.n_layers;
  m.qk_norm = false;
  m.baseline_extras = false;
  m.rope_theta = float(hp.rope_theta);
  m.norm_eps = float(hp.rms_eps);
  m.logit_mult = 1.0f;
  m.max_seq_len = hp.max_pos;
  m.bos_id = hp.bos;
  m.eos_id = hp.eos;
  m.pad_id = hp.pad;
  m.mup.enabled = false;
  c.train.seq_len = std::min(c.train.seq_len, hp.max_pos);
  validate(c, source);
  return c;
}

void from_llama_layout(const ModelConfig& cfg, const LlamaHParams& hp,
                       const LlamaTensorReader& read, ParamStore& ps, const std::string& source) {
  check_llama_expressible(cfg, source);
  std::vector<std::string> missing;
  for (const auto& [ours, hf] : llama_name_map(cfg)) {
    Param* p = ps.find(ours);
    DLCM_CHECK(p && p->w, "internal: from_llama_layout: the model has no parameter '", ours, "'");
    const bool head = ours == "lm_head.weight";
    const std::string src = head && hp.tied ? "model.embed_tokens.weight" : hf;
    if (!read(src, p->shape, p->w)) {
      missing.push_back(src);
      continue;
    }
    if (head && cfg.logit_mult != 1.0f)
      for (i64 i = 0; i < p->numel; ++i) p->w[i] /= cfg.logit_mult;
  }
  if (!missing.empty()) {
    std::string names;
    for (size_t i = 0; i < missing.size() && i < 6; ++i) names += (i ? ", '" : "'") + missing[i] + "'";
    if (missing.size() > 6) names += " and " + std::to_string(missing.size() - 6) + " more";
    fail(source, ": missing tensor", missing.size() > 1 ? "s " : " ", names,
         hp.tied ? "" : " (if lm_head.weight is the one missing, is tie_word_embeddings true?)");
  }
}

std::vector<float> llama_permute_qk(const float* w, i64 n_head, i64 head_dim, i64 in,
                                    bool inverse) {
  DLCM_CHECK(head_dim % 2 == 0, "llama_permute_qk: head_dim must be even, got ", head_dim);
  const i64 half = head_dim / 2;
  std::vector<float> out(size_t(n_head * head_dim * in));
  for (i64 h = 0; h < n_head; ++h)
    for (i64 i = 0; i < half; ++i)
      for (i64 s = 0; s < 2; ++s) {
        const i64 rh = h * head_dim + s * half + i;  // rotate-half row
        const i64 ri = h * head_dim + 2 * i + s;     // interleaved row
        const i64 from = inverse ? ri : rh, to = inverse ? rh : ri;
        std::memcpy(out.data() + to * in, w + from * in, sizeof(float) * size_t(in));
      }
  return out;
}

}  // namespace dlcm
