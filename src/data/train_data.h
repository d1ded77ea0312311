// Connects a prepared data folder (dlcm prepare) to the trainer's TrainData callbacks.
#pragma once
#include <memory>
#include <string>

#include "models/config.h"
#include "train/trainer.h"

namespace dlcm {

// Opens DIR/train.bin, DIR/val.bin and the tokenizer in DIR; checks the vocabulary against
// the model config. The returned TrainData keeps the shards open (memory-mapped).
TrainData open_train_data(const std::string& dir, const Config& cfg);

}  // namespace dlcm
