// Config JSON (--config files, checkpoints' config.json) and --set values: the input is parsed
// as a whole config, and used as the value of a --set of a model key, a nested key and a
// training key.
#include "core/json_util.h"
#include "fuzz_common.h"
#include "models/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace dlcm;
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    config_from_json(parse_json_bounded(text, "fuzz.json"), "fuzz.json");
  } catch (const Error&) {
  }
  for (const char* key : {"d_token=", "router.alpha=", "train.lr=", "arch=", "mup="}) {
    try {
      nlohmann::json j = nlohmann::json::object();
      apply_overrides(j, {key + text});
      config_from_json(j, "--set");
    } catch (const Error&) {
    }
  }
  return 0;
}
