// AdamW over a ParamStore (decoupled weight decay on matrices only), global-norm clipping and
// learning-rate schedules.
#pragma once
#include "core/params.h"
#include "models/config.h"

namespace dlcm {

class AdamW {
 public:
  void init(const ParamStore& ps);
  // One update with base learning rate lr; parameter p uses lr * p.lr_mult / p.width_mult and
  // eps / p.width_mult (µP, set by make_model; both 1 without µP). Returns whether every
  // updated weight and second moment is finite.
  bool step(ParamStore& ps, float lr, const TrainConfig& t);
  i64 t = 0;  // number of updates done (1-based inside step)
  Buf m, v;   // same layout as ParamStore data
};

// Global L2 norm of all gradients; when max_norm > 0 and the norm exceeds it, scales the
// gradients by max_norm / norm (PyTorch clip_grad_norm_ semantics). Returns the norm before
// clipping.
double clip_grad_norm(ParamStore& ps, float max_norm);

// Learning rate at optimizer step `step` (0-based) of `total` steps.
//   cosine: linear warmup to lr, cosine decay to lr * min_lr_ratio at the end;
//   wsd: warmup, constant, then linear decay to lr * min_lr_ratio over the last
//        wsd_decay_frac of the steps;
//   constant: warmup then constant.
float lr_at(const TrainConfig& t, i64 step, i64 total);

}  // namespace dlcm
