// Named parameters with their gradients, in one contiguous block each (one allocation,
// one pass for the optimizer, grad-norm and all-reduce).
#pragma once
#include <deque>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/common.h"

namespace dlcm {

// µP parameter groups (SPEC section 6). "Hidden" matrices scale with their width;
// "other" covers embeddings, norms, lm_head, null concept.
enum class ParamGroup { TokenHidden, ConceptHidden, Other };

struct Param {
  std::string name;
  std::vector<i64> shape;
  i64 numel = 0;
  ParamGroup group = ParamGroup::Other;
  bool decay = false;      // AdamW weight decay applies to matrices only
  float init_std = 0.02f;  // normal(0, std); 0 with init_one => ones
  bool init_one = false;   // norm weights
  bool init_identity = false;  // router projections start as I
  float width_mult = 1.0f;     // µP s for this parameter's group (1 = no scaling)
  float lr_mult = 1.0f;        // µP base learning-rate multiplier of the group (1 = none)
  i64 offset = 0;          // into ParamStore::data / grad
  float* w = nullptr;      // valid after ParamStore::finalize()
  float* g = nullptr;
};

class ParamStore {
 public:
  // Register a parameter; the returned pointer stays valid (deque) and gets its storage
  // at finalize().
  Param* add(const std::string& name, std::vector<i64> shape, ParamGroup group, bool decay);
  void finalize();  // allocate data and grad, bind pointers
  void init(uint64_t seed);  // initialise all parameters from their init fields
  void zero_grad();

  Param* find(const std::string& name);
  const Param* find(const std::string& name) const;
  const std::deque<Param>& params() const { return params_; }
  std::deque<Param>& params() { return params_; }
  i64 total() const { return total_; }
  float* data() { return data_.data(); }
  float* grad() { return grad_.data(); }
  const float* data() const { return data_.data(); }
  const float* grad() const { return grad_.data(); }

 private:
  std::deque<Param> params_;
  std::unordered_map<std::string, size_t> by_name_;  // index into params_: O(1) find, so
                                                    // registration stays linear
  i64 total_ = 0;
  bool finalized_ = false;
  Buf data_, grad_;
};

}  // namespace dlcm
