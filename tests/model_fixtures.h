// Shared fixtures for whole-model tests: tiny configs, deterministic token rows, and a
// runner for the PyTorch reference (python/reference.py under /usr/bin/python3).
#pragma once
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/rng.h"
#include "data/tokenizer.h"
#include "models/config.h"
#include "models/model.h"
#include "models/checkpoint.h"
#include "train/trainer.h"

namespace dlcm::test {

inline Config tiny_baseline(bool qk_norm = true, i64 kv_heads = 1) {
  Config c;
  c.model.arch = "baseline";
  c.model.vocab_size = 23;
  c.model.d_token = 16;
  c.model.n_heads = 2;
  c.model.n_kv_heads = kv_heads;
  c.model.head_dim = 8;
  c.model.d_ff = 24;
  c.model.n_layers = 2;
  c.model.qk_norm = qk_norm;
  c.model.max_seq_len = 64;
  c.model.init_std = 0.3f;  // large enough that every path carries signal
  c.train.seq_len = 9;
  c.train.batch_size = 3;
  return c;
}

// A tiny DLCM with every part present: GQA everywhere, d_scan != d_token, a backbone wider
// than the token width, QK-norm.
inline Config tiny_dlcm(const std::string& router_kind = "projected",
                        const std::string& xattn = "compact", bool smooth_grad = false) {
  Config c;
  ModelConfig& m = c.model;
  m.arch = "dlcm";
  m.vocab_size = 23;
  m.d_token = 16;
  m.n_heads = 2;
  m.n_kv_heads = 1;
  m.head_dim = 8;
  m.d_ff = 24;
  m.enc_layers = 1;
  m.dec_layers = 1;
  m.d_concept = 24;
  m.bb_layers = 2;
  m.bb_heads = 3;
  m.bb_kv_heads = 1;
  m.bb_d_ff = 40;
  m.x_heads = 2;
  m.x_kv_heads = 1;
  m.x_d_ff = 20;
  m.d_scan = 12;
  m.router.kind = router_kind;
  m.router.smooth_grad = smooth_grad;
  m.xattn_impl = xattn;
  m.qk_norm = true;
  m.max_seq_len = 96;
  m.init_std = 0.3f;
  c.train.seq_len = 20;
  c.train.batch_size = 3;
  return c;
}

inline std::vector<i32> random_tokens(i64 n, i64 V, uint64_t seed, i32 bos = -1, double bos_rate = 0) {
  std::vector<i32> t(n);
  Rng r(seed);
  for (i64 i = 0; i < n; ++i) {
    t[i] = i32(r.next() % uint64_t(V));
    if (bos >= 0 && t[i] == bos) t[i] = (bos + 1) % V;  // BOS only where we put it
    if (bos >= 0 && r.uniform() < bos_rate) t[i] = bos;
  }
  return t;
}

template <typename T>
inline void write_rows(const std::string& path, const std::vector<T>& v, i64 B, i64 L) {
  std::ofstream f(path);
  for (i64 b = 0; b < B; ++b) {
    for (i64 t = 0; t < L; ++t) f << i64(v[b * L + t]) << (t + 1 < L ? " " : "\n");
  }
}

// A learnable synthetic stream: row b of micro-batch `micro` at step `step` counts up by 3 from
// a counter-hashed start (next = prev + 3 mod V); `val_batches` validation batches of the same
// pattern. With bos >= 0 every 17th position is BOS (packed documents: forced DLCM boundaries).
inline TrainData pattern_data(i64 V, uint64_t seed = 99, i64 val_batches = 2, i32 bos = -1) {
  TrainData d;
  d.train_batch = [V, seed, bos](i64 step, i64 micro, i64, i64 B, i64 L, i32* tok, i32* tgt) {
    for (i64 b = 0; b < B; ++b) {
      for (i64 t = 0; t <= L; ++t) {
        i32 v = i32((counter_hash(seed, step, micro, b) + t * 3) % uint64_t(V));
        if (bos >= 0 && t % 17 == 0) v = bos;
        if (t < L) tok[b * L + t] = v;
        if (t > 0) tgt[b * L + t - 1] = v;
      }
    }
  };
  d.val_count = [val_batches](i64, i64) { return val_batches; };
  d.val_batch = [V](i64 i, i64 B, i64 L, i32* tok, i32* tgt) {
    for (i64 n = 0; n < B * L; ++n) {
      tok[n] = i32((i * 7 + n * 3) % V);
      tgt[n] = i32((i * 7 + n * 3 + 3) % V);
    }
  };
  return d;
}

inline bool torch_available() {
  return std::filesystem::exists("/usr/bin/python3") &&
         std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") == 0;
}

// Runs python/reference.py with the given extra arguments; returns its exit status.
inline int run_reference(const std::string& args, std::string* log = nullptr) {
  std::string cmd = std::string("/usr/bin/python3 ") + DLCM_SOURCE_DIR + "/python/reference.py " +
                    args + " 2>&1";
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  int rc = pclose(p);
  if (log) *log = out;
  return rc;
}

inline void save_model_only(const std::string& dir, const Config& cfg, const ParamStore& ps) {
  CheckpointWrite w;
  w.config = &cfg;
  w.params = &ps;
  save_checkpoint(dir, w);
}

// A checkpoint in dir of c's model (context ctx, initialised with seed) with the byte tokenizer
// (vocab 260): for the tests that put text through the CLI or the public API.
inline std::string byte_checkpoint(const std::string& dir, Config c, i64 ctx = 64, uint64_t seed = 5) {
  c.model.vocab_size = 260;
  c.model.max_seq_len = ctx;
  auto m = make_initialised_model(c.model, seed);
  save_model_only(dir, c, m->params());
  make_byte_tokenizer()->save(dir);
  return dir;
}

// Token rows with next-token targets and given boundaries, for the DLCM model tests: the
// batch and step context the model's forward/backward take.
struct DlcmData {
  std::vector<i32> tok, tgt;
  std::vector<uint8_t> b;  // given boundaries (forced ones included; rule routers ignore them)
  i64 B, L;
};

inline Batch batch_of(const DlcmData& d) {
  return Batch{d.tok.data(), d.tgt.data(), d.B, d.L, 0, d.b.data()};
}

// A fixed step (seed 5, step 3) whose totals are this batch's alone.
inline StepContext context_for(const DlcmData& d) {
  StepContext ctx;
  ctx.seed = 5;
  ctx.step = 3;
  for (i32 t : d.tgt) ctx.total_targets += t >= 0;
  ctx.total_positions = d.B * d.L;
  return ctx;
}

}  // namespace dlcm::test
