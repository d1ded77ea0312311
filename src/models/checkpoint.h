// Checkpoint directories (SPEC section 9):
//   config.json, model.safetensors, optimizer.safetensors (<name>.exp_avg, <name>.exp_avg_sq),
//   trainer_state.json, provenance.json (data/provenance.h), tokenizer files, train_log.jsonl.
// Written to DIR.tmp-XXXX and renamed into place, so a crash never leaves a half checkpoint;
// an existing DIR is replaced only after the new one is complete.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/params.h"
#include "models/config.h"

namespace dlcm {

struct CheckpointWrite {
  const Config* config = nullptr;
  const ParamStore* params = nullptr;
  const Buf* exp_avg = nullptr;     // same layout as ParamStore data (offsets), may be null
  const Buf* exp_avg_sq = nullptr;  // idem
  nlohmann::json trainer_state;     // step, tokens, RNG, data cursor, schedule position
  nlohmann::json provenance;        // written as provenance.json when not null (data/provenance.h)
  std::vector<std::string> extra_files;  // copied in by file name (tokenizer, log)
};

// Replaces dir wholesale, so files written into dir between saves (e.g. a live training log)
// are lost unless listed in extra_files; keep live files outside dir. An existing dir that is
// neither a checkpoint nor empty is never replaced (error). Calls
// clean_stale_checkpoint_siblings(dir) first.
void save_checkpoint(const std::string& dir, const CheckpointWrite& w);

// Makes DST a checkpoint with SRC's files, hard-linked (copied where links are refused), as
// atomically as save_checkpoint: built in DST.tmp-PID, then swapped in. A checkpoint's files are
// never rewritten in place (a save replaces the folder), so the links stay valid after SRC is
// replaced. An existing DST must be a checkpoint.
void copy_checkpoint(const std::string& src, const std::string& dst);

// Crash recovery for DIR: removes DIR.tmp-PID and DIR.old-PID siblings left by dead writers
// (a live process's ones are kept), and if DIR itself is missing but a DIR.old-PID exists
// (crash between the two renames) restores it as DIR. Returns how many were removed.
// `owned`: the caller holds the run folder's lock (RunDirLock), so no other writer exists and
// every sibling is stale whatever its pid (a dead writer's pid may have been reused).
int clean_stale_checkpoint_siblings(const std::string& dir, bool owned = false);

// Each reader names the checkpoint directory and file in its errors.
Config load_checkpoint_config(const std::string& dir);
void load_checkpoint_params(const std::string& dir, ParamStore& ps);
// Returns false when optimizer.safetensors is absent; throws when it is present but broken.
bool load_checkpoint_optimizer(const std::string& dir, const ParamStore& ps, Buf& exp_avg,
                               Buf& exp_avg_sq);
// trainer_state.json, checked by validate_trainer_state.
nlohmann::json load_trainer_state(const std::string& dir);
// The counters of a trainer state (step, tokens_seen, adam_t, world_size, non-finite skips),
// where present, are integers in their ranges (adam_t <= step, ...); Error naming `source` and
// the field otherwise.
void validate_trainer_state(const nlohmann::json& st, const std::string& source);
// True when dir looks like a checkpoint (has config.json and model.safetensors).
bool is_checkpoint(const std::string& dir);
// Resolves a user-given checkpoint path: DIR itself, or DIR/checkpoint for a run directory.
std::string resolve_checkpoint(const std::string& path);

class LanguageModel;
// A model with a checkpoint's weights (`path`: checkpoint or run folder); dir_out gets the
// checkpoint folder. Errors name the folder and file at fault.
std::unique_ptr<LanguageModel> load_model(const std::string& path, std::string* dir_out = nullptr);

}  // namespace dlcm
