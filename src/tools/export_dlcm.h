// `dlcm export --format hf` for a DLCM checkpoint: a folder that transformers loads with
// AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) (docs/interop.md).
#pragma once
#include <string>
#include <vector>

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

struct ExportDlcmHfArgs {
  std::string ckpt;   // checkpoint or run folder of a DLCM
  std::string out;    // the export folder (written atomically)
  bool force = false; // replace an existing --out
};
// Writes config.json (model_type "dlcm", auto_map, the checkpoint's config under "dlcm"),
// model.safetensors (the checkpoint's tensors under their SPEC-9 names, float32),
// generation_config.json and the remote-code files. Nothing is written on an error.
void export_dlcm_hf(const ExportDlcmHfArgs& a);

}  // namespace dlcm

namespace dlcm {

// `dlcm export`: --format hf of a DLCM checkpoint (export_dlcm_hf); --dtype f32.
struct ExportArgs {
  std::string ckpt, format = "hf", out, dtype = "f32";
  bool force = false;
};
int cmd_export(const ExportArgs& a);

}  // namespace dlcm
