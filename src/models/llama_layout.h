// The baseline model in the plain LLaMA layout: the tensors and hyper-parameters of Hugging
// Face transformers' LlamaForCausalLM (and, through HF names, of llama.cpp's GGUF "llama").
//
// The baseline (SPEC 2-3) is LLaMA's function with one extra multiplier: logits * logit_mult
// (1, or 1/s_token under µP). It is folded into lm_head, so that plain LLaMA computes the same
// logits. Nothing else differs: RMSNorm y = x / sqrt(mean(x^2) + eps) * w, attention scale
// 1/sqrt(head_dim), no embedding multiplier, SwiGLU w2(silu(w1 x) * w3 x), no biases, and RoPE
// in the same rotate-half layout (dimension i pairs with i + head_dim/2; transformers'
// rotate_half), so q/k rows keep their order. llama.cpp's GGUF wants interleaved pairs: its
// converter permutes the q/k rows of these HF tensors (llama_permute_qk below).
//
// A config that plain LLaMA cannot express (QK-norm, the baseline_extras block, a DLCM) is
// refused by check_llama_expressible with one line naming the config key.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "core/params.h"
#include "models/config.h"

namespace dlcm {

// LlamaConfig's hyper-parameters, in transformers' terms.
struct LlamaHParams {
  i64 hidden = 0;        // hidden_size = d_token
  i64 intermediate = 0;  // intermediate_size = d_ff
  i64 n_heads = 0;       // num_attention_heads
  i64 n_kv_heads = 0;    // num_key_value_heads
  i64 head_dim = 0;      // head_dim (may differ from hidden / heads)
  i64 n_layers = 0;      // num_hidden_layers
  i64 vocab = 0;         // vocab_size
  i64 max_pos = 0;       // max_position_embeddings = max_seq_len
  double rms_eps = 1e-5;       // rms_norm_eps
  double rope_theta = 10000;   // rope_theta
  bool tied = false;     // tie_word_embeddings (dlcm baselines are untied)
  i32 bos = 1, eos = 2, pad = 0;
};

// A tensor of the layout: HF name, shape [out, in] (PyTorch order) and float32 values.
struct NamedTensor {
  std::string name;
  std::vector<i64> shape;
  const float* data = nullptr;  // the model's parameter itself (unchanged values) ...
  std::vector<float> owned;     // ... or values computed for the layout (folded multipliers)
  const float* values() const { return owned.empty() ? data : owned.data(); }
  i64 numel() const;
};

// Throws Error "<source>: '<key>' ... cannot be expressed by LLaMA" for arch dlcm, qk_norm and
// baseline_extras.
void check_llama_expressible(const ModelConfig& m, const std::string& source);
LlamaHParams llama_hparams(const ModelConfig& m);

// dlcm parameter name -> HF name, in HF's order (embed_tokens, layers 0.. with input_layernorm,
// self_attn q/k/v/o, post_attention_layernorm, mlp gate/up/down, then norm, lm_head).
std::vector<std::pair<std::string, std::string>> llama_name_map(const ModelConfig& m);

// The model's weights under HF names with logit_mult folded into lm_head.weight. The tensors
// point into ps (lm_head owns its scaled copy when logit_mult != 1), so ps must outlive them.
std::vector<NamedTensor> to_llama_layout(const ModelConfig& m, const ParamStore& ps,
                                         const std::string& source);

// The dlcm baseline config with the plain LLaMA function of hp: standard parametrisation,
// logit_mult 1, no QK-norm, untied (a tied model gets lm_head = embed_tokens), train.seq_len
// capped at max_pos. Validated; errors name `source`.
Config llama_dlcm_config(const LlamaHParams& hp, const std::string& source);

// Fills ps (of a baseline built from cfg) from HF-named tensors: read(hf_name, shape, out)
// copies one tensor as float32 (checking its shape) and returns false when the tensor is
// absent. lm_head.weight comes from model.embed_tokens.weight when hp.tied, and is divided by
// cfg.logit_mult (undoing to_llama_layout's fold; exact for powers of two). Missing tensors are
// errors naming them and `source`.
using LlamaTensorReader =
    std::function<bool(const std::string& name, const std::vector<i64>& shape, float* out)>;
void from_llama_layout(const ModelConfig& cfg, const LlamaHParams& hp,
                       const LlamaTensorReader& read, ParamStore& ps, const std::string& source);

// Rows of a q or k projection [n_head * head_dim, in] from the rotate-half order to the
// interleaved order of GGUF/llama.cpp (within each head, row i < head_dim/2 goes to 2i and row
// head_dim/2 + i to 2i + 1), or back (inverse).
std::vector<float> llama_permute_qk(const float* w, i64 n_head, i64 head_dim, i64 in,
                                    bool inverse = false);

}  // namespace dlcm
