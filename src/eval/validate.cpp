#include "eval/validate.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/dist.h"
#include "kernels/gemm.h"

namespace dlcm {

ValResult validate_split(LanguageModel& model, const TrainData& data, i64 B, i64 L,
                         i64 max_batches) {
  ValResult v;
  if (!data.val_count) return v;
  i64 n = data.val_count(B, L);
  if (max_batches >= 0) n = std::min(n, max_batches);
  model.reserve(B, L);
  std::vector<i32> tk(B * L), tg(B * L);
  ops::PrecisionScope fp32(ops::Precision::FP32);  // validation is always FP32
  const int rank = dist::rank(), world = dist::size();
  double sums[4] = {0, 0, 0, 0};  // CE, targets, concepts, positions
  for (i64 i = rank; i < n; i += world) {
    data.val_batch(i, B, L, tk.data(), tg.data());
    MicroStats s = model.eval_micro(Batch{tk.data(), tg.data(), B, L, 0});
    sums[0] += s.ce_sum;
    sums[1] += s.n_targets;
    sums[2] += s.n_concepts;
    sums[3] += s.n_positions;
  }
  dist::allreduce_sum(sums, 4);
  const double ce = sums[0], concepts = sums[2], positions = sums[3];
  const i64 count = i64(sums[1]);
  v.tokens = count;
  v.loss = ce / std::max<i64>(count, 1);
  v.ppl = std::exp(v.loss);
  // bits per UTF-8 byte: scale the byte count to the share of the split evaluated
  if (data.val_bytes > 0 && data.val_tokens > 0 && count > 0)
    v.bpb = ce / std::log(2.0) / (data.val_bytes * double(count) / double(data.val_tokens));
  if (concepts > 0) v.compression = positions / concepts;
  return v;
}

}  // namespace dlcm
