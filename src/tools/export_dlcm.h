// `dlcm export --format hf` for a DLCM checkpoint: a folder that transformers loads with
// AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) (docs/interop.md).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "models/config.h"

namespace dlcm {

// A text file compiled into the binary (cmake/embed_text_files.cmake).
struct EmbeddedFile {
  const char* name;
  const char* text;
};

// The remote code, in the export's file names: configuration_dlcm.py, modeling_dlcm.py
// (python/hf) and dlcm_ref_config.py, dlcm_ref_model.py (copies of python/dlcm_ref/config.py
// and model.py, the PyTorch reference that the modeling file wraps).
const std::vector<EmbeddedFile>& hf_dlcm_files();

// The checkpoint's tokenizer for an export (nullptr when dir has no tokenizer files), checked
// against the config's vocab_size and bos/eos ids; and writing it in HF's format
// (tokenizer.json, tokenizer_config.json, ...) into an export folder (a note when nullptr).
// Shared by the LlamaForCausalLM and the DLCM exports (tools/interop_commands.cpp).
std::unique_ptr<Tokenizer> export_tokenizer_of(const std::string& dir, const Config& cfg);
void write_export_tokenizer(const Tokenizer* tok, const Config& cfg, const std::string& out_dir);

struct ExportArgs;
// `dlcm export --format hf` of the DLCM checkpoint in dir (config cfg): writes a.out atomically
// with config.json (model_type "dlcm", auto_map, the checkpoint's config under "dlcm"),
// model.safetensors (the checkpoint's tensors under their SPEC-9 names, float32),
// generation_config.json and the remote-code files. Nothing is written on an error.
int export_hf_dlcm(const ExportArgs& a, const std::string& dir, const Config& cfg);

}  // namespace dlcm
