// dlcm command-line tool: a thin shell over the library. Every failure prints one line
// naming the file, field or flag at fault, and exits non-zero.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "core/common.h"
#include "tools/commands.h"

int main(int argc, char** argv) {
  using namespace dlcm;
  CLI::App app{"dlcm: train, evaluate and run Dynamic Large Concept Models and LLaMA-style baselines"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "dlcm 0.1");

  TrainArgs ta;
  auto* train = app.add_subcommand("train", "train a model from a config on prepared data");
  train->add_option("--config", ta.config, "model/training config JSON (e.g. configs/baseline-small.json)")->required();
  train->add_option("--data", ta.data, "folder written by 'dlcm prepare'")->required();
  train->add_option("--out", ta.out, "run folder: train_log.jsonl and checkpoint/")->required();
  train->add_option("--steps", ta.steps, "optimizer steps (overrides train.steps)");
  train->add_option("--set", ta.sets, "override a config key: key=value (repeatable)");
  train->add_flag("--resume", ta.resume, "continue the run in --out from its checkpoint");
  train->add_option("--init-from", ta.init_from, "start from the weights of this checkpoint");
  train->add_flag("--quiet", ta.quiet, "no progress output");

  ForwardArgs fa;
  auto* fwd = app.add_subcommand("forward", "write logits (and dlcm p, b) for token rows");
  fwd->add_option("--ckpt", fa.ckpt, "checkpoint or run folder")->required();
  fwd->add_option("--tokens", fa.tokens, "text file: one row of space-separated token ids per line")->required();
  fwd->add_option("--out", fa.out, "output .safetensors")->required();

  GenerateArgs ga;
  auto* gen = app.add_subcommand("generate", "generate text from a prompt (streams to stdout)");
  gen->add_option("--ckpt", ga.ckpt, "checkpoint or run folder")->required();
  gen->add_option("--prompt", ga.prompt, "prompt text")->required();
  gen->add_option("--max-new-tokens", ga.max_new_tokens, "tokens to generate")->check(CLI::Range(1, 1 << 20));
  gen->add_option("--temperature", ga.temperature, "0 = greedy")->check(CLI::Range(0.0, 100.0));
  gen->add_option("--top-k", ga.top_k, "keep the k most likely tokens (0 = all)")->check(CLI::Range(0, 1 << 24));
  gen->add_option("--top-p", ga.top_p, "nucleus sampling mass (1 = off)")->check(CLI::Range(0.0, 1.0));
  gen->add_option("--seed", ga.seed, "sampling seed");

  FlopsArgs la;
  auto* flops = app.add_subcommand("flops", "forward FLOPs per token per component (SPEC 7)");
  flops->add_option("--config", la.config, "config JSON")->required();
  flops->add_option("--seq-len", la.seq_len, "sequence length (default: train.seq_len)");
  flops->add_option("--R", la.R, "tokens per concept (dlcm; default target_R)");
  flops->add_option("--set", la.sets, "override a config key: key=value");

  BenchTrainArgs ba;
  auto* bench = app.add_subcommand("bench", "benchmarks that print figures");
  bench->require_subcommand(1);
  auto* btrain = bench->add_subcommand("train", "training tokens/s and MFU vs the PyTorch reference");
  btrain->add_option("--config", ba.config, "config JSON (default: the reference baseline of the docs)");
  btrain->add_option("--set", ba.sets, "override a config key: key=value");
  btrain->add_option("--steps", ba.steps, "timed steps per repeat");
  btrain->add_option("--repeats", ba.repeats, "repeats (median reported)");
  btrain->add_flag("--no-torch", ba.no_torch, "skip the PyTorch reference");
  btrain->add_flag("--torch-defaults", ba.torch_default, "PyTorch peer with glibc malloc and ATen's default (AVX2) kernels");
  btrain->add_option("--precision", ba.precisions, "fp32 and/or bf16, timed side by side (default: the config's)")
      ->delimiter(',')->check(CLI::IsMember({"fp32", "bf16"}));
  btrain->add_flag("--breakdown", ba.breakdown, "per-component time of a training step");
  btrain->add_option("--R", ba.R, "dlcm: concepts of 1+Geometric lengths with this mean (default target_R; 0 = sample from the router)");

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

  PrepareArgs pa;
  auto* prep = app.add_subcommand("prepare", "corpus files/folders -> tokenizer + train/val token shards");
  prep->add_option("--input", pa.inputs, "corpus files or folders (*.jsonl, *.txt)")->required();
  prep->add_option("--out", pa.out, "output folder")->required();
  prep->add_option("--tokenizer", pa.tokenizer, "bpe (SentencePiece) or bytes")->check(CLI::IsMember({"bpe", "bytes"}));
  prep->add_option("--vocab-size", pa.vocab_size, "BPE vocabulary size")->check(CLI::Range(300, 1 << 20));
  prep->add_option("--val-fraction", pa.val_fraction, "share of documents for validation")->check(CLI::Range(0.0, 0.5));

  EvalArgs ea;
  auto* ev = app.add_subcommand("eval", "validation bits per byte, perplexity (JSON report)");
  ev->add_option("--ckpt", ea.ckpt, "checkpoint or run folder")->required();
  ev->add_option("--data", ea.data, "prepared data folder (validation split)")->required();
  ev->add_option("--limit", ea.limit, "at most this many validation batches");
  ev->add_option("--batch-size", ea.batch_size, "rows per batch")->check(CLI::Range(1, 4096));
  ev->add_option("--seq-len", ea.seq_len, "window length (default: the model's train.seq_len)");
  ev->add_option("--out", ea.out, "write the JSON report here");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (*train) return cmd_train(ta);
    if (*fwd) return cmd_forward(fa);
    if (*gen) return cmd_generate(ga);
    if (*flops) return cmd_flops(la);
    if (*btrain) return cmd_bench_train(ba);
    if (*bxattn) {
      if (x_only_fixed) xa.variable = false;
      if (x_only_variable) xa.fixed = false;
      return cmd_bench_xattn(xa);
    }
    if (*prep) return cmd_prepare(pa);
    if (*ev) return cmd_eval(ea);
  } catch (const dlcm::Error& e) {
    std::fprintf(stderr, "dlcm: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dlcm: error: %s\n", e.what());
    return 3;
  }
  return 0;
}
