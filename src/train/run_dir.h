// Ownership of a training run folder (--out): one trainer at a time, and no accidental
// restart over an existing run.
#pragma once
#include <string>

namespace dlcm {

// An exclusive advisory lock (flock) on DIR/train.lock, held for the object's life; the
// file records the holder's pid. The kernel drops the lock when the process dies, so a
// crashed trainer never leaves the folder locked. Creates DIR if needed. Throws Error naming
// the holder's pid when another trainer (in any process) holds it, or when DIR cannot be
// written (read-only folder).
class RunDirLock {
 public:
  explicit RunDirLock(const std::string& dir);
  ~RunDirLock();
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;

 private:
  int fd_ = -1;
};

// True when DIR holds a run: a checkpoint (or the pieces of an interrupted save) or a
// non-empty training log.
bool run_dir_has_run(const std::string& dir);

}  // namespace dlcm
