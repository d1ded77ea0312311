// The supported C++ API of the dlcm library (docs/library.md): load a checkpoint (baseline or
// DLCM), tokenize, forward, concept boundaries, generate with a streaming callback, train with
// a log callback. Thin wrappers over the engine (src/tools/dlcm_api.cpp); the layers' own headers
// (include/dlcm/<layer>/...) are installed too but may change between versions. Errors are
// thrown as std::runtime_error with a message naming the file or argument at fault.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace dlcm::api {

// "0.1" (the project version) and the build's git commit, as `dlcm --version` prints them.
std::string version();

struct Boundaries {
  std::vector<float> p;    // router probability of a concept starting at each token
  std::vector<uint8_t> b;  // 1 where a concept starts (inference rule: p >= tau, forced at BOS)
};

struct GenerateConfig {
  int64_t max_new_tokens = 64;
  float temperature = 0;  // 0: greedy
  int64_t top_k = 0;      // 0: off
  float top_p = 1;
  uint64_t seed = 0;
  std::vector<std::string> stop;  // the completion ends right before the first of these
};

class Model {
 public:
  // A checkpoint folder (or a run folder: its latest checkpoint), as `dlcm generate --ckpt`.
  static Model load(const std::string& path);
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  ~Model();

  const std::string& arch() const;  // "baseline" or "dlcm"
  int64_t vocab_size() const;
  int64_t max_seq_len() const;
  int32_t bos_id() const;
  int32_t eos_id() const;

  std::vector<int32_t> tokenize(const std::string& text) const;  // no BOS added
  std::string detokenize(const std::vector<int32_t>& ids) const;
  // Logits [L, vocab_size] of one row of tokens (as `dlcm forward` computes them).
  std::vector<float> forward(const std::vector<int32_t>& ids);
  // DLCM only (a baseline throws): p and b for each token; tau < 0 uses the config's.
  Boundaries boundaries(const std::vector<int32_t>& ids, float tau = -1);
  // The completion of prompt (BOS is prepended); on_text, when set, gets each piece of text as
  // soon as it is safe to show (whole characters, never part of a stop string).
  std::string generate(const std::string& prompt, const GenerateConfig& cfg = {},
                       const std::function<void(const std::string& piece)>& on_text = {});

 private:
  struct Impl;
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct TrainConfig {
  std::string config;  // a model + train config JSON (docs/config.md), as `dlcm train --config`
  std::string data;    // a `dlcm prepare` folder
  std::string out;     // the run folder
  int64_t steps = -1;  // > 0: overrides train.steps
  int64_t threads = 0; // > 0: overrides train.threads
  bool overwrite = false;
  bool final_eval = true;
};

struct TrainResult {
  int64_t step = 0;
  std::string checkpoint;  // the last checkpoint's folder (load it with Model::load)
};

// Trains as `dlcm train --quiet` does; on_log, when set, gets each train_log.jsonl record.
TrainResult train(const TrainConfig& cfg,
                  const std::function<void(const std::string& json_line)>& on_log = {});

}  // namespace dlcm::api
