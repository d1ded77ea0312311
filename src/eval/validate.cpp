#include "eval/validate.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/dist.h"
#include "kernels/gemm.h"

namespace dlcm {

std::vector<i64> row_position_buckets(i64 L) {
  std::vector<i64> from;
  if (L <= 0) return from;
  from.push_back(0);
  for (i64 e = 16; e < L; e *= 4) from.push_back(e);
  return from;
}

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
  const std::vector<i64> from = row_position_buckets(L);
  const i64 nb = i64(from.size());
  // CE, targets, concepts, positions, then per bucket: CE sum, targets
  std::vector<double> sums(4 + 2 * nb, 0.0);
  std::vector<i64> bucket(L);  // bucket of each position in a row
  for (i64 t = 0, k = 0; t < L; ++t) {
    while (k + 1 < nb && t >= from[k + 1]) ++k;
    bucket[t] = k;
  }
  std::vector<float> row_loss(B * L);
  for (i64 i = rank; i < n; i += world) {
    data.val_batch(i, B, L, tk.data(), tg.data());
    MicroStats s = model.eval_micro(Batch{tk.data(), tg.data(), B, L, 0}, row_loss.data());
    sums[0] += s.ce_sum;
    sums[1] += s.n_targets;
    sums[2] += s.n_concepts;
    sums[3] += s.n_positions;
    for (i64 j = 0; j < B * L; ++j) {
      if (tg[j] < 0) continue;  // ignored target: no loss
      double* b = &sums[4 + 2 * bucket[j % L]];
      b[0] += row_loss[j];
      b[1] += 1;
    }
  }
  dist::allreduce_sum(sums.data(), i64(sums.size()));
  const double ce = sums[0], concepts = sums[2], positions = sums[3];
  const i64 count = i64(sums[1]);
  v.tokens = count;
  v.loss = ce / std::max<i64>(count, 1);
  v.ppl = std::exp(v.loss);
  // bits per UTF-8 byte: scale the byte count to the share of the split evaluated
  if (data.val_bytes > 0 && data.val_tokens > 0 && count > 0)
    v.bpb = ce / std::log(2.0) / (data.val_bytes * double(count) / double(data.val_tokens));
  if (concepts > 0) v.compression = positions / concepts;
  for (i64 k = 0; k < nb; ++k) {
    const double c = sums[4 + 2 * k], t = sums[5 + 2 * k];
    v.row_pos_from.push_back(from[k]);
    v.row_pos_to.push_back(k + 1 < nb ? from[k + 1] : L);
    v.row_pos_tokens.push_back(i64(t));
    v.row_pos_ce.push_back(t > 0 ? c / t : 0.0);
  }
  return v;
}

}  // namespace dlcm
