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
#include <utility>
#include <vector>

#include "convert.h"
#include "data/tokenizer.h"
#include "models/model.h"

namespace dlcm::py_bind {

// Memory for forward()'s results. A new 64 MiB result costs about as much as 5-10% of a
// forward pass on the reference shape in first-touch page faults (measured with
// bench/python_forward.py); this pool takes back the blocks of freed results (at most kKeep)
// and hands them out again, so a loop `logits = model.forward(x)` reuses warm memory.
class BufferPool {
 public:
  ~BufferPool();
  // A new float32 array of `shape` (C order) whose block returns here when it is freed.
  static py::array_t<float> array(const std::shared_ptr<BufferPool>& pool,
                                  const std::vector<py::ssize_t>& shape);

 private:
  static constexpr size_t kKeep = 2;
  void give_back(float* p, size_t bytes);
  std::mutex mu_;
  std::vector<std::pair<float*, size_t>> free_;
};

struct ModelState {
  std::mutex mu;
  std::shared_ptr<LanguageModel> model;  // null once closed; state_dict views share it
  std::shared_ptr<const Tokenizer> tok;
  std::string dir;  // the checkpoint folder
  nlohmann::json config;  // config_to_json of the checkpoint's config, floats as 7 digits
  std::string arch;
  i64 vocab_size = 0, max_seq_len = 0;
  std::atomic<bool> closed{false};
  std::shared_ptr<BufferPool> pool = std::make_shared<BufferPool>();

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
