// safetensors files: header length, JSON header (depth, duplicates, dtypes, shapes, offsets),
// tensor reads, and loading into a parameter store (names, shapes, non-finite values).
#include "core/safetensors.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace dlcm;
  const std::string path = fuzz::write_scratch("t.safetensors", data, size);
  try {
    SafeTensorsFile f(path);
    for (const auto& [name, e] : f.entries()) {
      try {
        if (e.dtype == "F32" || e.dtype == "BF16") f.read_f32(name);
        else f.read_i32(name);
      } catch (const Error&) {
      }
    }
  } catch (const Error&) {
  }
  try {
    ParamStore ps;
    ps.add("a", {2, 3}, ParamGroup::Other, true);
    ps.add("b", {4}, ParamGroup::Other, false);
    ps.finalize();
    load_params(path, ps);
  } catch (const Error&) {
  }
  return 0;
}
