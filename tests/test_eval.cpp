// Zero-shot evaluation: fixture files of every layout (written here), prompts built as
// lm-evaluation-harness builds them, exact choices and accuracies under a model whose
// log-likelihoods are known in closed form (a bigram table), per-continuation log-likelihoods
// against the PyTorch reference on a tiny checkpoint of each architecture, batching/prefix
// sharing/truncation invariance, clear errors, and the CLI.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "core/build_info.h"
#include "data/tokenizer.h"
#include "eval/scorer.h"
#include "eval/zero_shot.h"
#include "kernels/ops.h"
#include "model_fixtures.h"
#include "testing.h"

using namespace dlcm;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// ---- fixture benchmark files (built-in file names, so "--tasks all" finds them) ----

const char* kLongContext =
    "It was a long day at the harbour, and the boats came in one by one while the gulls cried "
    "over the water and the fishermen sorted their catch on the stones until the light was "
    "almost gone at the very";

void write_bench(const std::string& dir) {
  fs::create_directories(dir + "/mmlu_dev");
  std::ofstream(dir + "/hellaswag_val.txt")
      << "Baking cookies: A woman puts dough on a tray. she\n1\neats the tray.\n"
         "puts the tray in the oven.\nwaves  at the camera.\nsings a song.\n"
         "Fixing a bike: The man [header] lifts the wheel. he\n3\ndrops it.\nrides away.\n"
         "paints it red.\nspins the wheel slowly.\n";
  std::ofstream(dir + "/piqa_valid.jsonl")
      << R"({"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Paint the lid."})" "\n"
      << R"({"goal": "dry wet shoes", "sol1": "put newspaper inside them", "sol2": "put them in the freezer"})" "\n";
  std::ofstream(dir + "/piqa_valid-labels.lst") << "0\n1\n";
  std::ofstream(dir + "/arc_easy.jsonl")
      << R"({"query": "Question: What do plants need?", "choices": ["light", "sand", "noise", "metal"], "gold": 0})" "\n"
      << R"({"query": "Question: Which is a mammal?", "choices": ["frog", "whale", "trout"], "gold": 1})" "\n\n"
      << R"({"query": "Question: Pick a letter.", "choices": ["A", "B"], "gold": "1"})" "\n";
  std::ofstream(dir + "/boolq.jsonl")
      << R"({"query": "Passage: Water boils at 100 C at sea level.\nQuestion: does water boil at 100 c?", "choices": ["no", "yes"], "gold": 1})" "\n"
      << R"({"query": "Passage: Cats are mammals.\nQuestion: are cats reptiles?", "choices": ["no", "yes"], "gold": 0})" "\n";
  std::ofstream(dir + "/copa.jsonl")
      << R"({"query": "The man turned on the faucet, therefore", "gold": 1, "choices": ["the toilet filled with water.", "water flowed from the spout."]})" "\n"
      << R"({"query": "The girl ate too much candy, because", "gold": 0, "choices": ["she was hungry for sweets.", "it rained."]})" "\n";
  std::ofstream(dir + "/winogrande_dev.jsonl")
      << R"({"qID": "a", "sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.", "option1": "Sarah", "option2": "Maria", "answer": "2"})" "\n"
      << R"({"qID": "b", "sentence": "The trophy did not fit in the suitcase because the _ was too big.", "option1": "trophy", "option2": "suitcase", "answer": "1"})" "\n";
  std::ofstream(dir + "/lambada_openai.jsonl")
      << R"({"context": "The cat sat on the", "continuation": "mat"})" "\n"
      << R"({"context": "She opened the door and said hello to her ", "continuation": "friend"})" "\n"
      << json{{"context", kLongContext}, {"continuation", "end"}}.dump() << "\n";
  std::ofstream(dir + "/wsc.jsonl")
      << R"({"context_options": ["The council refused the marchers a permit because the council", "The council refused the marchers a permit because the marchers"], "continuation": "feared violence.", "gold": 0})" "\n"
      << R"({"context_options": ["Anna did worse than Lucy because Anna", "Anna did worse than Lucy because Lucy", "Anna did worse than Lucy because Bob"], "continuation": "had studied less.", "gold": 0})" "\n";
  std::ofstream(dir + "/mmlu_dev/alpha_dev.csv")
      << "question,choice0,choice1,choice2,choice3,answer\n"
         "What is 2+2?,3,4,5,6,1\n"
         "\n"  // a blank line (skipped, but counted)
         "\"Which pair, in order, is sorted?\",\"1, 2\",\"2, 1\",\"3, 1\",\"b, a\",0\n";
  std::ofstream(dir + "/mmlu_dev/beta_two_test.csv")
      << "question,choice0,choice1,choice2,choice3,answer\r\n"
         "\"A \"\"quoted\"\" word\non two lines?\",yes,no,maybe,never,C\r\n"
         "Second?,w,x,y,z,d\r\nThird?,p,q,r,s,A\r\n";
}

// What each item must become: contexts and continuations after lm-eval's whitespace rule,
// the choice texts (for acc_norm), gold and MMLU subject.
struct Expect {
  std::vector<std::string> ctx, cont, text;
  int gold = 0, group = -1;
};

std::string mmlu_ctx(const std::string& topic, const std::string& q, std::vector<std::string> c) {
  std::string s = "The following are multiple choice questions (with answers) about " + topic + ".\n\n" + q;
  for (int i = 0; i < 4; ++i) s.append("\n").append(1, char('A' + i)).append(". ").append(c[i]);
  return s + "\nAnswer:";
}

Expect mc(const std::string& ctx, std::vector<std::string> choices, int gold, int group = -1) {
  Expect e{{ctx}, {}, choices, gold, group};
  for (auto& c : choices) e.cont.push_back(" " + c);
  return e;
}

std::map<std::string, std::vector<Expect>> expected_items() {
  std::map<std::string, std::vector<Expect>> m;
  m["hellaswag"] = {
      mc("Baking cookies: A woman puts dough on a tray. she",
         {"eats the tray.", "puts the tray in the oven.", "waves at the camera.", "sings a song."}, 1),
      mc("Fixing a bike: The man lifts the wheel. he",
         {"drops it.", "rides away.", "paints it red.", "spins the wheel slowly."}, 3)};
  m["piqa"] = {mc("Question: How do I open a jar?\nAnswer:", {"Twist the lid.", "Paint the lid."}, 0),
               mc("Question: dry wet shoes\nAnswer:", {"put newspaper inside them", "put them in the freezer"}, 1)};
  m["arc_easy"] = {mc("Question: What do plants need?\nAnswer:", {"light", "sand", "noise", "metal"}, 0),
                   mc("Question: Which is a mammal?\nAnswer:", {"frog", "whale", "trout"}, 1),
                   mc("Question: Pick a letter.\nAnswer:", {"A", "B"}, 1)};
  m["boolq"] = {mc("Passage: Water boils at 100 C at sea level.\nQuestion: does water boil at 100 c?\nAnswer:", {"no", "yes"}, 1),
                mc("Passage: Cats are mammals.\nQuestion: are cats reptiles?\nAnswer:", {"no", "yes"}, 0)};
  m["copa"] = {mc("The man turned on the faucet, therefore", {"the toilet filled with water.", "water flowed from the spout."}, 1),
               mc("The girl ate too much candy, because", {"she was hungry for sweets.", "it rained."}, 0)};
  m["winogrande"] = {
      {{"Sarah was a better surgeon than Maria so Sarah", "Sarah was a better surgeon than Maria so Maria"},
       {" got the easier cases."}, {"got the easier cases."}, 1},
      {{"The trophy did not fit in the suitcase because the trophy", "The trophy did not fit in the suitcase because the suitcase"},
       {" was too big."}, {"was too big."}, 0}};
  m["lambada_openai"] = {{{"The cat sat on the"}, {" mat"}, {"mat"}, 0},
                  {{"She opened the door and said hello to her"}, {" friend"}, {"friend"}, 0},
                  {{kLongContext}, {" end"}, {"end"}, 0}};
  m["wsc"] = {
      {{"The council refused the marchers a permit because the council", "The council refused the marchers a permit because the marchers"},
       {" feared violence."}, {"feared violence."}, 0},
      {{"Anna did worse than Lucy because Anna", "Anna did worse than Lucy because Lucy", "Anna did worse than Lucy because Bob"},
       {" had studied less."}, {"had studied less."}, 0}};
  std::vector<std::string> L = {"A", "B", "C", "D"};
  m["mmlu"] = {mc(mmlu_ctx("alpha", "What is 2+2?", {"3", "4", "5", "6"}), L, 1, 0),
               mc(mmlu_ctx("alpha", "Which pair, in order, is sorted?", {"1, 2", "2, 1", "3, 1", "b, a"}), L, 0, 0),
               mc(mmlu_ctx("beta two", "A \"quoted\" word\non two lines?", {"yes", "no", "maybe", "never"}), L, 2, 1),
               mc(mmlu_ctx("beta two", "Second?", {"w", "x", "y", "z"}), L, 3, 1),
               mc(mmlu_ctx("beta two", "Third?", {"p", "q", "r", "s"}), L, 0, 1)};
  return m;
}

std::vector<TaskSpec> fixture_specs() {
  auto s = resolve_tasks("all,wsc=context_options:wsc.jsonl");
  EXPECT_EQ(s.size(), 9u);
  return s;
}

// A model whose log-likelihoods are known in closed form: logits at t = T[token_t].
class BigramModel : public LanguageModel {
 public:
  explicit BigramModel(i64 V, i64 max_len) : T_(V * V) {
    cfg_.vocab_size = V;
    cfg_.max_seq_len = max_len;
    test::fill_normal(T_.data(), V * V, 17, 2.0f);
  }
  void reserve(i64, i64) override {}
  MicroStats train_micro(const Batch&, i64, const StepContext&) override { fail("not used"); }
  MicroStats eval_micro(const Batch&, float*) override { fail("not used"); }
  void logits(const i32* tokens, i64 B, i64 L, float* out) override {
    const i64 V = cfg_.vocab_size;
    ++calls;
    max_B = std::max(max_B, B);
    EXPECT_LE(L, cfg_.max_seq_len);
    for (i64 n = 0; n < B * L; ++n) std::copy_n(&T_[tokens[n] * V], V, out + n * V);
  }
  double flops_per_token(i64) const override { return 0; }
  std::unique_ptr<InferenceStream> new_stream(const StreamOptions&) override { fail("not used"); }
  // Makes `text` the greedy continuation of its first byte (bytes tokenizer ids).
  void make_greedy(const std::string& text) {
    for (size_t i = 0; i + 1 < text.size(); ++i)
      T_[(4 + (unsigned char)text[i]) * cfg_.vocab_size + 4 + (unsigned char)text[i + 1]] = 50.0f;
  }
  // log p(next | prev)
  double logp(i32 prev, i32 next) const {
    const i64 V = cfg_.vocab_size;
    double mx = -1e30, s = 0;
    for (i64 j = 0; j < V; ++j) mx = std::max(mx, double(T_[prev * V + j]));
    for (i64 j = 0; j < V; ++j) s += std::exp(double(T_[prev * V + j]) - mx);
    return double(T_[prev * V + next]) - mx - std::log(s);
  }
  bool is_top(i32 prev, i32 next) const {
    const i64 V = cfg_.vocab_size;
    for (i64 j = 0; j < V; ++j)
      if (T_[prev * V + j] > T_[prev * V + next] || (j < next && T_[prev * V + j] == T_[prev * V + next])) return false;
    return true;
  }
  i64 calls = 0, max_B = 0;

 private:
  std::vector<float> T_;
};

// Closed-form continuation log-likelihood under the bigram model, bytes tokenizer (id = 4 + byte).
std::pair<double, bool> bigram_loglik(const BigramModel& m, const std::string& ctx, const std::string& cont) {
  i32 prev = ctx.empty() ? 1 : 4 + (unsigned char)ctx.back();
  double ll = 0;
  bool greedy = true;
  for (unsigned char c : cont) {
    ll += m.logp(prev, 4 + c);
    greedy = greedy && m.is_top(prev, 4 + c);
    prev = 4 + c;
  }
  return {ll, greedy};
}

int first_max(const std::vector<double>& v) {
  int b = 0;
  for (int i = 1; i < int(v.size()); ++i)
    if (v[i] > v[b]) b = i;
  return b;
}

Config tiny_config(const std::string& arch) {
  Config c = test::tiny_baseline();
  c.model.vocab_size = 260;  // the bytes tokenizer
  c.model.max_seq_len = 128;
  if (arch == "dlcm") {  // the dlcm fixture of python/make_fixture.py, bytes vocabulary
    ModelConfig& m = c.model;
    m.arch = "dlcm";
    m.n_heads = 4, m.n_kv_heads = 2, m.head_dim = 4, m.d_ff = 24;
    m.enc_layers = 1, m.dec_layers = 1, m.d_concept = 24, m.bb_layers = 2, m.bb_heads = 3;
    m.bb_kv_heads = 1, m.bb_d_ff = 40, m.x_heads = 4, m.x_kv_heads = 2, m.x_d_ff = 20, m.d_scan = 12;
  }
  return c;
}

// A tiny checkpoint with the bytes tokenizer; nullptr when the architecture is not built yet.
std::unique_ptr<LanguageModel> tiny_checkpoint(const std::string& arch, const std::string& dir) {
  Config c = tiny_config(arch);
  std::unique_ptr<LanguageModel> m = make_initialised_model(c.model, 21);
  test::save_model_only(dir, c, m->params());
  make_byte_tokenizer()->save(dir);
  return m;
}

using test::error_of;

}  // namespace

// Every layout: the prompts are exactly lm-evaluation-harness's (decoded from the requests).
TEST(EvalTasks, EveryLayoutBuildsTheExpectedPrompts) {
  test::TempDir tmp;
  write_bench(tmp.path);
  auto tok = make_byte_tokenizer();
  auto want = expected_items();
  for (const TaskSpec& s : fixture_specs()) {
    SCOPED_TRACE(s.name);
    TaskData d = read_task(s, tmp.path);
    const auto& exp = want.at(s.name);
    ASSERT_EQ(d.items.size(), exp.size());
    auto reqs = task_requests(d, *tok);
    size_t k = 0;
    for (size_t i = 0; i < exp.size(); ++i) {
      EXPECT_EQ(d.items[i].gold, exp[i].gold) << i;
      EXPECT_EQ(d.items[i].group, exp[i].group) << i;
      EXPECT_EQ(d.items[i].choices, exp[i].text) << i;
      const size_t m = std::max(exp[i].ctx.size(), exp[i].cont.size());
      for (size_t j = 0; j < m; ++j, ++k) {
        ASSERT_LT(k, reqs.size());
        EXPECT_EQ(tok->decode(reqs[k].context), exp[i].ctx[exp[i].ctx.size() > 1 ? j : 0]) << i << "/" << j;
        EXPECT_EQ(tok->decode(reqs[k].continuation), exp[i].cont[exp[i].cont.size() > 1 ? j : 0]) << i << "/" << j;
      }
    }
    EXPECT_EQ(k, reqs.size());
  }
  TaskData mm = read_task(resolve_tasks("mmlu")[0], tmp.path);
  EXPECT_EQ(mm.groups, (std::vector<std::string>{"alpha", "beta_two"}));  // "about beta two"
  // line numbers count a CRLF once, and a quoted field's line break: the records of
  // beta_two_test.csv (CRLF) start on lines 2 (two lines long), 4 and 5
  ASSERT_EQ(mm.items.size(), 5u);
  EXPECT_TRUE(mm.items[1].where.ends_with("alpha_dev.csv:4")) << mm.items[1].where;
  for (auto [i, line] : {std::pair{2, 2}, {3, 4}, {4, 5}})
    EXPECT_TRUE(mm.items[i].where.ends_with("beta_two_test.csv:" + std::to_string(line)))
        << mm.items[i].where;
  // --limit: the first N items (per subject for MMLU)
  EXPECT_EQ(read_task(resolve_tasks("hellaswag")[0], tmp.path, 1).items.size(), 1u);
  EXPECT_EQ(read_task(resolve_tasks("mmlu")[0], tmp.path, 1).items.size(), 2u);
}

// A model with closed-form log-likelihoods: chosen answers, accuracies, standard errors,
// chance levels and LAMBADA perplexity match exactly (1e-12) on every layout.
TEST(EvalTasks, KnownModelGivesExactChoicesAndAccuracies) {
  test::TempDir tmp;
  write_bench(tmp.path);
  auto tok = make_byte_tokenizer();
  auto want = expected_items();
  EvalOptions o;
  o.bench_dir = tmp.path;
  o.keep_items = true;
  o.batch_tokens = 150;  // several batches per task
  double sum_acc = 0;
  for (const TaskSpec& s : fixture_specs()) {
    SCOPED_TRACE(s.name);
    BigramModel m(260, 128);
    m.make_greedy("e mat");  // LAMBADA's first item: " mat" after "...the" is the greedy choice
    TaskResult r = run_task(m, *tok, s, o);
    ASSERT_TRUE(r.ok()) << r.error;
    const auto& exp = want.at(s.name);
    ASSERT_EQ(r.items.size(), exp.size());
    std::vector<double> correct, correct_norm, weight;
    double chance = 0, ll_sum = 0;
    i64 truncated = 0;  // BOS + context + continuation - 1 > max_seq_len (bytes tokenizer)
    std::map<int, int> group_n;
    for (auto& e : exp) group_n[e.group]++;
    for (size_t i = 0; i < exp.size(); ++i) {
      const Expect& e = exp[i];
      const size_t m_choices = std::max(e.ctx.size(), e.cont.size());
      std::vector<double> ll, norm;
      bool greedy = false;
      for (size_t j = 0; j < m_choices; ++j) {
        const std::string &c = e.ctx[e.ctx.size() > 1 ? j : 0], &x = e.cont[e.cont.size() > 1 ? j : 0];
        auto [l, g] = bigram_loglik(m, c, x);
        truncated += c.size() + x.size() > 128;
        ll.push_back(l);
        greedy = g;
        norm.push_back(l / double(e.text[e.text.size() > 1 ? j : 0].size()));
        // float logits and a float exp-sum: about 1e-7 relative per token
        EXPECT_NEAR(r.items[i].loglik[j], l, 1e-6 * std::abs(l)) << i << "/" << j;
      }
      for (auto v : {ll, norm}) {  // a near tie would make "exact" depend on rounding
        std::sort(v.rbegin(), v.rend());
        ASSERT_TRUE(v.size() < 2 || v[0] - v[1] > 1e-5 * std::abs(v[0])) << "near tie in item " << i;
      }
      weight.push_back(e.group >= 0 ? 1.0 / (group_n.size() * group_n[e.group]) : 1.0 / exp.size());
      if (s.name == "lambada_openai") {
        EXPECT_EQ(r.items[i].greedy, greedy) << i;
        correct.push_back(greedy);
        ll_sum += ll[0];
      } else {
        EXPECT_EQ(r.items[i].pred, first_max(ll)) << i;
        correct.push_back(first_max(ll) == e.gold);
        correct_norm.push_back(first_max(norm) == e.gold);
        chance += weight.back() / double(m_choices);
        if (e.ctx.size() == 1) {
          EXPECT_EQ(r.items[i].pred_norm, first_max(norm)) << i;
        }
      }
    }
    auto wmean = [&](const std::vector<double>& x) {
      double p = 0;
      for (size_t i = 0; i < x.size(); ++i) p += weight[i] * x[i];
      return p;
    };
    const double n = exp.size(), p = wmean(correct);
    EXPECT_EQ(r.n, i64(n));
    EXPECT_NEAR(r.acc, p, 1e-12);
    EXPECT_NEAR(r.chance, s.name == "lambada_openai" ? 0.0 : chance, 1e-12);
    double w2 = 0;
    for (double w : weight) w2 += w * w;
    EXPECT_NEAR(r.acc_stderr, std::sqrt(w2 * p * (1 - p) * n / (n - 1)), 1e-12);
    if (s.name != "mmlu") {
      EXPECT_NEAR(r.acc_stderr, std::sqrt(p * (1 - p) / (n - 1)), 1e-12);
    }
    const bool is_mc = s.name != "lambada_openai" && s.name != "winogrande" && s.name != "wsc";
    if (is_mc) {
      EXPECT_NEAR(r.acc_norm, wmean(correct_norm), 1e-12);
    } else {
      EXPECT_TRUE(std::isnan(r.acc_norm));
    }
    if (s.name == "lambada_openai") {
      EXPECT_TRUE(r.items[0].greedy);
      EXPECT_FALSE(r.items[1].greedy);
      EXPECT_NEAR(r.perplexity, std::exp(-ll_sum / n), 1e-4 * r.perplexity);
    }
    if (s.name == "mmlu") {
      ASSERT_EQ(r.groups.size(), 2u);
      EXPECT_NEAR(r.acc, (r.groups[0].acc + r.groups[1].acc) / 2, 1e-12);  // subjects averaged
    }
    EXPECT_EQ(r.stats.truncated, truncated);
    EXPECT_EQ(m.calls, r.stats.batches);
    EXPECT_GT(r.stats.batches, 1);  // batch_tokens = 150: at most 2 rows per pass
    EXPECT_LE(m.max_B, 2);
    sum_acc += r.acc;
  }
  EXPECT_GT(sum_acc, 0);  // a test where everything is wrong would prove little
}

// Shared prefixes cost one row; batching, padding and row order do not change any score.
TEST(EvalScorer, BatchingAndPrefixSharingDoNotChangeScores) {
  test::TempDir tmp;
  auto m = tiny_checkpoint("baseline", tmp.path + "/ck");
  auto tok = make_byte_tokenizer();
  std::vector<ScoreRequest> reqs;
  for (const char* c : {"Question: Pick one.\nAnswer:", "Short", "A much longer context for this row"}) {
    for (const char* ch : {" A", " B", " C", " word", " A"})  // " A" twice: identical requests
      reqs.push_back(make_request(*tok, c, ch));
  }
  reqs.push_back(make_request(*tok, "", " empty context"));
  Scorer sc(*m, tok->bos_id(), tok->pad_id());
  ScorerOptions one, many;
  one.batch_tokens = 1;  // one row per forward pass
  many.batch_tokens = 1 << 16;
  ScoreStats s1, s2;
  auto a = sc.score(reqs, one, &s1);
  auto b = sc.score(reqs, many, &s2);
  // " A", " B", " C" are 2 bytes each: their fed rows BOS+context+" " are identical and a
  // prefix of the fed row of " word" (BOS+context+" wor"), so each context needs one row.
  EXPECT_EQ(s1.rows, 3 + 1);
  EXPECT_EQ(s1.requests, i64(reqs.size()));
  EXPECT_EQ(s1.batches, s1.rows);
  EXPECT_LT(s2.batches, s1.batches);
  EXPECT_EQ(s1.padded_tokens, s1.tokens);
  const i64 V = m->config().vocab_size;
  for (size_t i = 0; i < reqs.size(); ++i) {
    // direct: the request's own row alone, log-softmax in double
    auto row = sc.full_row(reqs[i]);
    const i64 L = row.size() - 1, nc = reqs[i].continuation.size();
    std::vector<float> lg(L * V);
    m->logits(row.data(), 1, L, lg.data());
    double want = 0;
    bool greedy = true;
    for (i64 p = L - nc; p < L; ++p) {
      const float* x = &lg[p * V];
      double mx = *std::max_element(x, x + V), s = 0;
      for (i64 j = 0; j < V; ++j) s += std::exp(double(x[j]) - mx);
      want += double(x[row[p + 1]]) - mx - std::log(s);
      greedy = greedy && (std::max_element(x, x + V) - x) == row[p + 1];
    }
    EXPECT_NEAR(a[i].loglik, want, 1e-5 * std::abs(want)) << i;
    EXPECT_NEAR(b[i].loglik, want, 1e-5 * std::abs(want)) << i;
    EXPECT_EQ(a[i].greedy, greedy) << i;
    EXPECT_EQ(b[i].greedy, greedy) << i;
  }
  EXPECT_EQ(a[0].loglik, a[4].loglik);  // identical requests, one row
  ScorerOptions apart;
  apart.share_prefixes = false;
  ScoreStats s3;
  auto c = sc.score(reqs, apart, &s3);
  EXPECT_EQ(s3.rows, s3.requests);
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_NEAR(c[i].loglik, a[i].loglik, 1e-5 * std::abs(a[i].loglik)) << i;
}

// The scorer's log-softmax kernel: ops::logsumexp against a double-precision sum, for row
// lengths around the vector width (masked tails) and with large values (the max shift).
TEST(EvalScorer, LogSumExpMatchesDoubleReference) {
  for (i64 n : {1, 15, 16, 17, 260, 1001}) {
    std::vector<float> x(n);
    Rng rng{uint64_t(n)};
    for (auto& v : x) v = 80.f + 10.f * rng.normal();
    double mx_ref = -1e300, s = 0;
    for (float v : x) mx_ref = std::max(mx_ref, double(v));
    for (float v : x) s += std::exp(double(v) - mx_ref);
    float mx = 0;
    const double lse = ops::logsumexp(x.data(), n, &mx);
    EXPECT_EQ(double(mx), mx_ref) << n;
    EXPECT_NEAR(lse, mx_ref + std::log(s), 1e-5) << n;
    EXPECT_EQ(ops::logsumexp(x.data(), n), lse) << n;
  }
}

// logits_at (the head on chosen rows only) equals rows of the full logits, for the baseline's
// own implementation and for the interface's default.
TEST(EvalScorer, LogitsAtEqualsRowsOfFullLogits) {
  test::TempDir tmp;
  auto base = tiny_checkpoint("baseline", tmp.path + "/ck");
  BigramModel bigram(260, 128);
  for (LanguageModel* m : {static_cast<LanguageModel*>(base.get()), static_cast<LanguageModel*>(&bigram)}) {
    const i64 B = 3, L = 11, V = m->config().vocab_size;
    auto tok = test::random_tokens(B * L, V, 5);
    std::vector<float> all(B * L * V);
    m->logits(tok.data(), B, L, all.data());
    std::vector<i64> pos = {32, 0, 5, 11, 12, 13, 20};
    std::vector<float> got(pos.size() * V);
    m->logits_at(tok.data(), B, L, pos.data(), pos.size(), got.data());
    for (size_t i = 0; i < pos.size(); ++i)
      EXPECT_LT(test::rel_err(got.data() + i * V, all.data() + pos[i] * V, V), 1e-6) << i;
  }
}

// Long contexts lose tokens on the left, BOS stays; the result equals scoring the cut request.
TEST(EvalScorer, TruncatesTheContextFromTheLeft) {
  test::TempDir tmp;
  auto m = tiny_checkpoint("baseline", tmp.path + "/ck");
  auto tok = make_byte_tokenizer();
  const i64 Lmax = m->config().max_seq_len;
  std::string ctx(300, 'x');
  for (size_t i = 0; i < ctx.size(); ++i) ctx[i] = char('a' + i % 26);
  ScoreRequest r = make_request(*tok, ctx, " tail");
  Scorer sc(*m, tok->bos_id(), tok->pad_id());
  bool trunc = false;
  auto row = sc.full_row(r, &trunc);
  EXPECT_TRUE(trunc);
  ASSERT_EQ(i64(row.size()), Lmax + 1);  // fed = Lmax tokens
  EXPECT_EQ(row[0], tok->bos_id());
  EXPECT_EQ(tok->decode(std::vector<i32>(row.end() - 5, row.end())), " tail");
  EXPECT_EQ(tok->decode(std::vector<i32>(row.begin() + 1, row.end() - 5)), ctx.substr(300 - (Lmax - 5)));
  ScoreRequest cut = make_request(*tok, ctx.substr(300 - (Lmax - 5)), " tail");
  ScoreStats st;
  auto s = sc.score({r, cut}, ScorerOptions{}, &st);
  EXPECT_TRUE(s[0].truncated);
  EXPECT_FALSE(s[1].truncated);
  EXPECT_EQ(s[0].loglik, s[1].loglik);
  EXPECT_EQ(st.rows, 1);  // the same fed row
  // a continuation longer than the window is scored on its last Lmax tokens after BOS
  std::string big(Lmax + 7, 'y');
  for (size_t i = 0; i < big.size(); ++i) big[i] = char('A' + i % 23);
  ScoreRequest huge = make_request(*tok, "c", big), tail = make_request(*tok, "", big.substr(7));
  auto hs = sc.score({huge, tail}, ScorerOptions{}, &st);
  EXPECT_EQ(hs[0].scored, Lmax);
  EXPECT_EQ(hs[1].scored, Lmax);
  EXPECT_TRUE(hs[0].truncated);  // the context went too
  EXPECT_EQ(st.cut_continuations, 1);
  EXPECT_EQ(hs[0].loglik, hs[1].loglik);
  EXPECT_EQ(sc.full_row(huge), sc.full_row(tail));
}

// The C++ per-continuation log-likelihoods equal the PyTorch reference's (relative error
// < 1e-4) on every fixture task, and the chosen answers and accuracies are the same.
class EvalReference : public ::testing::TestWithParam<std::string> {};

TEST_P(EvalReference, LogLikelihoodsChoicesAndAccuraciesMatchPyTorch) {
  const std::string arch = GetParam();
  test::TempDir tmp;
  auto m = tiny_checkpoint(arch, tmp.path + "/ck");
  if (!test::torch_available()) GTEST_SKIP() << "PyTorch reference not available";
  write_bench(tmp.path + "/bench");
  auto tok = make_byte_tokenizer();
  Scorer sc(*m, tok->bos_id(), tok->pad_id());
  std::vector<TaskData> tasks;
  std::vector<std::vector<Score>> scores;
  std::ofstream rf(tmp.path + "/requests.txt");
  for (const TaskSpec& s : fixture_specs()) {
    tasks.push_back(read_task(s, tmp.path + "/bench"));
    auto reqs = task_requests(tasks.back(), *tok);
    ScorerOptions o;
    o.batch_tokens = 512;
    scores.push_back(sc.score(reqs, o));
    for (auto& r : reqs) {
      rf << r.continuation.size();
      for (i32 t : sc.full_row(r)) rf << " " << t;
      rf << "\n";
    }
  }
  // One request whose continuation is the model's own greedy choice, so that greedy = true is
  // compared as well: three argmax steps after a context.
  ScoreRequest g{tok->encode("The cat sat"), {}};
  std::vector<i32> fed = {tok->bos_id()};
  fed.insert(fed.end(), g.context.begin(), g.context.end());
  for (int step = 0; step < 3; ++step) {
    const i64 L = fed.size(), V = m->config().vocab_size;
    std::vector<float> lg(L * V);
    m->logits(fed.data(), 1, L, lg.data());
    fed.push_back(i32(std::max_element(&lg[(L - 1) * V], &lg[L * V]) - &lg[(L - 1) * V]));
    g.continuation.push_back(fed.back());
  }
  Score g_score = sc.score({g}, ScorerOptions{})[0];
  EXPECT_TRUE(g_score.greedy);
  rf << g.continuation.size();
  for (i32 t : sc.full_row(g)) rf << " " << t;
  rf << "\n";
  rf.close();
  std::string cmd = std::string("/usr/bin/python3 ") + DLCM_SOURCE_DIR + "/python/score_reference.py --ckpt " +
                    tmp.path + "/ck --requests " + tmp.path + "/requests.txt --out " + tmp.path + "/ref.json 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  json ref = json::parse(std::ifstream(tmp.path + "/ref.json"));
  size_t k = 0;
  double worst = 0;
  for (size_t t = 0; t < tasks.size(); ++t) {
    SCOPED_TRACE(tasks[t].spec.name);
    std::vector<Score> want(scores[t].size());
    for (size_t i = 0; i < want.size(); ++i, ++k) {
      want[i].loglik = ref["loglik"][k].get<double>();
      want[i].greedy = ref["greedy"][k].get<bool>();
      if (!ref["margin"][k].is_null()) {  // a boundary decision this close to tau could flip
        ASSERT_GT(ref["margin"][k].get<double>(), 1e-4) << "request " << k << ": choose another seed";
      }
      double e = std::abs(scores[t][i].loglik - want[i].loglik) / std::max(std::abs(want[i].loglik), 1e-6);
      worst = test::worse(worst, e);
      EXPECT_LT(e, 1e-4) << "request " << i << ": " << scores[t][i].loglik << " vs " << want[i].loglik;
      EXPECT_EQ(scores[t][i].greedy, want[i].greedy) << i;
    }
    TaskResult got = task_metrics(tasks[t], scores[t], true), exp = task_metrics(tasks[t], want, true);
    // Log-likelihoods agree to 1e-4 relative, so choices must agree wherever the reference's
    // best leads the runner-up by more than twice that.
    auto clear_gap = [](std::vector<double> v) {
      std::sort(v.rbegin(), v.rend());
      return v.size() < 2 || v[0] - v[1] > 2e-4 * std::abs(v[0]);
    };
    for (size_t i = 0; i < exp.items.size(); ++i) {
      const Item& it = tasks[t].items[i];
      std::vector<double> ll = exp.items[i].loglik, norm = ll;
      for (size_t j = 0; j < norm.size() && it.choices.size() == norm.size(); ++j)
        norm[j] /= double(utf8_length(it.choices[j]));
      ASSERT_TRUE(clear_gap(ll) && clear_gap(norm)) << "near tie in item " << i << ": choose another seed";
      EXPECT_EQ(got.items[i].pred, exp.items[i].pred) << i;
      EXPECT_EQ(got.items[i].pred_norm, exp.items[i].pred_norm) << i;
    }
    EXPECT_EQ(got.acc, exp.acc);
    if (std::isfinite(exp.acc_norm)) {
      EXPECT_EQ(got.acc_norm, exp.acc_norm);
    }
    if (std::isfinite(exp.perplexity)) {
      EXPECT_NEAR(got.perplexity, exp.perplexity, 1e-4 * exp.perplexity);
    }
  }
  ASSERT_EQ(k + 1, ref["loglik"].size());
  EXPECT_TRUE(ref["greedy"][k].get<bool>());
  EXPECT_NEAR(g_score.loglik, ref["loglik"][k].get<double>(), 1e-4 * std::abs(g_score.loglik));
  std::printf("[%s] worst relative error of %zu continuation log-likelihoods vs PyTorch: %.2e\n",
              arch.c_str(), k, worst);
}

INSTANTIATE_TEST_SUITE_P(Arch, EvalReference, ::testing::Values("baseline", "dlcm"),
                         [](const auto& i) { return i.param; });

TEST(EvalTasks, ResolvesNamesInlineSpecsAndTaskFiles) {
  test::TempDir tmp;
  EXPECT_EQ(resolve_tasks("all").size(), builtin_tasks().size());
  auto s = resolve_tasks(" copa , obqa=query_choices_gold:obqa.jsonl");
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[1].name, "obqa");
  EXPECT_EQ(s[1].context_suffix, "\nAnswer:");
  EXPECT_EQ(resolve_tasks("p=piqa:x/my.jsonl")[0].labels, "x/my-labels.lst");
  EXPECT_EQ(resolve_tasks("p=piqa:x/my.lines")[0].labels, "x/my.lines-labels.lst");  // not .jsonl
  std::ofstream(tmp.path + "/t.json")
      << R"([{"name": "mycopa", "layout": "query_choices_gold", "path": "c.jsonl", "context_suffix": "", "delimiter": "\n"}])";
  auto f = resolve_tasks("mycopa,lambada", tmp.path + "/t.json");
  ASSERT_EQ(f.size(), 2u);
  EXPECT_EQ(f[0].context_suffix, "");
  EXPECT_EQ(f[0].delimiter, "\n");
  EXPECT_NE(error_of([] { resolve_tasks("hellaswag,nosuch"); }).find("unknown task 'nosuch'"), std::string::npos);
  EXPECT_NE(error_of([] { resolve_tasks("copa,copa"); }).find("listed twice"), std::string::npos);
  EXPECT_NE(error_of([] { resolve_tasks("x=csv:a.csv"); }).find("unknown task layout 'csv'"), std::string::npos);
  EXPECT_NE(error_of([] { resolve_tasks("x=a.csv"); }).find("expected name=layout:path"), std::string::npos);
  std::ofstream(tmp.path + "/bad.json") << R"([{"name": "x", "layout": "piqa", "path": "p", "lables": "l"}])";
  EXPECT_NE(error_of([&] { resolve_tasks("x", tmp.path + "/bad.json"); }).find("unknown field \"lables\""),
            std::string::npos);
}

// Malformed files: one-line errors naming the file and line; a missing file stops only its task.
TEST(EvalTasks, BadFilesGiveErrorsNamingFileAndLine) {
  test::TempDir tmp;
  const std::string d = tmp.path;
  auto err = [&](const std::string& spec, const std::string& file, const std::string& text) {
    std::ofstream(d + "/" + file) << text;
    return error_of([&] { read_task(resolve_tasks(spec)[0], d); });
  };
  struct Case {
    std::string spec, file, text, expect;
  } cases[] = {
      {"q=query_choices_gold:q.jsonl", "q.jsonl", "{\"query\": \"a\", \"choices\": [\"x\", \"y\"], \"gold\": 0}\n{oops\n", "q.jsonl:2: invalid JSON"},
      {"q=query_choices_gold:q.jsonl", "q.jsonl", "{\"query\": \"a\", \"gold\": 0}\n", "q.jsonl:1: missing field \"choices\""},
      {"q=query_choices_gold:q.jsonl", "q.jsonl", "{\"query\": \"a\", \"choices\": [\"x\", \"y\"], \"gold\": 2}\n", "q.jsonl:1: gold index 2 is outside [0, 2)"},
      {"q=query_choices_gold:q.jsonl", "q.jsonl", "{\"query\": \"a\", \"choices\": [\"x\", \" \"], \"gold\": 0}\n", "q.jsonl:1: choice 1 is empty"},
      {"h=hellaswag:h.txt", "h.txt", "ctx\n1\na\nb\nc\n", "h.txt: 5 lines is not a multiple of 6"},
      {"h=hellaswag:h.txt", "h.txt", "ctx\n7\na\nb\nc\nd\n", "h.txt:2: expected the gold index 0-3"},
      {"w=winogrande:w.jsonl", "w.jsonl", "{\"sentence\": \"no blank\", \"option1\": \"a\", \"option2\": \"b\", \"answer\": \"1\"}\n", "w.jsonl:1: \"sentence\" has no \"_\""},
      {"w=winogrande:w.jsonl", "w.jsonl", "{\"sentence\": \"a _ b\", \"option1\": \"a\", \"option2\": \"b\", \"answer\": \"3\"}\n", "w.jsonl:1: \"answer\" must be"},
      {"c=context_options:c.jsonl", "c.jsonl", "{\"context_options\": [\"a\"], \"continuation\": \"b\", \"gold\": 0}\n", "c.jsonl:1: field \"context_options\" must be an array of at least 2"},
      {"l=context_continuation:l.jsonl", "l.jsonl", "{\"context\": 3, \"continuation\": \"b\"}\n", "l.jsonl:1: field \"context\" must be a string"},
      {"m=mmlu_csv:m.csv", "m.csv", "q,a,b,c\n", "m.csv:1: expected the header question"},
      {"m=mmlu_csv:m.csv", "m.csv", "question,c0,c1,answer\nq,a,b\n", "m.csv:2: 3 fields, the header has 4"},
      {"m=mmlu_csv:m.csv", "m.csv", "question,c0,c1,answer\nq,a,b,7\n", "m.csv:2: gold index 7"},
      {"m=mmlu_csv:m.csv", "m.csv", "question,c0,c1,answer\n\"q,a,b,1\n", "m.csv:2: unterminated quoted field"},
      {"m=mmlu_csv:m.csv", "m.csv", "question,c0,c1,answer\n", "no items"},
  };
  for (auto& c : cases) EXPECT_NE(err(c.spec, c.file, c.text).find(c.expect), std::string::npos) << c.expect << " <- " << err(c.spec, c.file, c.text);
  std::ofstream(d + "/p.jsonl") << R"({"goal": "g", "sol1": "a", "sol2": "b"})" "\n" << R"({"goal": "g", "sol1": "a", "sol2": "b"})" "\n";
  std::ofstream(d + "/p-labels.lst") << "1\n";
  EXPECT_NE(error_of([&] { read_task(resolve_tasks("p=piqa:p.jsonl")[0], d); }).find("p-labels.lst: has 1 labels"), std::string::npos);
  // a missing file or folder: the task reports it, another task still runs
  BigramModel m(260, 128);
  auto tok = make_byte_tokenizer();
  EvalOptions o;
  o.bench_dir = d;
  TaskResult miss = run_task(m, *tok, resolve_tasks("hellaswag")[0], o);
  EXPECT_FALSE(miss.ok());
  EXPECT_NE(miss.error.find("file not found: " + d + "/hellaswag_val.txt"), std::string::npos) << miss.error;
  std::ofstream(d + "/copa.jsonl") << R"({"query": "q, because", "choices": ["a", "b"], "gold": 0})" "\n";
  EXPECT_TRUE(run_task(m, *tok, resolve_tasks("copa")[0], o).ok());
  o.bench_dir = d + "/nonexistent";
  TaskResult nodir = run_task(m, *tok, resolve_tasks("copa")[0], o);
  EXPECT_NE(nodir.error.find("benchmark folder not found: " + d + "/nonexistent"), std::string::npos) << nodir.error;
  std::string table = markdown_table({miss, run_task(m, *tok, resolve_tasks("copa")[0], EvalOptions{d})});
  EXPECT_NE(table.find("| copa | 1 |"), std::string::npos) << table;
  EXPECT_NE(table.find("- hellaswag: not run: "), std::string::npos) << table;
}

// The CLI: all tasks of the fixture folder, a JSON report and a markdown table; a missing file
// is reported and the others run (exit status 1); no task and no data is an error.
TEST(EvalCli, RunsTasksReportsMissingFilesAndWritesReport) {
  test::TempDir tmp;
  ASSERT_TRUE(tiny_checkpoint("baseline", tmp.path + "/ck"));
  write_bench(tmp.path + "/bench");
  std::string base = "eval --ckpt " + tmp.path + "/ck --bench-dir " + tmp.path + "/bench ";
  test::CmdResult r = test::run_dlcm(base + "--tasks all,wsc=context_options:wsc.jsonl --out " + tmp.path +
                        "/r.json --markdown " + tmp.path + "/t.md");
  ASSERT_EQ(r.rc, 0) << r.out;
  json j = json::parse(std::ifstream(tmp.path + "/r.json"));
  EXPECT_EQ(j["arch"], "baseline");
  EXPECT_TRUE(j.contains("seconds") && j["seconds"].is_number()) << j.dump();  // the whole run's
  ASSERT_EQ(j["tasks"].size(), 9u);
  for (auto& [name, t] : j["tasks"].items()) {
    EXPECT_TRUE(t.contains("acc")) << name << ": " << t.dump();
    EXPECT_GE(t["acc"].get<double>(), 0.0);
    EXPECT_GT(t["chance"].get<double>() + (name == "lambada_openai"), 0.0) << name;
    EXPECT_TRUE(t.contains("acc_stderr") && t.contains("n") && t.contains("seconds")) << name;
  }
  EXPECT_EQ(j["tasks"]["mmlu"]["subjects"].size(), 2u);
  EXPECT_TRUE(j["tasks"]["lambada_openai"].contains("perplexity"));
  EXPECT_TRUE(j["tasks"]["hellaswag"].contains("acc_norm"));
  std::stringstream md;
  md << std::ifstream(tmp.path + "/t.md").rdbuf();
  EXPECT_NE(md.str().find("| hellaswag | 2 |"), std::string::npos) << md.str();
  EXPECT_NE(r.out.find("| task | items | acc |"), std::string::npos) << r.out;  // on the terminal

  fs::remove(tmp.path + "/bench/boolq.jsonl");
  r = test::run_dlcm(base + "--tasks boolq,copa --out " + tmp.path + "/r2.json");
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find("boolq: not run: file not found"), std::string::npos) << r.out;
  j = json::parse(std::ifstream(tmp.path + "/r2.json"));
  EXPECT_TRUE(j["tasks"]["boolq"].contains("error"));
  EXPECT_EQ(j["tasks"]["copa"]["n"], 2);

  r = test::run_dlcm("eval --ckpt " + tmp.path + "/ck");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("dlcm: error: eval: give --data DIR"), std::string::npos) << r.out;
  r = test::run_dlcm(base + "--tasks copa,bogus");
  EXPECT_NE(r.out.find("dlcm: error: --tasks: unknown task 'bogus'"), std::string::npos) << r.out;
}

// The real benchmark files (../shared/bench), when present: item counts and first prompts.
TEST(EvalTasks, ReadsTheRealBenchmarkFiles) {
  std::string dir = std::getenv("DLCM_BENCH_DIR") ? std::getenv("DLCM_BENCH_DIR")
                                                  : std::string(DLCM_SOURCE_DIR) + "/../shared/bench";
  if (!fs::is_directory(dir)) GTEST_SKIP() << "no benchmark folder at " << dir << " (set DLCM_BENCH_DIR)";
  std::map<std::string, size_t> n = {{"hellaswag", 10042}, {"piqa", 1838}, {"arc_easy", 2376},
                                     {"boolq", 3270},      {"winogrande", 1267}, {"copa", 100},
                                     {"lambada_openai", 5153},    {"mmlu", 285}};
  auto tok = make_byte_tokenizer();
  for (const TaskSpec& s : builtin_tasks()) {
    SCOPED_TRACE(s.name);
    TaskData d = read_task(s, dir);
    EXPECT_EQ(d.items.size(), n.at(s.name));
    auto r = task_requests(TaskData{d.spec, d.kind, {d.items[0]}, d.groups, d.files}, *tok);
    ASSERT_FALSE(r.empty());
    std::string ctx = tok->decode(r[0].context), cont = tok->decode(r[0].continuation);
    if (s.name == "hellaswag") {
      EXPECT_EQ(ctx, "Roof shingle removal: A man is sitting on a roof. he");
    }
    if (s.name == "piqa") {
      EXPECT_EQ(ctx, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:");
    }
    if (s.name == "winogrande") {
      EXPECT_EQ(ctx + cont, "Sarah was a much better surgeon than Maria so Sarah always got the easier cases.");
    }
    if (s.name == "lambada_openai") {
      EXPECT_EQ(cont, " signs");
    }
    if (s.name == "mmlu") {
      EXPECT_EQ(d.groups.size(), 57u);
    }
    EXPECT_EQ(cont[0], ' ');
  }
}

// `eval --concept-usage`: the diagnostics under "concept_usage" in the report, on the whole
// validation split by default (its token count equals val_tokens) or on --batches N of it (or
// --limit N's);
// "applicable": false for the baseline; --data is required.
TEST(EvalCli, ConceptUsageReport) {
  test::TempDir tmp;
  {
    std::ofstream f(tmp.path + "/corpus.txt");
    Rng r(5);
    const char* words[] = {"the", "concept", "model", "reads", "tokens", "and", "writes", "text"};
    for (int d = 0; d < 200; ++d) {
      const int n = 4 + int(r.next() % 20);
      for (int w = 0; w < n; ++w) f << words[r.next() % 8] << (w + 1 < n ? " " : ".\n");
      f << "\f";  // document separator
    }
  }
  test::CmdResult p = test::run_dlcm("prepare --input " + tmp.path + "/corpus.txt --out " +
                                     tmp.path + "/data --tokenizer bytes --val-fraction 0.2");
  ASSERT_EQ(p.rc, 0) << p.out;
  ASSERT_TRUE(tiny_checkpoint("dlcm", tmp.path + "/ck"));
  const std::string base = "eval --ckpt " + tmp.path + "/ck --data " + tmp.path + "/data ";
  test::CmdResult r = test::run_dlcm(base + "--concept-usage --out " + tmp.path + "/all.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  json j = json::parse(std::ifstream(tmp.path + "/all.json"));
  ASSERT_TRUE(j.contains("concept_usage")) << j.dump();
  const json& u = j["concept_usage"];
  for (const char* k : {"delta_null", "delta_shuffle", "xattn_ratio", "pos_ce", "pos_count",
                        "compression", "tokens", "batches"})
    EXPECT_TRUE(u.contains(k)) << k;
  EXPECT_TRUE(u["full_split"].get<bool>());
  EXPECT_EQ(u["tokens"], j["val_tokens"]);
  EXPECT_NEAR(u["ce"].get<double>(), j["val_loss"].get<double>(), 1e-6);
  EXPECT_GT(u["batches"].get<i64>(), 2);
  EXPECT_NE(r.out.find("validation tokens (full split"), std::string::npos) << r.out;

  r = test::run_dlcm(base + "--concept-usage --batches 2 --out " + tmp.path + "/two.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  j = json::parse(std::ifstream(tmp.path + "/two.json"));
  EXPECT_FALSE(j["concept_usage"]["full_split"].get<bool>());
  EXPECT_EQ(j["concept_usage"]["batches"], 2);
  i64 counted = 0;
  for (auto& c : j["concept_usage"]["pos_count"]) counted += c.get<i64>();
  EXPECT_EQ(j["concept_usage"]["tokens"].get<i64>(), counted);
  // --limit bounds the diagnostics' pass too when --batches is not given (and --batches wins)
  r = test::run_dlcm(base + "--concept-usage --limit 1 --out " + tmp.path + "/one.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  j = json::parse(std::ifstream(tmp.path + "/one.json"));
  EXPECT_EQ(j["concept_usage"]["batches"], 1);
  r = test::run_dlcm(base + "--concept-usage --limit 1 --batches 2 --out " + tmp.path + "/b2.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(json::parse(std::ifstream(tmp.path + "/b2.json"))["concept_usage"]["batches"], 2);

  ASSERT_TRUE(tiny_checkpoint("baseline", tmp.path + "/bk"));
  r = test::run_dlcm("eval --ckpt " + tmp.path + "/bk --data " + tmp.path +
                     "/data --concept-usage --out " + tmp.path + "/b.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  j = json::parse(std::ifstream(tmp.path + "/b.json"));
  EXPECT_FALSE(j["concept_usage"]["applicable"].get<bool>());
  r = test::run_dlcm("eval --ckpt " + tmp.path + "/ck --concept-usage --tasks copa");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--concept-usage: give --data DIR"), std::string::npos) << r.out;
}

// ---- issue 21: lm-eval-shaped reports, samples, few-shot, task names, partial scoring ----

namespace {
std::vector<json> read_jsonl(const std::string& path) {
  std::vector<json> v;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) v.push_back(json::parse(line));
  return v;
}
}  // namespace

// --num-fewshot: K examples from the task's other items (never the item; MMLU: its subject),
// drawn by a fixed seed, formatted as lm-eval formats them (description, examples each followed
// by the fewshot delimiter, then the context); each layout's example is its gold prompt.
TEST(EvalFewShot, DrawsOtherItemsAndFormatsThemAsLmEval) {
  test::TempDir tmp;
  write_bench(tmp.path);
  auto spec = [](const std::string& n) { return resolve_tasks(n)[0]; };
  // arc_easy has 3 items: with k = 2 each item gets exactly the two others, in a seeded order
  TaskData arc = read_task(spec("arc_easy"), tmp.path);
  const std::vector<std::string> ex = {"Question: What do plants need?\nAnswer: light",
                                       "Question: Which is a mammal?\nAnswer: whale",
                                       "Question: Pick a letter.\nAnswer: B"};
  TaskData a2 = arc;
  add_fewshot(a2, 2, 1234);
  for (size_t i = 0; i < 3; ++i) {
    const std::string& f = a2.items[i].fewshot;
    const size_t j = (i + 1) % 3, k = (i + 2) % 3;
    EXPECT_TRUE(f == ex[j] + "\n\n" + ex[k] + "\n\n" || f == ex[k] + "\n\n" + ex[j] + "\n\n") << i << ": " << f;
  }
  auto texts = task_request_texts(a2);
  EXPECT_EQ(texts[0].context, a2.items[0].fewshot + "Question: What do plants need?\nAnswer:");
  EXPECT_EQ(texts[0].continuation, " light");
  // fixed seed: the same draw again; k = 1 draws differ across seeds for some item
  TaskData again = arc;
  add_fewshot(again, 2, 1234);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(again.items[i].fewshot, a2.items[i].fewshot);
  bool differs = false;
  for (uint64_t seed = 1; seed < 20 && !differs; ++seed) {
    TaskData x = arc, y = arc;
    add_fewshot(x, 1, 1234);
    add_fewshot(y, 1, seed);
    for (size_t i = 0; i < 3; ++i) differs = differs || x.items[i].fewshot != y.items[i].fewshot;
  }
  EXPECT_TRUE(differs);
  EXPECT_NE(error_of([&] { TaskData x = arc; add_fewshot(x, 3, 1); }).find("arc_easy: --num-fewshot 3 needs 3 other items"),
            std::string::npos);

  // MMLU: description first, then examples of the same subject (beta_two has 3 items)
  TaskData mm = read_task(spec("mmlu"), tmp.path);
  add_fewshot(mm, 1, 7);
  auto mt = task_request_texts(mm);
  const std::string beta = "The following are multiple choice questions (with answers) about beta two.\n\n";
  const std::string second = "Second?\nA. w\nB. x\nC. y\nD. z\nAnswer: D\n\n",
                    third = "Third?\nA. p\nB. q\nC. r\nD. s\nAnswer: A\n\n";
  EXPECT_TRUE(mm.items[2].fewshot == second || mm.items[2].fewshot == third) << mm.items[2].fewshot;
  EXPECT_EQ(mt[8].context, beta + mm.items[2].fewshot + "A \"quoted\" word\non two lines?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer:");
  EXPECT_EQ(mm.items[0].fewshot, "Which pair, in order, is sorted?\nA. 1, 2\nB. 2, 1\nC. 3, 1\nD. b, a\nAnswer: A\n\n");
  // partial scoring: the example is the gold option's context and the shared continuation
  TaskData wg = read_task(spec("winogrande"), tmp.path);
  add_fewshot(wg, 1, 1);
  EXPECT_EQ(wg.items[0].fewshot, "The trophy did not fit in the suitcase because the trophy was too big.\n\n");
  // greedy: context and target
  TaskData lb = read_task(spec("lambada_openai"), tmp.path);
  add_fewshot(lb, 2, 1);
  EXPECT_NE(lb.items[1].fewshot.find("The cat sat on the mat\n\n"), std::string::npos) << lb.items[1].fewshot;
  // a task file sets the description and the delimiter
  std::ofstream(tmp.path + "/t.json") << R"([{"name": "c2", "layout": "query_choices_gold", "path": "copa.jsonl",
      "context_suffix": "", "description": "Pick.\n", "fewshot_delimiter": "\n###\n", "version": 2}])";
  TaskSpec c2 = resolve_tasks("c2", tmp.path + "/t.json")[0];
  EXPECT_EQ(c2.version, 2);
  TaskData cd = read_task(c2, tmp.path);
  add_fewshot(cd, 1, 1);
  EXPECT_EQ(task_request_texts(cd)[0].context,
            "Pick.\nThe girl ate too much candy, because she was hungry for sweets.\n###\nThe man turned on the faucet, therefore");

  // through run_task: an item's examples do not depend on --limit
  BigramModel m(260, 512);
  auto tok = make_byte_tokenizer();
  EvalOptions o;
  o.bench_dir = tmp.path;
  o.num_fewshot = 2;
  o.log_samples = true;
  TaskResult all = run_task(m, *tok, spec("arc_easy"), o);
  o.limit = 1;
  TaskResult one = run_task(m, *tok, spec("arc_easy"), o);
  ASSERT_TRUE(all.ok() && one.ok()) << all.error << one.error;
  EXPECT_EQ(one.samples[0]["context"], all.samples[0]["context"]);
  EXPECT_EQ(one.num_fewshot, 2);
  EXPECT_EQ(one.n, 1);
  EXPECT_EQ(one.n_original, 3);
}

// --log-samples: one object per request with the strings scored, the log-likelihood (equal to
// the closed form of the bigram model), the greedy flag, gold and the item's results.
TEST(EvalSamples, OneRecordPerRequestWithItsScore) {
  test::TempDir tmp;
  write_bench(tmp.path);
  auto tok = make_byte_tokenizer();
  auto want = expected_items();
  EvalOptions o;
  o.bench_dir = tmp.path;
  o.log_samples = true;
  for (const TaskSpec& s : fixture_specs()) {
    SCOPED_TRACE(s.name);
    BigramModel m(260, 128);
    m.make_greedy("e mat");
    TaskResult r = run_task(m, *tok, s, o);
    ASSERT_TRUE(r.ok()) << r.error;
    EXPECT_TRUE(r.items.empty());  // kept for the samples only
    const auto& exp = want.at(s.name);
    size_t k = 0;
    double acc_sum = 0;
    for (size_t i = 0; i < exp.size(); ++i) {
      const size_t n = std::max(exp[i].ctx.size(), exp[i].cont.size());
      for (size_t j = 0; j < n; ++j, ++k) {
        ASSERT_LT(k, r.samples.size());
        const json& x = r.samples[k];
        EXPECT_EQ(x["task"], s.name);
        EXPECT_EQ(x["doc_id"], i64(i));
        EXPECT_EQ(x["choice"], j);
        EXPECT_EQ(x["gold"], exp[i].gold);
        const std::string c = exp[i].ctx[exp[i].ctx.size() > 1 ? j : 0], t = exp[i].cont[exp[i].cont.size() > 1 ? j : 0];
        EXPECT_EQ(x["context"].get<std::string>() + x["continuation"].get<std::string>(), c + t);
        if (c.size() + t.size() <= 128) {
          auto [ll, greedy] = bigram_loglik(m, c, t);
          EXPECT_NEAR(x["loglik"].get<double>(), ll, 1e-6 * std::abs(ll));
          EXPECT_EQ(x["greedy"].get<bool>(), greedy);
        }
        EXPECT_EQ(x.contains("acc_norm"), s.name != "lambada_openai" && s.name != "winogrande" && s.name != "wsc");
        if (j == 0) acc_sum += x["acc"].get<int>();
      }
    }
    EXPECT_EQ(k, r.samples.size());
    if (s.name != "mmlu") {
      EXPECT_NEAR(r.acc, acc_sum / double(exp.size()), 1e-12);
    }
  }
}

// The report in lm-evaluation-harness's layout beside today's fields, the standard error as
// lm-eval defines it (sample standard deviation / sqrt(n), from the logged samples), the
// samples files, the --limit warning and field, --tasks list and the lambada rename.
TEST(EvalCli, LmEvalLayoutSamplesLimitAndTaskList) {
  test::TempDir tmp;
  ASSERT_TRUE(tiny_checkpoint("baseline", tmp.path + "/ck"));
  write_bench(tmp.path + "/bench");
  const std::string base = "eval --ckpt " + tmp.path + "/ck --bench-dir " + tmp.path + "/bench ";
  test::CmdResult r = test::run_dlcm(base + "--tasks all,wsc=context_options:wsc.jsonl --log-samples --quiet --out " +
                                     tmp.path + "/r.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(r.out.find("partial evaluation"), std::string::npos) << r.out;
  json j = json::parse(std::ifstream(tmp.path + "/r.json"));
  EXPECT_FALSE(j.contains("partial_evaluation"));
  EXPECT_EQ(j["config"]["model"], "dlcm");
  EXPECT_EQ(j["config"]["model_args"], "ckpt=" + tmp.path + "/ck,arch=baseline");
  EXPECT_TRUE(j["config"]["limit"].is_null());
  EXPECT_EQ(j["config"]["batch_size"], "2048 tokens");
  EXPECT_GT(j["date"].get<double>(), 1.7e9);
  // lm-eval's git_hash: the short commit the binary was built from (+ "-dirty").
  const BuildInfo& bi = build_info();
  EXPECT_EQ(j["git_hash"], bi.git_commit.substr(0, 7) + (bi.git_dirty ? "-dirty" : ""));
  for (auto& [name, t] : j["tasks"].items()) {
    SCOPED_TRACE(name);
    const json& e = j["results"][name];
    EXPECT_EQ(e["alias"], name);
    EXPECT_EQ(e["acc,none"], t["acc"]);
    EXPECT_EQ(e["acc_stderr,none"], t["acc_stderr"]);
    EXPECT_EQ(e.contains("acc_norm,none"), t.contains("acc_norm"));
    if (t.contains("acc_norm")) {
      EXPECT_EQ(e["acc_norm,none"], t["acc_norm"]);
      EXPECT_EQ(e["acc_norm_stderr,none"], t["acc_norm_stderr"]);
    }
    EXPECT_EQ(j["n-shot"][name], 0);
    EXPECT_EQ(j["versions"][name], 1.0);
    EXPECT_EQ(j["n-samples"][name]["effective"], t["n"]);
    EXPECT_EQ(j["n-samples"][name]["original"], t["n"]);
    EXPECT_TRUE(j["higher_is_better"][name]["acc"].get<bool>());
    EXPECT_EQ(j["configs"][name]["num_fewshot"], 0);
    // lm-eval's stderr of a mean: sample standard deviation (n - 1) / sqrt(n), from the samples
    const std::string path = tmp.path + "/r_samples_" + name + ".jsonl";
    EXPECT_EQ(t["samples_file"], path);
    auto lines = read_jsonl(path);
    EXPECT_EQ(i64(lines.size()), t["requests"].get<i64>());
    if (name == "mmlu") continue;  // subjects averaged: its own weights (tested above)
    std::vector<double> acc;
    for (auto& l : lines)
      if (l["choice"] == 0) acc.push_back(l["acc"].get<double>());
    const double n = acc.size(), mean = std::accumulate(acc.begin(), acc.end(), 0.0) / n;
    double ss = 0;
    for (double v : acc) ss += (v - mean) * (v - mean);
    EXPECT_NEAR(e["acc,none"].get<double>(), mean, 1e-12);
    EXPECT_NEAR(e["acc_stderr,none"].get<double>(), std::sqrt(ss / (n - 1)) / std::sqrt(n), 1e-12);
  }
  EXPECT_TRUE(j["results"]["lambada_openai"].contains("perplexity,none"));
  EXPECT_TRUE(j["results"]["lambada_openai"]["perplexity_stderr,none"].get<double>() > 0);
  EXPECT_FALSE(j["higher_is_better"]["lambada_openai"]["perplexity"].get<bool>());
  EXPECT_EQ(j["group_subtasks"]["mmlu"], (json{"mmlu_alpha", "mmlu_beta_two"}));
  EXPECT_EQ(j["results"]["mmlu_beta_two"]["alias"], " - beta_two");
  EXPECT_EQ(j["n-samples"]["mmlu_beta_two"]["effective"], 3);
  EXPECT_EQ(j["groups"]["mmlu"]["acc,none"], j["results"]["mmlu"]["acc,none"]);

  // --limit: a warning on stderr and a field in the report; the old name with a note
  r = test::run_dlcm(base + "--tasks lambada,mmlu --limit 1 --num-fewshot 1 --quiet --out " + tmp.path + "/p.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("[eval] warning: --limit 1: a partial evaluation of lambada_openai (1 of 3 items), "
                       "mmlu (2 of 5 items)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[eval] note: --tasks: 'lambada' is now called 'lambada_openai'"), std::string::npos) << r.out;
  j = json::parse(std::ifstream(tmp.path + "/p.json"));
  EXPECT_EQ(j["partial_evaluation"]["limit"], 1);
  EXPECT_EQ(j["config"]["limit"], 1);
  EXPECT_EQ(j["n-shot"]["lambada_openai"], 1);
  EXPECT_EQ(j["n-samples"]["lambada_openai"], (json{{"original", 3}, {"effective", 1}}));
  EXPECT_EQ(j["n-samples"]["mmlu"], (json{{"original", 5}, {"effective", 2}}));
  EXPECT_TRUE(j["tasks"].contains("lambada_openai"));

  // a limit that leaves nothing out is not partial
  r = test::run_dlcm(base + "--tasks copa --limit 2 --quiet --out " + tmp.path + "/c.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(r.out.find("partial evaluation"), std::string::npos) << r.out;
  EXPECT_FALSE(json::parse(std::ifstream(tmp.path + "/c.json")).contains("partial_evaluation"));

  r = test::run_dlcm(base + "--tasks copa --log-samples");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("dlcm: error: --log-samples: give --out FILE.json too"), std::string::npos) << r.out;

  // --tasks list: no checkpoint needed; files under the bench dir, missing ones marked
  fs::remove(tmp.path + "/bench/boolq.jsonl");
  r = test::run_dlcm("eval --tasks list --bench-dir " + tmp.path + "/bench");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("lambada_openai   context_continuation   " + tmp.path + "/bench/lambada_openai.jsonl\n"),
            std::string::npos) << r.out;
  EXPECT_NE(r.out.find(tmp.path + "/bench/boolq.jsonl (missing)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("piqa_valid-labels.lst"), std::string::npos) << r.out;
}

// The generic partial-scoring layout (context_options): WinoGrande written in it scores exactly
// as WinoGrande's own reader, on the fixture and on the real dev split when present; a task
// file registers such a file under a name.
TEST(EvalTasks, WinoGrandeAsContextOptionsScoresIdentically) {
  test::TempDir tmp;
  write_bench(tmp.path);
  std::string dir = std::getenv("DLCM_BENCH_DIR") ? std::getenv("DLCM_BENCH_DIR")
                                                  : std::string(DLCM_SOURCE_DIR) + "/../shared/bench";
  std::vector<std::pair<std::string, i64>> sources = {{tmp.path + "/winogrande_dev.jsonl", -1}};
  if (fs::exists(dir + "/winogrande_dev.jsonl")) sources.push_back({dir + "/winogrande_dev.jsonl", 300});
  auto tok = make_byte_tokenizer();
  for (auto& [src, limit] : sources) {
    SCOPED_TRACE(src);
    // The conversion, written from the official layout's definition: the sentence up to "_"
    // with each option, and the rest of the sentence after "_" (stripped) as the continuation.
    std::ofstream out(tmp.path + "/wg_as_options.jsonl");
    std::ifstream in(src);
    std::string line;
    for (i64 n = 0; std::getline(in, line) && (limit < 0 || n < limit); ++n) {
      json w = json::parse(line);
      const std::string s = w["sentence"];
      const size_t blank = s.find('_');
      std::string rest = s.substr(blank + 1);
      rest.erase(0, rest.find_first_not_of(" "));
      while (!rest.empty() && rest.back() == ' ') rest.pop_back();
      out << json{{"context_options", {s.substr(0, blank) + w["option1"].get<std::string>(),
                                       s.substr(0, blank) + w["option2"].get<std::string>()}},
                  {"continuation", rest},
                  {"gold", w["answer"].get<std::string>() == "1" ? 0 : 1}}.dump()
          << "\n";
    }
    out.close();
    std::ofstream(tmp.path + "/tasks.json") << json::array(
        {{{"name", "wg_options"}, {"layout", "context_options"}, {"path", tmp.path + "/wg_as_options.jsonl"}},
         {{"name", "wg"}, {"layout", "winogrande"}, {"path", src}}}).dump();
    auto specs = resolve_tasks("wg,wg_options", tmp.path + "/tasks.json");
    BigramModel m(260, 512);
    EvalOptions o;
    o.keep_items = true;
    o.limit = limit;
    TaskResult a = run_task(m, *tok, specs[0], o), b = run_task(m, *tok, specs[1], o);
    ASSERT_TRUE(a.ok() && b.ok()) << a.error << b.error;
    EXPECT_EQ(b.kind, TaskKind::Partial);
    ASSERT_EQ(a.n, b.n);
    EXPECT_GT(a.n, 1);
    for (i64 i = 0; i < a.n; ++i) {
      EXPECT_EQ(a.items[i].loglik, b.items[i].loglik) << i;
      EXPECT_EQ(a.items[i].pred, b.items[i].pred) << i;
    }
    EXPECT_EQ(a.acc, b.acc);
    EXPECT_EQ(a.acc_stderr, b.acc_stderr);
    EXPECT_EQ(a.chance, b.chance);
    EXPECT_EQ(a.stats.tokens, b.stats.tokens);
  }
}
