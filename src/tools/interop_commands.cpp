// `dlcm export` and `dlcm import`: moving models between dlcm checkpoints and other tools'
// folders (docs/interop.md). The formats live in the library (models/hf_llama.h); these
// functions check the flags, load, and write atomically.
#include <cstdio>
#include <filesystem>

#include "core/staged_dir.h"
#include "data/hf_tokenizer.h"
#include "data/tokenizer.h"
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
  std::unique_ptr<Tokenizer> tok = export_tokenizer_of(dir, cfg);
  StagedDir out(a.out, a.force, "--force");
  write_hf_llama(out.path(), cfg, m->params(), o, dir);
  write_export_tokenizer(tok.get(), cfg, out.path());
  out.commit();
  i64 n_params = 0;
  for (const Param& p : m->params().params()) n_params += p.numel;
  std::fprintf(stderr, "[export] %s -> %s: LlamaForCausalLM, %lld parameters, %s%s\n",
               dir.c_str(), out.out().c_str(), (long long)n_params, o.dtype.c_str(),
               cfg.model.logit_mult != 1.0f ? ", logit_mult folded into lm_head" : "");
  return 0;
}

}  // namespace

std::unique_ptr<Tokenizer> export_tokenizer_of(const std::string& dir, const Config& cfg) {
  if (tokenizer_files(dir).empty()) return nullptr;
  std::unique_ptr<Tokenizer> tok = load_tokenizer(dir);
  DLCM_CHECK(tok->vocab_size() <= cfg.model.vocab_size, dir, ": the tokenizer has ",
             tok->vocab_size(), " ids but the model's vocab_size is ", cfg.model.vocab_size);
  DLCM_CHECK(tok->bos_id() == cfg.model.bos_id && tok->eos_id() == cfg.model.eos_id, dir,
             ": the tokenizer's bos/eos ids (", tok->bos_id(), ", ", tok->eos_id(),
             ") differ from config.json's bos_id/eos_id (", cfg.model.bos_id, ", ",
             cfg.model.eos_id, ")");
  return tok;
}

void write_export_tokenizer(const Tokenizer* tok, const Config& cfg, const std::string& out_dir) {
  if (!tok) {
    std::fprintf(stderr, "[export] note: the checkpoint has no tokenizer files, so none are "
                 "written; feed transformers token ids (docs/interop.md)\n");
    return;
  }
  HfWriteOptions to;
  to.model_max_length = cfg.model.max_seq_len;
  write_hf_tokenizer_files(*tok, out_dir, to);
  std::fprintf(stderr, "[export] tokenizer (%s, %d ids) written as tokenizer.json + "
               "tokenizer_config.json for AutoTokenizer\n", tok->kind().c_str(), tok->vocab_size());
}

int cmd_export(const ExportArgs& a) {
  if (a.format == "gguf") return cmd_export_gguf(a);
  DLCM_CHECK(a.format == "hf", "--format: expected hf or gguf, got '", a.format, "'");
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
  // The folder's HF tokenizer.json (read by our loader, so generate/eval/prepare accept the
  // checkpoint): its special ids become the config's, which training data must match.
  std::vector<std::string> tok_files;
  const bool has_hf_tok = fs::exists(fs::path(a.in) / "tokenizer.json", ec);
  if (has_hf_tok) {
    auto tok = load_tokenizer(a.in);
    DLCM_CHECK(tok->vocab_size() <= h.config.model.vocab_size, a.in, "/tokenizer.json: ",
               tok->vocab_size(), " ids, more than config.json's vocab_size ",
               h.config.model.vocab_size);
    ModelConfig& mc = h.config.model;
    if (tok->bos_id() != mc.bos_id || tok->eos_id() != mc.eos_id || tok->pad_id() != mc.pad_id)
      h.notes.push_back("special ids (bos, eos, pad) taken from the tokenizer files: (" +
                        std::to_string(tok->bos_id()) + ", " + std::to_string(tok->eos_id()) +
                        ", " + std::to_string(tok->pad_id()) + "); config.json had (" +
                        std::to_string(mc.bos_id) + ", " + std::to_string(mc.eos_id) + ", " +
                        std::to_string(mc.pad_id) + ")");
    mc.bos_id = tok->bos_id();
    mc.eos_id = tok->eos_id();
    mc.pad_id = tok->pad_id();
    tok_files = tokenizer_files(a.in);
  }
  auto m = make_model(h.config.model);
  read_hf_llama_weights(a.in, h, m->params());
  CheckpointWrite w;
  w.config = &h.config;
  w.params = &m->params();
  w.extra_files = tok_files;
  save_checkpoint(a.out, w);
  for (const std::string& n : h.notes) std::fprintf(stderr, "[import] note: %s\n", n.c_str());
  std::fprintf(stderr, "[import] %s -> %s: baseline, %lld layers, d_token %lld, vocab %lld%s\n",
               a.in.c_str(), a.out.c_str(), (long long)h.config.model.n_layers,
               (long long)h.config.model.d_token, (long long)h.config.model.vocab_size,
               h.restored ? " (dlcm settings restored from the export)" : "");
  if (has_hf_tok)
    std::fprintf(stderr, "[import] tokenizer.json imported: generate, eval and prepare "
                 "--tokenizer-from accept %s\n", a.out.c_str());
  else
    std::fprintf(stderr, "[import] note: %s has no tokenizer.json; forward takes token ids, "
                 "generate/eval need a tokenizer with the same ids in %s\n", a.in.c_str(),
                 a.out.c_str());
  return 0;
}

}  // namespace dlcm
