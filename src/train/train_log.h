// Reading a run's train_log.jsonl back (Trainer::run writes it), for plots and comparisons.
// One JSON object per line, of three kinds:
//   train  {"step", "tokens", "loss", "ce", "lr", "grad_norm", "tokens_per_s", "mfu", and the
//           model's terms: dlcm "aux", "F", "G", "compression", "compression_thresholded"}
//   eval   {"step", "tokens", "val_loss", "val_ppl", "val_tokens", "val_bpb", "val_compression"}
//   event  {"event": "nonfinite" | "ranks", ...}  (skipped here)
// Only numeric fields are kept (nested objects such as "concept_usage" and flags are not).
#pragma once
#include <map>
#include <string>
#include <vector>

#include "core/common.h"

namespace dlcm {

struct LogRecord {
  bool eval = false;  // an eval record (has "val_loss"), else a train record
  i64 line = 0;       // 1-based line in the file, for messages
  std::map<std::string, double> values;  // numeric fields, "step" and "tokens" included
  bool has(const std::string& k) const { return values.count(k) > 0; }
};

struct TrainLog {
  std::string path;  // the train_log.jsonl read
  std::vector<LogRecord> records;
};

// `run` is a run folder (its train_log.jsonl is read) or the path of a log file. Errors name
// the folder or file and line: a missing folder or log, an empty log (no train or eval
// record), a line that is not a JSON object, a record without an integer "step".
TrainLog read_train_log(const std::string& run);

}  // namespace dlcm
