// Tokenizer metadata (tokenizer.json of a data folder or checkpoint): its fields, and the
// model file it names (must stay inside the folder; a small garbage model file is present).
#include <filesystem>

#include "data/tokenizer.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace dlcm;
  static const std::string dir = [] {
    const std::string d = fuzz::scratch_dir() + "/tok";
    std::filesystem::create_directories(d);
    fuzz::write_scratch("tok/tokenizer.model", "not a sentencepiece model");
    fuzz::write_scratch("outside.model", "outside the folder");
    return d;
  }();
  fuzz::write_scratch("tok/tokenizer.json", data, size);
  try {
    auto t = load_tokenizer(dir);
    t->encode("fuzz");
  } catch (const Error&) {
  }
  return 0;
}
