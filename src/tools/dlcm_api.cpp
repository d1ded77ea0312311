// include/dlcm/dlcm.h: the supported C++ API, each call a thin wrapper over the entry points the
// CLI and the Python module use (load_model_with_tokenizer, LanguageModel, generate, train_run).
#include <dlcm/dlcm.h>  // the public header (include/), outside the layer folders

#include "core/build_info.h"
#include "data/model_loader.h"
#include "data/tokenizer.h"
#include "infer/generate.h"
#include "infer/sampler.h"
#include "tools/commands.h"

namespace dlcm::api {

std::string version() {
  const BuildInfo& b = build_info();
  return b.version + " (" + b.git_commit + (b.git_dirty ? ", dirty" : "") + ")";
}

struct Model::Impl {
  std::unique_ptr<LanguageModel> model;
  std::unique_ptr<Tokenizer> tok;
  std::string arch;
};

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
Model::~Model() = default;

Model Model::load(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  std::string dir;
  impl->model = load_model_with_tokenizer(path, &dir);
  impl->tok = load_tokenizer(dir);
  impl->arch = impl->model->config().arch;
  return Model(std::move(impl));
}

const std::string& Model::arch() const { return impl_->arch; }
int64_t Model::vocab_size() const { return impl_->model->config().vocab_size; }
int64_t Model::max_seq_len() const { return impl_->model->config().max_seq_len; }
int32_t Model::bos_id() const { return impl_->tok->bos_id(); }
int32_t Model::eos_id() const { return impl_->tok->eos_id(); }

std::vector<int32_t> Model::tokenize(const std::string& text) const {
  return impl_->tok->encode(text);
}

std::string Model::detokenize(const std::vector<int32_t>& ids) const {
  return impl_->tok->decode(ids);
}

// Token ids must index the vocabulary and the row fit the context: checked here, as the CLI does.
static void check_row(const Model& m, const std::vector<int32_t>& ids, const char* fn) {
  DLCM_CHECK(!ids.empty(), fn, ": empty token list");
  DLCM_CHECK(i64(ids.size()) <= m.max_seq_len(), fn, ": ", ids.size(),
             " tokens exceed the model's max_seq_len ", m.max_seq_len());
  for (size_t i = 0; i < ids.size(); ++i)
    DLCM_CHECK(ids[i] >= 0 && ids[i] < m.vocab_size(), fn, ": token ", i, " is ", ids[i],
               ", outside the vocabulary [0, ", m.vocab_size(), ")");
}

std::vector<float> Model::forward(const std::vector<int32_t>& ids) {
  check_row(*this, ids, "forward");
  std::vector<float> out(ids.size() * size_t(vocab_size()));
  impl_->model->logits(ids.data(), 1, i64(ids.size()), out.data());
  return out;
}

Boundaries Model::boundaries(const std::vector<int32_t>& ids, float tau) {
  check_row(*this, ids, "boundaries");
  Boundaries r;
  r.p.resize(ids.size());
  r.b.resize(ids.size());
  DLCM_CHECK(impl_->model->boundaries(ids.data(), 1, i64(ids.size()), r.p.data(), r.b.data(), tau),
             "boundaries: this is a ", impl_->arch,
             " checkpoint without concepts; boundaries need a dlcm checkpoint");
  return r;
}

std::string Model::generate(const std::string& prompt, const GenerateConfig& cfg,
                            const std::function<void(const std::string& piece)>& on_text) {
  GenerateOptions o;
  o.sampler = {cfg.temperature, cfg.top_k, cfg.top_p};
  validate_sampler(o.sampler);
  DLCM_CHECK(cfg.max_new_tokens >= 1, "generate: max_new_tokens: expected >= 1, got ",
             cfg.max_new_tokens);
  o.seed = cfg.seed;
  o.max_new_tokens = cfg.max_new_tokens;
  o.stop = cfg.stop;
  GenerateEvents ev;
  if (on_text) ev.on_text = [&](i64, const std::string& text) { on_text(text); };
  return dlcm::generate(*impl_->model, *impl_->tok, {prompt}, o, ev).at(0).text;
}

TrainResult train(const TrainConfig& cfg,
                  const std::function<void(const std::string& json_line)>& on_log) {
  TrainArgs a;
  a.config = cfg.config;
  a.data = cfg.data;
  a.out = cfg.out;
  a.steps = cfg.steps;
  a.threads = cfg.threads;
  a.overwrite = cfg.overwrite;
  a.final_eval = cfg.final_eval;
  a.quiet = true;
  a.on_log = on_log;
  TrainSummary s = train_run(a);
  return {s.step, s.checkpoint};
}

}  // namespace dlcm::api
