#include "nn/lm_head.h"

#include <algorithm>
#include <cstring>

#include "kernels/gemm.h"
#include "kernels/ops.h"

namespace dlcm {

void LMHead::init(Param* norm_w, Param* W, i64 d, i64 vocab, float eps, float logit_mult) {
  norm_w_ = norm_w;
  W_ = W;
  d_ = d;
  V_ = vocab;
  eps_ = eps;
  mult_ = logit_mult;
}

void LMHead::reserve(i64 max_rows) {
  if ((i64)rstd_.size() >= max_rows) return;
  xn_.assign(max_rows * d_, 0);
  rstd_.assign(max_rows, 0);
  gxn_.assign(max_rows * d_, 0);
  chunk_.assign(kChunk * V_, 0);
}

double LMHead::forward_backward(float* dx, const float* x, const i32* targets, i64 N,
                                float grad_scale) {
  DLCM_CHECK(N <= (i64)rstd_.size(), "internal: LMHead beyond reserved rows");
  ops::rmsnorm_forward(xn_.data(), rstd_.data(), x, norm_w_->w, N, d_, eps_);
  std::memset(gxn_.data(), 0, sizeof(float) * N * d_);
  double total = 0;
  for (i64 r0 = 0; r0 < N; r0 += kChunk) {
    const i64 n = std::min(kChunk, N - r0);
    const float* xn = xn_.data() + r0 * d_;
    // logits = mult * xn W^T ; the CE gradient w.r.t. (xn W^T) is mult * dlogits
    ops::gemm(false, true, n, V_, d_, mult_, xn, d_, W_->w, d_, 0.0f, chunk_.data(), V_);
    total += ops::cross_entropy_fused(chunk_.data(), targets + r0, n, V_, grad_scale * mult_);
    ops::gemm(false, false, n, d_, V_, 1.0f, chunk_.data(), V_, W_->w, d_, 1.0f,
              gxn_.data() + r0 * d_, d_);
    ops::gemm(true, false, V_, d_, n, 1.0f, chunk_.data(), V_, xn, d_, 1.0f, W_->g, d_);
  }
  ops::rmsnorm_backward(dx, norm_w_->g, gxn_.data(), x, norm_w_->w, rstd_.data(), N, d_);
  return total;
}

double LMHead::forward_loss(const float* x, const i32* targets, i64 N, float* row_loss) {
  DLCM_CHECK(N <= (i64)rstd_.size(), "internal: LMHead beyond reserved rows");
  ops::rmsnorm_forward(xn_.data(), rstd_.data(), x, norm_w_->w, N, d_, eps_);
  double total = 0;
  for (i64 r0 = 0; r0 < N; r0 += kChunk) {
    const i64 n = std::min(kChunk, N - r0);
    ops::gemm(false, true, n, V_, d_, mult_, xn_.data() + r0 * d_, d_, W_->w, d_, 0.0f,
              chunk_.data(), V_);
    total += ops::cross_entropy_forward(chunk_.data(), targets + r0, n, V_,
                                        row_loss ? row_loss + r0 : nullptr);
  }
  return total;
}

void LMHead::logits(const float* x, i64 N, float* out) {
  DLCM_CHECK(N <= (i64)rstd_.size(), "internal: LMHead beyond reserved rows");
  logits(x, N, out, xn_.data(), rstd_.data());
}

void LMHead::logits(const float* x, i64 N, float* out, float* xn, float* rstd) const {
  ops::rmsnorm_forward(xn, rstd, x, norm_w_->w, N, d_, eps_);
  ops::gemm(false, true, N, V_, d_, mult_, xn, d_, W_->w, d_, 0.0f, out, V_);
}

}  // namespace dlcm
