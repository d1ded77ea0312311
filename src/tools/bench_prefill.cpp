// `dlcm bench prefill`: prefill tokens/s of one or several checkpoints measured in one run,
// their repeats interleaved so that a noisy machine slows them alike. Per model: the stream's
// prefill of `batch` copies of a random prompt, or of `batch` texts of a validation split
// (--data; one call), and the full forward pass over the same rows (LanguageModel::logits,
// the training-style batched forward), wall and idle
// estimate (tokens per second of the busiest thread, robust to other processes with
// OMP_WAIT_POLICY=passive); then each model's rates against the first one's, raw and per
// forward FLOP (flops_report at the prompt length, with the DLCM's measured R).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include "core/profiler.h"
#include "core/rng.h"
#include "data/shards.h"
#include "kernels/gemm.h"
#include "kernels/packed_gemm.h"
#include "models/flops.h"
#include "tools/bench_common.h"
#include "tools/commands.h"

namespace dlcm {

namespace {

// The prompts of a run, [batch][prompt_len]: without --data, copies of one random-token prompt
// after BOS; with it, text of the validation split, sequence b from the b-th document start at
// or after --data-at (each prompt its own document, running on into the next if shorter).
// `path`: the split's file, empty without --data.
std::vector<std::vector<i32>> bench_prompts(const BenchPrefillArgs& a, const std::string& path,
                                            const ModelConfig& mc) {
  const i64 B = a.batch, P = a.prompt_len;
  if (path.empty()) {
    std::vector<i32> prompt(P);
    for (i64 t = 0; t < P; ++t)
      prompt[t] = i32(4 + counter_hash(3, t) % uint64_t(mc.vocab_size - 4));
    prompt[0] = mc.bos_id;
    return std::vector<std::vector<i32>>(B, prompt);
  }
  const ShardReader val(path, mc.vocab_size);
  std::vector<std::vector<i32>> out;
  std::string at;
  for (i64 t = a.data_at; i64(out.size()) < B && t + P <= val.size(); ++t) {
    if (val.at(t) != mc.bos_id) continue;
    out.push_back(val.read(t, P));
    if (out.size() <= 8) at += (out.size() > 1 ? ", " : "") + std::to_string(t);
    t += P - 1;  // the next prompt starts at a later document
  }
  DLCM_CHECK(i64(out.size()) == B, "bench prefill: --data ", path, " has ", out.size(),
             " document starts (BOS id ", mc.bos_id, ") from token ", a.data_at, " with ", P,
             " tokens after them, --batch asks for ", B,
             "; lower --batch, --prompt-len or --data-at");
  std::printf("prompts: %s tokens from %s%s\n", path.c_str(), at.c_str(), B > 8 ? ", ..." : "");
  return out;
}

}  // namespace

int cmd_bench_prefill(const BenchPrefillArgs& a) {
  DLCM_CHECK(!a.ckpts.empty(), "bench prefill: give at least one --ckpt");
  const bool by_call = a.products_in_order;
  const bool breakdown = a.breakdown || a.breakdown_gemm || by_call;
  prof::set_detail(a.breakdown_gemm || by_call);
  ops::set_gemm_shape_by_call(by_call);
  const i64 B = a.batch, P = a.prompt_len;
  const std::string val_path = a.data.empty() ? "" : a.data + "/val.bin";
  const ops::PackFormat precision = ops::parse_pack_format(a.precision, "--precision");
  struct Model {
    std::shared_ptr<LanguageModel> m;  // shared by a checkpoint's --prefetch-c entries
    std::unique_ptr<InferenceStream> st;
    std::vector<double> wall, idle, fwd_wall, fwd_idle;
    // model FLOPs per token (SPEC 7: the head at every position), and as the prefill runs them
    // (the head, and the final block's q, attention, wo and FFN, only where logits are asked
    // for: each prompt's last position; W_up, the backbone and the concept list's keys and
    // values for the closed concepts only: a prompt's open concept reaches them when it closes)
    double flops_tok = 0, flops_run = 0, R = 0, closed = 0;
    // --breakdown: per component, CPU seconds (all threads) and wall seconds
    struct Part {
      const char* name;
      double cpu = 0, wall = 0;
    };
    std::vector<Part> parts;
    bench::GemmShapeRows shapes;  // --breakdown-gemm: wall time per product shape
    size_t ckpt = 0;              // index into a.ckpts
    bool prefetch_c = true;       // ops::set_packed_prefetch_c while it runs
    bool last_rows = true;        // StreamOptions::last_rows of its stream
    std::string variant() const {
      return std::string("prefetch-c ") + (prefetch_c ? "on" : "off") +
             ", last-rows " + (last_rows ? "on" : "off");
    }
  };
  // one entry per checkpoint, --prefetch-c value and --last-rows value, in that order
  const bool prefetch_c0 = ops::packed_prefetch_c_on();
  const size_t n_pc = std::max<size_t>(a.prefetch_c.size(), 1);
  const size_t n_lr = std::max<size_t>(a.last_rows.size(), 1);
  const size_t per_ckpt = n_pc * n_lr;
  const bool variants = !a.prefetch_c.empty() || !a.last_rows.empty();
  std::vector<Model> ms(a.ckpts.size() * per_ckpt);
  for (size_t i = 0; i < ms.size(); ++i) {
    const size_t v = i % per_ckpt;
    ms[i].ckpt = i / per_ckpt;
    ms[i].prefetch_c = a.prefetch_c.empty() ? prefetch_c0 : a.prefetch_c[v / n_lr] == "on";
    ms[i].last_rows = a.last_rows.empty() || a.last_rows[v % n_lr] == "on";
  }
  std::vector<std::vector<i32>> prompts;  // [B][P]
  for (size_t i = 0; i < ms.size(); ++i) {
    const std::string& ckpt = a.ckpts[ms[i].ckpt];
    if (i % per_ckpt == 0) {  // a checkpoint's first entry loads it; its other entries share it
      std::string what;
      ms[i].m = load_model_with_tokenizer(ckpt, &what);
      const ModelConfig& mc = ms[i].m->config();
      DLCM_CHECK(P <= mc.max_seq_len, "bench prefill: --prompt-len ", P,
                 " exceeds the max_seq_len ", mc.max_seq_len, " of ", ckpt);
      if (i == 0) prompts = bench_prompts(a, val_path, mc);
      for (const auto& pr : prompts)
        for (i32 t : pr)
          DLCM_CHECK(t < mc.vocab_size, "bench prefill: the checkpoints' vocabularies differ (",
                     ckpt, ")");
    } else {
      ms[i].m = ms[i - 1].m;
    }
    const ModelConfig& mc = ms[i].m->config();
    StreamOptions so;
    so.max_seqs = B;
    so.max_len = P;
    so.precision = precision;
    so.last_rows = ms[i].last_rows;
    ms[i].st = ms[i].m->new_stream(so);
    std::printf("model %zu: %s, %s, %.2fM params, packed weights %.1f MiB%s\n", i, ckpt.c_str(),
                mc.arch.c_str(), ms[i].m->params().total() / 1e6,
                double(ms[i].st->packed_weight_bytes()) / double(1 << 20),
                variants ? (", " + ms[i].variant()).c_str() : "");
  }
  std::printf("prefill: batch %lld, prompt %lld tokens (%s), %s weights, threads %d, %lld repeats "
              "(medians)",
              (long long)B, (long long)P,
              val_path.empty() ? "random tokens" : ("text of " + val_path).c_str(),
              ops::pack_format_name(precision), omp_get_max_threads(), (long long)a.repeats);
  if (a.in_a_row > 1)
    std::printf("; %lld prefills of a model in a row, the first of each run not kept",
                (long long)a.in_a_row);
  std::printf("\n");
  std::vector<PrefillItem> items;
  for (i64 b = 0; b < B; ++b) items.push_back({b, prompts[b].data(), P});
  std::vector<i32> rows(B * P);
  for (i64 b = 0; b < B; ++b) std::copy(prompts[b].begin(), prompts[b].end(), rows.begin() + b * P);
  Buf lg(B * P * ms[0].m->config().vocab_size);
  auto timed = [&](auto&& f, std::vector<double>& wall, std::vector<double>& idle) {
    const auto th0 = bench::thread_cpu_seconds();
    const double s = bench::time_it(f);
    const double busy = bench::busiest_thread_seconds(th0, bench::thread_cpu_seconds());
    wall.push_back(double(B * P) / s);
    idle.push_back(double(B * P) / std::max(busy, 1e-9));
  };
  // --in-a-row K > 1: each repeat runs K prefills of a model back to back and keeps the last
  // K - 1 (their weights warm from the model's own previous prefill); the forward runs after
  const i64 K = a.in_a_row, kept_per_repeat = K > 1 ? K - 1 : 1;
  const i64 kept = a.repeats * kept_per_repeat;
  for (i64 r = -1; r < a.repeats; ++r) {  // r = -1: warm-up, not kept
    for (Model& x : ms) {
      ops::set_packed_prefetch_c(x.prefetch_c);
      lg.resize(B * P * x.m->config().vocab_size);
      for (i64 j = 0; j < K; ++j) {
        const bool keep = r >= 0 && (K == 1 || j >= 1);
        std::vector<double> w, id;
        for (i64 b = 0; b < B; ++b) x.st->reset(b);
        prof::reset();
        prof::enable(breakdown);
        timed([&] { x.st->prefill(items.data(), B, lg.data()); }, w, id);
        prof::enable(false);
        if (!keep) {
          ops::gemm_shape_stats(true);  // warm-ups' products are not kept
          continue;
        }
        if (breakdown)
          for (const prof::Entry& e : prof::entries()) {
            auto it = std::find_if(x.parts.begin(), x.parts.end(),
                                   [&](auto& p) { return std::string(p.name) == e.name; });
            if (it == x.parts.end()) x.parts.push_back({e.name, e.cpu_seconds, e.seconds});
            else it->cpu += e.cpu_seconds, it->wall += e.seconds;
          }
        bench::take_gemm_shape_stats(x.shapes);
        x.wall.push_back(w[0]);
        x.idle.push_back(id[0]);
      }
      std::vector<double> fw, fi;
      timed([&] { x.m->logits(rows.data(), B, P, lg.data()); }, fw, fi);
      if (r < 0) continue;
      x.fwd_wall.push_back(fw[0]);
      x.fwd_idle.push_back(fi[0]);
    }
  }
  ops::set_packed_prefetch_c(prefetch_c0);
  ops::set_gemm_shape_by_call(false);
  std::printf("%-6s %10s %8s %12s %8s %12s %12s %12s %8s %12s\n", "model", "R", "closed",
              "MFLOP/token", "as run", "prefill", "prefill idle", "forward", "fwd idle",
              "prefill/fwd");
  for (size_t i = 0; i < ms.size(); ++i) {
    Model& x = ms[i];
    if (x.st->has_concepts()) {  // over all sequences (their prompts differ with --data)
      i64 tokens = 0, concepts = 0, n_closed = 0;
      for (i64 b = 0; b < B; ++b) {
        const StreamCounters c = x.st->counters(b);
        tokens += c.tokens;
        concepts += c.concepts;
        n_closed += c.concepts_closed;
      }
      x.R = double(tokens) / double(std::max<i64>(concepts, 1));
      x.closed = double(n_closed) / double(B);  // per prompt
    }
    const FlopsReport fr = flops_report(x.m->config(), P, x.R);
    x.flops_tok = fr.total();
    x.flops_run = prefill_flops_as_run(x.m->config(), P, x.closed, x.last_rows);
    std::printf("%-6zu %10.2f %8.1f %12.2f %8.2f %12.1f %12.1f %12.1f %8.1f %12.2f\n", i, x.R,
                x.closed, x.flops_tok / 1e6, x.flops_run / 1e6, bench::median(x.wall),
                bench::median(x.idle), bench::median(x.fwd_wall), bench::median(x.fwd_idle),
                bench::median(x.wall) / bench::median(x.fwd_wall));
  }
  for (size_t i = 0; i < ms.size() && breakdown; ++i) {
    // CPU time is robust to a loaded host when idle threads sleep (OMP_WAIT_POLICY=passive);
    // wall time shows where threads wait (spinning threads count as CPU time too)
    for (const bool cpu : {true, false}) {
      double total = 0;
      for (auto& p : ms[i].parts) total += cpu ? p.cpu : p.wall;
      std::printf("model %zu prefill breakdown (%s ms per prefill):", i,
                  cpu ? "CPU, all threads," : "wall");
      for (auto& p : ms[i].parts)
        if (p.cpu > 0 || p.wall > 0)
          std::printf("  %s %.2f", p.name, 1e3 * (cpu ? p.cpu : p.wall) / double(kept));
      std::printf("  (total %.2f)\n", 1e3 * total / double(kept));
    }
    if (ms[i].shapes.empty()) continue;
    std::printf("model %zu products per prefill%s (wall ms of the calls, GFLOP/s, implementation):\n",
                i, by_call ? ", in call order" : "");
    for (auto& [key, sh] : ms[i].shapes)
      std::printf("  %s  calls %5.1f  %8.3f ms  %7.1f GFLOP/s  %s\n", key.c_str(),
                  double(sh.calls) / double(kept), 1e3 * sh.sec / double(kept),
                  sh.flops / std::max(sh.sec, 1e-12) / 1e9, sh.impl.c_str());
  }
  // per-repeat ratios against a reference model (same repeat, so the same load), then their
  // median
  auto per_repeat = [&](size_t i, size_t ref, std::vector<double> Model::*rate) {
    const std::vector<double>& a = ms[i].*rate;
    const std::vector<double>& b = ms[ref].*rate;
    std::vector<double> v;
    for (size_t r = 0; r < a.size(); ++r) v.push_back(a[r] / b[r]);
    return v;
  };
  for (size_t i = 1; i < ms.size(); ++i) {
    // across checkpoints: against model 0, or with several --prefetch-c / --last-rows values
    // against the first checkpoint's entry of the same values
    const size_t ref = i % per_ckpt;
    if (i == ref) continue;
    const std::vector<double> rw = per_repeat(i, ref, &Model::wall);
    const double w = bench::median(rw), id = bench::median(per_repeat(i, ref, &Model::idle));
    const double f = ms[i].flops_tok / ms[ref].flops_tok, fr = ms[i].flops_run / ms[ref].flops_run;
    std::printf("model %zu / model %zu prefill tokens/s: %.2fx wall, %.2fx idle; at matched FLOPs "
                "as run (head%s once per prompt, x %.3f FLOP/token ratio): %.2fx wall, %.2fx idle; "
                "by the model count (head at every position, x %.3f): %.2fx wall, %.2fx idle\n",
                i, ref, w, id, ms[i].last_rows ? " and final block's tail" : "", fr, w * fr,
                id * fr, f, w * f, id * f);
    // how the repeats spread: a median near 1 is "parity" only if they straddle it
    const auto above = std::count_if(rw.begin(), rw.end(), [&](double x) { return x * fr > 1.0; });
    std::printf("  its repeats at matched FLOPs as run (wall): quartiles %.3fx-%.3fx, above 1.0x "
                "in %td of %zu\n",
                bench::quantile(rw, 0.25) * fr, bench::quantile(rw, 0.75) * fr, above, rw.size());
  }
  for (size_t i = 0; i < ms.size() && per_ckpt > 1; ++i) {
    const size_t ref = i - i % per_ckpt;  // the same checkpoint's first entry
    if (i == ref) continue;
    const double w = bench::median(per_repeat(i, ref, &Model::wall));
    const double id = bench::median(per_repeat(i, ref, &Model::idle));
    std::printf("model %zu / model %zu prefill tokens/s (checkpoint %zu, %s / %s): "
                "%.2fx wall, %.2fx idle\n",
                i, ref, ms[i].ckpt, ms[i].variant().c_str(), ms[ref].variant().c_str(), w, id);
  }
  return 0;
}

}  // namespace dlcm
