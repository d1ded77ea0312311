// Loading a checkpoint's model together with what it needs from the checkpoint's tokenizer.
//
// models/checkpoint.h's load_model builds the model and reads its weights, but it sits below
// this layer and cannot read tokenizer files. A DLCM with router.kind = "word" also needs the
// word-start table of its own tokenizer (Tokenizer::word_starts(), copied into every
// checkpoint with the tokenizer files): the CLI loads checkpoints through this function, which
// passes the table on. Without it such a model stops at its first forward pass with an error
// that names set_word_starts.
#pragma once
#include <memory>
#include <string>

#include "models/model.h"

namespace dlcm {

// load_model(path, dir_out), plus set_word_starts from the checkpoint's tokenizer when the
// model's router.kind is "word". Errors name the checkpoint folder and the file at fault.
std::unique_ptr<LanguageModel> load_model_with_tokenizer(const std::string& path,
                                                         std::string* dir_out = nullptr);

}  // namespace dlcm
