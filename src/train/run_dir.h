// Ownership of a training run folder (--out): one trainer at a time, and no accidental
// restart over an existing run.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "models/config.h"

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

// True when DIR holds a run: a checkpoint (checkpoint/, checkpoint-step-N/, checkpoint-best/,
// or the pieces of an interrupted save) or a non-empty training log.
bool run_dir_has_run(const std::string& dir);

// Checkpoints of a run folder (docs/reliability.md):
//   DIR/checkpoint/             the latest (what --resume and `--ckpt DIR` read)
//   DIR/checkpoint-step-N/      --keep K: the last K saves, N = their step (hard links)
//   DIR/checkpoint-best/        --keep-best: the lowest validation loss logged so far
std::string step_checkpoint_dir(const std::string& dir, i64 step);
std::string best_checkpoint_dir(const std::string& dir);
// The checkpoint-step-N folders of DIR as (N, path), by increasing N.
std::vector<std::pair<i64, std::string>> step_checkpoints(const std::string& dir);
// Removes all but the `keep` newest checkpoint-step-N folders (each renamed to a .tmp- sibling
// first, so a kill never leaves a half-deleted checkpoint under a checkpoint's name).
void prune_step_checkpoints(const std::string& dir, i64 keep);
// Crash recovery of every checkpoint folder of DIR (clean_stale_checkpoint_siblings with the
// run folder's lock held).
void clean_run_dir(const std::string& dir);
// Removes every checkpoint folder of DIR (--overwrite).
void remove_run_checkpoints(const std::string& dir);

// The config a resumed run trains with: the run's own DIR/checkpoint/config.json (or, when
// `config_path` is given, that file, whose model keys the Trainer compares with the
// checkpoint's), then `sets`. Only keys marked on_resume in the key table (models/config.h) may
// be set to another value than the run's; others are refused naming them with both values.
Config resume_config(const std::string& dir, const std::string& config_path,
                     const std::vector<std::string>& sets);

}  // namespace dlcm
