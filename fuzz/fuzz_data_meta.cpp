// A data folder's meta.json, read by open_data_dir next to a valid byte tokenizer and shards.
#include <filesystem>

#include "data/prepare.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace dlcm;
  static const std::string dir = [] {
    const std::string d = fuzz::scratch_dir() + "/data";
    std::filesystem::create_directories(d);
    make_byte_tokenizer()->save(d);
    for (const char* name : {"train.bin", "val.bin"}) {
      ShardWriter w(d + "/" + name, make_byte_tokenizer()->vocab_size());
      const int32_t doc[] = {1, 72, 105, 2};
      w.add_document(doc, 4);
      w.finish();
    }
    return d;
  }();
  fuzz::write_scratch("data/meta.json", data, size);
  try {
    open_data_dir(dir);
  } catch (const Error&) {
  }
  return 0;
}
