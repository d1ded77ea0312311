#include "train/optimizer.h"

#include <cmath>

#include "kernels/ops.h"

namespace dlcm {

void AdamW::init(const ParamStore& ps) {
  m.assign(ps.total(), 0);
  v.assign(ps.total(), 0);
  t = 0;
}

bool AdamW::step(ParamStore& ps, float lr, const TrainConfig& tc) {
  ++t;
  bool finite = true;
  for (auto& p : ps.params()) {
    float wd = p.decay ? tc.weight_decay : 0.0f;
    // µP (SPEC 6): lr * lr_mult / s and eps / s; both factors are 1 without µP.
    finite &= ops::adamw_update(p.w, p.g, m.data() + p.offset, v.data() + p.offset, p.numel,
                      lr * p.lr_mult / p.width_mult, tc.beta1, tc.beta2, tc.eps / p.width_mult,
                      wd, t);
  }
  return finite;
}

double clip_grad_norm(ParamStore& ps, float max_norm) {
  double ss = ops::sum_squares(ps.grad(), ps.total());  // padding between tensors is zero
  double norm = std::sqrt(ss);
  if (max_norm > 0 && norm > max_norm) {
    // PyTorch: clip_coef = max_norm / (norm + 1e-6)
    ops::scale_inplace(ps.grad(), ps.total(), float(max_norm / (norm + 1e-6)));
  }
  return norm;
}

float lr_at(const TrainConfig& t, i64 step, i64 total) {
  const float lo = t.lr * t.min_lr_ratio;
  if (t.warmup_steps > 0 && step < t.warmup_steps)
    return t.lr * float(step + 1) / float(t.warmup_steps);
  if (t.schedule == "constant") return t.lr;
  if (t.schedule == "wsd") {
    i64 decay = i64(std::ceil(t.wsd_decay_frac * total));
    i64 start = total - decay;
    if (step < start || decay <= 0) return t.lr;
    float frac = float(step - start + 1) / float(decay);
    return t.lr + (lo - t.lr) * std::min(frac, 1.0f);
  }
  // cosine
  i64 span = std::max<i64>(total - t.warmup_steps, 1);
  float frac = std::min(1.0f, float(step - t.warmup_steps) / float(span));
  return lo + 0.5f * (t.lr - lo) * (1.0f + std::cos(float(M_PI) * frac));
}

}  // namespace dlcm
