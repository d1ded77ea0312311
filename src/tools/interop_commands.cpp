// `dlcm export` and `dlcm import`: moving models between dlcm checkpoints and other tools'
// folders (docs/interop.md). The formats live in the library (models/hf_llama.h); these
// functions check the flags, load, and write atomically.
#include <cstdio>
#include <filesystem>

#include "core/staged_dir.h"
#include "models/checkpoint.h"
#include "models/hf_llama.h"
#include "models/model.h"
#include "tools/commands.h"
#include "tools/export_dlcm.h"

namespace dlcm {

namespace fs = std::filesystem;

namespace {

// A baseline checkpoint as a transformers LlamaForCausalLM folder.
int export_hf(const ExportArgs& a, const std::string& dir, const Config& cfg) {
  const std::string src = (fs::path(dir) / "config.json").string();
  // cmd_export is the one place where the architecture decides what --format hf writes.
  DLCM_CHECK(!cfg.model.is_dlcm(), src, ": internal: the LlamaForCausalLM export of a DLCM");
  check_llama_expressible(cfg.model, src);
  HfExportOptions o;
  o.dtype = a.dtype;
  hf_safetensors_dtype(o.dtype, "--dtype");
  if (!a.shard_size.empty()) o.shard_size = parse_byte_size(a.shard_size, "--shard-size");
  std::error_code ec;
  DLCM_CHECK(!fs::exists(fs::path(a.out) / "trainer_state.json", ec), a.out, ": is a dlcm "
             "checkpoint; refusing to replace it with an export (choose another --out)");
  auto m = load_model(dir);
  StagedDir out(a.out, a.force, "--force");
  write_hf_llama(out.path(), cfg, m->params(), o, dir);
  out.commit();
  i64 n_params = 0;
  for (const Param& p : m->params().params()) n_params += p.numel;
  std::fprintf(stderr, "[export] %s -> %s: LlamaForCausalLM, %lld parameters, %s%s\n",
               dir.c_str(), out.out().c_str(), (long long)n_params, o.dtype.c_str(),
               cfg.model.logit_mult != 1.0f ? ", logit_mult folded into lm_head" : "");
  std::fprintf(stderr, "[export] note: no tokenizer files are written; feed transformers token "
               "ids (docs/interop.md)\n");
  return 0;
}

}  // namespace

int cmd_export(const ExportArgs& a) {
  DLCM_CHECK(a.format == "hf", "--format: expected hf, got '", a.format, "'");
  const std::string dir = resolve_checkpoint(a.ckpt);
  const Config cfg = load_checkpoint_config(dir);
  if (cfg.model.is_dlcm()) return export_hf_dlcm(a, dir, cfg);  // remote code (tools/export_dlcm.h)
  return export_hf(a, dir, cfg);
}

int cmd_import(const ImportArgs& a) {
  DLCM_CHECK(a.format == "hf", "--format: expected hf, got '", a.format, "'");
  HfLlamaModel h = read_hf_llama_config(a.in);
  std::error_code ec;
  DLCM_CHECK(a.force || !fs::exists(a.out, ec), a.out, ": already exists; give --force to "
             "replace it, or choose another --out");
  auto m = make_model(h.config.model);
  read_hf_llama_weights(a.in, h, m->params());
  CheckpointWrite w;
  w.config = &h.config;
  w.params = &m->params();
  save_checkpoint(a.out, w);
  for (const std::string& n : h.notes) std::fprintf(stderr, "[import] note: %s\n", n.c_str());
  std::fprintf(stderr, "[import] %s -> %s: baseline, %lld layers, d_token %lld, vocab %lld%s\n",
               a.in.c_str(), a.out.c_str(), (long long)h.config.model.n_layers,
               (long long)h.config.model.d_token, (long long)h.config.model.vocab_size,
               h.restored ? " (dlcm settings restored from the export)" : "");
  const bool has_tok = fs::exists(fs::path(a.in) / "tokenizer.json", ec) ||
                       fs::exists(fs::path(a.in) / "tokenizer.model", ec);
  std::fprintf(stderr, "[import] note: %s; forward takes token ids, generate/eval need a "
               "tokenizer with the same ids in %s\n",
               has_tok ? "the folder's tokenizer is not imported" : "the folder has no tokenizer",
               a.out.c_str());
  return 0;
}

}  // namespace dlcm
