#include "train/coord_check.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "models/model.h"
#include "models/mup.h"
#include "train/trainer.h"

namespace dlcm {

ModelConfig scale_width(const ModelConfig& m, double token_mult, double concept_mult) {
  auto sc = [](i64 v, double f, const char* key) {
    double x = double(v) * f;
    DLCM_CHECK(std::fabs(x - std::round(x)) < 1e-9 && x >= 1, "width multiplier ", f, " makes '",
               key, "' = ", v, " x ", f, " non-integer; use multipliers that keep sizes whole");
    return i64(std::llround(x));
  };
  ModelConfig r = m;
  r.d_token = sc(m.d_token, token_mult, "d_token");
  r.n_heads = sc(m.n_heads, token_mult, "n_heads");
  r.n_kv_heads = sc(m.n_kv_heads, token_mult, "n_kv_heads");
  r.d_ff = sc(m.d_ff, token_mult, "d_ff");
  if (m.d_scan > 0) r.d_scan = sc(m.d_scan, token_mult, "d_scan");
  r.x_heads = sc(m.x_heads, token_mult, "x_heads");
  r.x_kv_heads = sc(m.x_kv_heads, token_mult, "x_kv_heads");
  r.x_d_ff = sc(m.x_d_ff, token_mult, "x_d_ff");
  r.d_concept = sc(m.d_concept, concept_mult, "d_concept");
  r.bb_heads = sc(m.bb_heads, concept_mult, "bb_heads");
  r.bb_kv_heads = sc(m.bb_kv_heads, concept_mult, "bb_kv_heads");
  r.bb_d_ff = sc(m.bb_d_ff, concept_mult, "bb_d_ff");
  return r;
}

ModelConfig parametrised(const ModelConfig& m, const std::string& param) {
  DLCM_CHECK(param == "mup" || param == "sp", "parametrisation '", param, "' must be mup or sp");
  ModelConfig r = m;
  r.mup.enabled = param == "mup";
  if (r.mup.enabled) {
    r.logit_mult = float(1.0 / mup_s_token(r));  // what make_model forces, without the log line
  } else {
    r.init_std = m.mup.sigma_base;
    r.logit_mult = 1.0f;
  }
  return r;
}

std::vector<CoordPoint> coord_check(const CoordCheckOptions& o) {
  const TrainConfig& bt = o.base.train;
  const i64 B = bt.batch_size, L = bt.seq_len, V = o.base.model.vocab_size;
  DLCM_CHECK(i64(o.tokens.size()) == B * L && o.targets.size() == o.tokens.size(),
             "coord check: the fixed batch must hold train.batch_size x train.seq_len = ", B * L,
             " tokens and targets, got ", o.tokens.size(), " and ", o.targets.size());
  DLCM_CHECK(!o.mults.empty() && !o.record_steps.empty(), "coord check: no widths or no steps");
  DLCM_CHECK(o.seeds >= 1, "coord check: --seeds must be >= 1");
  const i64 last = *std::max_element(o.record_steps.begin(), o.record_steps.end());
  DLCM_CHECK(*std::min_element(o.record_steps.begin(), o.record_steps.end()) >= 0,
             "coord check: steps must be >= 0");
  for (double mult : o.mults)  // every width is valid before any training starts
    scale_width(o.base.model, o.scale_token ? mult : 1, o.scale_concept ? mult : 1);
  for (const std::string& param : o.params) parametrised(o.base.model, param);
  std::vector<CoordPoint> out;
  for (const std::string& param : o.params) {
    for (double mult : o.mults) {
      Config c = o.base;
      c.model = scale_width(o.base.model, o.scale_token ? mult : 1, o.scale_concept ? mult : 1);
      c.model = parametrised(c.model, param);
      c.train.grad_accum = 1;
      c.train.steps = last;
      c.train.schedule = "constant";
      c.train.warmup_steps = 0;
      c.train.grad_clip = 0;
      c.train.eval_every = 0;
      c.train.ckpt_every = 0;
      validate(c, "coord check");
      // name -> step -> summed RMS over seeds
      std::map<std::pair<i64, std::string>, double> sum;
      std::vector<std::string> order;
      for (i64 seed = 0; seed < o.seeds; ++seed) {
        c.train.seed = bt.seed + uint64_t(seed);
        TrainData data;
        data.train_batch = [&o](i64, i64, i64, i64 b, i64 l, i32* tok, i32* tgt) {
          std::copy(o.tokens.begin(), o.tokens.begin() + b * l, tok);
          std::copy(o.targets.begin(), o.targets.begin() + b * l, tgt);
        };
        TrainOptions to;
        to.quiet = true;
        to.peak_gflops = 1;  // MFU is irrelevant here; skip the GEMM measurement
        Trainer tr(c, std::move(data), to);
        Buf logits(B * L * V);
        for (i64 s = 0; s <= last; ++s) {
          if (std::find(o.record_steps.begin(), o.record_steps.end(), s) != o.record_steps.end()) {
            tr.model().logits(o.tokens.data(), B, L, logits.data());
            auto acts = tr.model().activation_rms();
            DLCM_CHECK(!acts.empty(), "coord check: arch \"", c.model.arch,
                       "\" reports no activation RMS (LanguageModel::activation_rms)");
            acts.push_back({"logits", rms(logits.data(), B * L * V)});
            for (auto& [name, v] : acts) {
              if (std::find(order.begin(), order.end(), name) == order.end()) order.push_back(name);
              sum[{s, name}] += v;
            }
          }
          if (s < last) tr.train_step();
        }
      }
      std::vector<i64> steps = o.record_steps;
      std::sort(steps.begin(), steps.end());
      steps.erase(std::unique(steps.begin(), steps.end()), steps.end());
      for (i64 s : steps)
        for (auto& name : order)
          out.push_back({param, mult, c.model.d_token, c.model.is_dlcm() ? c.model.d_concept : 0, s, name,
                         sum[{s, name}] / double(o.seeds)});
    }
  }
  return out;
}

double coord_spread(const std::vector<CoordPoint>& pts, const std::string& param, i64 step,
                    const std::string& name) {
  double lo = INFINITY, hi = 0;
  for (auto& p : pts)
    if (p.param == param && p.step == step && p.name == name) {
      lo = std::min(lo, p.rms);
      hi = std::max(hi, p.rms);
    }
  return hi > 0 && lo > 0 ? hi / lo : 0;
}

}  // namespace dlcm
