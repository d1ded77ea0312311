// The Python Model and Tokenizer (dlcm.load): a checkpoint's model, tokenizer and config
// behind one mutex. Calls take the GIL off while they compute; the mutex makes calls from
// several Python threads on one model run one after the other (a model's activation buffers
// are its own), while different models run in parallel.
#pragma once
#include <atomic>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>

#include "convert.h"
#include "data/tokenizer.h"
#include "models/model.h"

namespace dlcm::py_bind {

struct ModelState {
  std::mutex mu;
  std::shared_ptr<LanguageModel> model;  // null once closed; state_dict views share it
  std::shared_ptr<const Tokenizer> tok;
  std::string dir;  // the checkpoint folder
  nlohmann::json config;  // config_to_json of the checkpoint's config, floats as 7 digits
  std::string arch;
  i64 vocab_size = 0, max_seq_len = 0;
  std::atomic<bool> closed{false};

  void check_open() const;
  // Runs f(model) with the GIL released and the model's mutex held; ClosedError once closed.
  template <typename F>
  auto run(F&& f) {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(mu);
    if (!model) throw ClosedError(closed_message());
    return f(*model);
  }
  std::string closed_message() const;
};

class PyTokenizer {
 public:
  explicit PyTokenizer(std::shared_ptr<const Tokenizer> t) : t_(std::move(t)) {}
  const Tokenizer& get() const { return *t_; }
  std::shared_ptr<const Tokenizer> shared() const { return t_; }

 private:
  std::shared_ptr<const Tokenizer> t_;
};

void bind_model(py::module_& m);

}  // namespace dlcm::py_bind
