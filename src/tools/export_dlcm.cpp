#include "tools/export_dlcm.h"

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/common.h"
#include "core/safetensors.h"
#include "core/staged_dir.h"
#include "models/checkpoint.h"
#include "models/config.h"
#include "models/model.h"
#include "tools/commands.h"

namespace dlcm {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json hf_config(const Config& c) {
  const ModelConfig& m = c.model;
  json j;
  j["architectures"] = {"DlcmForCausalLM"};
  j["model_type"] = "dlcm";
  j["auto_map"] = {{"AutoConfig", "configuration_dlcm.DlcmConfig"},
                   {"AutoModelForCausalLM", "modeling_dlcm.DlcmForCausalLM"}};
  j["dlcm"] = config_to_json(c);  // the source of truth; the keys below are derived from it
  j["vocab_size"] = m.vocab_size;
  j["hidden_size"] = m.d_token;
  j["num_hidden_layers"] = m.enc_layers + m.dec_layers;
  j["num_attention_heads"] = m.n_heads;
  j["max_position_embeddings"] = m.max_seq_len;
  j["bos_token_id"] = m.bos_id;
  j["eos_token_id"] = m.eos_id;
  j["pad_token_id"] = m.pad_id;
  j["tie_word_embeddings"] = false;
  j["use_cache"] = false;
  j["torch_dtype"] = "float32";
  return j;
}

}  // namespace

int export_hf_dlcm(const ExportArgs& a, const std::string& dir, const Config& cfg) {
  const std::string src = (fs::path(dir) / "config.json").string();
  DLCM_CHECK(cfg.model.is_dlcm(), src, ": internal: export_hf_dlcm of a ", cfg.model.arch,
             " checkpoint");
  DLCM_CHECK(cfg.model.router.kind != "word", src,
             ": router.kind = \"word\" needs the tokenizer's word-start table, which the "
             "transformers export does not carry; export a model with a projected, raw or fixed "
             "router");
  DLCM_CHECK(a.dtype == "f32", "--dtype: a DLCM exports in f32 only (its remote code computes in "
             "float32), got '", a.dtype, "'");
  DLCM_CHECK(a.shard_size.empty(), "--shard-size: a DLCM export is one model.safetensors");
  auto model = load_model(dir);  // checks every tensor's name and shape
  std::unique_ptr<Tokenizer> tok = export_tokenizer_of(dir, cfg);
  StagedDir out(a.out, a.force, "--force");
  const fs::path tmp = out.path();
  write_text_file_synced((tmp / "config.json").string(), hf_config(cfg).dump(2) + "\n");
  json gen = {{"bos_token_id", cfg.model.bos_id}, {"eos_token_id", cfg.model.eos_id},
              {"pad_token_id", cfg.model.pad_id}, {"use_cache", false}};
  write_text_file_synced((tmp / "generation_config.json").string(), gen.dump(2) + "\n");
  // transformers requires the "format" metadata that save_pretrained writes
  std::vector<TensorToWrite> tensors;
  i64 n_params = 0;
  for (const Param& p : model->params().params()) {
    tensors.push_back({p.name, p.shape, p.w, nullptr});
    n_params += p.numel;
  }
  write_safetensors((tmp / "model.safetensors").string(), tensors, {{"format", "pt"}});
  for (const EmbeddedFile& f : hf_dlcm_files())
    write_text_file_synced((tmp / f.name).string(), f.text);
  write_export_tokenizer(tok.get(), cfg, tmp.string());
  out.commit();
  std::fprintf(stderr, "[export] %s -> %s: DLCM as transformers remote code, %lld parameters, "
               "f32 (AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True))\n",
               dir.c_str(), out.out().c_str(), (long long)n_params);
  return 0;
}

}  // namespace dlcm
