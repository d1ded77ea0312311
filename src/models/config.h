// Model and training configuration: defaults in one place, loaded from JSON, overridable with
// --set key=value, saved into every checkpoint as config.json (SPEC section 9).
//
// Each key is declared twice and nowhere else: its struct member below (type and default) and
// its line in the key table (kKeys in config.cpp: JSON path, member, documented range, one-line
// doc). Reading, writing (checkpoints), --set, range checks, `dlcm config --keys` and the table
// in docs/config.md all follow the table. To add a key:
//   1. add the member with its default here, e.g. `i64 enc_window = 0;` in ModelConfig;
//   2. add one line to kKeys, e.g.
//        NUM("enc_window", model.enc_window, 0, 1 << 20, "encoder attention window (0 = full)"),
//      (NUM: inclusive [min, max]; NUM_GT: min excluded; NUM_LT: max excluded; BOOL; STR with
//      the allowed values "a|b"). Nested keys use dots: "router.alpha", "train.lr";
//   3. regenerate docs/config.md with `dlcm config --keys --markdown` (a test compares them).
// Consistency rules between keys (head counts dividing, ids inside the vocabulary, ...) live in
// validate().
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "core/common.h"

namespace dlcm {

struct RouterConfig {
  // "projected" (learned Wq/Wk) | "raw" (cosine of h itself) | "fixed" (a concept every
  // `stride` tokens, counted from each row start and BOS) | "word" (a concept at every token
  // that begins a word; the table comes from the tokenizer, DlcmModel::set_word_starts).
  // "fixed"/"word" are rules (models/boundary_rule.h): p is the rule's 0/1 decision, no router
  // parameters, no auxiliary loss.
  std::string kind = "projected";
  i64 stride = 4;                  // "fixed": tokens per concept
  float alpha = 0.1f;              // Bernoulli sharpening temperature (alpha < 1 sharpens; docs/dlcm.md)
  float tau = 0.5f;                // inference threshold
  bool smooth_grad = false;        // let the LM loss reach p through the smoother
};

// Decoupled µP (SPEC 6, docs/mup_scaling.md). With s = width / d_base per group, hidden matrices
// start N(0, sigma_base^2 / s) and train with lr = train.lr * lr_mult_<group> / s and AdamW
// eps = train.eps / s; embeddings, norms, null concept and lm_head start with sigma_base and
// train with train.lr * lr_mult_other. Logits are multiplied by 1/s_token (logit_mult is
// forced). train.lr is therefore the base learning rate at width d_base; the schedule scales
// every group alike. init_std is not used when enabled.
struct MupConfig {
  bool enabled = false;
  // d_base 64, sigma_base 0.02 and train.lr 3e-3 (the default) are the base values chosen by
  // the learning-rate transfer sweep of docs/mup_scaling.md.
  i64 d_base = 64;           // width at which µP multipliers are 1
  float sigma_base = 0.02f;  // init std of hidden matrices at d_base
  float lr_mult_token = 1.0f;    // eta_token = train.lr * lr_mult_token
  float lr_mult_concept = 1.0f;  // eta_concept = train.lr * lr_mult_concept
  float lr_mult_other = 1.0f;    // eta_others = train.lr * lr_mult_other
};

struct ModelConfig {
  std::string arch = "baseline";  // "baseline" | "dlcm"
  i64 vocab_size = 4096;
  i64 d_token = 256;
  i64 n_heads = 4;
  i64 n_kv_heads = 4;
  i64 head_dim = 64;
  i64 d_ff = 768;
  i64 n_layers = 4;  // baseline
  // Baseline control with the DLCM's token-path extras: after layer n_layers_pre, an RMSNorm
  // (encoder.norm) and a pre-norm SwiGLU block of width x_d_ff (xattn.ffn_norm, xattn.ffn.*),
  // as the DLCM has between its encoder and decoder. n_layers_pre = 0 means n_layers / 2.
  bool baseline_extras = false;
  i64 n_layers_pre = 0;
  // dlcm
  i64 enc_layers = 2;
  i64 dec_layers = 2;
  i64 d_concept = 384;
  i64 bb_layers = 4;
  i64 bb_heads = 6;
  i64 bb_kv_heads = 6;
  i64 bb_d_ff = 1152;
  i64 x_heads = 4;
  i64 x_kv_heads = 4;
  i64 x_d_ff = 768;
  i64 d_scan = 0;  // 0 = d_token
  RouterConfig router;
  float target_R = 4.0f;
  float aux_weight = 0.03f;
  // "global": the Global Parser, F and G over the whole step; "sequence": the paper's "Normal"
  // variant, the same formula per row (sequence), averaged over the step's rows.
  std::string aux_kind = "global";
  bool smoother = true;  // false: zs_j = z_j (no smoothing across concepts)
  std::string xattn_impl = "compact";  // "compact" | "replicate" (same function)
  // Sliding-window self-attention in the encoder / decoder blocks (SPEC 4.9): token t sees
  // tokens (t - w, t]; 0 = full causal.
  i64 enc_window = 0;
  i64 dec_window = 0;
  // Research variants (SPEC 4.9; docs/dlcm.md). "inclusive" needs "first" or "prefix_mean".
  std::string concept_repr = "mean";           // "mean" | "first" | "prefix_mean"
  std::string concept_visibility = "shifted";  // "shifted" | "inclusive"
  // RoPE in the concept cross-attention: query of token t at t, key of concept j at start_j,
  // z_null at the query's own position (its score position-free).
  bool xattn_rope = false;
  bool concept_path = true;  // false: no backbone, no concept attention (Psi = H), control
  // shared
  bool qk_norm = false;
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;
  float logit_mult = 1.0f;
  i64 max_seq_len = 512;
  i32 bos_id = 1;
  i32 eos_id = 2;
  i32 pad_id = 0;
  float init_std = 0.02f;
  MupConfig mup;

  i64 scan_dim() const { return d_scan > 0 ? d_scan : d_token; }
  bool is_dlcm() const { return arch == "dlcm"; }
  // Router kinds whose boundaries are a fixed rule rather than learned.
  bool rule_router() const { return router.kind == "fixed" || router.kind == "word"; }
  i64 layers_pre() const { return n_layers_pre > 0 ? n_layers_pre : n_layers / 2; }
};

struct TrainConfig {
  i64 seq_len = 256;
  i64 batch_size = 8;  // sequences per micro-batch
  i64 grad_accum = 1;  // micro-batches per optimizer step
  i64 steps = 1000;
  std::string schedule = "cosine";  // "cosine" (warmup + cosine) | "wsd" | "constant"
  float lr = 3e-3f;
  float min_lr_ratio = 0.1f;
  i64 warmup_steps = 50;
  float wsd_decay_frac = 0.2f;  // WSD: share of steps in the final decay
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
  float grad_clip = 1.0f;  // 0 = off
  uint64_t seed = 1234;
  i64 log_every = 10;
  i64 eval_every = 200;
  i64 eval_batches = 16;
  i64 ckpt_every = 500;
  i64 threads = 0;  // OpenMP threads per process; 0 = automatic (OpenMP default with one
                    // process; under MPI: the rank's cores / ranks sharing them)
  // Data parallel (MPI): gradient all-reduce bucket size, and whether buckets start during
  // the last micro-batch's backward (non-blocking) or after it (blocking).
  float allreduce_bucket_mb = 8.0f;
  bool allreduce_overlap = true;
  // Matrix products: "fp32" or "bf16" (mixed precision: bf16 operands, fp32 accumulation,
  // fp32 master weights and optimizer state; kernels/gemm.h). Validation runs in fp32.
  std::string precision = "fp32";
  // A step whose loss or gradient norm is not finite never updates the weights: "stop" ends
  // the run with an error naming the step and the component; "skip" drops the step (counted
  // in the log) and stops after max_nonfinite_skips such steps in a row.
  std::string on_nonfinite = "stop";
  i64 max_nonfinite_skips = 10;
};

struct Config {
  ModelConfig model;
  TrainConfig train;
};

// The member a key sets, inside a given Config.
using ConfigField = std::variant<i64*, i32*, uint64_t*, float*, bool*, std::string*>;

// One row of the key table. Numeric keys hold [min, max] (an end is excluded when its *_open
// flag is set); every float must also be finite. String keys list their allowed values.
struct ConfigKey {
  const char* path;  // JSON path with dots: "d_token", "router.alpha", "train.lr"
  ConfigField (*field)(Config&);
  double min = 0, max = 0;
  bool min_open = false, max_open = false;
  const char* choices = nullptr;  // string keys: "baseline|dlcm"
  const char* doc = "";
  // May differ from the checkpoint's value on `dlcm train --resume --set` (run length,
  // cadences, recovery knobs); every other key is the run's own and is refused there.
  bool on_resume = false;
};

// Every key, in the order of docs/config.md.
const std::vector<ConfigKey>& config_keys();
// The key at `path` ("router.alpha"), or nullptr.
const ConfigKey* find_config_key(std::string_view path);
// A listing of every key with its type, default, range and doc: aligned text, or the Markdown
// table of docs/config.md.
std::string config_keys_listing(bool markdown);

// JSON with model keys at the top level (SPEC section 9) and training keys under "train".
// Floats are written as the shortest text that reads back as the same float (0.03, not
// 0.029999999329447746).
nlohmann::json config_to_json(const Config& c);
// The shortest decimal text of a float that reads back as the same float ("0.03").
std::string float_text(float v);
// Starts from defaults, applies j; unknown keys, wrong types and out-of-range values are errors
// naming `source` and the key. Validates the result.
Config config_from_json(const nlohmann::json& j, const std::string& source);
// A config file's JSON, read with bounded size and nesting (core/json_util.h).
nlohmann::json load_config_json(const std::string& path);
Config load_config(const std::string& path);
// Applies "key=value" overrides ("d_token=512", "router.alpha=0.7", "train.lr=1e-3"; a bare
// training key like "lr=1e-3" is accepted when it is not also a model key). A string key takes
// the text as it is; other values are parsed as bounded JSON.
void apply_overrides(nlohmann::json& j, const std::vector<std::string>& sets);
// The key an override "key=value" names after apply_overrides' rules ("lr=1e-3" names
// "train.lr"); nullptr for an unknown key or a group ("router={...}").
const ConfigKey* override_key(const std::string& set);
// Checks every key's range and the consistency rules, and that the model's size estimate is
// within bounds; throws Error naming the field.
void validate(const Config& c, const std::string& source);

// Sizes a config implies, in floats, computed with overflow checks (an overflow is an Error
// naming `source`): parameters exactly as the models register them (ignoring 64-byte padding)
// and a coarse upper estimate of the activations held for one micro-batch's backward.
struct ConfigSize {
  i64 params = 0;
  i64 activations = 0;
};
ConfigSize config_size(const Config& c, const std::string& source);
i64 model_param_count(const ModelConfig& m, const std::string& source);
// Bounds enforced by validate() (all three) and make_model() (parameters): 2^34 parameters
// (64 GiB of floats, before gradients and optimizer state), 2^36 activation floats, and at most
// 2^24 tokens per micro-batch (batch_size * seq_len).
constexpr i64 kMaxParams = i64(1) << 34;
constexpr i64 kMaxActivations = i64(1) << 36;
constexpr i64 kMaxBatchTokens = i64(1) << 24;
// Throws, naming `source`, when the model's parameter count exceeds kMaxParams; cheap, and
// called before anything is allocated.
void check_model_size(const ModelConfig& m, const std::string& source);

}  // namespace dlcm
