// `dlcm export --format hf` of a DLCM, judged by transformers itself (tests/hf_dlcm_check.py under
// the project venv's python): the folder loads with trust_remote_code; logits agree with
// `dlcm forward` and greedy generation with `dlcm generate --ids`; one training step with
// given boundaries gives the engine's loss and gradients; the counter-RNG samples are the
// engine's; gradient accumulation over micro-batches equals one batch (also via the HF Trainer).
#include <filesystem>
#include <sstream>

#include "core/safetensors.h"
#include "data/tokenizer.h"
#include "kernels/dlcm_ops.h"
#include "model_fixtures.h"
#include "testing.h"

using namespace dlcm;

namespace {

const std::string kVenvPython = std::string(DLCM_SOURCE_DIR) + "/.venv/bin/python";

bool venv_available() {
  return std::filesystem::exists(kVenvPython) &&
         std::system((kVenvPython + " -c 'import transformers' >/dev/null 2>&1").c_str()) == 0;
}

int run_check(const std::string& args, std::string* log) {
  auto r = test::run_command(kVenvPython + " " + DLCM_SOURCE_DIR + "/tests/hf_dlcm_check.py " +
                             args + " 2>&1");
  *log = r.out;
  return r.rc;
}

// A tiny DLCM over the byte tokenizer's 260 ids, norms perturbed away from 1 (so their
// gradients are not special), saved as a checkpoint and exported.
struct Exported {
  test::TempDir tmp;
  Config c;
  std::unique_ptr<LanguageModel> m;
  std::string ckpt, hf;

  Exported() {
    c = test::tiny_dlcm("projected", "compact");
    c.model.vocab_size = 260;
    c.model.aux_weight = 0.2f;
    c.model.router.tau = 0.45f;
    c.model.router.alpha = 0.5f;
    c.train.seed = 99;
    m = make_initialised_model(c.model, 21);
    Rng jr(4);
    for (auto& p : m->params().params())
      if (p.init_one)
        for (i64 i = 0; i < p.numel; ++i) p.w[i] += 0.2f * (jr.uniform() - 0.5f);
    ckpt = tmp.path + "/ckpt";
    hf = tmp.path + "/hf";
    test::save_model_only(ckpt, c, m->params());
    make_byte_tokenizer()->save(ckpt);  // for `dlcm generate`
    auto r = test::run_dlcm("export --ckpt " + ckpt + " --format hf --out " + hf);
    EXPECT_EQ(r.rc, 0) << r.out;
  }
};

// Rows with packed documents (BOS inside some rows).
std::vector<i32> rows(const Config& c, i64 B, i64 L, uint64_t seed) {
  auto tok = test::random_tokens(B * L, c.model.vocab_size, seed, c.model.bos_id, 0.08);
  for (i64 r = 0; r < B; ++r) tok[r * L] = c.model.bos_id;
  return tok;
}

}  // namespace

TEST(HfDlcm, ExportRefusesWhatItCannotExpress) {
  test::TempDir tmp;
  Config c = test::tiny_dlcm("word");  // needs the tokenizer's word-start table
  auto m = make_initialised_model(c.model, 1);
  test::save_model_only(tmp.path + "/word", c, m->params());
  auto r = test::run_dlcm("export --ckpt " + tmp.path + "/word --format hf --out " + tmp.path + "/x");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("router.kind = \"word\""), std::string::npos) << r.out;
  EXPECT_FALSE(std::filesystem::exists(tmp.path + "/x"));
  Exported e;
  r = test::run_dlcm("export --ckpt " + e.ckpt + " --format hf --out " + e.hf);
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--force"), std::string::npos) << r.out;
  r = test::run_dlcm("export --ckpt " + e.ckpt + " --format hf --out " + e.hf + " --force");
  EXPECT_EQ(r.rc, 0) << r.out;
  for (const char* f : {"config.json", "generation_config.json", "model.safetensors",
                        "configuration_dlcm.py", "modeling_dlcm.py", "dlcm_ref_model.py",
                        "dlcm_ref_config.py"})
    EXPECT_TRUE(std::filesystem::exists(e.hf + "/" + f)) << f;
}

TEST(HfDlcm, LogitsAndGreedyGenerationMatchTheEngine) {
  if (!venv_available()) GTEST_SKIP() << "no .venv with transformers (scripts/setup.sh)";
  Exported e;
  const i64 B = 3, L = 24;
  auto tok = rows(e.c, B, L, 8);
  test::write_rows(e.tmp.path + "/tokens.txt", tok, B, L);
  auto r = test::run_dlcm("forward --ckpt " + e.ckpt + " --tokens " + e.tmp.path +
                          "/tokens.txt --out " + e.tmp.path + "/fwd.safetensors");
  ASSERT_EQ(r.rc, 0) << r.out;
  SafeTensorsFile fwd(e.tmp.path + "/fwd.safetensors");
  auto logits = fwd.read_f32("logits");

  // 32 greedy tokens of `dlcm generate` (past EOS), as ids: "PROMPT_IDS -> COMPLETION_IDS"
  r = test::run_dlcm("generate --ckpt " + e.ckpt + " --prompt 'Concepts, then tokens' "
                     "--temperature 0 --max-new-tokens 32 --ignore-eos --ids --quiet");
  ASSERT_EQ(r.rc, 0) << r.out;
  std::vector<i32> prompt, greedy;
  {
    std::istringstream line(r.out.substr(0, r.out.find('\n')));
    std::string w;
    bool after = false;
    while (line >> w) {
      if (w == "->") after = true;
      else (after ? greedy : prompt).push_back(std::stoi(w));
    }
  }
  ASSERT_EQ(greedy.size(), 32u) << r.out;
  ASSERT_EQ(prompt[0], e.c.model.bos_id) << r.out;
  const i64 P = prompt.size();
  std::vector<TensorToWrite> out = {
      {"tokens", {B, L}, nullptr, tok.data()},
      {"logits", {B, L, e.c.model.vocab_size}, logits.data(), nullptr},
      {"prompt", {P}, nullptr, prompt.data()},
      {"greedy", {32}, nullptr, greedy.data()}};
  write_safetensors(e.tmp.path + "/expect.safetensors", out);
  std::string log;
  EXPECT_EQ(run_check("infer --model " + e.hf + " --expect " + e.tmp.path + "/expect.safetensors",
                      &log), 0) << log;
}

TEST(HfDlcm, TrainingStepMatchesTheEngine) {
  if (!venv_available()) GTEST_SKIP() << "no .venv with transformers (scripts/setup.sh)";
  Exported e;
  const i64 B = 3, L = 20, N = B * L;
  const i32 bos = e.c.model.bos_id;
  auto tok = rows(e.c, B, L, 13);
  // given boundaries, targets = next token with a few ignored (HF: label -100 one later)
  std::vector<uint8_t> b(N);
  std::vector<i32> tgt(N), labels(tok);
  Rng rb(17);
  for (i64 n = 0; n < N; ++n) {
    const i64 t = n % L;
    b[n] = (t == 0 || tok[n] == bos || rb.uniform() < 0.3f) ? 1 : 0;
    tgt[n] = t + 1 < L ? tok[n + 1] : -1;
  }
  for (i64 n : {5, 6, 30}) {
    tgt[n] = -1;
    labels[n + 1] = -100;
  }
  StepContext ctx;
  for (i32 t : tgt) ctx.total_targets += t >= 0;
  ctx.total_positions = N;
  Batch bt{tok.data(), tgt.data(), B, L, 0, b.data()};
  e.m->params().zero_grad();
  ctx.sum_b = e.m->prepare_step({bt}, ctx);
  MicroStats s = e.m->train_micro(bt, 0, ctx);
  const double F = ctx.sum_b / double(N);
  const double loss = s.ce_sum / double(s.n_targets) +
                      e.c.model.aux_weight *
                          ops::global_parser_loss(ctx.sum_b, s.sum_p, double(N),
                                                  e.c.model.target_R).value;

  // the engine's training samples for its own p (seed, step 3, first row = global row 2)
  Buf p(N);
  std::vector<uint8_t> thr(N), sampled(N);
  ASSERT_TRUE(e.m->boundaries(tok.data(), B, L, p.data(), thr.data(), -1));
  const i64 step = 3, row0 = 2;
  ops::sample_boundaries(sampled.data(), p.data(), tok.data(), bos, B, L, e.c.model.router.alpha,
                         e.c.train.seed, step, row0);

  std::vector<float> bf(b.begin(), b.end()), sf(sampled.begin(), sampled.end());
  const float lossf = float(loss), Ff = float(F);
  const i32 seed = i32(e.c.train.seed), stepi = i32(step), row0i = i32(row0);
  std::vector<TensorToWrite> out = {{"tokens", {B, L}, nullptr, tok.data()},
                                    {"labels", {B, L}, nullptr, labels.data()},
                                    {"boundaries", {B, L}, bf.data(), nullptr},
                                    {"loss", {1}, &lossf, nullptr},
                                    {"F", {1}, &Ff, nullptr},
                                    {"p", {B, L}, p.data(), nullptr},
                                    {"sampled", {B, L}, sf.data(), nullptr},
                                    {"seed", {1}, nullptr, &seed},
                                    {"step", {1}, nullptr, &stepi},
                                    {"row0", {1}, nullptr, &row0i}};
  std::vector<std::string> names;
  for (auto& prm : e.m->params().params()) names.push_back("grad." + prm.name);
  i64 i = 0;
  for (auto& prm : e.m->params().params()) out.push_back({names[i++], prm.shape, prm.g, nullptr});
  write_safetensors(e.tmp.path + "/expect.safetensors", out);
  std::string log;
  EXPECT_EQ(run_check("train --model " + e.hf + " --expect " + e.tmp.path + "/expect.safetensors",
                      &log), 0) << log;
}

// Also the way back: the model after one HF Trainer step, saved with dlcm_save_checkpoint, runs
// in the engine with the logits transformers computes.
TEST(HfDlcm, MicroBatchAccumulationEqualsOneBatchAndTrainedModelComesBack) {
  if (!venv_available()) GTEST_SKIP() << "no .venv with transformers (scripts/setup.sh)";
  Exported e;
  std::string log;
  const std::string back_dir = e.tmp.path + "/back";
  std::filesystem::create_directories(back_dir);
  ASSERT_EQ(run_check("accum --model " + e.hf + " --save " + back_dir, &log), 0) << log;
  auto r = test::run_dlcm("forward --ckpt " + back_dir + "/ckpt --tokens " + back_dir +
                          "/tokens.txt --out " + e.tmp.path + "/back.safetensors");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto back = SafeTensorsFile(e.tmp.path + "/back.safetensors").read_f32("logits");
  auto hf = SafeTensorsFile(back_dir + "/hf_logits.safetensors").read_f32("logits");
  ASSERT_EQ(back.size(), hf.size());
  EXPECT_LT(test::rel_err(back.data(), hf.data(), i64(back.size())), 1e-4);
  // the weights did move: the engine's logits of the exported (untrained) model differ
  auto r0 = test::run_dlcm("forward --ckpt " + e.ckpt + " --tokens " + back_dir +
                           "/tokens.txt --out " + e.tmp.path + "/before.safetensors");
  ASSERT_EQ(r0.rc, 0) << r0.out;
  auto before = SafeTensorsFile(e.tmp.path + "/before.safetensors").read_f32("logits");
  EXPECT_GT(test::rel_err(before.data(), hf.data(), i64(hf.size())), 1e-3);
}
