// Reliability guarantees of training (docs/reliability.md):
//  - a non-finite loss or gradient never reaches the weights (train.on_nonfinite = stop|skip),
//    a checkpoint is never written with non-finite values and loading one refuses;
//  - a run folder has one owner (lock), is not restarted by accident, resumes by itself from a
//    crash at any point of a save, and refuses changed model keys or a corrupt trainer state;
//  - kill -9 at random moments, then --resume, reproduces the uninterrupted run bit for bit.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <chrono>
#include <random>
#include <thread>

#include "core/safetensors.h"
#include "core/build_info.h"
#include "data/prepare.h"
#include "data/provenance.h"
#include "data/tokenizer.h"
#include "data/train_data.h"
#include "eval/tasks.h"
#include "infer/sampler.h"
#include "model_fixtures.h"
#include "testing.h"
#include "train/run_dir.h"

using namespace dlcm;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::vector<json> read_log(const std::string& run) {
  std::vector<json> lines;
  std::ifstream f(run + "/train_log.jsonl");
  for (std::string l; std::getline(f, l);)
    if (!l.empty()) lines.push_back(json::parse(l));
  return lines;
}

Config small_run(i64 steps) {
  Config c = test::tiny_baseline();
  c.train.steps = steps;
  c.train.warmup_steps = 1;
  c.train.eval_every = 0;
  c.train.ckpt_every = 2;
  c.train.log_every = 1;
  return c;
}

TrainOptions opts(const std::string& out) {
  TrainOptions o;
  o.quiet = true;
  o.peak_gflops = 100;
  o.out_dir = out;
  return o;
}

// Pattern data that poisons one weight with NaN while loading the batches of the steps in
// [from, to) (0-based), and puts the weight back at the next step: the forward pass of those
// steps gives a NaN loss, as a diverging run would, without the test touching the trainer.
struct Poison {
  Trainer* tr = nullptr;
  i64 from = 0, to = 0;
  float saved = 0;
  bool on = false;
  std::vector<float> before;  // all weights when the first poisoned step began
};

TrainData poisoned(const Config& c, std::shared_ptr<Poison> ps) {
  TrainData d = test::pattern_data(c.model.vocab_size);
  auto inner = d.train_batch;
  d.train_batch = [inner, ps](i64 step, i64 micro, i64 rank, i64 B, i64 L, i32* tok, i32* tgt) {
    inner(step, micro, rank, B, L, tok, tgt);
    if (micro != 0 || !ps->tr) return;
    float* w = ps->tr->model().params().find("norm.weight")->w;
    if (step >= ps->from && step < ps->to && !ps->on) {
      auto& p = ps->tr->model().params();
      ps->before.assign(p.data(), p.data() + p.total());
      ps->saved = w[0];
      w[0] = std::numeric_limits<float>::quiet_NaN();
      ps->on = true;
    } else if ((step < ps->from || step >= ps->to) && ps->on) {
      w[0] = ps->saved;
      ps->on = false;
    }
  };
  return d;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(NonFinite, StopEndsTheRunAndKeepsTheLastCheckpoint) {
  test::TempDir tmp;
  Config c = small_run(8);
  auto ps = std::make_shared<Poison>();
  ps->from = 2;  // the third step
  ps->to = 1000;
  const std::string out = tmp.path + "/run";
  Trainer tr(c, poisoned(c, ps), opts(out));
  ps->tr = &tr;
  std::string err = error_of([&] { tr.run(); });
  EXPECT_NE(err.find("step 3: loss (CE = nan) went non-finite"), std::string::npos) << err;
  EXPECT_NE(err.find("train.on_nonfinite=skip"), std::string::npos) << err;
  EXPECT_EQ(tr.step(), 2);
  // The checkpoint of step 2 is the last one and holds finite values only (it loads).
  EXPECT_EQ(load_trainer_state(out + "/checkpoint").at("step").get<i64>(), 2);
  ParamStore& p = tr.model().params();
  EXPECT_NO_THROW(load_checkpoint_params(out + "/checkpoint", p));
  auto log = read_log(out);
  ASSERT_FALSE(log.empty());
  EXPECT_EQ(log.back().value("event", ""), "nonfinite");
  EXPECT_EQ(log.back().value("action", ""), "stop");
  EXPECT_EQ(log.back().value("step", i64(0)), 3);
}

// Finite loss and gradients whose AdamW update still goes non-finite (the update reports it
// from the pass that writes w and v): the run stops naming the parameter.
TEST(NonFinite, AnUpdateThatGoesNonFiniteStopsNamingTheParameter) {
  // kinds 0, 1: element 1 of the tensor; 2, 3: its element 0 (the search for the bad tensor
  // must take index 0 as found)
  for (int kind = 0; kind < 4; ++kind) {
    test::TempDir tmp;
    const i64 at = kind < 2 ? 1 : 0;
    Config c = small_run(4);
    auto ps = std::make_shared<Poison>();  // from = to = 0: never poisons
    Trainer tr(c, poisoned(c, ps), opts(tmp.path + "/run"));
    ps->tr = &tr;
    tr.train_step();
    const Param* fn = tr.model().params().find("norm.weight");
    ASSERT_NE(fn, nullptr);
    // a NaN first moment carries into the weight; an infinite second moment stays infinite
    if (kind % 2 == 0) tr.optimizer().m[fn->offset + at] = std::numeric_limits<float>::quiet_NaN();
    else tr.optimizer().v[fn->offset + at] = std::numeric_limits<float>::infinity();
    const std::string err = error_of([&] { tr.train_step(); });
    const std::string what = kind % 2 == 0 ? "the weight 'norm.weight'"
                                           : "the AdamW second moment of 'norm.weight'";
    EXPECT_NE(err.find("step 2: the AdamW update made " + what + " non-finite"),
              std::string::npos) << err;
  }
}

TEST(NonFinite, SkipLeavesTheWeightsUntouchedAndCountsTheStep) {
  test::TempDir tmp;
  Config c = small_run(6);
  c.train.on_nonfinite = "skip";
  auto ps = std::make_shared<Poison>();
  ps->from = 2;
  ps->to = 4;  // steps 3 and 4 (1-based) go non-finite
  const std::string out = tmp.path + "/run";
  Trainer tr(c, poisoned(c, ps), opts(out));
  ps->tr = &tr;
  std::vector<float> after_skips;
  // Run step by step to see the weights right after the skipped steps.
  for (int s = 0; s < 4; ++s) {
    StepResult r = tr.train_step();
    EXPECT_EQ(r.skipped, s == 2 || s == 3) << "step " << s + 1;
    if (r.skipped) {
      EXPECT_EQ(r.nonfinite, "loss (CE = nan)");
    }
  }
  ParamStore& p = tr.model().params();
  ASSERT_EQ(i64(ps->before.size()), p.total());
  // Only the poisoned element differs from the weights before step 3: the two skipped steps
  // changed nothing.
  const Param* fn = p.find("norm.weight");
  i64 diff = 0;
  for (i64 i = 0; i < p.total(); ++i)
    if (std::memcmp(&ps->before[i], p.data() + i, 4) != 0) {
      ++diff;
      EXPECT_EQ(i, fn->offset) << "weight " << i << " changed during a skipped step";
    }
  EXPECT_EQ(diff, 1);
  EXPECT_EQ(tr.nonfinite_skips(), 2);
  EXPECT_EQ(tr.optimizer().t, 2);  // AdamW counts updates only
  tr.run();                        // steps 5, 6 are finite again (the weight is restored)
  EXPECT_EQ(tr.step(), 6);
  EXPECT_EQ(tr.optimizer().t, 4);
  json st = load_trainer_state(out + "/checkpoint");
  EXPECT_EQ(st.at("nonfinite_skips").get<i64>(), 2);
  EXPECT_NO_THROW(load_checkpoint_params(out + "/checkpoint", p));
  int events = 0;
  for (auto& j : read_log(out)) events += j.value("event", "") == "nonfinite";
  EXPECT_EQ(events, 2);
}

TEST(NonFinite, SkipStopsAfterTooManyInARow) {
  test::TempDir tmp;
  Config c = small_run(20);
  c.train.on_nonfinite = "skip";
  c.train.max_nonfinite_skips = 3;
  c.train.ckpt_every = 4;
  auto ps = std::make_shared<Poison>();
  ps->from = 4;  // steps 5, 6, 7 are skipped, step 8 stops
  ps->to = 1000;
  const std::string out = tmp.path + "/run";
  Trainer tr(c, poisoned(c, ps), opts(out));
  ps->tr = &tr;
  std::string err = error_of([&] { tr.run(); });
  EXPECT_NE(err.find("step 8: loss (CE = nan) went non-finite; 3 steps in a row were already "
                     "skipped (train.max_nonfinite_skips = 3)"),
            std::string::npos)
      << err;
  EXPECT_EQ(tr.nonfinite_skips(), 3);
  EXPECT_EQ(tr.step(), 7);
  EXPECT_EQ(tr.optimizer().t, 4);
  // The last checkpoint (step 4) is left as it was.
  EXPECT_EQ(load_trainer_state(out + "/checkpoint").at("step").get<i64>(), 4);
}

// An update that overflows (learning rate inf) is caught after the step: the run stops and the
// checkpoint is not replaced.
TEST(NonFinite, NonFiniteUpdateStopsBeforeAnyCheckpoint) {
  test::TempDir tmp;
  Config c = small_run(4);
  const std::string out = tmp.path + "/run";
  {
    Trainer tr(c, test::pattern_data(c.model.vocab_size), opts(out));
    tr.run();
  }
  const std::string good = test::read_text(out + "/checkpoint/model.safetensors");
  c.train.steps = 8;
  c.train.lr = std::numeric_limits<float>::infinity();
  TrainOptions o = opts(out);
  o.resume = true;
  Trainer tr(c, test::pattern_data(c.model.vocab_size), o);
  std::string err = error_of([&] { tr.run(); });
  EXPECT_NE(err.find("step 5: "), std::string::npos) << err;
  EXPECT_NE(err.find("non-finite"), std::string::npos) << err;
  EXPECT_TRUE(test::read_text(out + "/checkpoint/model.safetensors") == good) << "checkpoint changed";
}

TEST(NonFinite, CheckpointsWithNonFiniteValuesAreNeitherWrittenNorLoaded) {
  test::TempDir tmp;
  Config c = small_run(2);
  const std::string out = tmp.path + "/run", ck = out + "/checkpoint";
  Trainer tr(c, test::pattern_data(c.model.vocab_size), opts(out));
  tr.run();
  const std::string good = test::read_text(ck + "/model.safetensors");
  ParamStore& p = tr.model().params();
  Param* q = p.find("layers.1.ffn.w2.weight");
  ASSERT_NE(q, nullptr);
  // Writing: weights and each optimizer moment are checked.
  q->w[5] = INFINITY;
  std::string err = error_of([&] { tr.save_checkpoint_now(); });
  EXPECT_NE(err.find("tensor 'layers.1.ffn.w2.weight' holds a non-finite value (inf at "
                     "element 5); the previous checkpoint is kept"),
            std::string::npos)
      << err;
  q->w[5] = 0;
  tr.optimizer().v[q->offset + 1] = NAN;
  err = error_of([&] { tr.save_checkpoint_now(); });
  EXPECT_NE(err.find("'layers.1.ffn.w2.weight.exp_avg_sq' holds a non-finite"),
            std::string::npos)
      << err;
  tr.optimizer().v[q->offset + 1] = 0;
  EXPECT_TRUE(test::read_text(ck + "/model.safetensors") == good) << "checkpoint changed";
  // Loading: a hand-made file with a NaN is refused, naming the tensor.
  std::vector<TensorToWrite> ts;
  std::vector<float> bad(q->numel, 0.f);
  bad[3] = NAN;
  for (const Param& x : p.params())
    ts.push_back({x.name, x.shape, &x == q ? bad.data() : x.w, nullptr});
  write_safetensors(ck + "/model.safetensors", ts);
  err = error_of([&] { load_checkpoint_params(ck, p); });
  EXPECT_NE(err.find("tensor 'layers.1.ffn.w2.weight' holds a non-finite value (nan at "
                     "element 3)"),
            std::string::npos)
      << err;
  ts.clear();
  for (const Param& x : p.params()) {
    ts.push_back({x.name + ".exp_avg", x.shape, &x == q ? bad.data() : x.w, nullptr});
    ts.push_back({x.name + ".exp_avg_sq", x.shape, x.w, nullptr});
  }
  write_safetensors(ck + "/optimizer.safetensors", ts);
  err = error_of([&] { load_checkpoint_optimizer(ck, p, tr.optimizer().m, tr.optimizer().v); });
  EXPECT_NE(err.find("tensor 'layers.1.ffn.w2.weight.exp_avg' holds a non-finite value"),
            std::string::npos)
      << err;
}

TEST(RunFolder, OneTrainerAtATime) {
  test::TempDir tmp;
  Config c = small_run(2);
  const std::string out = tmp.path + "/run";
  {
    Trainer a(c, test::pattern_data(c.model.vocab_size), opts(out));
    std::string err =
        error_of([&] { Trainer b(c, test::pattern_data(c.model.vocab_size), opts(out)); });
    EXPECT_NE(err.find("in use by another trainer (pid " + std::to_string(getpid()) + ")"),
              std::string::npos)
        << err;
  }
  test::CommandResult r = test::run_command("flock -n " + out + "/train.lock true");
  EXPECT_EQ(r.rc, 0) << "the lock outlived its trainer";
  // A lock held by another process (flock(1) for 3 s): refused while it lives. flock(1) writes
  // no pid, and what the file holds is not one: the message says so rather than print it.
  { std::ofstream(out + "/train.lock") << "x1\n"; }
  test::CommandResult held = test::run_command(
      "(flock " + out + "/train.lock sleep 3 >/dev/null 2>&1 &) ; sleep 0.5");
  ASSERT_EQ(held.rc, 0);
  std::string err = error_of([&] {
    TrainOptions o = opts(out);
    o.overwrite = true;
    Trainer b(c, test::pattern_data(c.model.vocab_size), o);
  });
  EXPECT_NE(err.find("in use by another trainer (pid unknown)"), std::string::npos) << err;
}

TEST(RunFolder, ExistingRunIsNotRestartedByAccident) {
  test::TempDir tmp;
  Config c = small_run(2);
  const std::string out = tmp.path + "/run";
  Trainer(c, test::pattern_data(c.model.vocab_size), opts(out)).run();
  const std::string log = test::read_text(out + "/train_log.jsonl");
  std::string err =
      error_of([&] { Trainer(c, test::pattern_data(c.model.vocab_size), opts(out)); });
  EXPECT_NE(err.find("already holds a run"), std::string::npos) << err;
  EXPECT_NE(err.find("--overwrite"), std::string::npos) << err;
  EXPECT_EQ(test::read_text(out + "/train_log.jsonl"), log);  // refused before touching anything
  EXPECT_TRUE(is_checkpoint(out + "/checkpoint"));
  // --overwrite starts over: the old checkpoint goes at once, the log restarts.
  TrainOptions o = opts(out);
  o.overwrite = true;
  c.train.steps = 1;
  Trainer tr(c, test::pattern_data(c.model.vocab_size), o);
  EXPECT_FALSE(fs::exists(out + "/checkpoint"));
  tr.run();
  EXPECT_EQ(load_trainer_state(out + "/checkpoint").at("step").get<i64>(), 1);
  // A run that died before its first checkpoint left only its log: still a run. An empty log
  // alone is not one, nor a folder of another name.
  const std::string early = tmp.path + "/early";
  fs::create_directories(early);
  { std::ofstream(early + "/train_log.jsonl") << "{\"step\": 1}\n"; }
  err = error_of([&] { Trainer(c, test::pattern_data(c.model.vocab_size), opts(early)); });
  EXPECT_NE(err.find("already holds a run"), std::string::npos) << err;
  { std::ofstream(early + "/train_log.jsonl", std::ios::trunc); }
  fs::create_directories(early + "/notes");
  EXPECT_EQ(error_of([&] { Trainer(c, test::pattern_data(c.model.vocab_size), opts(early)); }), "");
}

TEST(RunFolder, ReadOnlyFolderIsACleanError) {
  test::TempDir tmp;
  Config c = small_run(2);
  // Root ignores permission bits; /proc/self is a folder where nobody can create files.
  const std::string out = geteuid() == 0 ? "/proc/self" : tmp.path + "/ro";
  fs::create_directories(out);
  if (geteuid() != 0) ::chmod(out.c_str(), 0555);
  std::string err =
      error_of([&] { Trainer(c, test::pattern_data(c.model.vocab_size), opts(out)); });
  if (geteuid() != 0) ::chmod(out.c_str(), 0755);
  EXPECT_NE(err.find("cannot create the run folder's lock file"), std::string::npos) << err;
}

// A kill between the save's two renames leaves only checkpoint.old-PID (and the complete new
// checkpoint.tmp-PID); a kill while writing leaves a partial checkpoint.tmp-PID. --resume puts
// the previous checkpoint back by itself, even when the dead writer's pid has been reused by a
// live process.
TEST(RunFolder, ResumeRecoversFromACrashAtAnyPointOfTheSave) {
  Config c = small_run(4);
  for (int window = 0; window < 2; ++window) {
    SCOPED_TRACE(window ? "between the renames" : "while writing");
    test::TempDir tmp;
    const std::string out = tmp.path + "/run", ck = out + "/checkpoint";
    {
      TrainOptions o = opts(out);
      o.stop_after = 2;
      Trainer(c, test::pattern_data(c.model.vocab_size), o).run();
    }
    const std::string pid = std::to_string(getppid());  // alive: a reused pid
    const std::string model = test::read_text(ck + "/model.safetensors");
    if (window == 1) fs::rename(ck, ck + ".old-" + pid);
    fs::create_directories(ck + ".tmp-" + pid);
    std::ofstream(ck + ".tmp-" + pid + "/model.safetensors") << "partial";
    TrainOptions o = opts(out);
    o.resume = true;
    Trainer tr(c, test::pattern_data(c.model.vocab_size), o);
    EXPECT_EQ(tr.step(), 2);
    EXPECT_TRUE(test::read_text(ck + "/model.safetensors") == model) << "checkpoint changed";
    EXPECT_FALSE(fs::exists(ck + ".old-" + pid));
    EXPECT_FALSE(fs::exists(ck + ".tmp-" + pid));
    tr.run();
    EXPECT_EQ(tr.step(), 4);
  }
}

TEST(RunFolder, ResumeRefusesChangedModelKeysAndCorruptState) {
  test::TempDir tmp;
  Config c = small_run(2);
  const std::string out = tmp.path + "/run", ck = out + "/checkpoint";
  Trainer(c, test::pattern_data(c.model.vocab_size), opts(out)).run();
  TrainOptions o = opts(out);
  o.resume = true;
  Config changed = c;
  changed.model.d_ff = 32;
  changed.model.qk_norm = false;
  changed.train.steps = 4;  // training keys may change
  std::string err =
      error_of([&] { Trainer(changed, test::pattern_data(c.model.vocab_size), o); });
  EXPECT_NE(err.find("changes model key(s) d_ff (checkpoint 24, given 32), qk_norm (checkpoint "
                     "true, given false)"),
            std::string::npos)
      << err;
  changed.model = c.model;
  EXPECT_NO_THROW(Trainer(changed, test::pattern_data(c.model.vocab_size), o));
  const json good = load_trainer_state(ck);
  for (auto [key, value, expect] :
       {std::tuple{"step", json(-5), "'step' = -5 is out of range"},
        {"step", json(uint64_t(1) << 63), "is out of range [0, 1099511627776]"},
        {"adam_t", json(3), "'adam_t' = 3 is out of range [0, 2]"},
        {"tokens_seen", json("many"), "'tokens_seen' must be an integer"},
        {"world_size", json(0), "'world_size' must be in [1, 2^20]"}}) {
    json st = good;
    st[key] = value;
    std::ofstream(ck + "/trainer_state.json") << st.dump();
    err = error_of([&] { Trainer(c, test::pattern_data(c.model.vocab_size), o); });
    EXPECT_NE(err.find(expect), std::string::npos) << key << ": " << err;
  }
}

// --resume continues with the run's own config: only resumable keys may be --set.
TEST(RunFolder, ResumeUsesTheRunsConfigAndRefusesOtherKeys) {
  test::TempDir tmp;
  Config c = small_run(2);
  c.model.d_ff = 40;
  const std::string out = tmp.path + "/run", ck = out + "/checkpoint";
  Trainer(c, test::pattern_data(c.model.vocab_size), opts(out)).run();
  Config r = resume_config(out, "", {"train.steps=4", "lr=1e-3", "train.eval_every=1"});
  EXPECT_EQ(config_to_json(Config{r.model, {}}), config_to_json(Config{c.model, {}}));
  EXPECT_EQ(r.train.steps, 4);
  EXPECT_FLOAT_EQ(r.train.lr, 1e-3f);
  EXPECT_EQ(r.train.eval_every, 1);
  EXPECT_EQ(r.train.seq_len, c.train.seq_len);
  std::string err = error_of([&] {
    resume_config(out, "", {"d_ff=48", "train.steps=5", "train.batch_size=4", "router.alpha=0.5"});
  });
  EXPECT_NE(err.find("--set would change d_ff (run 40, given 48), train.batch_size (run 3, given "
                     "4), router.alpha (run 0.1, given 0.5), which may not change when a run is "
                     "resumed"), std::string::npos) << err;
  EXPECT_NE(err.find("keys that may change: train.grad_accum, train.steps,"), std::string::npos) << err;
  // The run's own value is no change (scripts repeat the first start's flags on resume).
  EXPECT_EQ(resume_config(out, "", {"d_ff=40", "train.batch_size=3", "steps=3"}).train.steps, 3);
  // An interrupted save between its renames: the config is read from checkpoint.old-PID.
  fs::rename(ck, ck + ".old-123456");
  EXPECT_EQ(resume_config(out, "", {}).model.d_ff, 40);
  err = error_of([&] { resume_config(tmp.path + "/none", "", {}); });
  EXPECT_NE(err.find("--resume given but there is no checkpoint"), std::string::npos) << err;
}

// --keep N keeps the last N saves as checkpoint-step-N/, --keep-best the lowest logged
// validation loss as checkpoint-best/; a resume keeps both settings; --overwrite drops them.
TEST(RunFolder, KeepsTheLastCheckpointsAndTheBest) {
  test::TempDir tmp;
  Config c = small_run(6);
  c.train.ckpt_every = 1;
  c.train.eval_every = 1;
  c.train.lr = 0.05f;  // a loss that moves, so the best is not simply the last step
  const std::string out = tmp.path + "/run";
  TrainOptions o = opts(out);
  o.keep = 2;
  o.keep_best = 1;
  Trainer(c, test::pattern_data(c.model.vocab_size), o).run();
  auto steps = step_checkpoints(out);
  ASSERT_EQ(steps.size(), 2u);
  EXPECT_EQ(steps[0].first, 5);
  EXPECT_EQ(steps[1].first, 6);
  EXPECT_EQ(steps[1].second, step_checkpoint_dir(out, 6));
  EXPECT_EQ(load_trainer_state(steps[0].second).at("step").get<i64>(), 5);
  EXPECT_EQ(test::read_text(steps[1].second + "/model.safetensors"), test::read_text(out + "/checkpoint/model.safetensors"));
  double best = 1e300;
  i64 best_step = -1;
  for (const json& l : read_log(out))
    if (l.contains("val_loss") && l["val_loss"].get<double>() < best) {
      best = l["val_loss"].get<double>();
      best_step = l["step"].get<i64>();
    }
  const json bs = load_trainer_state(best_checkpoint_dir(out));
  EXPECT_EQ(bs.at("step").get<i64>(), best_step);
  EXPECT_EQ(bs.at("best_step").get<i64>(), best_step);
  EXPECT_DOUBLE_EQ(bs.at("best_val_loss").get<double>(), best);
  EXPECT_EQ(load_trainer_state(out + "/checkpoint").at("best_step").get<i64>(), best_step);
  // The best checkpoint loads like any other (--ckpt RUN/checkpoint-best).
  EXPECT_EQ(resolve_checkpoint(best_checkpoint_dir(out)), best_checkpoint_dir(out));
  // Resumed without the options: the run's own (keep 2, keep best) continue.
  c.train.steps = 8;
  TrainOptions r = opts(out);
  r.resume = true;
  {
    Trainer tr(c, test::pattern_data(c.model.vocab_size), r);
    tr.run();
    steps = step_checkpoints(out);
    ASSERT_EQ(steps.size(), 2u);
    EXPECT_EQ(steps[0].first, 7);
    EXPECT_EQ(steps[1].first, 8);
    EXPECT_LE(tr.best_val_loss(), best);
    EXPECT_EQ(load_trainer_state(best_checkpoint_dir(out)).at("step").get<i64>(), tr.best_step());
  }
  // --overwrite starts over without the old run's checkpoints.
  TrainOptions w = opts(out);
  w.overwrite = true;
  c.train.steps = 1;
  Trainer fresh(c, test::pattern_data(c.model.vocab_size), w);
  EXPECT_TRUE(step_checkpoints(out).empty());
  EXPECT_FALSE(fs::exists(best_checkpoint_dir(out)));
}

// ---------------------------------------------------------------------------------------------
// Bounded parsing of external files (regressions of issue 15's crashes and accepted nonsense).

namespace {

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

// A safetensors file from a header text and a data section.
std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = char(uint64_t(header.size()) >> (8 * i));
  return out + header + data;
}

}  // namespace

TEST(Parsing, SafetensorsHeaderBounds) {
  test::TempDir tmp;
  const std::string p = tmp.path + "/t.safetensors";
  const std::string data(16, '\0');
  auto err = [&](const std::string& header) {
    write_file(p, safetensors_bytes(header, data));
    return error_of([&] { SafeTensorsFile f(p); });
  };
  // Deeply nested metadata used to overflow the stack while the message was built.
  std::string deep = R"({"__metadata__": {"k": )" + std::string(100000, '[') +
                     std::string(100000, ']') + "}}";
  EXPECT_NE(err(deep).find("nested deeper than 3 levels"), std::string::npos) << err(deep);
  // Duplicate tensor names are refused (JSON parsers keep the last one silently).
  const std::string a = R"("a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";
  const std::string a2 = R"("a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]})";
  EXPECT_NE(err("{" + a + ", " + a2 + "}").find("names tensor 'a' twice"), std::string::npos);
  EXPECT_EQ(err("{" + a + "}"), "");
  // Element counts that overflow i64 even with a zero dimension.
  EXPECT_NE(err(R"({"z": {"dtype": "F32", "shape": [4611686018427387904, 4, 0], "data_offsets": [0, 0]}})")
                .find("too many elements"),
            std::string::npos);
  EXPECT_NE(err(R"({"z": {"dtype": "F32", "shape": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1], "data_offsets": [0, 4]}})")
                .find("at most 16"),
            std::string::npos);
  // A huge tensor name is cut in messages.
  const std::string name(100000, 'n');
  std::string e = err(R"({")" + name + R"(": {"dtype": "X9", "shape": [], "data_offsets": [0, 0]}})");
  EXPECT_NE(e.find("unknown dtype"), std::string::npos) << e.substr(0, 300);
  EXPECT_LT(e.size(), 1000u);
}

// Found by fuzz_trainer_state: a number beyond double's range escaped as nlohmann's
// out_of_range instead of an Error naming the file.
TEST(Parsing, NumberOverflowInJsonIsAnError) {
  test::TempDir tmp;
  const std::string ck = tmp.path + "/ckpt";
  fs::create_directories(ck);
  write_file(ck + "/config.json", config_to_json(Config{}).dump());
  write_file(ck + "/model.safetensors", "");
  write_file(ck + "/trainer_state.json", "4444444444844444444444E444444444411");
  std::string e = error_of([&] { load_trainer_state(ck); });
  EXPECT_NE(e.find("trainer_state.json: invalid JSON"), std::string::npos) << e;
  write_file(ck + "/trainer_state.json", R"({"step": 1e999})");
  e = error_of([&] { load_trainer_state(ck); });
  EXPECT_NE(e.find("number overflow"), std::string::npos) << e;
}

TEST(Parsing, TokenizerModelFileStaysInItsFolder) {
  test::TempDir tmp;
  const std::string dir = tmp.path + "/tok";
  fs::create_directories(dir);
  write_file(tmp.path + "/secret.model", "outside");
  auto err = [&](const std::string& model_file) {
    write_file(dir + "/tokenizer.json", R"({"kind": "bpe", "model_file": )" + model_file + "}");
    return error_of([&] { load_tokenizer(dir); });
  };
  for (const char* bad : {R"("../secret.model")", R"("/etc/passwd")", R"("..")", R"("")"})
    EXPECT_NE(err(bad).find("must name a file in"), std::string::npos) << bad << ": " << err(bad);
  EXPECT_NE(err("42").find("must be a string"), std::string::npos);
  fs::create_symlink(tmp.path + "/secret.model", dir + "/link.model");
  EXPECT_NE(err(R"("link.model")").find("leads outside"), std::string::npos) << err(R"("link.model")");
  // Bounded: a tokenizer.json of 2 MiB is refused before parsing.
  write_file(dir + "/tokenizer.json", R"({"kind": "bytes", "pad": ")" + std::string(2 << 20, 'x') + "\"}");
  EXPECT_NE(error_of([&] { load_tokenizer(dir); }).find("exceeds the limit"), std::string::npos);
}

TEST(Parsing, ValidationSplitOfUnderTwoTokensIsAnError) {
  test::TempDir tmp;
  const std::string d = tmp.path + "/data";
  fs::create_directories(d);
  auto tok = make_byte_tokenizer();
  tok->save(d);
  std::vector<int32_t> doc(40, 72);
  for (auto [name, n] : {std::pair{"train.bin", 40}, {"val.bin", 1}}) {
    ShardWriter w(d + "/" + name, tok->vocab_size());
    w.add_document(doc.data(), n);
    w.finish();
  }
  write_file(d + "/meta.json", R"({"val": {"bytes": 0}})");
  Config c = test::tiny_baseline();
  c.model.vocab_size = tok->vocab_size();
  c.model.bos_id = tok->bos_id();
  c.model.eos_id = tok->eos_id();
  c.model.pad_id = tok->pad_id();
  TrainData t = open_train_data(d, c);
  std::string e = error_of([&] { t.val_count(2, 8); });
  EXPECT_NE(e.find("the validation split holds 1 token(s)"), std::string::npos) << e;
  write_file(d + "/meta.json", R"({"val": {"bytes": -3}})");
  e = error_of([&] { open_data_dir(d); });
  EXPECT_NE(e.find("val.bytes missing or not an integer in [0, 2^50]"), std::string::npos) << e;
}

TEST(Parsing, BenchmarkFileLinesAreBounded) {
  test::TempDir tmp;
  TaskSpec s;
  s.name = "t";
  s.layout = "context_continuation";
  s.path = tmp.path + "/t.jsonl";
  write_file(s.path, R"({"context": "a", "continuation": "b"})" "\n" + std::string(2 << 20, ' ') + "\n");
  std::string e = error_of([&] { read_task(s, ""); });
  EXPECT_NE(e.find("t.jsonl:2: line of 2097152 bytes, over the limit"), std::string::npos) << e;
  s.layout = "query_choices_gold";
  write_file(s.path, R"({"query": "q", "choices": ["a", "b"], "gold": 4294967296})" "\n");
  e = error_of([&] { read_task(s, ""); });
  EXPECT_NE(e.find("field \"gold\" is out of range"), std::string::npos) << e;
}

TEST(Parsing, SamplerRefusesNonFiniteAndDenormalTemperatures) {
  for (float t : {NAN, INFINITY, -1.0f, 1e-40f, 1e-7f, 101.0f})
    EXPECT_NE(error_of([&] { validate_sampler({t, 0, 1.0f}); }).find("--temperature"),
              std::string::npos)
        << t;
  for (float t : {0.0f, 1e-6f, 0.7f, 100.0f}) EXPECT_NO_THROW(validate_sampler({t, 0, 1.0f})) << t;
  EXPECT_NE(error_of([&] { validate_sampler({0.7f, 0, NAN}); }).find("--top-p"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Through the dlcm binary: exit codes, messages, and kill -9 at random moments.

namespace {

const std::string kDlcm = DLCM_BINARY;

test::CommandResult sh(const std::string& cmd) { return test::run_command(cmd + " 2>&1"); }

// A byte-tokenized corpus and a tiny baseline config for it.
struct CliRun {
  test::TempDir dir;
  std::string data, cfg;
  CliRun() {
    {
      std::ofstream f(dir.path + "/corpus.txt");
      std::mt19937 r(5);
      const char* words[] = {"a", "run", "folder", "has", "one", "owner", "and", "resumes",
                             "exactly", "after", "a", "crash"};
      for (int d = 0; d < 200; ++d) {
        for (int w = 0; w < 12; ++w) f << words[r() % 12] << (w < 11 ? " " : ".\n");
        f << "\f";
      }
    }
    data = dir.path + "/data";
    test::CommandResult p = sh(kDlcm + " prepare --input " + dir.path + "/corpus.txt --out " +
                               data + " --tokenizer bytes");
    if (p.rc != 0) throw Error("prepare failed: " + p.out);
    Config c = test::tiny_baseline();
    c.model.vocab_size = 260;
    c.model.bos_id = 1;
    c.model.eos_id = 2;
    c.model.pad_id = 0;
    c.train.seq_len = 16;
    c.train.batch_size = 2;
    c.train.steps = 30;
    c.train.warmup_steps = 2;
    c.train.eval_every = 0;
    c.train.ckpt_every = 1;  // a save after every step: kills land inside saves
    c.train.log_every = 1;
    cfg = dir.path + "/config.json";
    std::ofstream(cfg) << config_to_json(c).dump(2);
  }
  std::string train(const std::string& out, const std::string& extra = "") const {
    return kDlcm + " train --quiet --no-final-eval --config " + cfg + " --data " + data +
           " --out " + out + " " + extra;
  }
};

CliRun& cli() {
  static CliRun r;
  return r;
}

bool has_old_sibling(const std::string& out) {
  for (const auto& e : fs::directory_iterator(out))
    if (e.path().filename().string().rfind("checkpoint.old-", 0) == 0) return true;
  return false;
}

}  // namespace

// kill -9 at random moments of a run started with `extra` flags, --resume until it finishes:
// the latest checkpoint (and any kept ones) equal those of an uninterrupted run.
void kill_and_resume(const std::string& extra) {
  test::TempDir tmp;
  const std::string ref = tmp.path + "/ref", run = tmp.path + "/run";
  cli();  // the shared corpus is prepared before the reference run is timed
  const auto t0 = std::chrono::steady_clock::now();
  test::CommandResult r = sh(cli().train(ref, extra));
  ASSERT_EQ(r.rc, 0) << r.out;
  // Kill moments spread over the reference run's duration (start-up, steps and saves).
  const double whole = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::mt19937 rng(std::random_device{}());
  int kills = 0;
  double scale = 1.0;  // shrinks when a run outpaces the timed reference before any kill
  for (int attempt = 0; attempt < 12; ++attempt) {
    const bool resume = fs::exists(run) && (fs::exists(run + "/checkpoint") || has_old_sibling(run));
    const std::string flag = resume ? "--resume" : fs::exists(run) ? "--overwrite" : "";
    const double t = scale * whole * std::uniform_real_distribution<double>(0.2, 0.9)(rng);
    r = sh("timeout -s KILL " + std::to_string(t) + " " + cli().train(run, flag + " " + extra));
    if (r.rc == 0 && kills == 0) {  // finished before the kill: start again, killing sooner
      fs::remove_all(run);
      scale *= 0.5;
      continue;
    }
    if (r.rc == 0) break;
    ASSERT_EQ(r.rc, 128 + SIGKILL) << r.out;
    ++kills;
  }
  r = sh(cli().train(run, (fs::exists(run + "/checkpoint") || has_old_sibling(run) ? "--resume " : "--overwrite ") + extra));
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_GT(kills, 0);
  std::vector<std::string> kept = {"checkpoint"};
  for (const auto& e : fs::directory_iterator(ref))
    if (e.path().filename().string().rfind("checkpoint-", 0) == 0) kept.push_back(e.path().filename().string());
  for (const auto& e : fs::directory_iterator(run)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("checkpoint-", 0) == 0) {
      EXPECT_NE(std::find(kept.begin(), kept.end(), n), kept.end()) << n << " is not in the reference run";
    }
  }
  for (const std::string& k : kept) {
    // the same files; all but the provenance (times, resumes) and the log copy (timings) equal
    const std::vector<std::string> in_ref = test::file_names(ref + "/" + k);
    EXPECT_EQ(in_ref, test::file_names(run + "/" + k)) << k;
    for (const std::string& f : in_ref) {
      if (f == "provenance.json" || f == "train_log.jsonl") continue;
      EXPECT_EQ(test::read_text(ref + "/" + k + "/" + f), test::read_text(run + "/" + k + "/" + f))
          << k << "/" << f << " differs after " << kills << " kill(s)";
    }
    // a checkpoint is self-contained: the data's tokenizer travels with it
    const std::string text = "the checkpoint's own tokenizer";
    EXPECT_EQ(load_tokenizer(run + "/" + k)->encode(text), load_tokenizer(cli().data)->encode(text))
        << k;
  }
  auto a = read_log(ref), b = read_log(run);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].value("loss", -1.0), b[i].value("loss", -1.0));
  for (const auto& e : fs::directory_iterator(run)) {
    const std::string n = e.path().filename().string();
    EXPECT_TRUE(n == "train_log.jsonl" || n == "train.lock" ||
                std::find(kept.begin(), kept.end(), n) != kept.end()) << n;
  }
}

TEST(FaultCli, KillDuringSavesThenResumeIsExact) { kill_and_resume(""); }

// The same with kept checkpoints: every checkpoint-step-N/ and checkpoint-best/ is written
// atomically, so kills inside those saves resume to the same folders.
TEST(FaultCli, KillDuringSavesWithKeptCheckpointsThenResumeIsExact) {
  kill_and_resume("--keep 3 --keep-best --set train.eval_every=2 --set train.eval_batches=1");
}

TEST(FaultCli, SecondTrainerOnOneFolderIsRefusedWithThePid) {
  test::TempDir tmp;
  const std::string out = tmp.path + "/run";
  // The first trainer runs long enough (20000 steps) to be found holding the lock.
  const std::string first = cli().train(out, "--steps 20000");
  test::CommandResult bg = sh("(" + first + " > " + tmp.path + "/first.log 2>&1 & echo $! > " +
                              tmp.path + "/first.pid)");
  ASSERT_EQ(bg.rc, 0);
  std::string pid;
  for (int i = 0; i < 200 && pid.empty(); ++i) {  // until it has written its pid
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (fs::exists(out + "/train.lock")) pid = test::read_text(out + "/train.lock");
    while (!pid.empty() && pid.back() == '\n') pid.pop_back();
  }
  ASSERT_FALSE(pid.empty());
  test::CommandResult second = sh(cli().train(out, "--resume"));
  ::kill(pid_t(std::stol(test::read_text(tmp.path + "/first.pid"))), SIGKILL);
  EXPECT_EQ(second.rc, 2) << second.out;
  EXPECT_NE(second.out.find("in use by another trainer (pid " + pid + ")"), std::string::npos)
      << second.out;
}

TEST(FaultCli, ExitCodesAndMessagesOfRefusedRuns) {
  test::TempDir tmp;
  const std::string out = tmp.path + "/run";
  // --steps 0 writes nothing and says so.
  test::CommandResult r = sh(cli().train(out, "--steps 0"));
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("no steps run, no checkpoint written"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(out + "/checkpoint"));
  r = sh(cli().train(out, "--steps -1"));  // once meant "the config's train.steps"
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("--steps"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(out + "/checkpoint"));
  r = sh(cli().train(out, "--steps 2"));
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("checkpoint in " + out + "/checkpoint"), std::string::npos) << r.out;
  // Again without --resume: refused, nothing touched.
  const std::string model = test::read_text(out + "/checkpoint/model.safetensors");
  r = sh(cli().train(out, "--steps 4"));
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("already holds a run"), std::string::npos) << r.out;
  // --resume with a changed model key: refused, naming it (a --set of a key that may not change
  // on resume, or a --config whose model keys differ from the checkpoint's).
  r = sh(cli().train(out, "--steps 4 --resume --set d_ff=40 --set train.seq_len=8"));
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("--set would change d_ff (run 24, given 40), train.seq_len (run 16, given "
                       "8), which may not change when a run is resumed"), std::string::npos) << r.out;
  json other = json::parse(test::read_text(cli().cfg));
  other["d_ff"] = 40;
  std::ofstream(tmp.path + "/other.json") << other.dump();
  r = sh(kDlcm + " train --quiet --no-final-eval --config " + tmp.path + "/other.json --data " +
         cli().data + " --out " + out + " --resume --steps 4");
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("changes model key(s) d_ff (checkpoint 24, given 40)"), std::string::npos)
      << r.out;
  // Without --resume, --config is needed.
  r = sh(kDlcm + " train --data " + cli().data + " --out " + tmp.path + "/new");
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("give --config FILE (only --resume"), std::string::npos) << r.out;
  r = sh(cli().train(out, "--resume --overwrite"));
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_TRUE(test::read_text(out + "/checkpoint/model.safetensors") == model) << "checkpoint changed";
  // Divergence within the config's ranges (decoupled weight decay lr * wd = 10^4 multiplies
  // the weights by -9999 per step), in each train.on_nonfinite mode: exit code 2 naming the
  // step and the component, and the last checkpoint (step 2) finite and in place.
  const std::string diverge = " --steps 40 --set train.lr=10 --set train.weight_decay=1000 "
                              "--set train.warmup_steps=0 --set train.schedule=constant "
                              "--set train.ckpt_every=2";
  for (const char* mode : {"stop", "skip"}) {
    const std::string d = tmp.path + "/diverge-" + mode;
    r = sh(cli().train(d, diverge + " --set train.on_nonfinite=" + mode +
                              " --set train.max_nonfinite_skips=3"));
    EXPECT_EQ(r.rc, 2) << mode << ": " << r.out;
    EXPECT_NE(r.out.find("went non-finite"), std::string::npos) << mode << ": " << r.out;
    if (std::string(mode) == "skip") {
      EXPECT_NE(r.out.find("3 steps in a row were already skipped"), std::string::npos) << r.out;
    }
    json st = load_trainer_state(d + "/checkpoint");
    EXPECT_EQ(st.at("step").get<i64>() % 2, 0) << mode;
    auto m = make_model(load_checkpoint_config(d + "/checkpoint").model);
    EXPECT_NO_THROW(load_checkpoint_params(d + "/checkpoint", m->params())) << mode;
  }
  // flops --seq-len 0 is refused rather than replaced.
  r = sh(kDlcm + " flops --config " + cli().cfg + " --seq-len 0");
  EXPECT_NE(r.rc, 0) << r.out;
  // NaN and denormal temperatures are refused.
  for (const char* t : {"nan", "1e-40", "1e-300"}) {
    r = sh(kDlcm + " generate --ckpt " + out + " --prompt a --max-new-tokens 2 --temperature " + t);
    EXPECT_NE(r.rc, 0) << t << ": " << r.out;
    EXPECT_NE(r.out.find("--temperature"), std::string::npos) << t << ": " << r.out;
  }
  // Counts of batches that would run nothing (eval once reported loss 0 over 0 tokens for
  // --limit 0) or that meant "all" when negative are refused, naming the flag (analyze's
  // --batches: AnalyzeCommand.BadInputsGiveOneLineErrors).
  for (const char* v : {"0", "-5"}) {
    r = sh(kDlcm + " eval --ckpt " + out + " --data " + cli().data + " --quiet --limit " + v);
    EXPECT_NE(r.rc, 0) << v << ": " << r.out;
    EXPECT_NE(r.out.find("--limit"), std::string::npos) << v << ": " << r.out;
  }
  // The scaling tools: a P step that would scan forever, a negative or infinite model size.
  json fit;
  for (const char* k : {"E0", "A_tok", "t_tok", "d1", "A_con", "g", "t_con", "d2", "A_dat",
                        "t_dat", "a"})
    fit["constants"][k] = 1.0;
  std::ofstream(tmp.path + "/fit.json") << fit.dump();
  const std::string alloc = kDlcm + " scaling allocate --fit " + tmp.path + "/fit.json --flops 1e18 --R 4";
  r = sh("timeout 60 " + alloc + " --p-step 1e-12");
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("raise --p-step"), std::string::npos) << r.out;
  r = sh(alloc + " --N -5");
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("--N must be a positive number"), std::string::npos) << r.out;
  EXPECT_EQ(sh(alloc + " --p-step 0.1").rc, 0);
  r = sh(kDlcm + " scaling predict --fit " + tmp.path + "/fit.json --N inf --D 1e9 --R 4 --P 0.5");
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("positive and finite"), std::string::npos) << r.out;
}

// Provenance: every checkpoint records the code, command, libraries, CPU and data; a resume
// keeps the first start and adds its record; eval reports carry it too.
TEST(FaultCli, ProvenanceInCheckpointsAndEvalReports) {
  test::TempDir tmp;
  const std::string out = tmp.path + "/run";
  test::CommandResult r = sh(cli().train(out, "--steps 2"));
  ASSERT_EQ(r.rc, 0) << r.out;
  const json p = json::parse(test::read_text(out + "/checkpoint/provenance.json"));
  EXPECT_EQ(p["git_commit"], build_info().git_commit);
  EXPECT_EQ(p["git_dirty"], build_info().git_dirty);
  EXPECT_EQ(p["version"], build_info().version);
  EXPECT_EQ(p["command"][1], "train");
  EXPECT_EQ(p["command"].back(), "2");
  EXPECT_EQ(p["step"], 2);
  EXPECT_TRUE(p["libraries"]["onednn"].is_string());
  EXPECT_TRUE(p["cpu"]["isa"].is_array());
  {  // the CPU as /proc/cpuinfo names it (where it does), and its vector extensions
    std::ifstream ci("/proc/cpuinfo");
    std::string model, flags;
    for (std::string line; std::getline(ci, line);) {
      if (model.empty() && line.rfind("model name", 0) == 0) model = line.substr(line.find(':') + 2);
      if (flags.empty() && line.rfind("flags", 0) == 0) flags = line.substr(line.find(':') + 1) + " ";
    }
    if (!model.empty()) {
      EXPECT_EQ(p["cpu"]["model"], model);
    }
    if (flags.find(" avx2 ") != std::string::npos) {
      EXPECT_NE(p["cpu"]["isa"].dump().find("\"avx2\""), std::string::npos) << p["cpu"].dump();
    }
  }
  EXPECT_EQ(p["data"]["shards"]["train.bin"]["bytes"].get<uint64_t>(),
            fs::file_size(cli().data + "/train.bin"));
  EXPECT_EQ(p["data"]["meta_fnv1a64"].get<std::string>().size(), 16u);
  EXPECT_LE(p["start"].get<std::string>(), p["end"].get<std::string>());
  // Resumed without --config: the first start stays, the resume is recorded.
  r = sh(kDlcm + " train --quiet --no-final-eval --data " + cli().data + " --out " + out +
         " --resume --steps 3");
  ASSERT_EQ(r.rc, 0) << r.out;
  const json q = json::parse(test::read_text(out + "/checkpoint/provenance.json"));
  EXPECT_EQ(q["start"], p["start"]);
  EXPECT_EQ(q["step"], 3);
  ASSERT_EQ(q["resumes"].size(), 1u);
  EXPECT_EQ(q["resumes"][0]["step"], 2);
  EXPECT_NE(q["resumes"][0]["command"].dump().find("--resume"), std::string::npos) << q.dump();
  EXPECT_TRUE(q["resumes"][0].contains("start"));
  // The eval report.
  r = sh(kDlcm + " eval --ckpt " + out + " --data " + cli().data + " --limit 1 --quiet --out " +
         tmp.path + "/report.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  const json e = json::parse(test::read_text(tmp.path + "/report.json"));
  EXPECT_EQ(e["provenance"]["git_commit"], build_info().git_commit);
  EXPECT_EQ(e["provenance"]["data"]["meta_fnv1a64"], p["data"]["meta_fnv1a64"]);
  EXPECT_EQ(e["provenance"]["command"][1], "eval");
  // The fingerprint follows the shard headers.
  const std::string copy = tmp.path + "/data";
  fs::copy(cli().data, copy);
  const json before = data_fingerprint(copy);
  {
    std::fstream f(copy + "/val.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(40);
    f.put('\x01');  // a reserved header byte
  }
  const json after = data_fingerprint(copy);
  EXPECT_NE(after["shards"]["val.bin"]["header_fnv1a64"], before["shards"]["val.bin"]["header_fnv1a64"]);
  EXPECT_EQ(after["shards"]["train.bin"], before["shards"]["train.bin"]);
  EXPECT_EQ(after["meta_fnv1a64"], before["meta_fnv1a64"]);
}

// A full disk while saving, simulated with a file-size limit (writes fail with EFBIG as they
// would with ENOSPC; SIGXFSZ ignored): a clean error naming the file, the previous checkpoint
// intact, no temporary folder left, and --resume works once there is room again.
TEST(FaultCli, FullDiskWhileSavingKeepsThePreviousCheckpoint) {
  test::TempDir tmp;
  const std::string out = tmp.path + "/run";
  test::CommandResult r = sh(cli().train(out, "--steps 2"));
  ASSERT_EQ(r.rc, 0) << r.out;
  const std::string model = test::read_text(out + "/checkpoint/model.safetensors");
  // 60 KiB per file: the model (~48 KB) fits, the optimizer state (~96 KB) does not.
  r = sh("bash -c \"trap '' XFSZ; ulimit -f 60; exec " + cli().train(out, "--steps 4 --resume") +
         "\"");
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("optimizer.safetensors: write failed"), std::string::npos) << r.out;
  EXPECT_TRUE(test::read_text(out + "/checkpoint/model.safetensors") == model) << "checkpoint changed";
  EXPECT_EQ(load_trainer_state(out + "/checkpoint").at("step").get<i64>(), 2);
  for (const auto& e : fs::directory_iterator(out))
    EXPECT_EQ(e.path().filename().string().find("checkpoint."), std::string::npos) << e.path();
  r = sh(cli().train(out, "--steps 4 --resume"));
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(load_trainer_state(out + "/checkpoint").at("step").get<i64>(), 4);
}
