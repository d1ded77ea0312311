#include "models/config.h"

#include <charconv>
#include <cstdint>
#include <fstream>
#include <limits>

#include "core/json_util.h"
#include "models/mup.h"

namespace dlcm {
using nlohmann::json;

namespace {

// Table rows (see the header for how to add a key). FIELD turns a member path into the
// accessor; the NUM variants give the documented range.
#define FIELD(member) [](Config& c) -> ConfigField { return &c.member; }
#define NUM(path, member, lo, hi, doc) \
  ConfigKey{path, FIELD(member), double(lo), double(hi), false, false, nullptr, doc}
#define NUM_GT(path, member, lo, hi, doc) \
  ConfigKey{path, FIELD(member), double(lo), double(hi), true, false, nullptr, doc}
#define NUM_LT(path, member, lo, hi, doc) \
  ConfigKey{path, FIELD(member), double(lo), double(hi), false, true, nullptr, doc}
#define BOOL(path, member, doc) ConfigKey{path, FIELD(member), 0, 1, false, false, nullptr, doc}
#define STR(path, member, choices, doc) \
  ConfigKey{path, FIELD(member), 0, 0, false, false, choices, doc}
// A key that may change when a run is resumed (ConfigKey::on_resume).
constexpr ConfigKey RESUMABLE(ConfigKey k) {
  k.on_resume = true;
  return k;
}

constexpr i64 kWidth = 65536, kHeads = 1024, kLayers = 1024, kVocab = i64(1) << 24;
constexpr i64 kSeq = i64(1) << 20, kSteps = i64(1) << 40;

const std::vector<ConfigKey> kKeys = {
    STR("arch", model.arch, "baseline|dlcm", "model family"),
    NUM("vocab_size", model.vocab_size, 1, kVocab, "tokenizer vocabulary size"),
    NUM("d_token", model.d_token, 1, kWidth, "token width (baseline width; dlcm encoder/decoder)"),
    NUM("n_heads", model.n_heads, 1, kHeads, "query heads of token-level attention"),
    NUM("n_kv_heads", model.n_kv_heads, 1, kHeads, "key/value heads (divides n_heads)"),
    NUM("head_dim", model.head_dim, 2, 4096, "width of every attention head (even, for RoPE)"),
    NUM("d_ff", model.d_ff, 1, kWidth, "SwiGLU hidden width of token-level blocks"),
    NUM("n_layers", model.n_layers, 1, kLayers, "baseline: transformer blocks"),
    BOOL("baseline_extras", model.baseline_extras, "baseline: control with the DLCM's token-path extras (encoder.norm + cross FFN of width x_d_ff) after n_layers_pre blocks"),
    NUM("n_layers_pre", model.n_layers_pre, 0, kLayers, "baseline_extras: blocks before the extras (0 = n_layers / 2)"),
    NUM("enc_layers", model.enc_layers, 1, kLayers, "dlcm: encoder blocks"),
    NUM("dec_layers", model.dec_layers, 0, kLayers, "dlcm: decoder blocks"),
    NUM("d_concept", model.d_concept, 1, kWidth, "dlcm: concept (backbone) width"),
    NUM("bb_layers", model.bb_layers, 1, kLayers, "dlcm: backbone blocks"),
    NUM("bb_heads", model.bb_heads, 1, kHeads, "dlcm: backbone query heads"),
    NUM("bb_kv_heads", model.bb_kv_heads, 1, kHeads, "dlcm: backbone key/value heads (divides bb_heads)"),
    NUM("bb_d_ff", model.bb_d_ff, 1, kWidth, "dlcm: backbone SwiGLU hidden width"),
    NUM("x_heads", model.x_heads, 1, kHeads, "dlcm: cross-attention query heads"),
    NUM("x_kv_heads", model.x_kv_heads, 1, kHeads, "dlcm: cross-attention key/value heads (divides x_heads)"),
    NUM("x_d_ff", model.x_d_ff, 1, kWidth, "dlcm: cross-attention SwiGLU hidden width"),
    NUM("d_scan", model.d_scan, 0, kWidth, "dlcm: router projection width (0 = d_token)"),
    STR("router.kind", model.router.kind, "projected|raw|fixed|word", "dlcm: learned Wq/Wk, cosine of h itself, or a rule: every router.stride tokens (fixed), at word starts (word)"),
    NUM("router.stride", model.router.stride, 1, kSeq, "dlcm, router.kind fixed: tokens per concept (restarted at every document)"),
    NUM_GT("router.alpha", model.router.alpha, 0, 100, "dlcm: Bernoulli sharpening temperature"),
    NUM("router.tau", model.router.tau, 0, 1, "dlcm: inference boundary threshold"),
    BOOL("router.smooth_grad", model.router.smooth_grad, "dlcm: let the LM loss reach p through the smoother"),
    NUM_GT("target_R", model.target_R, 1, 1024, "dlcm: target tokens per concept"),
    NUM("aux_weight", model.aux_weight, 0, 1000, "dlcm: weight of the compression loss"),
    STR("aux_kind", model.aux_kind, "global|sequence", "dlcm: compression loss over the whole step (global) or per sequence, averaged over the rows"),
    BOOL("smoother", model.smoother, "dlcm: false = no smoothing across concepts (ZS = Z, every gate 1)"),
    STR("xattn_impl", model.xattn_impl, "compact|replicate", "dlcm: cross-attention implementation (same function)"),
    STR("concept_repr", model.concept_repr, "mean|first|prefix_mean", "dlcm: concept vector = mean of its tokens, its first token, or the mean of its prefix"),
    STR("concept_visibility", model.concept_visibility, "shifted|inclusive", "dlcm: a token sees concepts closed before its own (shifted) or also its own (inclusive; not with mean)"),
    BOOL("xattn_rope", model.xattn_rope, "dlcm: RoPE in the concept cross-attention (query at t, concept key at its start, z_null position-free)"),
    BOOL("concept_path", model.concept_path, "dlcm: false = control without backbone and concept attention (Psi = H)"),
    NUM("enc_window", model.enc_window, 0, kSeq, "dlcm: encoder sliding attention window, token t sees (t-w, t] (0 = full; <= max_seq_len)"),
    NUM("dec_window", model.dec_window, 0, kSeq, "dlcm: decoder sliding attention window (0 = full; <= max_seq_len)"),
    BOOL("qk_norm", model.qk_norm, "RMSNorm on queries and keys"),
    NUM_GT("rope_theta", model.rope_theta, 0, 1e12, "RoPE base"),
    NUM_GT("norm_eps", model.norm_eps, 0, 1, "RMSNorm epsilon"),
    NUM_GT("logit_mult", model.logit_mult, 0, 1e6, "logit multiplier (forced to 1/s_token under µP)"),
    NUM("max_seq_len", model.max_seq_len, 1, kSeq, "longest sequence (RoPE tables, caches)"),
    NUM("bos_id", model.bos_id, 0, kVocab - 1, "beginning-of-sequence token (inside the vocabulary)"),
    NUM("eos_id", model.eos_id, 0, kVocab - 1, "end-of-sequence token (inside the vocabulary)"),
    NUM("pad_id", model.pad_id, 0, kVocab - 1, "padding token (inside the vocabulary)"),
    NUM("init_std", model.init_std, 0, 100, "init std of matrices without µP"),
    BOOL("mup.enabled", model.mup.enabled, "decoupled µP (docs/mup_scaling.md)"),
    NUM("mup.d_base", model.mup.d_base, 1, kWidth, "µP: width at which multipliers are 1"),
    NUM_GT("mup.sigma_base", model.mup.sigma_base, 0, 100, "µP: init std of hidden matrices at d_base"),
    NUM_GT("mup.lr_mult_token", model.mup.lr_mult_token, 0, 1e6, "µP: learning-rate multiplier, token group"),
    NUM_GT("mup.lr_mult_concept", model.mup.lr_mult_concept, 0, 1e6, "µP: learning-rate multiplier, concept group"),
    NUM_GT("mup.lr_mult_other", model.mup.lr_mult_other, 0, 1e6, "µP: learning-rate multiplier, other parameters"),
    NUM("train.seq_len", train.seq_len, 1, kSeq, "tokens per training sequence (<= max_seq_len)"),
    NUM("train.batch_size", train.batch_size, 1, kWidth, "sequences per micro-batch (batch_size * seq_len <= 2^24)"),
    RESUMABLE(NUM("train.grad_accum", train.grad_accum, 1, kWidth, "micro-batches per optimizer step (on resume with another rank count: docs/distributed.md)")),
    RESUMABLE(NUM("train.steps", train.steps, 0, kSteps, "optimizer steps")),
    STR("train.schedule", train.schedule, "cosine|wsd|constant", "learning-rate schedule"),
    RESUMABLE(NUM_GT("train.lr", train.lr, 0, 10, "peak (base, under µP) learning rate")),
    NUM("train.min_lr_ratio", train.min_lr_ratio, 0, 1, "final learning rate / peak"),
    NUM("train.warmup_steps", train.warmup_steps, 0, kSteps, "linear warmup steps"),
    RESUMABLE(NUM("train.wsd_decay_frac", train.wsd_decay_frac, 0, 1, "WSD: share of steps in the final decay")),
    NUM_LT("train.beta1", train.beta1, 0, 1, "AdamW beta1"),
    NUM_LT("train.beta2", train.beta2, 0, 1, "AdamW beta2"),
    RESUMABLE(NUM_GT("train.eps", train.eps, 0, 1, "AdamW epsilon")),
    NUM("train.weight_decay", train.weight_decay, 0, 1000, "AdamW weight decay (matrices only)"),
    NUM("train.grad_clip", train.grad_clip, 0, 1e9, "global gradient-norm clip (0 = off)"),
    NUM("train.seed", train.seed, 0, std::numeric_limits<uint64_t>::max(), "initialisation and data seed"),
    RESUMABLE(NUM("train.log_every", train.log_every, 1, kSteps, "steps between log lines")),
    RESUMABLE(NUM("train.eval_every", train.eval_every, 0, kSteps, "steps between validations (0 = off)")),
    RESUMABLE(NUM("train.eval_batches", train.eval_batches, -1, kSteps, "validation batches (-1 = the whole split)")),
    RESUMABLE(NUM("train.ckpt_every", train.ckpt_every, 0, kSteps, "steps between checkpoints (0 = only the last)")),
    RESUMABLE(NUM("train.threads", train.threads, 0, 4096, "OpenMP threads per process (0 = automatic)")),
    RESUMABLE(NUM_GT("train.allreduce_bucket_mb", train.allreduce_bucket_mb, 0, 65536, "MPI gradient all-reduce bucket size")),
    RESUMABLE(BOOL("train.allreduce_overlap", train.allreduce_overlap, "all-reduce buckets during the last backward")),
    STR("train.precision", train.precision, "fp32|bf16", "matrix products: fp32 or bf16 (fp32 accumulation)"),
    RESUMABLE(STR("train.on_nonfinite", train.on_nonfinite, "stop|skip", "a step with a non-finite loss or gradient: stop the run, or skip the step")),
    RESUMABLE(NUM("train.max_nonfinite_skips", train.max_nonfinite_skips, 1, 1000000, "skip: stop after this many non-finite steps in a row")),
};

#undef FIELD
#undef NUM
#undef NUM_GT
#undef NUM_LT
#undef BOOL
#undef STR

// Untrusted key names are shortened in messages.
std::string short_text(const std::string& s) {
  return s.size() <= 100 ? s : s.substr(0, 100) + "...";
}

bool is_group(std::string_view path) {
  for (const ConfigKey& k : kKeys) {
    std::string_view p = k.path;
    if (p.size() > path.size() && p.substr(0, path.size()) == path && p[path.size()] == '.')
      return true;
  }
  return false;
}

bool is_integer_field(const ConfigField& f) {
  return std::holds_alternative<i64*>(f) || std::holds_alternative<i32*>(f);
}

std::string fmt_limit(double x, bool integer) {
  if (integer) return std::to_string((long long)x);
  std::ostringstream os;
  os << x;
  return os.str();
}

// Range check of an integer key (limits are exact in a double: |limit| <= 2^53).
void check_int(const ConfigKey& k, i64 v, const std::string& src) {
  const i64 lo = i64(k.min), hi = i64(k.max);
  if (v < lo) {
    if (lo == 1) fail(src, ": '", k.path, "' = ", v, " must be positive (minimum 1)");
    fail(src, ": '", k.path, "' = ", v, " is below the minimum ", lo);
  }
  DLCM_CHECK(v <= hi, src, ": '", k.path, "' = ", v, " exceeds the maximum ", hi);
}

void check_float(const ConfigKey& k, double v, const std::string& src) {
  DLCM_CHECK(std::isfinite(v), src, ": '", k.path, "' = ", v,
             " is not a finite number (every float key must be finite)");
  if (k.min_open) {
    if (!(v > k.min)) {
      if (k.min == 0) fail(src, ": '", k.path, "' = ", v, " must be positive (greater than 0)");
      fail(src, ": '", k.path, "' = ", v, " must be greater than ", k.min);
    }
  } else {
    DLCM_CHECK(v >= k.min, src, ": '", k.path, "' = ", v, " is below the minimum ", k.min);
  }
  if (k.max_open) DLCM_CHECK(v < k.max, src, ": '", k.path, "' = ", v, " must be less than ", k.max);
  else DLCM_CHECK(v <= k.max, src, ": '", k.path, "' = ", v, " exceeds the maximum ", k.max);
}

void check_choice(const ConfigKey& k, const std::string& v, const std::string& src) {
  std::string_view all = k.choices;
  std::string list;
  size_t n = 0;
  for (size_t a = 0; a <= all.size();) {
    size_t b = all.find('|', a);
    if (b == std::string_view::npos) b = all.size();
    if (all.substr(a, b - a) == v) return;
    const bool last = b == all.size();
    if (n++) list += last ? " or " : ", ";
    list += '"';
    list.append(all.substr(a, b - a));
    list += '"';
    a = b + 1;
  }
  fail(src, ": '", k.path, "' must be ", list, ", got ", json_excerpt(json(v)));
}

// A JSON number that must be an integer, as i64 (values beyond i64 are reported against the
// key's limits).
i64 json_to_i64(const ConfigKey& k, const json& v, const std::string& src) {
  DLCM_CHECK(v.is_number(), src, ": config key '", k.path, "' must be a number, got ",
             json_excerpt(v));
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    DLCM_CHECK(u <= uint64_t(std::numeric_limits<i64>::max()), src, ": '", k.path, "' = ", u,
               " exceeds the maximum ", fmt_limit(k.max, true));
    return i64(u);
  }
  if (v.is_number_integer()) return v.get<i64>();
  const double d = v.get<double>();
  DLCM_CHECK(std::isfinite(d) && d == std::floor(d), src, ": config key '", k.path,
             "' must be an integer, got ", json_excerpt(v));
  DLCM_CHECK(d >= -9.2e18, src, ": '", k.path, "' = ", d, " is below the minimum ",
             fmt_limit(k.min, true));
  DLCM_CHECK(d <= 9.2e18, src, ": '", k.path, "' = ", d, " exceeds the maximum ",
             fmt_limit(k.max, true));
  return i64(d);
}

// Sets key k of c from the JSON value v, checking type and range.
void set_from_json(Config& c, const ConfigKey& k, const json& v, const std::string& src) {
  const ConfigField f = k.field(c);
  if (auto p = std::get_if<i64*>(&f)) {
    const i64 x = json_to_i64(k, v, src);
    check_int(k, x, src);
    **p = x;
  } else if (auto p = std::get_if<i32*>(&f)) {
    const i64 x = json_to_i64(k, v, src);
    check_int(k, x, src);  // limits fit i32
    **p = i32(x);
  } else if (auto p = std::get_if<uint64_t*>(&f)) {
    DLCM_CHECK(v.is_number(), src, ": config key '", k.path, "' must be a number, got ",
               json_excerpt(v));
    if (v.is_number_unsigned()) {
      **p = v.get<uint64_t>();
    } else if (v.is_number_integer()) {
      const i64 x = v.get<i64>();
      DLCM_CHECK(x >= 0, src, ": '", k.path, "' = ", x, " is below the minimum 0");
      **p = uint64_t(x);
    } else {
      const double d = v.get<double>();
      DLCM_CHECK(std::isfinite(d) && d == std::floor(d), src, ": config key '", k.path,
                 "' must be an integer, got ", json_excerpt(v));
      DLCM_CHECK(d >= 0, src, ": '", k.path, "' = ", d, " is below the minimum 0");
      DLCM_CHECK(d < 18446744073709551616.0, src, ": '", k.path, "' = ", d,
                 " exceeds the maximum ", std::numeric_limits<uint64_t>::max());
      **p = uint64_t(d);
    }
  } else if (auto p = std::get_if<float*>(&f)) {
    DLCM_CHECK(v.is_number(), src, ": config key '", k.path, "' must be a number, got ",
               json_excerpt(v));
    const double x = v.get<double>();
    check_float(k, x, src);
    **p = float(x);
  } else if (auto p = std::get_if<bool*>(&f)) {
    DLCM_CHECK(v.is_boolean(), src, ": config key '", k.path, "' must be true or false, got ",
               json_excerpt(v));
    **p = v.get<bool>();
  } else if (auto p = std::get_if<std::string*>(&f)) {
    DLCM_CHECK(v.is_string(), src, ": config key '", k.path, "' must be a string, got ",
               json_excerpt(v));
    **p = v.get<std::string>();
  }
}

void read_object(Config& c, const json& src, const std::string& prefix, const std::string& source) {
  DLCM_CHECK(src.is_object(), source, ": ", prefix.empty() ? "top level" : "'" + prefix + "'",
             " must be a JSON object, got ", json_excerpt(src));
  for (auto it = src.begin(); it != src.end(); ++it) {
    const std::string key = prefix.empty() ? it.key() : prefix + "." + it.key();
    if (const ConfigKey* k = find_config_key(key)) set_from_json(c, *k, it.value(), source);
    else if (is_group(key)) read_object(c, it.value(), key, source);
    else fail(source, ": unknown config key '", short_text(key), "'");
  }
}

json field_json(const ConfigField& f) {
  // A float goes through its shortest text: json(float) would widen it to the double
  // 0.029999999329447746 and print every digit of that.
  if (auto p = std::get_if<float*>(&f)) return json(std::stod(float_text(**p)));
  return std::visit([](auto* p) { return json(*p); }, f);
}

// Checked i64 arithmetic for the size estimates.
struct Checked {
  const std::string& src;
  i64 mul(i64 a, i64 b) const {
    i64 r;
    DLCM_CHECK(!__builtin_mul_overflow(a, b, &r), src,
               ": the model's size overflows 64-bit arithmetic (reduce widths, layers or "
               "vocab_size)");
    return r;
  }
  i64 add(i64 a, i64 b) const {
    i64 r;
    DLCM_CHECK(!__builtin_add_overflow(a, b, &r), src,
               ": the model's size overflows 64-bit arithmetic (reduce widths, layers or "
               "vocab_size)");
    return r;
  }
  template <typename... T>
  i64 sum(i64 a, T... rest) const {
    i64 s = a;
    ((s = add(s, rest)), ...);
    return s;
  }
};

// Parameters of one pre-norm block, as nn/transformer.cpp registers them.
i64 block_param_count(const Checked& k, i64 d, i64 H, i64 Hkv, i64 hd, i64 dff, bool qk) {
  const i64 q = k.mul(H, hd), kv = k.mul(Hkv, hd);
  return k.sum(k.mul(2, d), k.mul(k.mul(2, q), d), k.mul(k.mul(2, kv), d),
               k.mul(k.mul(3, d), dff), qk ? k.mul(2, hd) : 0);
}

// Activation floats one block keeps per token for its backward (generous).
i64 block_act_per_token(const Checked& k, i64 d, i64 H, i64 Hkv, i64 hd, i64 dff) {
  return k.sum(k.mul(8, d), k.mul(3, k.mul(H, hd)), k.mul(3, k.mul(Hkv, hd)), k.mul(4, dff));
}

}  // namespace

const std::vector<ConfigKey>& config_keys() { return kKeys; }

std::string float_text(float v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);  // shortest round-trip form
  return std::string(buf, r.ptr);
}

const ConfigKey* find_config_key(std::string_view path) {
  for (const ConfigKey& k : kKeys)
    if (path == k.path) return &k;
  return nullptr;
}

std::string config_keys_listing(bool markdown) {
  Config d;
  std::ostringstream os;
  if (markdown) {
    os << "| key | type | default | allowed | on resume | description |\n"
       << "|---|---|---|---|---|---|\n";
  }
  for (const ConfigKey& k : kKeys) {
    const ConfigField f = k.field(d);
    std::string type, range;
    const std::string def = field_json(f).dump();
    if (std::holds_alternative<std::string*>(f)) {
      type = "string";
      std::string c = k.choices;
      for (size_t i = 0; (i = c.find('|', i)) != std::string::npos;) c.replace(i, 1, ", ");
      range = c;
    } else if (std::holds_alternative<bool*>(f)) {
      type = "bool";
      range = "true, false";
    } else if (std::holds_alternative<uint64_t*>(f)) {
      type = "uint64";
      range = "[0, " + std::to_string(std::numeric_limits<uint64_t>::max()) + "]";
    } else {
      const bool integer = is_integer_field(f);
      type = integer ? "int" : "float";
      range = std::string(k.min_open ? "(" : "[") + fmt_limit(k.min, integer) + ", " +
              fmt_limit(k.max, integer) + (k.max_open ? ")" : "]");
    }
    if (markdown) {
      os << "| `" << k.path << "` | " << type << " | " << def << " | " << range << " | "
         << (k.on_resume ? "may change" : "") << " | " << k.doc << " |\n";
    } else {
      char line[160];
      std::snprintf(line, sizeof line, "%-26s %-6s %-12s %-26s %-7s ", k.path, type.c_str(),
                    def.c_str(), range.c_str(), k.on_resume ? "resume" : "");
      os << line << k.doc << "\n";
    }
  }
  return os.str();
}

nlohmann::json config_to_json(const Config& c_in) {
  Config c = c_in;
  json j = json::object();
  for (const ConfigKey& k : kKeys) {
    json* t = &j;
    std::string_view p = k.path;
    for (size_t dot; (dot = p.find('.')) != std::string_view::npos; p.remove_prefix(dot + 1))
      t = &(*t)[std::string(p.substr(0, dot))];
    (*t)[std::string(p)] = field_json(k.field(c));
  }
  return j;
}

Config config_from_json(const json& src, const std::string& source) {
  Config c;
  read_object(c, src, "", source);
  validate(c, source);
  mup_resolve(c.model);
  return c;
}

nlohmann::json load_config_json(const std::string& path) {
  std::ifstream probe(path);
  DLCM_CHECK(probe, path, ": cannot open config file (check the path given to --config)");
  return read_json_file_bounded(path, {64, size_t(1) << 20});
}

Config load_config(const std::string& path) { return config_from_json(load_config_json(path), path); }

// The key path an override names: its text before '=', or "train.<key>" for a bare training
// key ("lr=1e-3").
static std::string override_path(const std::string& s) {
  std::string key = s.substr(0, s.find('='));
  if (!find_config_key(key) && !is_group(key) && find_config_key("train." + key))
    key = "train." + key;
  return key;
}

const ConfigKey* override_key(const std::string& set) { return find_config_key(override_path(set)); }

void apply_overrides(json& j, const std::vector<std::string>& sets) {
  for (const std::string& s : sets) {
    const std::string shown = short_text(s);
    auto eq = s.find('=');
    DLCM_CHECK(eq != std::string::npos && eq > 0, "--set '", shown,
               "': expected key=value, e.g. --set d_token=512 or --set train.lr=1e-3");
    const std::string key = override_path(s), val = s.substr(eq + 1);
    const ConfigKey* k = find_config_key(key);
    DLCM_CHECK(k || is_group(key), "--set '", shown, "': unknown config key '", short_text(key),
               "' (`dlcm config --keys` lists them)");
    json v;
    Config probe;
    if (k && std::holds_alternative<std::string*>(k->field(probe))) {
      v = val;
    } else {
      try {
        v = parse_json_bounded(val, "--set '" + shown + "'", {64, size_t(1) << 20});
      } catch (const Error& e) {
        fail(e.what(), " (expected ", k ? "a number or true/false" : "a JSON object", ")");
      }
    }
    json* t = &j;
    std::string_view p = key;
    for (size_t a = 0;;) {
      const size_t dot = p.find('.', a);
      if (!t->is_object()) *t = json::object();
      t = &(*t)[std::string(p.substr(a, dot == std::string_view::npos ? dot : dot - a))];
      if (dot == std::string_view::npos) break;
      a = dot + 1;
    }
    *t = std::move(v);
  }
}

i64 model_param_count(const ModelConfig& m, const std::string& src) {
  const Checked k{src};
  const i64 d = m.d_token, V = m.vocab_size, hd = m.head_dim;
  const i64 emb = k.mul(V, d);
  const i64 tok_block = block_param_count(k, d, m.n_heads, m.n_kv_heads, hd, m.d_ff, m.qk_norm);
  if (!m.is_dlcm()) {
    // baseline_extras: encoder.norm, xattn.ffn_norm and the cross FFN's w1, w2, w3
    const i64 extras = m.baseline_extras ? k.sum(d, d, k.mul(k.mul(3, m.x_d_ff), d)) : 0;
    return k.sum(emb, k.mul(m.n_layers, tok_block), extras, d, emb);
  }
  const i64 dc = m.d_concept, xq = k.mul(m.x_heads, hd), xkv = k.mul(m.x_kv_heads, hd);
  const i64 router = m.router.kind == "projected" ? k.mul(k.mul(2, m.scan_dim()), d) : 0;
  const i64 bb_block =
      block_param_count(k, dc, m.bb_heads, m.bb_kv_heads, hd, m.bb_d_ff, m.qk_norm);
  const i64 cross_ffn = k.sum(d, k.mul(k.mul(3, m.x_d_ff), d));
  // concept_path = false registers no pooling, backbone or concept attention (the control).
  if (!m.concept_path)
    return k.sum(emb, k.mul(m.enc_layers, tok_block), d, router, cross_ffn,
                 k.mul(m.dec_layers, tok_block), d, emb);
  const i64 xattn = k.sum(d, k.mul(xq, d), k.mul(k.mul(2, xkv), dc), k.mul(d, xq), k.mul(2, hd),
                          cross_ffn);
  return k.sum(emb, k.mul(m.enc_layers, tok_block), d, router, k.mul(dc, d),
               k.mul(m.bb_layers, bb_block), dc, dc, xattn, k.mul(m.dec_layers, tok_block), d,
               emb);
}

ConfigSize config_size(const Config& c, const std::string& src) {
  const Checked k{src};
  const ModelConfig& m = c.model;
  ConfigSize r;
  r.params = model_param_count(m, src);
  const i64 d = m.d_token, hd = m.head_dim;
  const i64 tokens = k.mul(c.train.batch_size, c.train.seq_len);
  const i64 tok_block = block_act_per_token(k, d, m.n_heads, m.n_kv_heads, hd, m.d_ff);
  i64 per_token = k.mul(8, d);  // embedding, final norm and their gradients
  if (!m.is_dlcm()) {
    per_token = k.add(per_token, k.mul(m.n_layers, tok_block));
    // baseline_extras: 7 [d] activations/gradients and 6 [x_d_ff] ones per token (and rstds)
    if (m.baseline_extras) per_token = k.sum(per_token, k.mul(16, d), k.mul(6, m.x_d_ff));
  } else {
    // Concepts are at most as many as tokens: counting the backbone per token bounds it.
    const i64 bb_block =
        block_act_per_token(k, m.d_concept, m.bb_heads, m.bb_kv_heads, hd, m.bb_d_ff);
    const i64 xattn = block_act_per_token(k, d, m.x_heads, m.x_kv_heads, hd, m.x_d_ff);
    per_token = k.sum(per_token, k.mul(k.add(m.enc_layers, m.dec_layers), tok_block),
                      k.mul(m.bb_layers, bb_block), xattn, k.mul(8, m.d_concept),
                      k.mul(4, m.scan_dim()));
  }
  // The head computes logits in chunks of 256 rows (nn/lm_head.h): no [tokens, V] tensor.
  r.activations = k.add(k.mul(tokens, per_token), k.mul(512, m.vocab_size));
  return r;
}

void check_model_size(const ModelConfig& m, const std::string& src) {
  const i64 n = model_param_count(m, src);
  DLCM_CHECK(n <= kMaxParams, src, ": the model would have ", n, " parameters, over the limit of ",
             kMaxParams, " (2^34; reduce widths, layers or vocab_size)");
}

void validate(const Config& c_in, const std::string& src) {
  Config c = c_in;  // the table's accessors take a mutable Config
  for (const ConfigKey& k : kKeys) {
    const ConfigField f = k.field(c);
    if (auto p = std::get_if<i64*>(&f)) check_int(k, **p, src);
    else if (auto p = std::get_if<i32*>(&f)) check_int(k, **p, src);
    else if (auto p = std::get_if<float*>(&f)) check_float(k, **p, src);
    else if (auto p = std::get_if<std::string*>(&f)) check_choice(k, **p, src);
  }
  const ModelConfig& m = c.model;
  DLCM_CHECK(m.head_dim % 2 == 0, src, ": 'head_dim' must be even for RoPE, got ", m.head_dim);
  auto heads = [&](i64 h, i64 kv, const char* hk, const char* kvk) {
    DLCM_CHECK(h % kv == 0, src, ": '", kvk, "' (", kv, ") must divide '", hk, "' (", h, ")");
    DLCM_CHECK(h * m.head_dim <= kWidth, src, ": '", hk, "' * 'head_dim' = ", h * m.head_dim,
               " exceeds the maximum attention width ", kWidth);
  };
  heads(m.n_heads, m.n_kv_heads, "n_heads", "n_kv_heads");
  for (auto [id, k] : {std::pair{m.bos_id, "bos_id"}, {m.eos_id, "eos_id"}, {m.pad_id, "pad_id"}})
    DLCM_CHECK(id >= 0 && id < m.vocab_size, src, ": '", k, "' = ", id,
               " is outside the vocabulary [0, ", m.vocab_size, ")");
  if (!m.is_dlcm() && m.baseline_extras)
    DLCM_CHECK(m.layers_pre() >= 1 && m.layers_pre() < m.n_layers, src,
               ": 'baseline_extras' splits the stack at 'n_layers_pre' (", m.layers_pre(),
               "), which must lie in [1, n_layers - 1] = [1, ", m.n_layers - 1,
               "] (0 means n_layers / 2; n_layers must be >= 2)");
  if (m.is_dlcm()) {
    DLCM_CHECK(!(m.rule_router() && m.router.smooth_grad), src, ": 'router.smooth_grad' needs a ",
               "learned router; router.kind \"", m.router.kind, "\" is a rule (p is its 0/1 ",
               "decision, nothing to train)");
    heads(m.bb_heads, m.bb_kv_heads, "bb_heads", "bb_kv_heads");
    heads(m.x_heads, m.x_kv_heads, "x_heads", "x_kv_heads");
    DLCM_CHECK(!(m.concept_visibility == "inclusive" && m.concept_repr == "mean"), src,
               ": 'concept_visibility' \"inclusive\" with 'concept_repr' \"mean\" leaks the "
               "future (a token would see the mean of tokens after it); use 'concept_repr' "
               "\"first\" or \"prefix_mean\", or 'concept_visibility' \"shifted\"");
    DLCM_CHECK(!(m.concept_visibility == "inclusive" && m.concept_repr == "prefix_mean" &&
                 m.concept_path && m.xattn_impl == "replicate"),
               src, ": 'xattn_impl' \"replicate\" is not implemented for 'concept_repr' "
               "\"prefix_mean\" with 'concept_visibility' \"inclusive\" (a token's own concept "
               "differs per token); use \"compact\"");
    for (auto [w, k] : {std::pair{m.enc_window, "enc_window"}, {m.dec_window, "dec_window"}})
      DLCM_CHECK(w <= m.max_seq_len, src, ": '", k, "' must be in [0, max_seq_len = ",
                 m.max_seq_len, "] (0 = full causal attention), got ", w);
  }
  const TrainConfig& t = c.train;
  DLCM_CHECK(t.seq_len <= m.max_seq_len, src, ": 'train.seq_len' (", t.seq_len,
             ") exceeds 'max_seq_len' (", m.max_seq_len, ")");
  DLCM_CHECK(t.batch_size * t.seq_len <= kMaxBatchTokens, src, ": 'train.batch_size' * ",
             "'train.seq_len' = ", t.batch_size * t.seq_len, " tokens exceeds the maximum ",
             kMaxBatchTokens, " per micro-batch (use train.grad_accum)");
  check_model_size(m, src);
  const ConfigSize sz = config_size(c, src);
  DLCM_CHECK(sz.activations <= kMaxActivations, src, ": a micro-batch would keep about ",
             sz.activations, " activation floats, over the limit of ", kMaxActivations,
             " (2^36; reduce train.batch_size, train.seq_len or the model)");
}

}  // namespace dlcm
