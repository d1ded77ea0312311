#include "tools/export_dlcm.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/common.h"
#include "core/safetensors.h"
#include "models/checkpoint.h"
#include "models/config.h"
#include "models/model.h"

namespace dlcm {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  f.close();
  DLCM_CHECK(f.good(), path.string(), ": cannot write (disk full or no permission?)");
}

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

void export_dlcm_hf(const ExportDlcmHfArgs& a) {
  std::string dir;
  const std::string ckpt = resolve_checkpoint(a.ckpt);
  const Config cfg = load_checkpoint_config(ckpt);
  DLCM_CHECK(cfg.model.arch == "dlcm", ckpt, "/config.json: arch is \"", cfg.model.arch,
             "\"; the remote-code export is for DLCM checkpoints");
  DLCM_CHECK(cfg.model.router.kind != "word", ckpt,
             "/config.json: router.kind = \"word\" needs the tokenizer's word-start table, which "
             "the transformers export does not carry; export a model with a projected, raw or "
             "fixed router");
  DLCM_CHECK(!a.out.empty(), "dlcm export: --out is required");
  std::error_code ec;
  const bool exists = fs::exists(a.out, ec);
  DLCM_CHECK(!exists || a.force, a.out, ": already exists; pass --force to replace it");
  DLCM_CHECK(!exists || fs::is_directory(a.out, ec), a.out,
             ": exists and is not a folder; --force replaces only an export folder");
  auto model = load_model(ckpt, &dir);  // checks every tensor's name and shape

  // Everything goes into OUT.tmp-PID first and is renamed into place when complete.
  const std::string pid = std::to_string(::getpid());
  const fs::path tmp = a.out + ".tmp-" + pid, old = a.out + ".old-" + pid;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  DLCM_CHECK(!ec, tmp.string(), ": cannot create the folder (", ec.message(), ")");
  try {
    write_text(tmp / "config.json", hf_config(cfg).dump(2) + "\n");
    json gen = {{"bos_token_id", cfg.model.bos_id}, {"eos_token_id", cfg.model.eos_id},
                {"pad_token_id", cfg.model.pad_id}, {"use_cache", false}};
    write_text(tmp / "generation_config.json", gen.dump(2) + "\n");
    // transformers requires the "format" metadata of save_pretrained
    std::vector<TensorToWrite> tensors;
    for (const Param& p : model->params().params())
      tensors.push_back({p.name, p.shape, p.w, nullptr});
    write_safetensors((tmp / "model.safetensors").string(), tensors, {{"format", "pt"}});
    for (const EmbeddedFile& f : hf_dlcm_files()) write_text(tmp / f.name, f.text);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  if (exists) fs::rename(a.out, old, ec);
  DLCM_CHECK(!ec, a.out, ": cannot move the old export aside (", ec.message(), ")");
  fs::rename(tmp, a.out, ec);
  if (ec) {
    if (exists) fs::rename(old, a.out);
    fs::remove_all(tmp);
    fail(a.out, ": cannot rename the new export into place (", ec.message(), ")");
  }
  if (exists) fs::remove_all(old, ec);
}

}  // namespace dlcm

namespace dlcm {

int cmd_export(const ExportArgs& a) {
  DLCM_CHECK(a.format == "hf", "dlcm export: --format ", a.format, " is not supported (use hf)");
  DLCM_CHECK(a.dtype == "f32", "dlcm export: --dtype ", a.dtype,
             " is not supported for a DLCM (the remote code computes in float32; use f32)");
  const Config cfg = load_checkpoint_config(resolve_checkpoint(a.ckpt));
  DLCM_CHECK(cfg.model.arch == "dlcm", a.ckpt, ": --format hf of a ", cfg.model.arch,
             " checkpoint is not supported by this build (only DLCM checkpoints)");
  export_dlcm_hf({a.ckpt, a.out, a.force});
  std::fprintf(stderr, "[export] wrote %s (transformers: AutoModelForCausalLM.from_pretrained(dir, "
               "trust_remote_code=True))\n", a.out.c_str());
  return 0;
}

}  // namespace dlcm
