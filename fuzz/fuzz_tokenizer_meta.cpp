// Tokenizer files read as tokenizer.json: our metadata under its old name (its fields, and the
// model file it names, which must stay inside the folder; a small garbage model file is
// present) and HF's tokenizer.json (every field of data/hf_tokenizer.cpp). A file that loads
// then encodes its own bytes, which drives the pre-tokenizers and BPE with arbitrary text.
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
    const auto ids = t->encode(std::string_view(reinterpret_cast<const char*>(data), size));
    t->decode(ids);
  } catch (const Error&) {
  }
  return 0;
}
