#include "core/params.h"

#include <algorithm>

#include "core/rng.h"

namespace dlcm {

Param* ParamStore::add(const std::string& name, std::vector<i64> shape, ParamGroup group,
                       bool decay) {
  DLCM_CHECK(!finalized_, "internal: parameter '", name, "' added after finalize");
  DLCM_CHECK(!by_name_.count(name), "internal: duplicate parameter name '", name, "'");
  Param p;
  p.name = name;
  p.shape = std::move(shape);
  p.numel = 1;
  for (i64 s : p.shape) p.numel *= s;
  p.group = group;
  p.decay = decay;
  p.offset = total_;
  // Keep every tensor 64-byte aligned inside the block.
  total_ += (p.numel + 15) / 16 * 16;
  params_.push_back(std::move(p));
  by_name_.emplace(name, params_.size() - 1);
  return &params_.back();
}

void ParamStore::finalize() {
  DLCM_CHECK(!finalized_, "internal: ParamStore finalized twice");
  data_.assign(total_, 0.0f);
  grad_.assign(total_, 0.0f);
  for (auto& p : params_) {
    p.w = data_.data() + p.offset;
    p.g = grad_.data() + p.offset;
  }
  finalized_ = true;
}

void ParamStore::init(uint64_t seed) {
  // Each tensor gets its own stream keyed by its index, so its values do not depend on the
  // sizes of the tensors registered before it (as they would with one stream through all).
  i64 idx = 0;
  for (auto& p : params_) {
    Rng rng(counter_hash(seed, 0x1A17, idx++));
    if (p.init_one) {
      std::fill(p.w, p.w + p.numel, 1.0f);
    } else if (p.init_identity) {
      DLCM_CHECK(p.shape.size() == 2, "internal: identity init needs a matrix: ", p.name);
      std::fill(p.w, p.w + p.numel, 0.0f);
      for (i64 i = 0; i < std::min(p.shape[0], p.shape[1]); ++i) p.w[i * p.shape[1] + i] = 1.0f;
    } else {
      for (i64 i = 0; i < p.numel; ++i) p.w[i] = rng.normal() * p.init_std;
    }
  }
}

void ParamStore::zero_grad() { std::fill(grad_.begin(), grad_.end(), 0.0f); }

Param* ParamStore::find(const std::string& name) {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &params_[it->second];
}

const Param* ParamStore::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &params_[it->second];
}

}  // namespace dlcm
