// Token shards (train.bin / val.bin): header fields, counts against the file size, token ids
// against the vocabulary.
#include <algorithm>
#include <vector>

#include "data/shards.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace dlcm;
  const std::string path = fuzz::write_scratch("s.bin", data, size);
  for (int64_t vocab : {int64_t(-1), int64_t(260)}) {
    try {
      ShardReader r(path, vocab);
      std::vector<int32_t> out(64);
      const int64_t n = std::min<int64_t>(r.size(), 64);
      r.read(0, n, out.data());
      r.read(r.size() - n, n, out.data());
    } catch (const Error&) {
    }
  }
  return 0;
}
