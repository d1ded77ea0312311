#include "train/run_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>

#include "core/common.h"
#include "models/checkpoint.h"

namespace dlcm {
namespace fs = std::filesystem;

RunDirLock::RunDirLock(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  DLCM_CHECK(!ec, dir, ": cannot create the run folder: ", ec.message(),
             " (choose a writable --out)");
  const std::string path = (fs::path(dir) / "train.lock").string();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  DLCM_CHECK(fd_ >= 0, path, ": cannot create the run folder's lock file: ", std::strerror(errno),
             " (is --out writable?)");
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[32] = {0};
    const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
    ::close(fd_);
    fd_ = -1;
    DLCM_CHECK(err == EWOULDBLOCK, path, ": cannot lock the run folder: ", std::strerror(err));
    std::string pid(buf, n > 0 ? size_t(n) : 0);
    while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
    if (pid.empty() || pid.find_first_not_of("0123456789") != std::string::npos) pid = "unknown";
    fail(dir, ": the run folder is in use by another trainer (pid ", pid,
         "); two trainers on one --out would overwrite each other's checkpoint and log. Wait for "
         "it to finish or stop it, or choose another --out");
  }
  const std::string me = std::to_string(::getpid()) + "\n";
  // Best effort: the pid is only shown to a refused second trainer.
  if (::ftruncate(fd_, 0) == 0 && ::pwrite(fd_, me.data(), me.size(), 0) == ssize_t(me.size()))
    ::fsync(fd_);
}

RunDirLock::~RunDirLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the lock; the file stays (unlinking it would race)
}

namespace {

constexpr const char* kStepPrefix = "checkpoint-step-";

// N of a "checkpoint-step-N" name, or -1.
i64 step_of(const std::string& name) {
  const std::string pre = kStepPrefix;
  if (name.size() <= pre.size() || name.size() > pre.size() + 15 || name.compare(0, pre.size(), pre))
    return -1;
  const std::string num = name.substr(pre.size());
  if (num.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stoll(num);
}

// The checkpoint folder a name belongs to: "checkpoint", "checkpoint-best", "checkpoint-step-N"
// itself, or the one a ".tmp-PID" / ".old-PID" sibling of a save belongs to; "" for other names.
std::string checkpoint_base(const std::string& name) {
  std::string base = name;
  for (const char* tag : {".tmp-", ".old-"}) {
    const size_t at = name.rfind(tag);
    if (at != std::string::npos) base = name.substr(0, at);
  }
  if (base == "checkpoint" || base == "checkpoint-best" || step_of(base) >= 0) return base;
  return "";
}

}  // namespace

std::string step_checkpoint_dir(const std::string& dir, i64 step) {
  char name[48];
  std::snprintf(name, sizeof name, "%s%06lld", kStepPrefix, (long long)step);
  return (fs::path(dir) / name).string();
}

std::string best_checkpoint_dir(const std::string& dir) {
  return (fs::path(dir) / "checkpoint-best").string();
}

std::vector<std::pair<i64, std::string>> step_checkpoints(const std::string& dir) {
  std::vector<std::pair<i64, std::string>> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const i64 s = step_of(e.path().filename().string());
    if (s >= 0 && is_checkpoint(e.path().string())) out.emplace_back(s, e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

void prune_step_checkpoints(const std::string& dir, i64 keep) {
  auto all = step_checkpoints(dir);
  const std::string gone = ".tmp-" + std::to_string(::getpid());
  for (size_t i = 0; i + size_t(std::max<i64>(keep, 0)) < all.size(); ++i) {
    std::error_code ec;
    fs::rename(all[i].second, all[i].second + gone, ec);
    DLCM_CHECK(!ec, all[i].second, ": cannot remove an old checkpoint (--keep): ", ec.message());
    fs::remove_all(all[i].second + gone, ec);
  }
}

void clean_run_dir(const std::string& dir) {
  std::set<std::string> bases;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.find(".tmp-") != std::string::npos || name.find(".old-") != std::string::npos) {
      const std::string b = checkpoint_base(name);
      if (!b.empty()) bases.insert(b);
    }
  }
  bases.insert("checkpoint");
  for (const std::string& b : bases) clean_stale_checkpoint_siblings((fs::path(dir) / b).string(), true);
}

void remove_run_checkpoints(const std::string& dir) {
  std::error_code ec;
  std::vector<fs::path> doomed;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (!checkpoint_base(e.path().filename().string()).empty()) doomed.push_back(e.path());
  // The latest goes last: until then a crash leaves the old run resumable, never half of it.
  std::sort(doomed.begin(), doomed.end(), [](const fs::path& a, const fs::path& b) {
    return (a.filename() == "checkpoint") < (b.filename() == "checkpoint");
  });
  for (const fs::path& p : doomed)
    if (is_checkpoint(p.string()) || p.filename() != "checkpoint") fs::remove_all(p, ec);
}

Config resume_config(const std::string& dir, const std::string& config_path,
                     const std::vector<std::string>& sets) {
  // An interrupted save may have left the checkpoint under checkpoint.old-PID (the Trainer
  // puts it back once it holds the lock); its config is the run's.
  std::string ck = (fs::path(dir) / "checkpoint").string();
  std::error_code ec;
  if (!is_checkpoint(ck))
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.path().filename().string().rfind("checkpoint.old-", 0) == 0 &&
          is_checkpoint(e.path().string()))
        ck = e.path().string();
  if (!is_checkpoint(ck)) {
    // A trainer that has not saved yet: its lock names it, which says more than "no checkpoint".
    if (fs::is_directory(dir, ec)) RunDirLock probe(dir);
    fail(dir, ": --resume given but there is no checkpoint in ",
         (fs::path(dir) / "checkpoint").string(), " (start without --resume)");
  }
  const std::string run_config = (fs::path(dir) / "checkpoint" / "config.json").string();
  const nlohmann::json saved = config_to_json(load_checkpoint_config(ck));
  // A key that may not change on resume may still be --set to the run's own value (scripts
  // repeat the flags of the first start when they resume).
  std::string refused;
  for (const std::string& s : sets) {
    const ConfigKey* k = override_key(s);
    if (!k || k->on_resume) continue;
    nlohmann::json probe = saved;
    apply_overrides(probe, {s});
    const nlohmann::json now = config_to_json(config_from_json(probe, "--set '" + s + "'"));
    std::string path = std::string("/") + k->path;
    std::replace(path.begin(), path.end(), '.', '/');
    const nlohmann::json::json_pointer at(path);
    if (now.at(at) != saved.at(at))
      refused += std::string(refused.empty() ? "" : ", ") + k->path + " (run " + saved.at(at).dump() +
                 ", given " + now.at(at).dump() + ")";
  }
  if (!refused.empty()) {
    std::string allowed;
    for (const ConfigKey& k : config_keys())
      if (k.on_resume) allowed += std::string(allowed.empty() ? "" : ", ") + k.path;
    fail("--resume: --set would change ", refused, ", which may not change when a run is ",
         "resumed (the run keeps its own config, ", run_config, "); keys that may change: ",
         allowed, ". To change the others, start a new run (--init-from ", dir,
         " starts one from these weights)");
  }
  nlohmann::json j = config_path.empty() ? saved : load_config_json(config_path);
  apply_overrides(j, sets);
  return config_from_json(j, config_path.empty() ? run_config : config_path);
}

bool run_dir_has_run(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return false;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    // A file named checkpoint is not a run (saving refuses it later with its own message).
    if ((!checkpoint_base(name).empty() && name.find(".tmp-") == std::string::npos) &&
        fs::is_directory(e.path(), ec))
      return true;
    if (name == "train_log.jsonl" && fs::file_size(e.path(), ec) > 0 && !ec) return true;
  }
  return false;
}

}  // namespace dlcm
