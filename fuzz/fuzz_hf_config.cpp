// A transformers model folder's config.json as `dlcm import --format hf` reads it (the weights
// are the safetensors harness's).
#include "fuzz_common.h"
#include "models/hf_llama.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  dlcm::fuzz::read_file_input("hf", "config.json", data, size,
                              [](const std::string& dir) { dlcm::read_hf_llama_config(dir); });
  return 0;
}
