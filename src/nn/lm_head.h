// Final RMSNorm + untied output projection + softmax cross-entropy, fused and chunked over
// rows so that only a [chunk, V] block of logits ever exists (no [N, V] probability copy).
#pragma once
#include "core/params.h"

namespace dlcm {

class LMHead {
 public:
  void init(Param* norm_w, Param* W, i64 d, i64 vocab, float eps, float logit_mult);
  void reserve(i64 max_rows);
  // x [N, d] pre-norm hidden states. Accumulates dx (+=) and parameter gradients for
  // loss = grad_scale * sum of CE over non-ignored targets. Returns the unscaled CE sum.
  double forward_backward(float* dx, const float* x, const i32* targets, i64 N, float grad_scale);
  // Sum of CE over non-ignored targets; row_loss [N] optional (0 for ignored rows).
  double forward_loss(const float* x, const i32* targets, i64 N, float* row_loss = nullptr);
  // Full logits [N, V] (times logit_mult) into out.
  void logits(const float* x, i64 N, float* out);
  // The same with caller scratch xn [N, d], rstd [N] (inference keeps its own buffers).
  void logits(const float* x, i64 N, float* out, float* xn, float* rstd) const;
  i64 vocab() const { return V_; }

 private:
  static constexpr i64 kChunk = 256;
  Param *norm_w_ = nullptr, *W_ = nullptr;
  i64 d_ = 0, V_ = 0;
  float eps_ = 1e-5f, mult_ = 1.0f;
  Buf xn_, rstd_, gxn_, chunk_;  // xn/rstd [N,d]/[N], chunk [kChunk, V]
};

}  // namespace dlcm
