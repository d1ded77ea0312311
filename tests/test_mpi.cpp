// Data-parallel training over MPI, through the dlcm binary under mpirun:
//  - 2 ranks x grad_accum k give the weights of 1 process x grad_accum 2k over the same
//    batches (rank r, micro-batch k <-> micro-batch r*k_per_rank + k), for both architectures;
//  - resuming with another number of ranks keeps the global batch and continues the same run;
//  - a failure on any rank stops every rank with a message naming it, and leaves no
//    half-written checkpoint; a rank killed outright stops the job too, and --resume goes on.
// Skipped, with the reason, when the build has no MPI or mpirun is missing (CI installs it).
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>
#include <nlohmann/json.hpp>

#include "core/dist.h"
#include "core/safetensors.h"
#include "model_fixtures.h"
#include "testing.h"

using namespace dlcm;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using test::CmdResult;
CmdResult sh(const std::string& cmd) { return test::run_command(cmd + " 2>&1"); }

bool have_mpirun() { return sh("command -v mpirun").rc == 0; }

// mpirun for np ranks on this machine: --oversubscribe (2 cores may be busy), root allowed
// in CI containers, the single-copy shared-memory path off (containers often forbid the
// ptrace-based one), OMP_NUM_THREADS dropped so the ranks choose their own thread counts,
// and a timeout so that a hang fails the test instead of stalling CI.
std::string mpirun_opts() {
  std::string c = "env -u OMP_NUM_THREADS timeout 120 mpirun --oversubscribe "
                  "--mca btl_vader_single_copy_mechanism none";
  if (geteuid() == 0) c += " --allow-run-as-root";
  return c + " ";
}
std::string mpirun(int np) { return mpirun_opts() + "-np " + std::to_string(np) + " "; }
// mpirun's MPMD form: rank 0 runs a, rank 1 runs b.
std::string mpirun_two(const std::string& a, const std::string& b) {
  return mpirun_opts() + "-np 1 " + a + " : -np 1 " + b;
}

const std::string kDlcm = DLCM_BINARY;

// A small text corpus as byte tokens (no network, no tokenizer training).
struct Corpus {
  test::TempDir dir;
  std::string data;
  Corpus() {
    std::ofstream f(dir.path + "/corpus.txt");
    Rng r(11);
    const char* words[] = {"the", "concept", "model", "reads", "tokens", "and", "writes",
                           "text", "while", "ranks", "sum", "gradients", "over", "steps"};
    for (int d = 0; d < 300; ++d) {
      int n = 5 + int(r.next() % 25);
      for (int w = 0; w < n; ++w) f << words[r.next() % 14] << (w + 1 < n ? " " : ".\n");
      f << "\f";  // document separator
    }
    f.close();
    data = dir.path + "/data";
    CmdResult p = sh(kDlcm + " prepare --input " + dir.path + "/corpus.txt --out " + data +
                     " --tokenizer bytes");
    if (p.rc != 0) throw Error("prepare failed: " + p.out);
  }
};

Corpus& corpus() {
  static Corpus c;
  return c;
}

Config tiny(const std::string& arch) {
  Config c;
  ModelConfig& m = c.model;
  m.arch = arch;
  m.vocab_size = 260;  // the byte tokenizer
  m.d_token = 32;
  m.n_heads = 2;
  m.n_kv_heads = 1;
  m.head_dim = 16;
  m.d_ff = 64;
  m.n_layers = 2;
  m.enc_layers = 1;
  m.dec_layers = 1;
  m.d_concept = 48;
  m.bb_layers = 1;
  m.bb_heads = 3;
  m.bb_kv_heads = 3;
  m.bb_d_ff = 96;
  m.x_heads = 2;
  m.x_kv_heads = 2;
  m.x_d_ff = 64;
  m.max_seq_len = 64;
  m.init_std = 0.1f;
  TrainConfig& t = c.train;
  t.seq_len = 32;
  t.batch_size = 2;
  t.grad_accum = 1;
  t.steps = 3;
  t.lr = 3e-3f;
  t.schedule = "constant";  // a run extended with --steps sees the same learning rates
  t.warmup_steps = 0;
  t.eval_every = 3;
  t.eval_batches = -1;  // the whole (tiny) validation split: several batches per rank
  t.ckpt_every = 0;
  t.log_every = 1;
  t.allreduce_bucket_mb = 0.02f;  // several buckets even for this tiny model
  return c;
}

std::string write_config(const std::string& dir, const Config& c) {
  std::string path = dir + "/config.json";
  std::ofstream(path) << config_to_json(c).dump(2);
  return path;
}

// Max over tensors of max|a - b| / max|b|.
double weights_rel_diff(const std::string& ckpt_a, const std::string& ckpt_b, const char* file) {
  SafeTensorsFile a(ckpt_a + "/" + file), b(ckpt_b + "/" + file);
  EXPECT_EQ(a.entries().size(), b.entries().size());
  double worst = 0;
  for (auto& [name, e] : b.entries()) {
    if (!a.has(name)) {
      ADD_FAILURE() << name << " missing in " << ckpt_a;
      continue;
    }
    auto x = a.read_f32(name), y = b.read_f32(name);
    worst = std::max(worst, test::rel_err(x.data(), y.data(), i64(y.size())));
  }
  return worst;
}

std::vector<json> read_log(const std::string& run) {
  std::vector<json> lines;
  std::ifstream f(run + "/train_log.jsonl");
  for (std::string l; std::getline(f, l);)
    if (!l.empty()) lines.push_back(json::parse(l));
  return lines;
}

std::vector<double> losses(const std::string& run) {
  std::vector<double> v;
  for (auto& j : read_log(run))
    if (j.contains("loss")) v.push_back(j["loss"].get<double>());
  return v;
}

std::string train(const std::string& cfg, const std::string& out, const std::string& extra) {
  return kDlcm + " train --quiet --config " + cfg + " --data " + corpus().data + " --out " + out +
         " " + extra;
}

class Mpi : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!dist::built_with_mpi()) GTEST_SKIP() << "built without MPI (libopenmpi-dev missing at configure time)";
    if (!have_mpirun()) GTEST_SKIP() << "mpirun not found (apt-get install openmpi-bin; CI installs it)";
  }
};

// 2 ranks x grad_accum 2 against 1 process x grad_accum 4 over 3 steps.
void check_two_ranks_equal_one_process(const std::string& arch) {
  Config c = tiny(arch);
  test::TempDir tmp;
  std::string cfg = write_config(tmp.path, c);
  CmdResult one = sh(train(cfg, tmp.path + "/one", "--set grad_accum=4"));
  ASSERT_EQ(one.rc, 0) << one.out;
  CmdResult two = sh(mpirun(2) + train(cfg, tmp.path + "/two", "--set grad_accum=2"));
  ASSERT_EQ(two.rc, 0) << two.out;
  const std::string a = tmp.path + "/two/checkpoint", b = tmp.path + "/one/checkpoint";
  // Same batches, same boundaries, only the float summation order of the gradients differs
  // ((g0+g1)+(g2+g3) against ((g0+g1)+g2)+g3): measured 7e-6 after a few steps; giving rank 1
  // rank 0's batches instead gives 0.1.
  EXPECT_LT(weights_rel_diff(a, b, "model.safetensors"), 1e-4) << arch;
  EXPECT_LT(weights_rel_diff(a, b, "optimizer.safetensors"), 1e-3) << arch;
  auto la = losses(tmp.path + "/two"), lb = losses(tmp.path + "/one");
  ASSERT_EQ(la.size(), 3u);
  ASSERT_EQ(lb.size(), 3u);
  for (size_t i = 0; i < la.size(); ++i) EXPECT_NEAR(la[i], lb[i], 1e-5 * std::abs(lb[i])) << i;
  // validation at the last step, its batches split over the ranks
  auto val = [](const std::string& run) {
    for (auto& j : read_log(run))
      if (j.contains("val_loss")) return j["val_loss"].get<double>();
    return -1.0;
  };
  EXPECT_GT(val(tmp.path + "/one"), 0);
  EXPECT_NEAR(val(tmp.path + "/two"), val(tmp.path + "/one"), 1e-5 * val(tmp.path + "/one"));
  // the losses move: a test that trains nothing would pass the comparison trivially
  EXPECT_NE(lb[0], lb[2]);
  // rank 0 logged the layout and its thread choice; the checkpoint knows its rank count
  json ev = read_log(tmp.path + "/two")[0];
  EXPECT_EQ(ev.value("event", ""), "ranks") << ev.dump();
  EXPECT_EQ(ev.value("ranks", 0), 2);
  EXPECT_EQ(ev.value("global_batch_rows", 0), 2 * 2 * c.train.batch_size);
  EXPECT_GE(ev.value("threads_per_rank", 0), 1);
  EXPECT_TRUE(ev.contains("threads_choice"));
  EXPECT_EQ(load_trainer_state(a).value("world_size", 0), 2);
  // the single-process run's log carries no MPI fields
  EXPECT_FALSE(read_log(tmp.path + "/one")[0].contains("allreduce_s"));
}

}  // namespace

TEST_F(Mpi, TwoRanksEqualOneProcessWithTwiceTheAccumulationBaseline) {
  check_two_ranks_equal_one_process("baseline");
}

TEST_F(Mpi, TwoRanksEqualOneProcessWithTwiceTheAccumulationDlcm) {
  check_two_ranks_equal_one_process("dlcm");
}

// Overlapped (non-blocking buckets during backward) and blocking all-reduce agree exactly:
// both sum the same numbers. A model announcing a gradient as complete too early would break
// this (the bucket would be summed before its last additions).
static void check_overlap_matches_blocking(const std::string& arch) {
  test::TempDir tmp;
  std::string cfg = write_config(tmp.path, tiny(arch));
  CmdResult a = sh(mpirun(2) + train(cfg, tmp.path + "/a", "--set allreduce_overlap=true"));
  ASSERT_EQ(a.rc, 0) << a.out;
  CmdResult b = sh(mpirun(2) + train(cfg, tmp.path + "/b", "--set allreduce_overlap=false"));
  ASSERT_EQ(b.rc, 0) << b.out;
  EXPECT_EQ(weights_rel_diff(tmp.path + "/a/checkpoint", tmp.path + "/b/checkpoint",
                             "model.safetensors"),
            0.0);
  // with overlap, buckets did start during backward (the head and the last block finish
  // before the first block); without, none did
  auto early = [](const std::string& run) {
    json j;
    for (auto& l : read_log(run))
      if (l.contains("allreduce_buckets")) j = l;  // the last step's line
    EXPECT_GT(j.value("allreduce_buckets", 0), 3) << j.dump();
    return j.value("allreduce_early", -1);
  };
  EXPECT_GT(early(tmp.path + "/a"), 0);
  EXPECT_EQ(early(tmp.path + "/b"), 0);
}

TEST_F(Mpi, OverlappedAndBlockingAllreduceAgreeBaseline) { check_overlap_matches_blocking("baseline"); }

TEST_F(Mpi, OverlappedAndBlockingAllreduceAgreeDlcm) { check_overlap_matches_blocking("dlcm"); }

// 2 ranks (grad_accum 2) for 2 steps, resumed by 1 process for 2 more (grad_accum becomes 4),
// resumed by 2 ranks for 2 more (grad_accum 2 again): the run of 1 process x grad_accum 4 for
// 6 steps, because the global batch and hence every step's data stayed the same.
TEST_F(Mpi, ResumeWithAnotherNumberOfRanksKeepsTheGlobalBatch) {
  test::TempDir tmp;
  std::string cfg = write_config(tmp.path, tiny("baseline"));
  const std::string run = tmp.path + "/run", ref = tmp.path + "/ref";
  CmdResult r1 = sh(mpirun(2) + train(cfg, run, "--set grad_accum=2 --steps 2"));
  ASSERT_EQ(r1.rc, 0) << r1.out;
  CmdResult r2 = sh(train(cfg, run, "--set grad_accum=2 --steps 4 --resume"));
  ASSERT_EQ(r2.rc, 0) << r2.out;
  EXPECT_NE(r2.out.find("grad_accum 2 -> 4 keeps the global batch"), std::string::npos) << r2.out;
  EXPECT_EQ(load_checkpoint_config(run + "/checkpoint").train.grad_accum, 4);
  CmdResult r3 = sh(mpirun(2) + train(cfg, run, "--set grad_accum=2 --steps 6 --resume"));
  ASSERT_EQ(r3.rc, 0) << r3.out;
  CmdResult rr = sh(train(cfg, ref, "--set grad_accum=4 --steps 6"));
  ASSERT_EQ(rr.rc, 0) << rr.out;
  EXPECT_LT(weights_rel_diff(run + "/checkpoint", ref + "/checkpoint", "model.safetensors"), 1e-4);
  json st = load_trainer_state(run + "/checkpoint");
  EXPECT_EQ(st.value("step", 0), 6);
  EXPECT_EQ(st.value("world_size", 0), 2);
  // the log records each change of layout
  int layouts = 0;
  for (auto& j : read_log(run)) layouts += j.value("event", "") == "ranks";
  EXPECT_EQ(layouts, 3);
}

// Two ranks that mpirun does not bind (--bind-to none) share every CPU of the test's own
// affinity mask, and split them: each runs max(1, C / 2) OpenMP threads, and the log says
// why. (A plan that missed the other rank's mask, or counted itself twice, gives C or C / 3.)
TEST_F(Mpi, UnboundRanksSplitTheCpusTheyShare) {
  cpu_set_t mine;
  CPU_ZERO(&mine);
  ASSERT_EQ(sched_getaffinity(0, sizeof mine, &mine), 0);
  const int cpus = CPU_COUNT(&mine);
  test::TempDir tmp;
  Config c = tiny("baseline");
  c.train.steps = 1;
  c.train.eval_every = 0;
  std::string cfg = write_config(tmp.path, c);
  CmdResult r = sh(mpirun_opts() + "--bind-to none -np 2 " + train(cfg, tmp.path + "/run", ""));
  ASSERT_EQ(r.rc, 0) << r.out;
  json ev = read_log(tmp.path + "/run")[0];
  ASSERT_EQ(ev.value("event", ""), "ranks") << ev.dump();
  EXPECT_EQ(ev.value("threads_choice", ""), std::to_string(cpus) +
                                                " CPUs in the rank's affinity mask / 2 local "
                                                "ranks sharing them") << ev.dump();
  EXPECT_EQ(ev.value("threads_per_rank", 0), std::max(1, cpus / 2)) << ev.dump();
}

// Rank 1 cannot open its data (mpirun's MPMD form gives it another --data): every rank stops,
// the message names rank 1, and nothing was written.
TEST_F(Mpi, FailureOnOneRankStopsAllRanks) {
  test::TempDir tmp;
  std::string cfg = write_config(tmp.path, tiny("baseline"));
  const std::string out = tmp.path + "/run";
  std::string good = train(cfg, out, "");
  std::string bad = kDlcm + " train --quiet --config " + cfg + " --data " + tmp.path +
                    "/no-such-data --out " + out;
  CmdResult r = sh(mpirun_two(good, bad));
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.rc, 124) << "mpirun hung instead of stopping: " << r.out;
  EXPECT_NE(r.out.find("dlcm: error: rank 1 of 2:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("no-such-data"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(out + "/checkpoint"));
}

// Ranks started with different settings are refused before training.
TEST_F(Mpi, RanksWithDifferentSettingsAreRefused) {
  test::TempDir tmp;
  std::string cfg = write_config(tmp.path, tiny("baseline"));
  const std::string out = tmp.path + "/run";
  CmdResult r = sh(mpirun_two(train(cfg, out, ""), train(cfg, out, "--set lr=0.01")));
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.rc, 124) << "mpirun hung instead of stopping: " << r.out;
  EXPECT_NE(r.out.find("differ from rank 0's (first difference at /train/lr)"), std::string::npos)
      << r.out;
}

// Rank 0 fails while saving (the checkpoint path is taken by a file) as rank 1 waits for it:
// both stop, and no temporary checkpoint folder is left behind.
TEST_F(Mpi, FailureWhileSavingStopsAllRanksAndLeavesNoPartialCheckpoint) {
  test::TempDir tmp;
  std::string cfg = write_config(tmp.path, tiny("baseline"));
  const std::string out = tmp.path + "/run";
  fs::create_directories(out);
  std::ofstream(out + "/checkpoint") << "not a checkpoint folder";
  CmdResult r = sh(mpirun(2) + train(cfg, out, "--set ckpt_every=2"));
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.rc, 124) << "mpirun hung instead of stopping: " << r.out;
  EXPECT_NE(r.out.find("dlcm: error: rank 0 of 2:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("exists and is not a directory"), std::string::npos) << r.out;
  for (auto& e : fs::directory_iterator(out))
    EXPECT_EQ(e.path().filename().string().find("checkpoint.tmp"), std::string::npos) << e.path();
}

namespace {

// The live dlcm ranks training into `out`, by rank (Open MPI puts OMPI_COMM_WORLD_RANK in each
// rank's environment; mpirun and the shell around it have none).
std::map<int, pid_t> ranks_training_into(const std::string& out) {
  std::map<int, pid_t> found;
  for (auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::string cmd = test::read_text(e.path().string() + "/cmdline");
    if (cmd.rfind(kDlcm + '\0', 0) != 0 || cmd.find('\0' + out + '\0') == std::string::npos) continue;
    std::string env = test::read_text(e.path().string() + "/environ");
    const std::string key = std::string(1, '\0') + "OMPI_COMM_WORLD_RANK=";
    size_t at = ('\0' + env).find(key);
    if (at != std::string::npos) found[std::atoi(env.c_str() + at + key.size() - 1)] = pid_t(std::stol(name));
  }
  return found;
}

// The highest step with a loss in the run's log so far (the trainer may be writing its last line).
long last_logged_step(const std::string& run) {
  long step = 0;
  std::ifstream f(run + "/train_log.jsonl");
  for (std::string l; std::getline(f, l);) {
    json j = json::parse(l, nullptr, false);
    if (!j.is_discarded() && j.contains("loss")) step = std::max(step, j.value("step", 0L));
  }
  return step;
}

}  // namespace

// Rank 1 is killed outright (SIGKILL, as the kernel's OOM killer or a lost node would do it) in
// the middle of training, while rank 0 waits for it in the gradient all-reduce: mpirun notices,
// stops rank 0 and exits non-zero within seconds; the run folder still holds the last complete
// checkpoint, byte for byte, and nothing else that would stop --resume; --resume on 2 ranks then
// continues from it to exactly the weights of a run that was never interrupted.
TEST_F(Mpi, RankKilledDuringTrainingStopsTheJobAndResumeContinues) {
  test::TempDir tmp;
  std::string cfg = write_config(tmp.path, tiny("baseline"));
  const std::string run = tmp.path + "/run", ref = tmp.path + "/ref";
  CmdResult r = sh(mpirun(2) + train(cfg, run, "--steps 2"));
  ASSERT_EQ(r.rc, 0) << r.out;
  std::map<std::string, std::string> saved;
  for (auto& e : fs::directory_iterator(run + "/checkpoint"))
    saved[e.path().filename().string()] = test::read_text(e.path().string());

  // Resumed for many steps (its only save would be at the end, never reached); rank 1 is killed
  // once rank 0 has logged step 4, so both ranks are inside the training loop.
  CmdResult killed;
  std::thread job([&] { killed = sh(mpirun(2) + train(cfg, run, "--resume --steps 100000")); });
  const auto t0 = std::chrono::steady_clock::now();
  std::map<int, pid_t> ranks;
  long at_kill = 0;
  while (std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60)) {
    ranks = ranks_training_into(run);
    at_kill = last_logged_step(run);
    if (at_kill >= 4 && ranks.count(1)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const bool kill_sent = at_kill >= 4 && ranks.count(1) && ::kill(ranks[1], SIGKILL) == 0;
  const auto t_kill = std::chrono::steady_clock::now();
  if (!kill_sent)  // do not leave the job running (until mpirun's timeout) behind a failed test
    for (auto& [rank, pid] : ranks_training_into(run)) ::kill(pid, SIGKILL);
  job.join();
  const double stop_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_kill).count();
  ASSERT_TRUE(kill_sent) << "rank 1 not found training past step 4 (last logged step " << at_kill
                         << "):\n" << killed.out;
  EXPECT_NE(killed.rc, 0) << killed.out;
  EXPECT_NE(killed.rc, 124) << "mpirun hung instead of stopping: " << killed.out;
  EXPECT_LT(stop_s, 30) << killed.out;
  // Open MPI's report: "mpirun noticed that process rank 1 with PID ... exited on signal 9"
  EXPECT_NE(killed.out.find("process rank 1 "), std::string::npos) << killed.out;
  EXPECT_NE(killed.out.find("exited on signal 9"), std::string::npos) << killed.out;
  EXPECT_TRUE(ranks_training_into(run).empty()) << "rank 0 outlived the job";
  EXPECT_LT(last_logged_step(run), 100000);  // it was killed mid-run, not finished

  // The checkpoint is the step-2 one, whole; no temporary or half-renamed folder is left.
  for (auto& [file, bytes] : saved) EXPECT_TRUE(test::read_text(run + "/checkpoint/" + file) == bytes) << file;
  for (auto& e : fs::directory_iterator(run)) {
    const std::string n = e.path().filename().string();
    EXPECT_TRUE(n == "checkpoint" || n == "train_log.jsonl" || n == "train.lock") << n;
  }

  // --resume on 2 ranks continues from step 2; it ends where an uninterrupted run ends.
  r = sh(mpirun(2) + train(cfg, run, "--resume --steps 4"));
  ASSERT_EQ(r.rc, 0) << r.out;
  r = sh(mpirun(2) + train(cfg, ref, "--steps 4"));
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(load_trainer_state(run + "/checkpoint").value("step", 0), 4);
  for (const char* f : {"model.safetensors", "optimizer.safetensors"})
    EXPECT_TRUE(test::read_text(run + "/checkpoint/" + f) == test::read_text(ref + "/checkpoint/" + f)) << f;
  auto a = losses(run), b = losses(ref);
  ASSERT_EQ(a.size(), 4u);
  EXPECT_EQ(a, b);  // the killed run's steps 3..N were dropped from the log
}
