#include "data/model_loader.h"

#include "data/tokenizer.h"
#include "models/checkpoint.h"

namespace dlcm {

std::unique_ptr<LanguageModel> load_model_with_tokenizer(const std::string& path,
                                                         std::string* dir_out) {
  std::string dir;
  auto m = load_model(path, &dir);
  if (m->config().is_dlcm() && m->config().router.kind == "word")
    m->set_word_starts(load_tokenizer(dir)->word_starts());
  if (dir_out) *dir_out = dir;
  return m;
}

}  // namespace dlcm
