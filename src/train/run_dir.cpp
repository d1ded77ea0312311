#include "train/run_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/common.h"

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

bool run_dir_has_run(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return false;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    // A file named checkpoint is not a run (saving refuses it later with its own message).
    if ((name == "checkpoint" || name.rfind("checkpoint.old-", 0) == 0) &&
        fs::is_directory(e.path(), ec))
      return true;
    if (name == "train_log.jsonl" && fs::file_size(e.path(), ec) > 0 && !ec) return true;
  }
  return false;
}

}  // namespace dlcm
