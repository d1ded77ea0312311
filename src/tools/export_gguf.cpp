// `dlcm export --format gguf`: a baseline checkpoint as one GGUF file for llama.cpp.
#include <filesystem>

#include "core/gguf.h"
#include "data/gguf_tokenizer.h"
#include "data/model_loader.h"
#include "data/tokenizer.h"
#include "models/gguf_llama.h"
#include "tools/commands.h"

namespace dlcm {

int cmd_export_gguf(const ExportArgs& a) {
  namespace fs = std::filesystem;
  DLCM_CHECK(a.shard_size.empty(), "--shard-size: a GGUF export is one file; drop the flag");
  const GgmlType type = parse_ggml_type(a.dtype, "--dtype");
  std::error_code ec;
  DLCM_CHECK(!fs::is_directory(a.out, ec), "--out ", a.out,
             " is a folder; GGUF is one file (e.g. --out model.gguf)");
  DLCM_CHECK(a.force || !fs::exists(a.out, ec), "--out ", a.out,
             " exists; pass --force to replace it");
  std::string dir;
  auto m = load_model_with_tokenizer(a.ckpt, &dir);
  DLCM_CHECK(!tokenizer_files(dir).empty(), dir, ": no tokenizer files; a GGUF file carries "
             "its tokenizer, so copy the tokenizer the model was trained with into the checkpoint");
  auto tok = load_tokenizer(dir);
  GgufWriter w;
  std::string name = fs::path(dir).filename().string();
  if (name == "checkpoint") name = fs::path(dir).parent_path().filename().string();
  add_gguf_llama_model(w, m->config(), m->params(), type, name, dir + "/config.json");
  add_gguf_tokenizer(w, *tok, m->config().vocab_size);
  w.write(a.out);
  std::fprintf(stderr, "[export] wrote %s (GGUF llama, %s, %.2f MB): llama.cpp runs it, e.g. "
               "llama-cli -m %s\n", a.out.c_str(), ggml_type_name(type),
               double(fs::file_size(a.out, ec)) / 1e6, a.out.c_str());
  return 0;
}

}  // namespace dlcm
