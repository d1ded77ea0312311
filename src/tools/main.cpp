// dlcm command-line tool: a thin shell over the library. Every failure prints one line
// naming the file, field or flag at fault, and exits non-zero.
#include <CLI/CLI.hpp>
#include <omp.h>

#include <cstdio>
#include <exception>

#include "core/common.h"
#include "core/dist.h"
#include "data/provenance.h"
#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "tools/cli_help.h"
#include "tools/commands.h"

int main(int argc, char** argv) {
  using namespace dlcm;
  set_command_line(argc, argv);  // provenance of checkpoints and reports
  try {  // DLCM_ISA, DLCM_GEMM, DLCM_SGEMM_OWN, DLCM_BF16_UNITS read up front: a bad value fails
         // every command (--version too) with one line
    ops::read_kernel_settings();
  } catch (const dlcm::Error& e) {
    std::fprintf(stderr, "dlcm: error: %s\n", e.what());
    return 2;
  }
  CLI::App app{"dlcm: train, evaluate and run Dynamic Large Concept Models and LLaMA-style baselines"};
  app.require_subcommand(1);
  app.set_version_flag("--version", [] { return version_text(); }, "version, git commit, build flags and ISA");
  app.option_defaults()->always_capture_default();  // every --help shows the defaults
  // --threads on every command that computes: OpenMP threads of this process (0 = default).
  i64 threads = 0;
  auto add_threads = [&](CLI::App* c) {
    c->add_option("--threads", threads, "OpenMP threads (0 = the OpenMP default or OMP_NUM_THREADS)")
        ->check(CLI::Range(0, 4096));
  };

  TrainArgs ta;
  auto* train = app.add_subcommand("train", "train a model from a config on prepared data");
  train->add_option("--config", ta.config, "model/training config JSON (e.g. configs/baseline-small.json); "
                    "optional with --resume (the run's own checkpoint/config.json) or --init-from");
  train->add_option("--data", ta.data, "folder written by 'dlcm prepare'")->required();
  train->add_option("--out", ta.out, "run folder: train_log.jsonl and checkpoint/")->required();
  train->add_option("--steps", ta.steps, "optimizer steps (overrides train.steps)")
      ->check(CLI::Range(i64(0), i64(1) << 40));
  train->add_option("--set", ta.sets, "override a config key: key=value (repeatable; with --resume only keys "
                    "that may change on resume, docs/config.md)");
  train->add_option("--keep", ta.keep, "also keep the last N checkpoints as checkpoint-step-STEP/ "
                    "(-1: as the resumed run, else none)")->check(CLI::Range(-1, 1 << 20));
  train->add_flag("--keep-best", ta.keep_best, "keep the checkpoint of the lowest logged validation loss as checkpoint-best/");
  train->add_flag("--resume", ta.resume, "continue the run in --out from its checkpoint");
  train->add_flag("--overwrite", ta.overwrite, "start over in an --out that already holds a run (replaces its checkpoint and log)");
  train->add_option("--init-from", ta.init_from, "start from the weights of this checkpoint (fresh optimizer; same architecture; without --config its config is used)");
  train->add_flag("--quiet", ta.quiet, "no progress output");
  train->add_flag("--concept-usage", ta.concept_usage,
                  "dlcm: concept-usage diagnostics on the eval batches at every logged eval (docs/dlcm.md)");
  bool no_final_eval = false;
  train->add_flag("--no-final-eval", no_final_eval, "skip the full validation pass at the end (logged evals still run)");
  add_threads(train);

  ForwardArgs fa;
  auto* fwd = app.add_subcommand("forward", "write logits (and dlcm p, b) for token rows");
  fwd->add_option("--ckpt", fa.ckpt, "checkpoint or run folder")->required();
  fwd->add_option("--tokens", fa.tokens, "text file: one row of space-separated token ids per line")->required();
  fwd->add_option("--out", fa.out, "output .safetensors")->required();
  add_threads(fwd);

  GenerateArgs ga;
  auto* gen = app.add_subcommand("generate", "generate text from prompts (streams one prompt to stdout)");
  gen->add_option("--ckpt", ga.ckpt, "checkpoint or run folder")->required();
  gen->add_option("--prompt", ga.prompt, "prompt text");
  gen->add_option("--prompt-file", ga.prompt_file, "prompts, one per line (blank lines skipped), decoded together; - reads stdin");
  gen->add_option("--max-new-tokens", ga.max_new_tokens, "tokens to generate per prompt")->check(CLI::Range(1, 1 << 20));
  gen->add_option("--temperature", ga.temperature, "0 = greedy")->check(CLI::Range(0.0, 100.0));
  gen->add_option("--top-k", ga.top_k, "keep the k most likely tokens (0 = all)")->check(CLI::Range(0, 1 << 24));
  gen->add_option("--top-p", ga.top_p, "nucleus sampling mass (1 = off)")->check(CLI::Range(0.0, 1.0));
  gen->add_option("--seed", ga.seed, "sampling seed (same seed, same text)");
  gen->add_option("--stop", ga.stops, "stop before this string (repeatable)");
  gen->add_option("--batch", ga.batch, "prompts decoded together")->check(CLI::Range(1, 4096));
  gen->add_option("--precision", ga.precision, "weights of the decode: fp32, or weight-only bf16 or int8 copies (per-column scales; FP32 activations and accumulation)");
  gen->add_option("--tau", ga.tau, "dlcm boundary threshold (default: the checkpoint's router.tau)");
  gen->add_flag("--show-concepts", ga.show_concepts, "print each generated token's boundary probability and concept index (dlcm)");
  gen->add_flag("--ignore-eos", ga.ignore_eos, "keep generating after the end-of-sequence token");
  gen->add_flag("--quiet", ga.quiet, "no summary line on stderr");
  gen->add_flag("--ids", ga.ids, "print token ids instead of text: one line per prompt, 'PROMPT_IDS -> COMPLETION_IDS' (BOS included)");
  gen->add_flag("--json", ga.json, "one JSON object per completion on stdout (prompt, text, tokens, stop reason)");
  add_threads(gen);

  SegmentArgs sa;
  auto* seg = app.add_subcommand("segment", "show a dlcm's concept boundaries on text (terminal colours, --html page)");
  seg->add_option("--ckpt", sa.ckpt, "dlcm checkpoint or run folder")->required();
  seg->add_option("--text", sa.texts, "text to segment (repeatable: one text each)");
  seg->add_option("--file", sa.files, "file whose contents is one text (repeatable)");
  seg->add_option("--tau", sa.tau, "boundary threshold (default: the checkpoint's router.tau)");
  seg->add_option("--target-R", sa.target_R, "find the tau giving this many tokens per concept on the text")->check(CLI::PositiveNumber);
  seg->add_option("--html", sa.html, "write a self-contained HTML page here");
  seg->add_flag("--no-color", sa.no_color, "no ANSI colours (concepts separated by '|')");
  add_threads(seg);

  ExportArgs xp;
  auto* exp = app.add_subcommand("export", "write a checkpoint in another tool's format (--format hf: transformers LlamaForCausalLM, or remote code for a DLCM; gguf: llama.cpp)");
  exp->add_option("--ckpt", xp.ckpt, "checkpoint or run folder")->required();
  exp->add_option("--format", xp.format, "hf or gguf")->required();
  exp->add_option("--out", xp.out, "output folder (hf) or file (gguf), written atomically")->required();
  exp->add_option("--dtype", xp.dtype, "weights on disk: f32, bf16 or f16 (default f32); gguf also q8_0");
  exp->add_option("--shard-size", xp.shard_size, "largest weights file, e.g. 500MB or 2GiB (default 5GB)");
  exp->add_flag("--force", xp.force, "replace an existing --out");
  ImportArgs ia;
  auto* imp = app.add_subcommand("import", "make a checkpoint from another tool's model folder (--format hf: LlamaForCausalLM)");
  imp->add_option("--format", ia.format, "hf")->required();
  imp->add_option("--in", ia.in, "model folder (config.json, safetensors weights)")->required();
  imp->add_option("--out", ia.out, "checkpoint folder to write")->required();
  imp->add_flag("--force", ia.force, "replace an existing --out checkpoint");

  ConfigArgs cf;
  auto* conf = app.add_subcommand("config", "print the resolved config JSON, or list every key (--keys)");
  conf->add_option("--config", cf.config, "config JSON (default: the built-in defaults)");
  conf->add_option("--set", cf.sets, "override a config key: key=value (repeatable)");
  conf->add_flag("--keys", cf.keys, "list every key: type, default, allowed range, meaning");
  conf->add_flag("--markdown", cf.markdown, "with --keys: the Markdown table of docs/config.md");

  FlopsArgs la;
  auto* flops = app.add_subcommand("flops", "forward FLOPs per token per component (SPEC 7)");
  flops->add_option("--config", la.config, "config JSON")->required();
  flops->add_option("--seq-len", la.seq_len, "sequence length (default: train.seq_len)")->check(CLI::PositiveNumber);
  flops->add_option("--R", la.R, "tokens per concept (dlcm; default target_R)");
  flops->add_option("--set", la.sets, "override a config key: key=value");
  flops->add_flag("--json", la.json, "print the report as JSON");

  PlanArgs pl;
  auto* plan = app.add_subcommand("plan", "propose a dlcm config matching a baseline's inference FLOPs per token");
  plan->add_option("--match", pl.match, "baseline config JSON")->required();
  plan->add_option("--R", pl.R, "tokens per concept (target_R)")->required()->check(CLI::Range(1.0001, 1e6));
  plan->add_option("--P", pl.P, "backbone share of non-embedding parameters")->required()->check(CLI::Range(0.0, 1.0));
  plan->add_option("--d-concept", pl.d_concept, "fix the concept width (default: search)");
  plan->add_option("--d-token", pl.d_token, "fix the token width (default: the baseline's, else nearby)");
  plan->add_option("--seq-len", pl.seq_len, "sequence length for attention FLOPs (default: train.seq_len)")->check(CLI::PositiveNumber);
  plan->add_option("--flops-tol", pl.flops_tol, "relative FLOPs tolerance (default 0.05)")->check(CLI::Range(1e-6, 1.0));
  plan->add_option("--p-tol", pl.p_tol, "absolute tolerance on P (default 0.03)")->check(CLI::Range(1e-6, 1.0));
  plan->add_option("--set", pl.sets, "override a key of the baseline config: key=value");
  plan->add_option("--out", pl.out, "write the proposed config JSON here");

  BenchTrainArgs ba;
  auto* bench = app.add_subcommand("bench", "benchmarks that print figures");
  bench->require_subcommand(1);
  auto* btrain = bench->add_subcommand("train", "training tokens/s and MFU vs the PyTorch reference");
  btrain->add_option("--config", ba.config, "config JSON (default: the reference baseline of the docs)");
  btrain->add_option("--set", ba.sets, "override a config key: key=value");
  btrain->add_option("--steps", ba.steps, "timed steps per repeat")->check(CLI::Range(1, 1 << 20));
  btrain->add_option("--repeats", ba.repeats, "repeats (median reported)")->check(CLI::Range(1, 1 << 20));
  btrain->add_flag("--no-torch", ba.no_torch, "skip the PyTorch reference");
  btrain->add_flag("--torch-defaults", ba.torch_default, "PyTorch peer with glibc malloc and ATen's default (AVX2) kernels");
  btrain->add_option("--torch", ba.torch,
                     "PyTorch peers, each PY[:autocast][:sdpa][:compile] (default /usr/bin/python3, "
                     "Debian's torch 1.13; torch 2.x: bash scripts/setup_bench.sh, then "
                     ".venv-torch2/bin/python)")->delimiter(',');
  btrain->add_option("--precision", ba.precisions, "fp32 and/or bf16, timed side by side (default: the config's)")
      ->delimiter(',')->check(CLI::IsMember({"fp32", "bf16"}));
  btrain->add_option("--gemm", ba.gemm_paths, "runtime, fixed (oneDNN's paths), tiles (BF16 products on the AMX tile kernel where they fit, the rest fixed), tiles-nochunk (the same, a wide B read whole by every strip of A: no column chunks), tiles-k512 (the same, C through the tiles every 512 k instead of 2048), tiles-whole-a (the same, A packed whole before the products instead of per strip), tiles-plain-stores (the same, whole packs written with ordinary stores instead of non-temporal ones), tiles-plain-outputs (the same, SwiGLU's and the attention's large outputs and gradients written with ordinary stores instead of non-temporal ones), tiles-floats (the same, the producers of BF16 products' inputs writing their floats too where only the products read them), fixed-brgemm-nt (fixed, with the FP32 x W^T products on fixed-shape brgemm too instead of sgemm), onednn (runtime with every FP32 product on oneDNN's sgemm, none on dlcm's blocked one) and/or blocked (runtime with the FP32 weight-gradient products on dlcm's blocked sgemm, the default on Intel CPUs), timed side by side (default: DLCM_GEMM, else fixed on AMX CPUs, runtime elsewhere; DLCM_AMX_GEMM; DLCM_SGEMM_OWN)")
      ->delimiter(',')->check(CLI::IsMember({"runtime", "fixed", "tiles", "tiles-nochunk", "tiles-k512", "tiles-whole-a", "tiles-plain-stores", "tiles-plain-outputs", "tiles-floats", "fixed-brgemm-nt", "onednn", "blocked"}));
  btrain->add_flag("--breakdown", ba.breakdown, "per-component time of a training step");
  btrain->add_flag("--breakdown-gemm", ba.breakdown_gemm,
                   "--breakdown with every GEMM, the BF16 operand rounding, the attention kernel "
                   "and SwiGLU in rows of their own (the components keep the rest: norms, RoPE, "
                   "residual adds)");
  btrain->add_option("--compare", ba.compare,
                     "more models (config JSON files) whose engines run in the same repeats as "
                     "--config's; each prints its MFU minus the first model's, in points (--set "
                     "applies to --config's model only)")
      ->delimiter(',');
  btrain->add_option("--R", ba.R, "dlcm: concepts of 1+Geometric lengths with this mean (default target_R; 0 = sample from the router)");
  add_threads(btrain);

  BenchGemmArgs bg;
  auto* bgemm = bench->add_subcommand("gemm", "GEMM GFLOP/s: runtime-shape vs fixed-shape oneDNN products, FP32 and BF16; FP32 also on oneDNN's sgemm alone and, with --torch, PyTorch's");
  bgemm->add_option("--repeats", bg.repeats, "repeats (median reported)")->check(CLI::Range(1, 1000));
  bgemm->add_option("--seconds", bg.seconds, "seconds per path and repeat")->check(CLI::Range(0.01, 60.0));
  bgemm->add_option("--torch", bg.torch, "FP32 products also through PyTorch's matmul (MKL in the pip wheels) in the same repeats: the interpreter, e.g. .venv-torch2/bin/python (bash scripts/setup_bench.sh)");
  add_threads(bgemm);

  BenchXattnArgs xa;
  bool x_only_fixed = false, x_only_variable = false;
  auto* bxattn = bench->add_subcommand("xattn", "concept cross-attention: masked vs replicate vs compact (Table 6)");
  bxattn->add_option("--lengths", xa.lengths, "sequence lengths")->delimiter(',');
  bxattn->add_option("--batch", xa.batch, "rows")->check(CLI::Range(1, 1024));
  bxattn->add_option("--heads", xa.heads, "query heads")->check(CLI::Range(1, 256));
  bxattn->add_option("--kv-heads", xa.kv_heads, "key/value heads")->check(CLI::Range(1, 256));
  bxattn->add_option("--head-dim", xa.head_dim, "head dimension")->check(CLI::Range(1, 1024));
  bxattn->add_option("--repeats", xa.repeats, "repeats (median reported)")->check(CLI::Range(1, 1000));
  bxattn->add_option("--interval", xa.interval, "fixed concept length")->check(CLI::Range(1, 1 << 20));
  bxattn->add_option("--mean-len", xa.mean_len, "mean variable concept length")->check(CLI::Range(1.0, 1e6));
  bxattn->add_flag("--fixed-only", x_only_fixed, "only fixed-length concepts");
  bxattn->add_flag("--variable-only", x_only_variable, "only variable-length concepts");
  add_threads(bxattn);

  BenchDecodeArgs bd;
  auto* bdec = bench->add_subcommand("decode", "decode tokens/s with the streaming caches vs recomputing the prefix");
  bdec->add_option("--ckpt", bd.ckpt, "checkpoint or run folder (default: a config with random weights)");
  bdec->add_option("--config", bd.config, "config JSON (default: the reference baseline of the docs)");
  bdec->add_option("--set", bd.sets, "override a config key: key=value");
  bdec->add_option("--prompt-len", bd.prompt_len, "prompt tokens")->check(CLI::Range(1, 1 << 20));
  bdec->add_option("--new-tokens", bd.new_tokens, "generated tokens per sequence")->check(CLI::Range(1, 1 << 20));
  bdec->add_option("--batch", bd.batch, "sequences decoded together")->check(CLI::Range(1, 4096));
  bdec->add_option("--repeats", bd.repeats, "repeats (median reported)")->check(CLI::Range(1, 100));
  bdec->add_option("--precision", bd.precisions, "fp32, bf16 and/or int8 weights for the cached decode, side by side")->delimiter(',');
  bdec->add_option("--data", bd.data, "prepared data folder: also report each precision's validation CE through its stream (needs --ckpt)");
  bdec->add_option("--val-windows", bd.val_windows, "validation windows of max_seq_len tokens for --data")->check(CLI::Range(1, 100000));
  bdec->add_flag("--no-recompute", bd.no_recompute, "skip the recompute baseline (slow at long prompts); greedy tokens checked against the first --precision");
  add_threads(bdec);

  BenchPrefillArgs bp;
  auto* bpre = bench->add_subcommand("prefill", "prefill tokens/s of checkpoints in one run, against the first (matched FLOPs)");
  bpre->add_option("--ckpt", bp.ckpts, "checkpoints or run folders (repeat the flag; the first is the reference)")->required();
  bpre->add_option("--prompt-len", bp.prompt_len, "prompt tokens")->check(CLI::Range(1, 1 << 20));
  bpre->add_option("--batch", bp.batch, "sequences prefilled together")->check(CLI::Range(1, 4096));
  bpre->add_option("--repeats", bp.repeats, "repeats (median reported)")->check(CLI::Range(1, 1000));
  bpre->add_option("--in-a-row", bp.in_a_row,
                   "prefills of one model in a row per repeat, the first of each run not kept (> 1: "
                   "the model's weights warm from its own previous prefill, as in a server running "
                   "one model; 1: each prefill right after the other models' work)")
      ->check(CLI::Range(1, 100));
  bpre->add_option("--precision", bp.precision,
                   "the streams' weights: fp32, or weight-only bf16 / int8 copies (FP32 arithmetic)")
      ->capture_default_str();
  bpre->add_option("--data", bp.data,
                   "prepared data folder: each sequence's prompt is text of its validation split "
                   "(DIR/val.bin, from a document's start), not a random-token prompt");
  bpre->add_option("--data-at", bp.data_at,
                   "with --data: first token of the validation split to look for documents from")
      ->check(CLI::NonNegativeNumber);
  bpre->add_flag("--breakdown", bp.breakdown, "CPU time per component of each stream's prefill");
  bpre->add_flag("--breakdown-gemm", bp.breakdown_gemm,
                 "--breakdown with the GEMMs in rows of their own, and each product shape's time");
  bpre->add_flag("--products-in-order", bp.products_in_order,
                 "--breakdown-gemm with each product of a prefill in a row of its own, in call "
                 "order (one weight matrix per row: the same shape in different layers apart)");
  bpre->add_option("--prefetch-c", bp.prefetch_c,
                   "the stream products prefetch their output lines for writing: on, off, or "
                   "on,off (each checkpoint under both, side by side in the same repeats)")
      ->delimiter(',')
      ->check(CLI::IsMember({"on", "off"}));
  bpre->add_option("--last-rows", bp.last_rows,
                   "the final block runs its q, attention, wo and FFN for each prompt's last "
                   "position only (the others only to their keys and values): on, off, or "
                   "on,off (each checkpoint under both, side by side in the same repeats)")
      ->delimiter(',')
      ->check(CLI::IsMember({"on", "off"}));
  add_threads(bpre);

  PrepareArgs pa;
  auto* prep = app.add_subcommand("prepare", "corpus files/folders -> tokenizer + train/val token shards");
  prep->add_option("--input", pa.inputs, "corpus files or folders (*.jsonl, *.txt; a single text file "
                   "without form feeds is split into documents at blank lines)")->required();
  prep->add_option("--out", pa.out, "output folder")->required();
  prep->add_option("--tokenizer", pa.tokenizer, "bpe (SentencePiece) or bytes")->check(CLI::IsMember({"bpe", "bytes"}));
  prep->add_option("--vocab-size", pa.vocab_size, "BPE vocabulary size")->check(CLI::Range(300, 1 << 20));
  prep->add_option("--tokenizer-from", pa.tokenizer_from, "use the tokenizer of this folder (checkpoint, data, HF tokenizer.json) instead of training one");
  prep->add_option("--val-fraction", pa.val_fraction, "share of documents for validation")->check(CLI::Range(0.0, 0.5));
  add_threads(prep);

  EvalArgs ea;
  auto* ev = app.add_subcommand("eval", "validation bits per byte and zero-shot benchmarks (JSON report)");
  ev->add_option("--ckpt", ea.ckpt, "checkpoint or run folder (required unless --tasks list)");
  ev->add_option("--data", ea.data, "prepared data folder: validation loss, perplexity, bits per byte");
  ev->add_option("--tasks", ea.tasks,
                 "zero-shot tasks, comma-separated: hellaswag,piqa,arc_easy,boolq,winogrande,copa,lambada_openai,mmlu, "
                 "all, or name=layout:path; 'list' prints the tasks and their data files");
  ev->add_option("--bench-dir", ea.bench_dir, "folder with the benchmark files (default ../shared/bench)");
  ev->add_option("--task-file", ea.task_file, "JSON array of extra task specs (docs/evaluation.md)");
  ev->add_option("--limit", ea.limit, "at most this many validation batches / items per task (default: all)")
      ->check(CLI::Range(i64(1), i64(1) << 40));
  ev->add_option("--batch-size", ea.batch_size, "validation rows per batch")->check(CLI::Range(1, 4096));
  ev->add_option("--seq-len", ea.seq_len, "validation window length (default: the model's train.seq_len)");
  ev->add_option("--batch-tokens", ea.batch_tokens, "zero-shot: padded tokens per forward pass")
      ->check(CLI::Range(1, 1 << 24));
  ev->add_option("--out", ea.out, "write the JSON report here");
  ev->add_option("--markdown", ea.markdown, "write the zero-shot table (markdown) here");
  ev->add_flag("--no-prefix-sharing", ea.no_prefix_sharing,
               "zero-shot: one forward row per request (to measure what prefix sharing saves)");
  ev->add_flag("--concept-usage", ea.concept_usage,
               "dlcm: concept-usage diagnostics on the validation split (z_null / shuffled "
               "concepts, |Wo att|/|H|, CE by position in concept; docs/dlcm.md)");
  ev->add_option("--batches", ea.usage_batches, "concept usage: at most this many validation batches (default: --limit, else all)")
      ->check(CLI::Range(i64(1), i64(1) << 40));
  ev->add_flag("--quiet", ea.quiet, "no progress lines or table on stderr");
  ev->add_option("--num-fewshot", ea.num_fewshot, "zero-shot: examples from the task's other items before each context")
      ->check(CLI::Range(0, 1000));
  ev->add_option("--fewshot-seed", ea.fewshot_seed, "zero-shot: seed of the few-shot draw (default 1234)");
  ev->add_flag("--log-samples", ea.log_samples,
               "zero-shot: one JSON line per request in OUT_samples_<task>.jsonl beside the --out report");
  add_threads(ev);

  AnalyzeArgs na;
  auto* an = app.add_subcommand("analyze", "concept analysis of a dlcm checkpoint: JSON report and HTML page with figures");
  an->add_option("--ckpt", na.ckpt, "dlcm checkpoint or run folder")->required();
  an->add_option("--data", na.data, "prepared data folder (its validation split is analysed)")->required();
  an->add_option("--out", na.out, "output folder for analysis.json and analysis.html (default analysis)");
  an->add_option("--batches", na.batches, "at most this many validation batches (default: all)");
  an->add_option("--batch-size", na.batch_size, "validation windows per forward pass")->check(CLI::Range(1, 4096));
  an->add_option("--seq-len", na.seq_len, "window length (default: the checkpoint's train.seq_len)")->check(CLI::Range(1, 1 << 24));
  an->add_option("--tau", na.tau, "boundary threshold (default: the checkpoint's router.tau)");
  an->add_option("--baseline", na.baseline, "baseline checkpoint on the same tokenizer: loss by position in concept, dlcm minus baseline");
  an->add_option("--top", na.top, "tokens listed as concept openers (default 30)")->check(CLI::Range(1, 100000));
  add_threads(an);

  PlotArgs pla;
  auto* plot = app.add_subcommand("plot", "training curves of runs, overlaid (SVG or HTML page)");
  plot->add_option("runs", pla.runs, "run folders (or their train_log.jsonl)")->required();
  plot->add_option("--out", pla.out, "FILE.svg or FILE.html")->required();
  plot->add_option("--x", pla.x, "x axis: tokens (tokens seen) or step")->check(CLI::IsMember({"tokens", "step"}));
  plot->add_option("--metrics", pla.metrics,
                   "panels, comma-separated (default loss,val_bpb,compression,aux,lr,tokens_per_s; "
                   "any numeric field of the log)");
  plot->add_option("--title", pla.title, "figure title");

  auto* mup = app.add_subcommand("mup", "decoupled µP tools (SPEC 6)");
  mup->require_subcommand(1);
  CoordCheckArgs ca;
  auto* coord = mup->add_subcommand("coord-check", "RMS of each stack and of the logits across widths, µP vs standard");
  coord->add_option("--config", ca.config, "config JSON of the model at multiplier 1 (default: built-in defaults)");
  coord->add_option("--set", ca.sets, "override a config key: key=value (repeatable)");
  coord->add_option("--data", ca.data, "prepared data folder: train on its first batch (default: a synthetic batch)");
  coord->add_option("--widths", ca.widths, "width multipliers, comma-separated (default 1,2,4,8)");
  coord->add_option("--steps", ca.steps, "record after these optimizer steps (default 0,1,10)");
  coord->add_option("--scale", ca.scale, "which widths scale: both, token or concept")->check(CLI::IsMember({"both", "token", "concept"}));
  coord->add_option("--params", ca.params, "parametrisations: mup,sp (default both)");
  coord->add_option("--seeds", ca.seeds, "initialisations averaged (default 1)")->check(CLI::Range(1, 100));
  coord->add_option("--out", ca.out, "output folder for coord_check.{csv,json,svg} (default coord_check)");
  add_threads(coord);
  LrSweepArgs lsa;
  auto* lrs = mup->add_subcommand("lr-sweep", "learning-rate transfer sweep: widths x base learning rates (resumable)");
  lrs->add_option("--config", lsa.config, "config JSON of the model at multiplier 1")->required();
  lrs->add_option("--data", lsa.data, "prepared data folder")->required();
  lrs->add_option("--out", lsa.out, "sweep folder: one run folder per point, lr_sweep.{md,csv,json,svg}")->required();
  lrs->add_option("--set", lsa.sets, "override a config key: key=value (repeatable)");
  lrs->add_option("--widths", lsa.widths, "width multipliers (default 1,2,4)");
  lrs->add_option("--lrs", lsa.lrs, "base learning rates (default 1e-3,3e-3,1e-2,3e-2)");
  lrs->add_option("--params", lsa.params, "parametrisations: mup and/or sp (default mup)");
  lrs->add_option("--scale", lsa.scale, "which widths scale: both, token or concept")->check(CLI::IsMember({"both", "token", "concept"}));
  lrs->add_option("--steps", lsa.steps, "optimizer steps per run (overrides train.steps)")
      ->check(CLI::Range(i64(1), i64(1) << 40));
  lrs->add_flag("--quiet", lsa.quiet, "no per-step progress");
  add_threads(lrs);

  auto* scaling = app.add_subcommand("scaling", "compression-aware scaling law (SPEC 8)");
  scaling->require_subcommand(1);
  ScalingFitArgs sfa;
  auto* sfit = scaling->add_subcommand("fit", "fit the law to training runs (robust NLLS, shared exponents)");
  sfit->add_option("runs", sfa.runs, "run folders written by 'dlcm train --out'")->required();
  sfit->add_option("--out", sfa.out, "output folder for scaling_fit.{json,md,svg} (default scaling_fit)");
  sfit->add_option("--metric", sfa.metric, "val_loss (validation lines, default) or ce (training lines)")->check(CLI::IsMember({"val_loss", "ce"}));
  sfit->add_option("--huber", sfa.huber, "Huber threshold on log-loss residuals (default 0.01)")->check(CLI::Range(1e-6, 1e6));
  sfit->add_option("--min-frac", sfa.min_frac, "skip points before this share of each run (and its warmup; default 0.1)")->check(CLI::Range(0.0, 1.0));
  sfit->add_flag("--realized-R", sfa.realized_R, "use the logged compression instead of target_R");
  sfit->add_option("--fix", sfa.fix, "hold a constant: name=value (repeatable), e.g. --fix t_tok=0");
  ScalingPredictArgs spa;
  auto* spred = scaling->add_subcommand("predict", "predicted loss of a configuration");
  spred->add_option("--fit", spa.fit, "scaling_fit.json")->required();
  spred->add_option("--N", spa.N, "non-embedding parameters")->required();
  spred->add_option("--D", spa.D, "training tokens")->required();
  spred->add_option("--R", spa.R, "tokens per concept (1 for a baseline)")->required();
  spred->add_option("--P", spa.P, "backbone share of non-embedding parameters")->required();
  ScalingAllocateArgs saa;
  auto* salloc = scaling->add_subcommand("allocate", "P, N and D minimising the predicted loss under a FLOPs budget");
  salloc->add_option("--fit", saa.fit, "scaling_fit.json")->required();
  salloc->add_option("--flops", saa.flops, "training FLOPs budget")->required();
  salloc->add_option("--R", saa.R, "tokens per concept")->required();
  salloc->add_option("--p-min", saa.p_min, "smallest P searched (default 0.05)");
  salloc->add_option("--p-max", saa.p_max, "largest P searched (default 0.95)");
  salloc->add_option("--p-step", saa.p_step, "P step (default 0.01)");
  salloc->add_option("--n-min", saa.n_min, "smallest N searched (default 1e4)");
  salloc->add_option("--n-max", saa.n_max, "largest N searched (default 1e13)");
  salloc->add_option("--N", saa.N, "fix the non-embedding parameters N (choose only P and D)");

  auto run_tokenizer = add_tokenizer_commands(app);
  auto run_serve = add_serve_commands(app, *bench);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const std::string hint = e.get_exit_code() != 0 ? unknown_name_hint(app, argc, argv) : "";
    if (hint.empty()) return app.exit(e);
    std::fprintf(stderr, "dlcm: error: %s\n", hint.c_str());
    return e.get_exit_code();
  }
  // Under MPI a failure on any rank ends every rank (MPI_Abort) after one line naming it.
  auto report = [](const char* what, int code) {
    if (dist::size() > 1) {
      std::fprintf(stderr, "dlcm: error: rank %d of %d: %s (stopping all ranks)\n", dist::rank(),
                   dist::size(), what);
      dist::abort_all(code);
    }
    std::fprintf(stderr, "dlcm: error: %s\n", what);
    dist::finalize();
    return code;
  };
  if (threads > 0) {
    omp_set_num_threads(int(threads));
    std::fprintf(stderr, "[dlcm] OpenMP threads: %lld (--threads)\n", (long long)threads);
  }
  ta.threads = threads;  // also train.threads: the trainer applies it under MPI too
  pa.threads = threads;
  try {
    ta.final_eval = !no_final_eval;
    if (*train) {
      dist::init(&argc, &argv);  // data parallel when started by mpirun
      int rc = cmd_train(ta);
      dist::finalize();
      return rc;
    }
    if (*fwd) return cmd_forward(fa);
    if (*gen) return cmd_generate(ga);
    if (*conf) return cmd_config(cf);
    if (*exp) return cmd_export(xp);
    if (*imp) return cmd_import(ia);
    if (*flops) return cmd_flops(la);
    if (*plan) return cmd_plan(pl);
    if (*btrain) {
      dist::init(&argc, &argv);  // data-parallel throughput when started by mpirun
      int rc = cmd_bench_train(ba);
      dist::finalize();
      return rc;
    }
    if (*bdec) return cmd_bench_decode(bd);
    if (*bpre) return cmd_bench_prefill(bp);
    if (*bgemm) return cmd_bench_gemm(bg);
    if (*seg) return cmd_segment(sa);
    if (*bxattn) {
      if (x_only_fixed) xa.variable = false;
      if (x_only_variable) xa.fixed = false;
      return cmd_bench_xattn(xa);
    }
    if (*prep) return cmd_prepare(pa);
    if (*ev) return cmd_eval(ea);
    if (*an) return cmd_analyze(na);
    if (*plot) return cmd_plot(pla);
    if (*coord) return cmd_coord_check(ca);
    if (*lrs) return cmd_lr_sweep(lsa);
    if (*sfit) return cmd_scaling_fit(sfa);
    if (*spred) return cmd_scaling_predict(spa);
    if (*salloc) return cmd_scaling_allocate(saa);
    if (int rc = run_tokenizer(); rc >= 0) return rc;
    if (int rc = run_serve(); rc >= 0) return rc;
  } catch (const dlcm::Error& e) {
    return report(e.what(), 2);
  } catch (const std::exception& e) {
    return report(e.what(), 3);
  }
  return 0;
}
