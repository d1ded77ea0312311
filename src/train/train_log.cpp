#include "train/train_log.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/json_util.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

TrainLog read_train_log(const std::string& run) {
  DLCM_CHECK(fs::exists(run), run, ": no such run folder or log file (give the --out folder of dlcm train)");
  TrainLog log;
  log.path = fs::is_directory(run) ? (fs::path(run) / "train_log.jsonl").string() : run;
  DLCM_CHECK(fs::exists(log.path), log.path,
             ": not found (is ", run, " a run folder written by dlcm train?)");
  // bounded before reading: a log is ~300 bytes per logged step, so 1 GiB is millions of steps
  constexpr std::uintmax_t kMaxLogBytes = std::uintmax_t(1) << 30;
  std::error_code ec;
  const std::uintmax_t size = fs::file_size(log.path, ec);
  DLCM_CHECK(!ec, log.path, ": cannot read (", ec.message(), ")");
  DLCM_CHECK(size <= kMaxLogBytes, log.path, ": ", size, " bytes, over the limit of ",
             kMaxLogBytes, " for a training log (not a train_log.jsonl written by dlcm train?)");
  std::ifstream f(log.path);
  DLCM_CHECK(f, log.path, ": cannot open");
  std::string text;
  i64 n = 0;
  while (std::getline(f, text)) {
    ++n;
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = log.path + ":" + std::to_string(n);
    // A record is a flat object with at most one nested level (concept_usage and its arrays).
    const json j = parse_json_bounded(text, where, JsonLimits{8, size_t(1) << 20});
    DLCM_CHECK(j.is_object(), where, ": expected a JSON object per line, got ", json_excerpt(j));
    if (j.contains("event")) continue;
    DLCM_CHECK(j.contains("step") && j["step"].is_number_integer(), where,
               ": missing integer field \"step\" (not a train_log.jsonl written by dlcm train?)");
    LogRecord r;
    r.line = n;
    r.eval = j.contains("val_loss");
    for (auto& [k, v] : j.items())
      if (v.is_number()) r.values[k] = v.get<double>();
    log.records.push_back(std::move(r));
  }
  DLCM_CHECK(!log.records.empty(), log.path, ": empty training log (no train or eval record)");
  return log;
}

}  // namespace dlcm
