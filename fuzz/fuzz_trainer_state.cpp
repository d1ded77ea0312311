// A checkpoint's trainer_state.json as --resume reads it (the checkpoint folder around it is
// valid).
#include <filesystem>

#include "fuzz_common.h"
#include "models/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace dlcm;
  static const std::string dir = [] {
    const std::string d = fuzz::scratch_dir() + "/ckpt";
    std::filesystem::create_directories(d);
    fuzz::write_scratch("ckpt/config.json", config_to_json(Config{}).dump());
    fuzz::write_scratch("ckpt/model.safetensors", "");
    return d;
  }();
  fuzz::write_scratch("ckpt/trainer_state.json", data, size);
  try {
    load_trainer_state(dir);
  } catch (const Error&) {
  }
  return 0;
}
