#include "models/config.h"

#include <fstream>

#include "models/mup.h"

namespace dlcm {
using nlohmann::json;

nlohmann::json config_to_json(const Config& c) {
  const ModelConfig& m = c.model;
  json j;
  j["arch"] = m.arch;
  j["vocab_size"] = m.vocab_size;
  j["d_token"] = m.d_token;
  j["n_heads"] = m.n_heads;
  j["n_kv_heads"] = m.n_kv_heads;
  j["head_dim"] = m.head_dim;
  j["d_ff"] = m.d_ff;
  j["n_layers"] = m.n_layers;
  j["baseline_extras"] = m.baseline_extras;
  j["n_layers_pre"] = m.n_layers_pre;
  j["enc_layers"] = m.enc_layers;
  j["dec_layers"] = m.dec_layers;
  j["d_concept"] = m.d_concept;
  j["bb_layers"] = m.bb_layers;
  j["bb_heads"] = m.bb_heads;
  j["bb_kv_heads"] = m.bb_kv_heads;
  j["bb_d_ff"] = m.bb_d_ff;
  j["x_heads"] = m.x_heads;
  j["x_kv_heads"] = m.x_kv_heads;
  j["x_d_ff"] = m.x_d_ff;
  j["d_scan"] = m.d_scan;
  j["router"] = {{"kind", m.router.kind},
                 {"stride", m.router.stride},
                 {"alpha", m.router.alpha},
                 {"tau", m.router.tau},
                 {"smooth_grad", m.router.smooth_grad}};
  j["target_R"] = m.target_R;
  j["aux_weight"] = m.aux_weight;
  j["aux_kind"] = m.aux_kind;
  j["smoother"] = m.smoother;
  j["xattn_impl"] = m.xattn_impl;
  j["qk_norm"] = m.qk_norm;
  j["rope_theta"] = m.rope_theta;
  j["norm_eps"] = m.norm_eps;
  j["logit_mult"] = m.logit_mult;
  j["max_seq_len"] = m.max_seq_len;
  j["bos_id"] = m.bos_id;
  j["eos_id"] = m.eos_id;
  j["pad_id"] = m.pad_id;
  j["init_std"] = m.init_std;
  j["mup"] = {{"enabled", m.mup.enabled},
              {"d_base", m.mup.d_base},
              {"sigma_base", m.mup.sigma_base},
              {"lr_mult_token", m.mup.lr_mult_token},
              {"lr_mult_concept", m.mup.lr_mult_concept},
              {"lr_mult_other", m.mup.lr_mult_other}};
  const TrainConfig& t = c.train;
  j["train"] = {{"seq_len", t.seq_len},
                {"batch_size", t.batch_size},
                {"grad_accum", t.grad_accum},
                {"steps", t.steps},
                {"schedule", t.schedule},
                {"lr", t.lr},
                {"min_lr_ratio", t.min_lr_ratio},
                {"warmup_steps", t.warmup_steps},
                {"wsd_decay_frac", t.wsd_decay_frac},
                {"beta1", t.beta1},
                {"beta2", t.beta2},
                {"eps", t.eps},
                {"weight_decay", t.weight_decay},
                {"grad_clip", t.grad_clip},
                {"seed", t.seed},
                {"log_every", t.log_every},
                {"eval_every", t.eval_every},
                {"eval_batches", t.eval_batches},
                {"ckpt_every", t.ckpt_every},
                {"threads", t.threads},
                {"allreduce_bucket_mb", t.allreduce_bucket_mb},
                {"allreduce_overlap", t.allreduce_overlap},
                {"precision", t.precision}};
  return j;
}

namespace {

// Recursively overlay `src` onto `dst` (which holds the defaults): every key of src must
// exist in dst with a compatible JSON type.
void overlay(json& dst, const json& src, const std::string& prefix, const std::string& source) {
  DLCM_CHECK(src.is_object(), source, ": ", prefix.empty() ? "top level" : prefix,
             " must be a JSON object");
  for (auto it = src.begin(); it != src.end(); ++it) {
    std::string key = prefix.empty() ? it.key() : prefix + "." + it.key();
    if (!dst.contains(it.key())) fail(source, ": unknown config key '", key, "'");
    json& d = dst[it.key()];
    const json& s = it.value();
    if (d.is_object()) {
      overlay(d, s, key, source);
    } else if (d.is_number()) {
      DLCM_CHECK(s.is_number(), source, ": config key '", key, "' must be a number, got ",
                 s.dump());
      if (d.is_number_integer() || d.is_number_unsigned()) {
        DLCM_CHECK(s.is_number_integer() || s.is_number_unsigned() ||
                       (s.is_number_float() && s.get<double>() == double(s.get<i64>())),
                   source, ": config key '", key, "' must be an integer, got ", s.dump());
        d = s.get<i64>();
      } else {
        d = s.get<double>();
      }
    } else if (d.is_boolean()) {
      DLCM_CHECK(s.is_boolean(), source, ": config key '", key, "' must be true or false, got ",
                 s.dump());
      d = s;
    } else if (d.is_string()) {
      DLCM_CHECK(s.is_string(), source, ": config key '", key, "' must be a string, got ",
                 s.dump());
      d = s;
    } else {
      d = s;
    }
  }
}

template <typename T>
void get(const json& j, const char* k, T& out) {
  out = j.at(k).get<T>();
}

}  // namespace

Config config_from_json(const json& src, const std::string& source) {
  json j = config_to_json(Config{});
  overlay(j, src, "", source);
  Config c;
  ModelConfig& m = c.model;
  get(j, "arch", m.arch);
  get(j, "vocab_size", m.vocab_size);
  get(j, "d_token", m.d_token);
  get(j, "n_heads", m.n_heads);
  get(j, "n_kv_heads", m.n_kv_heads);
  get(j, "head_dim", m.head_dim);
  get(j, "d_ff", m.d_ff);
  get(j, "n_layers", m.n_layers);
  get(j, "baseline_extras", m.baseline_extras);
  get(j, "n_layers_pre", m.n_layers_pre);
  get(j, "enc_layers", m.enc_layers);
  get(j, "dec_layers", m.dec_layers);
  get(j, "d_concept", m.d_concept);
  get(j, "bb_layers", m.bb_layers);
  get(j, "bb_heads", m.bb_heads);
  get(j, "bb_kv_heads", m.bb_kv_heads);
  get(j, "bb_d_ff", m.bb_d_ff);
  get(j, "x_heads", m.x_heads);
  get(j, "x_kv_heads", m.x_kv_heads);
  get(j, "x_d_ff", m.x_d_ff);
  get(j, "d_scan", m.d_scan);
  const json& r = j.at("router");
  get(r, "kind", m.router.kind);
  get(r, "stride", m.router.stride);
  get(r, "alpha", m.router.alpha);
  get(r, "tau", m.router.tau);
  get(r, "smooth_grad", m.router.smooth_grad);
  get(j, "target_R", m.target_R);
  get(j, "aux_weight", m.aux_weight);
  get(j, "aux_kind", m.aux_kind);
  get(j, "smoother", m.smoother);
  get(j, "xattn_impl", m.xattn_impl);
  get(j, "qk_norm", m.qk_norm);
  get(j, "rope_theta", m.rope_theta);
  get(j, "norm_eps", m.norm_eps);
  get(j, "logit_mult", m.logit_mult);
  get(j, "max_seq_len", m.max_seq_len);
  get(j, "bos_id", m.bos_id);
  get(j, "eos_id", m.eos_id);
  get(j, "pad_id", m.pad_id);
  get(j, "init_std", m.init_std);
  const json& mu = j.at("mup");
  get(mu, "enabled", m.mup.enabled);
  get(mu, "d_base", m.mup.d_base);
  get(mu, "sigma_base", m.mup.sigma_base);
  get(mu, "lr_mult_token", m.mup.lr_mult_token);
  get(mu, "lr_mult_concept", m.mup.lr_mult_concept);
  get(mu, "lr_mult_other", m.mup.lr_mult_other);
  const json& tj = j.at("train");
  TrainConfig& t = c.train;
  get(tj, "seq_len", t.seq_len);
  get(tj, "batch_size", t.batch_size);
  get(tj, "grad_accum", t.grad_accum);
  get(tj, "steps", t.steps);
  get(tj, "schedule", t.schedule);
  get(tj, "lr", t.lr);
  get(tj, "min_lr_ratio", t.min_lr_ratio);
  get(tj, "warmup_steps", t.warmup_steps);
  get(tj, "wsd_decay_frac", t.wsd_decay_frac);
  get(tj, "beta1", t.beta1);
  get(tj, "beta2", t.beta2);
  get(tj, "eps", t.eps);
  get(tj, "weight_decay", t.weight_decay);
  get(tj, "grad_clip", t.grad_clip);
  get(tj, "seed", t.seed);
  get(tj, "log_every", t.log_every);
  get(tj, "eval_every", t.eval_every);
  get(tj, "eval_batches", t.eval_batches);
  get(tj, "ckpt_every", t.ckpt_every);
  get(tj, "threads", t.threads);
  get(tj, "allreduce_bucket_mb", t.allreduce_bucket_mb);
  get(tj, "allreduce_overlap", t.allreduce_overlap);
  get(tj, "precision", t.precision);
  validate(c, source);
  mup_resolve(c.model);
  return c;
}

Config load_config(const std::string& path) {
  std::ifstream f(path);
  DLCM_CHECK(f, path, ": cannot open config file (check the path given to --config)");
  json j;
  try {
    j = json::parse(f);
  } catch (const json::parse_error& e) {
    fail(path, ": invalid JSON: ", e.what());
  }
  return config_from_json(j, path);
}

void apply_overrides(json& j, const std::vector<std::string>& sets) {
  const json defaults = config_to_json(Config{});
  for (const std::string& s : sets) {
    auto eq = s.find('=');
    DLCM_CHECK(eq != std::string::npos && eq > 0, "--set '", s,
               "': expected key=value, e.g. --set d_token=512 or --set train.lr=1e-3");
    std::string key = s.substr(0, eq), val = s.substr(eq + 1);
    std::vector<std::string> path;
    for (size_t a = 0, b; a <= key.size(); a = b + 1) {
      b = key.find('.', a);
      if (b == std::string::npos) b = key.size();
      path.push_back(key.substr(a, b - a));
    }
    if (path.size() == 1 && !defaults.contains(path[0]) && defaults["train"].contains(path[0]))
      path.insert(path.begin(), "train");
    const json* d = &defaults;
    json* t = &j;
    for (size_t i = 0; i < path.size(); ++i) {
      DLCM_CHECK(d->is_object() && d->contains(path[i]), "--set '", s, "': unknown config key '",
                 key, "'");
      d = &(*d)[path[i]];
      if (!t->is_object()) *t = json::object();
      t = &(*t)[path[i]];
    }
    json v;
    if (d->is_string()) {
      v = val;
    } else {
      try {
        v = json::parse(val);
      } catch (...) {
        fail("--set '", s, "': cannot parse value '", val, "' (expected ", d->type_name(), ")");
      }
    }
    *t = v;
  }
}

void validate(const Config& c, const std::string& src) {
  const ModelConfig& m = c.model;
  auto pos = [&](i64 v, const char* k) {
    DLCM_CHECK(v > 0, src, ": '", k, "' must be positive, got ", v);
  };
  DLCM_CHECK(m.arch == "baseline" || m.arch == "dlcm", src, ": 'arch' must be \"baseline\" or ",
             "\"dlcm\", got \"", m.arch, "\"");
  pos(m.vocab_size, "vocab_size");
  pos(m.d_token, "d_token");
  pos(m.n_heads, "n_heads");
  pos(m.n_kv_heads, "n_kv_heads");
  pos(m.head_dim, "head_dim");
  DLCM_CHECK(m.head_dim % 2 == 0, src, ": 'head_dim' must be even for RoPE, got ", m.head_dim);
  pos(m.d_ff, "d_ff");
  pos(m.max_seq_len, "max_seq_len");
  DLCM_CHECK(m.n_heads % m.n_kv_heads == 0, src, ": 'n_kv_heads' (", m.n_kv_heads,
             ") must divide 'n_heads' (", m.n_heads, ")");
  DLCM_CHECK(m.norm_eps > 0, src, ": 'norm_eps' must be positive");
  DLCM_CHECK(m.rope_theta > 0, src, ": 'rope_theta' must be positive");
  for (auto [id, k] : {std::pair{m.bos_id, "bos_id"}, {m.eos_id, "eos_id"}, {m.pad_id, "pad_id"}})
    DLCM_CHECK(id >= 0 && id < m.vocab_size, src, ": '", k, "' = ", id,
               " is outside the vocabulary [0, ", m.vocab_size, ")");
  if (m.arch == "baseline") {
    pos(m.n_layers, "n_layers");
    if (m.baseline_extras)
      DLCM_CHECK(m.layers_pre() >= 1 && m.layers_pre() < m.n_layers && m.x_d_ff >= 1, src,
                 ": 'baseline_extras' splits the stack at 'n_layers_pre' (", m.layers_pre(),
                 "), which must lie in [1, n_layers - 1] = [1, ", m.n_layers - 1,
                 "] (0 means n_layers / 2), and needs 'x_d_ff' >= 1");
  } else {
    pos(m.enc_layers, "enc_layers");
    DLCM_CHECK(m.dec_layers >= 0, src, ": 'dec_layers' must be >= 0");
    pos(m.d_concept, "d_concept");
    pos(m.bb_layers, "bb_layers");
    pos(m.bb_heads, "bb_heads");
    pos(m.bb_kv_heads, "bb_kv_heads");
    pos(m.bb_d_ff, "bb_d_ff");
    pos(m.x_heads, "x_heads");
    pos(m.x_kv_heads, "x_kv_heads");
    pos(m.x_d_ff, "x_d_ff");
    DLCM_CHECK(m.bb_heads % m.bb_kv_heads == 0, src, ": 'bb_kv_heads' must divide 'bb_heads'");
    DLCM_CHECK(m.x_heads % m.x_kv_heads == 0, src, ": 'x_kv_heads' must divide 'x_heads'");
    DLCM_CHECK(m.d_scan >= 0, src, ": 'd_scan' must be >= 0 (0 means d_token)");
    DLCM_CHECK(m.router.kind == "projected" || m.router.kind == "raw" ||
                   m.router.kind == "fixed" || m.router.kind == "word",
               src, ": 'router.kind' must be \"projected\", \"raw\", \"fixed\" or \"word\", got \"",
               m.router.kind, "\"");
    DLCM_CHECK(m.router.stride >= 1, src, ": 'router.stride' must be >= 1, got ", m.router.stride);
    DLCM_CHECK(!(m.rule_router() && m.router.smooth_grad), src, ": 'router.smooth_grad' needs a ",
               "learned router; router.kind \"", m.router.kind, "\" is a rule (p is its 0/1 ",
               "decision, nothing to train)");
    DLCM_CHECK(m.aux_kind == "global" || m.aux_kind == "sequence", src,
               ": 'aux_kind' must be \"global\" or \"sequence\", got \"", m.aux_kind, "\"");
    DLCM_CHECK(m.router.alpha > 0, src, ": 'router.alpha' must be positive");
    DLCM_CHECK(m.router.tau >= 0 && m.router.tau <= 1, src, ": 'router.tau' must be in [0,1]");
    DLCM_CHECK(m.target_R > 1, src, ": 'target_R' must be > 1, got ", m.target_R);
    DLCM_CHECK(m.aux_weight >= 0, src, ": 'aux_weight' must be >= 0");
    DLCM_CHECK(m.xattn_impl == "compact" || m.xattn_impl == "replicate", src,
               ": 'xattn_impl' must be \"compact\" or \"replicate\", got \"", m.xattn_impl, "\"");
  }
  if (m.mup.enabled) {
    pos(m.mup.d_base, "mup.d_base");
    DLCM_CHECK(m.mup.sigma_base > 0, src, ": 'mup.sigma_base' must be positive");
    for (auto [v, k] : {std::pair{m.mup.lr_mult_token, "mup.lr_mult_token"},
                        {m.mup.lr_mult_concept, "mup.lr_mult_concept"},
                        {m.mup.lr_mult_other, "mup.lr_mult_other"}})
      DLCM_CHECK(v > 0, src, ": '", k, "' must be positive, got ", v);
  }
  const TrainConfig& t = c.train;
  pos(t.seq_len, "train.seq_len");
  pos(t.batch_size, "train.batch_size");
  pos(t.grad_accum, "train.grad_accum");
  DLCM_CHECK(t.steps >= 0, src, ": 'train.steps' must be >= 0");
  DLCM_CHECK(t.seq_len <= m.max_seq_len, src, ": 'train.seq_len' (", t.seq_len,
             ") exceeds 'max_seq_len' (", m.max_seq_len, ")");
  DLCM_CHECK(t.schedule == "cosine" || t.schedule == "wsd" || t.schedule == "constant", src,
             ": 'train.schedule' must be \"cosine\", \"wsd\" or \"constant\", got \"", t.schedule,
             "\"");
  DLCM_CHECK(t.lr > 0, src, ": 'train.lr' must be positive");
  DLCM_CHECK(t.beta1 >= 0 && t.beta1 < 1 && t.beta2 >= 0 && t.beta2 < 1, src,
             ": 'train.beta1'/'train.beta2' must be in [0,1)");
  pos(t.log_every, "train.log_every");
  DLCM_CHECK(t.threads >= 0, src, ": 'train.threads' must be >= 0 (0 = automatic)");
  DLCM_CHECK(t.allreduce_bucket_mb > 0, src, ": 'train.allreduce_bucket_mb' must be positive");
  DLCM_CHECK(t.precision == "fp32" || t.precision == "bf16", src,
             ": 'train.precision' must be \"fp32\" or \"bf16\", got \"", t.precision, "\"");
}

}  // namespace dlcm
