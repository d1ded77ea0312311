#include "data/train_data.h"

#include <stdlib.h>

#include <algorithm>
#include <filesystem>
#include <memory>
#include <mutex>

#include "data/loader.h"
#include "data/prepare.h"

namespace dlcm {

TrainData open_train_data(const std::string& dir, const Config& cfg) {
  auto dd = std::make_shared<DataDir>(open_data_dir(dir));
  const ModelConfig& m = cfg.model;
  DLCM_CHECK(dd->tokenizer->vocab_size() == m.vocab_size, dir, ": the tokenizer has ",
             dd->tokenizer->vocab_size(), " tokens but the config says vocab_size ", m.vocab_size,
             " (set vocab_size to ", dd->tokenizer->vocab_size(), ")");
  DLCM_CHECK(dd->tokenizer->bos_id() == m.bos_id && dd->tokenizer->eos_id() == m.eos_id &&
                 dd->tokenizer->pad_id() == m.pad_id,
             dir, ": tokenizer special ids (bos ", dd->tokenizer->bos_id(), ", eos ",
             dd->tokenizer->eos_id(), ", pad ", dd->tokenizer->pad_id(),
             ") differ from the config's bos_id/eos_id/pad_id");
  auto train = std::make_shared<TrainLoader>(dd->train, cfg.train.seq_len, cfg.train.seed, m.pad_id);
  TrainData t;
  t.train_batch = [train](i64 step, i64 micro, i64 rank, i64 B, i64 L, i32* tok, i32* tgt) {
    DLCM_CHECK(L == train->seq_len(), "internal: loader built for another seq_len");
    TokenBatch b = train->get(step, micro, rank, B);
    std::copy(b.inputs.begin(), b.inputs.end(), tok);
    std::copy(b.targets.begin(), b.targets.end(), tgt);
  };
  // Validation windows are indexed: batch i holds windows [i*B, (i+1)*B).
  struct Val {
    std::shared_ptr<DataDir> dd;
    i64 L = 0;
    std::unique_ptr<ValIterator> it;
  };
  auto val = std::make_shared<Val>();
  val->dd = dd;
  t.val_count = [val, dir](i64 B, i64 L) {
    // Under 2 tokens there is no target to score: a loss of 0 would be silent garbage.
    DLCM_CHECK(val->dd->val->size() >= 2, dir, "/val.bin: the validation split holds ",
               val->dd->val->size(), " token(s), so there is nothing to validate on; prepare "
               "the data with more validation text (dlcm prepare --val-fraction) or set "
               "train.eval_every=0");
    if (!val->it || val->L != L) {
      val->it = std::make_unique<ValIterator>(val->dd->val, L, val->dd->tokenizer->pad_id());
      val->L = L;
    }
    return (val->it->num_windows() + B - 1) / B;
  };
  t.val_batch = [val](i64 i, i64 B, i64 L, i32* tok, i32* tgt) {
    if (!val->it || val->L != L) {
      val->it = std::make_unique<ValIterator>(val->dd->val, L, val->dd->tokenizer->pad_id());
      val->L = L;
    }
    // The iterator is sequential: rewind when asked for an earlier batch, then skip forward
    // (under MPI each rank reads every ranks-th batch).
    if (val->it->position() > i * B) val->it->reset();
    TokenBatch skip;
    while (val->it->position() < i * B) val->it->next(std::min(B, i * B - val->it->position()), skip);
    TokenBatch b;
    val->it->next(B, b);
    if (b.inputs.empty()) {
      std::fill(tok, tok + B * L, val->dd->tokenizer->pad_id());
      std::fill(tgt, tgt + B * L, -1);
      return;
    }
    std::copy(b.inputs.begin(), b.inputs.end(), tok);
    std::copy(b.targets.begin(), b.targets.end(), tgt);
  };
  t.val_bytes = double(dd->val_bytes);
  t.val_tokens = dd->val->size() > 0 ? dd->val->size() - 1 : 0;
  t.checkpoint_files = tokenizer_files(dir);
  if (has_legacy_tokenizer_meta(dir)) {
    // A folder prepared before the rename holds our metadata as tokenizer.json, which is HF's
    // name: checkpoints get the tokenizer saved under the new name instead (from a private
    // folder that lives as long as the TrainData).
    std::string tmpl = (std::filesystem::temp_directory_path() / "dlcm-tok-XXXXXX").string();
    DLCM_CHECK(mkdtemp(tmpl.data()) != nullptr, "cannot create a temporary folder for ", dir,
               "'s tokenizer files");
    t.staged = std::shared_ptr<void>(nullptr, [tmpl](void*) {
      std::error_code ec;
      std::filesystem::remove_all(tmpl, ec);
    });
    dd->tokenizer->save(tmpl);
    t.checkpoint_files = tokenizer_files(tmpl);
  }
  t.word_starts = dd->tokenizer->word_starts();
  return t;
}

}  // namespace dlcm
