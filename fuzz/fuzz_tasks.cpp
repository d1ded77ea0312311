// Benchmark files read by dlcm eval --tasks: the input is read under every layout (JSON lines,
// CSV, HellaSwag text, PIQA with a labels file).
#include "eval/tasks.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace dlcm;
  const std::string path = fuzz::write_scratch("task.jsonl", data, size);
  fuzz::write_scratch("task-labels.lst", data, size);
  for (const std::string& layout : task_layouts()) {
    TaskSpec s;
    s.name = "fuzz";
    s.layout = layout;
    s.path = path;
    if (layout == "piqa") s.labels = fuzz::scratch_dir() + "/task-labels.lst";
    try {
      read_task(s, "", 50);
    } catch (const Error&) {
    }
  }
  return 0;
}
