#include "models/gguf_llama.h"

#include "models/llama_layout.h"

namespace dlcm {

namespace {

// HF name of the plain LLaMA layout -> llama.cpp's GGUF name ("" when unknown).
std::string gguf_name(const std::string& hf) {
  static const std::pair<const char*, const char*> kBlock[] = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
  };
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  const std::string pre = "model.layers.";
  if (hf.rfind(pre, 0) != 0) return "";
  const size_t dot = hf.find('.', pre.size());
  if (dot == std::string::npos) return "";
  const std::string layer = hf.substr(pre.size(), dot - pre.size()), rest = hf.substr(dot + 1);
  for (auto [h, g] : kBlock)
    if (rest == h) return "blk." + layer + "." + g;
  return "";
}

bool ends_with(const std::string& s, const char* t) {
  const size_t n = std::strlen(t);
  return s.size() >= n && s.compare(s.size() - n, n, t) == 0;
}

// llama_ftype of a file whose matrices are mostly `t`.
uint32_t file_type(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return 0;
    case GgmlType::F16: return 1;
    case GgmlType::Q8_0: return 7;
    case GgmlType::BF16: return 32;
  }
  return 0;
}

}  // namespace

void add_gguf_llama_model(GgufWriter& w, const ModelConfig& m, const ParamStore& ps, GgmlType type,
                          const std::string& name, const std::string& source) {
  std::vector<NamedTensor> tensors = to_llama_layout(m, ps, source);
  const LlamaHParams hp = llama_hparams(m);
  w.set_string("general.architecture", "llama");
  w.set_string("general.name", name);
  w.set_u32("general.file_type", file_type(type));
  w.set_u32("general.quantization_version", 2);
  w.set_u32("general.alignment", 32);
  w.set_u32("llama.vocab_size", uint32_t(hp.vocab));
  w.set_u32("llama.context_length", uint32_t(hp.max_pos));
  w.set_u32("llama.embedding_length", uint32_t(hp.hidden));
  w.set_u32("llama.block_count", uint32_t(hp.n_layers));
  w.set_u32("llama.feed_forward_length", uint32_t(hp.intermediate));
  w.set_u32("llama.attention.head_count", uint32_t(hp.n_heads));
  w.set_u32("llama.attention.head_count_kv", uint32_t(hp.n_kv_heads));
  // head_dim is a key of its own in dlcm; llama.cpp assumes embedding / heads unless told.
  w.set_u32("llama.attention.key_length", uint32_t(hp.head_dim));
  w.set_u32("llama.attention.value_length", uint32_t(hp.head_dim));
  w.set_f32("llama.attention.layer_norm_rms_epsilon", float(hp.rms_eps));
  w.set_f32("llama.rope.freq_base", float(hp.rope_theta));
  w.set_u32("llama.rope.dimension_count", uint32_t(hp.head_dim));
  for (NamedTensor& t : tensors) {
    const std::string g = gguf_name(t.name);
    DLCM_CHECK(!g.empty(), "internal: no GGUF name for '", t.name, "'");
    std::vector<float> v;
    if (ends_with(t.name, "q_proj.weight") || ends_with(t.name, "k_proj.weight")) {
      const i64 heads = ends_with(t.name, "q_proj.weight") ? hp.n_heads : hp.n_kv_heads;
      v = llama_permute_qk(t.values(), heads, hp.head_dim, t.shape[1]);
    } else {
      v.assign(t.values(), t.values() + t.numel());
    }
    GgmlType tt = t.shape.size() == 1 ? GgmlType::F32 : type;
    if (tt == GgmlType::Q8_0 && t.shape.back() % kQ8BlockSize != 0) tt = GgmlType::F16;
    w.add_tensor(g, t.shape, std::move(v), tt);
  }
}

}  // namespace dlcm
