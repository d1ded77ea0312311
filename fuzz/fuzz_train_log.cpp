// A run's train_log.jsonl as `dlcm plot` and the run comparisons read it.
#include "fuzz_common.h"
#include "train/train_log.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  dlcm::fuzz::read_file_input("run", "train_log.jsonl", data, size,
                              [](const std::string& dir) { dlcm::read_train_log(dir); });
  return 0;
}
