// load_model: a checkpoint's config, a model built from it and its weights. Kept apart from the
// checkpoint format (checkpoint.cpp) so that the format's readers link without any model code
// (the fuzz harnesses of fuzz/ build checkpoint.cpp alone).
#include "models/checkpoint.h"
#include "models/model.h"

namespace dlcm {

std::unique_ptr<LanguageModel> load_model(const std::string& path, std::string* dir_out) {
  std::string dir = resolve_checkpoint(path);
  Config cfg = load_checkpoint_config(dir);
  auto m = make_model(cfg.model);
  load_checkpoint_params(dir, m->params());
  if (dir_out) *dir_out = dir;
  return m;
}

}  // namespace dlcm
