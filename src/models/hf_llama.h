// Hugging Face transformers LlamaForCausalLM folders (docs/interop.md): a baseline written as
// config.json + safetensors weights + generation_config.json, and such folders read back into
// a dlcm baseline config and weights. The tensor mapping is models/llama_layout.h; these
// functions handle the files. Tokenizer files are not touched here (data layer).
#pragma once
#include <string>
#include <vector>

#include "core/params.h"
#include "models/config.h"
#include "models/llama_layout.h"

namespace dlcm {

struct HfExportOptions {
  std::string dtype = "f32";             // "f32" | "bf16" | "f16": the weights' dtype on disk
  i64 shard_size = 5'000'000'000;        // largest safetensors file (transformers' 5GB)
};

// "f32"/"bf16"/"f16" -> the safetensors dtype ("F32"...); Error naming `flag` otherwise.
std::string hf_safetensors_dtype(const std::string& dtype, const std::string& flag);
// "5000000", "500MB", "2GiB", "10KB" -> bytes (decimal KB/MB/GB, binary KiB/MiB/GiB); Error
// naming `flag` for anything else or a size below 1 KB.
i64 parse_byte_size(const std::string& text, const std::string& flag);

// transformers' config.json of the baseline cfg.model (which must pass
// check_llama_expressible). It carries cfg itself under "dlcm_config" so that an import
// restores the dlcm settings (µP, training keys) and undoes the logit_mult fold.
nlohmann::ordered_json hf_llama_config_json(const Config& cfg, const std::string& torch_dtype);

// Writes config.json, generation_config.json and the weights into dir (an existing, empty
// staging folder): model.safetensors, or above o.shard_size model-0000i-of-0000N.safetensors
// with model.safetensors.index.json, as transformers' save_pretrained names them. `source`
// names the checkpoint in errors.
void write_hf_llama(const std::string& dir, const Config& cfg, const ParamStore& ps,
                    const HfExportOptions& o, const std::string& source);

// An HF folder's model, read for import.
struct HfLlamaModel {
  Config config;                   // the dlcm config (plain LLaMA function)
  LlamaHParams hp;
  bool restored = false;           // config taken from an export's "dlcm_config"
  std::vector<std::string> notes;  // one line each, for the user (fields ignored or defaulted)
};

// Reads dir/config.json: model_type "llama" with LlamaForCausalLM; every feature dlcm cannot
// compute (rope_scaling, sliding_window, attention_bias, mlp_bias, hidden_act other than silu,
// partial rotary, quantization) is an Error of one line naming the field.
HfLlamaModel read_hf_llama_config(const std::string& dir);

// Reads the weights (model.safetensors, or the shards of model.safetensors.index.json;
// F32/F16/BF16) into ps, a baseline built from h.config. Missing tensors, tensors dlcm does not
// have (biases, ...) and non-finite values are errors naming the file and tensor.
void read_hf_llama_weights(const std::string& dir, const HfLlamaModel& h, ParamStore& ps);

}  // namespace dlcm
