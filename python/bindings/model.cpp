#include "model.h"

#include "docs.h"

#include <pybind11/stl.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <optional>
#include <thread>

#include "data/model_loader.h"
#include "eval/scorer.h"
#include "eval/zero_shot.h"
#include "infer/generate.h"
#include "infer/sampler.h"
#include "infer/segment.h"
#include "models/checkpoint.h"

namespace dlcm::py_bind {
using nlohmann::json;
using Clock = std::chrono::steady_clock;

void ModelState::check_open() const {
  if (closed.load()) throw ClosedError(closed_message());
}

std::string ModelState::closed_message() const {
  return "model " + dir + ": closed (Model.close() or the end of its with-block); load it again "
         "with dlcm.load()";
}

BufferPool::~BufferPool() {
  for (auto& [p, n] : free_) std::free(p);
}

void BufferPool::give_back(float* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.size() < kKeep) {
    free_.emplace_back(p, bytes);
    return;
  }
  std::free(p);
}

py::array_t<float> BufferPool::array(const std::shared_ptr<BufferPool>& pool,
                                     const std::vector<py::ssize_t>& shape) {
  size_t bytes = sizeof(float);
  for (auto d : shape) bytes *= size_t(d);
  bytes = (bytes + 63) / 64 * 64 + 64;  // aligned_alloc wants a multiple of the alignment
  float* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(pool->mu_);
    for (size_t i = 0; i < pool->free_.size(); ++i)
      if (pool->free_[i].second == bytes) {
        p = pool->free_[i].first;
        pool->free_.erase(pool->free_.begin() + i);
        break;
      }
  }
  if (!p) p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  struct Block {
    std::shared_ptr<BufferPool> pool;
    float* p;
    size_t bytes;
  };
  auto* b = new Block{pool, p, bytes};
  py::capsule owner(b, [](void* v) {
    auto* blk = static_cast<Block*>(v);
    blk->pool->give_back(blk->p, blk->bytes);
    delete blk;
  });
  return py::array_t<float>(shape, p, owner);
}

namespace {

using State = std::shared_ptr<ModelState>;

// A C++ exception that unwinds a computation the bindings abandon (Ctrl-C, a dropped stream).
struct Cancelled {};

// Checks for Ctrl-C from inside a computation that runs without the GIL, at most every 100 ms.
// After a signal the Python error (KeyboardInterrupt) stays set and the computation unwinds with
// Cancelled; raise_pending() turns it back into the Python exception once the GIL is held.
class SignalCheck {
 public:
  void poll() {
    const auto now = Clock::now();
    if (now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      error_ = std::make_unique<py::error_already_set>();  // fetches KeyboardInterrupt
      throw Cancelled{};
    }
  }
  [[noreturn]] void raise_pending() {
    if (error_) {
      error_->restore();
      throw py::error_already_set();
    }
    throw Error("interrupted");
  }

 private:
  Clock::time_point last_ = Clock::now();
  std::unique_ptr<py::error_already_set> error_;
};

float tau_arg(std::optional<double> tau) {
  if (!tau) return -1;
  if (!(*tau > 0 && *tau <= 1)) raise<ArgumentError>("tau: expected a value in (0, 1], got ", *tau);
  return float(*tau);
}

void require_concepts(const State& s, const char* fn) {
  if (s->arch != "dlcm")
    raise<Error>(fn, ": this is a ", s->arch, " checkpoint (", s->dir, ") without concepts; ", fn,
                 " needs a dlcm checkpoint");
}

i64 vocab(const State& s) { return s->vocab_size; }
i64 max_len(const State& s) { return s->max_seq_len; }

ScoreRequest score_request(const State& s, py::handle context, py::handle continuation) {
  const bool text = py::isinstance<py::str>(context) && py::isinstance<py::str>(continuation);
  if (text) return make_request(*s->tok, context.cast<std::string>(), continuation.cast<std::string>());
  if (py::isinstance<py::str>(context) || py::isinstance<py::str>(continuation))
    raise<ArgumentTypeError>("score: give context and continuation both as str or both as token "
                             "id lists, not one of each");
  ScoreRequest r;
  r.context = token_list(context, vocab(s), "context", true);
  r.continuation = token_list(continuation, vocab(s), "continuation", false);
  return r;
}

// Logits of each row of t, one row per call as `dlcm forward` computes them (so the two agree
// bit for bit, and activation memory stays at one row's worth).
void forward_rows(LanguageModel& m, const TokenRows& t, i64 V, float* out) {
  for (i64 b = 0; b < t.B; ++b) m.logits(t.ids.data() + b * t.L, 1, t.L, out + b * t.L * V);
}

// ---- streaming generation: a worker thread runs generate() and queues the text pieces ----

struct StreamQueue {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<i64, std::string>> pieces;
  bool done = false;
  std::exception_ptr error;
  std::atomic<bool> cancel{false};
};

class PyGenerateStream {
 public:
  PyGenerateStream(State s, std::vector<std::string> prompts, GenerateOptions o, bool multi)
      : q_(std::make_shared<StreamQueue>()), multi_(multi) {
    auto q = q_;
    worker_ = std::thread([q, s = std::move(s), prompts = std::move(prompts), o = std::move(o)] {
      try {
        GenerateEvents ev;
        ev.on_text = [&](i64 i, const std::string& t) {
          std::lock_guard<std::mutex> lock(q->mu);
          q->pieces.emplace_back(i, t);
          q->cv.notify_one();
        };
        ev.on_token = [&](i64, i32, const TokenConcept*) {
          if (q->cancel.load()) throw Cancelled{};
        };
        std::lock_guard<std::mutex> lock(s->mu);
        if (!s->model) throw ClosedError(s->closed_message());
        generate(*s->model, *s->tok, prompts, o, ev);
      } catch (const Cancelled&) {
      } catch (...) {
        std::lock_guard<std::mutex> lock(q->mu);
        q->error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(q->mu);
      q->done = true;
      q->cv.notify_one();
    });
  }
  ~PyGenerateStream() { stop(); }

  void stop() {
    q_->cancel = true;
    if (worker_.joinable()) {
      py::gil_scoped_release nogil;
      worker_.join();
    }
  }

  py::object next() {
    while (true) {
      std::optional<std::pair<i64, std::string>> piece;
      bool finished = false;
      std::exception_ptr error;
      {
        py::gil_scoped_release nogil;
        std::unique_lock<std::mutex> lock(q_->mu);
        q_->cv.wait_for(lock, std::chrono::milliseconds(100),
                        [&] { return !q_->pieces.empty() || q_->done; });
        if (!q_->pieces.empty()) {
          piece = std::move(q_->pieces.front());
          q_->pieces.pop_front();
        } else if (q_->done) {
          finished = true;
          error = q_->error;
          q_->error = nullptr;
        }
      }
      if (piece) {
        if (multi_) return py::make_tuple(piece->first, to_str(piece->second));
        return to_str(piece->second);
      }
      if (finished) {
        stop();
        if (error) std::rethrow_exception(error);
        throw py::stop_iteration();
      }
      if (PyErr_CheckSignals() != 0) {
        py::error_already_set e;  // KeyboardInterrupt: stop the worker before raising it
        stop();
        throw e;
      }
    }
  }

 private:
  std::shared_ptr<StreamQueue> q_;
  bool multi_;
  std::thread worker_;
};

class PyModel {
 public:
  explicit PyModel(State s) : s_(std::move(s)) {}

  const State& state() const { return s_; }

  void close() {
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(s_->mu);
    s_->model.reset();
    s_->closed = true;
  }

  py::array forward(py::handle tokens, py::handle out_arg) {
    s_->check_open();
    const TokenRows t = token_rows(tokens, vocab(s_), max_len(s_), "tokens");
    const i64 V = vocab(s_);
    const std::vector<py::ssize_t> shape = t.batched ? std::vector<py::ssize_t>{t.B, t.L, V}
                                                     : std::vector<py::ssize_t>{t.L, V};
    py::array out;
    if (out_arg.is_none()) {
      out = BufferPool::array(s_->pool, shape);
    } else {
      // A caller's buffer, written in place (no allocation, no first-touch page faults).
      if (!py::isinstance<py::array>(out_arg) || !py::isinstance<py::array_t<float>>(out_arg))
        raise<ArgumentTypeError>("out: expected a float32 NumPy array");
      out = py::reinterpret_borrow<py::array>(out_arg);
      const std::vector<py::ssize_t> got(out.shape(), out.shape() + out.ndim());
      if (got != shape) {
        std::ostringstream want, have;
        for (auto x : shape) want << (want.tellp() ? ", " : "") << x;
        for (auto x : got) have << (have.tellp() ? ", " : "") << x;
        raise<ArgumentError>("out: shape [", have.str(), "] but the logits are [", want.str(), "]");
      }
      if (!(out.flags() & py::array::c_style) || !out.writeable())
        raise<ArgumentError>("out: expected a writeable C-contiguous array");
    }
    float* o = static_cast<float*>(out.mutable_data());
    s_->run([&](LanguageModel& m) { forward_rows(m, t, V, o); });
    return out;
  }

  // Seconds of each of `repeats` forward passes over tokens timed inside C++ (no Python in the
  // loop): the reference the Python-call overhead is measured against (bench/python_forward.py).
  std::vector<double> time_forward(py::handle tokens, i64 repeats) {
    s_->check_open();
    if (repeats < 1) raise<ArgumentError>("repeats: expected >= 1, got ", repeats);
    const TokenRows t = token_rows(tokens, vocab(s_), max_len(s_), "tokens");
    const i64 V = vocab(s_);
    Buf out(t.B * t.L * V);
    return s_->run([&](LanguageModel& m) {
      std::vector<double> sec;
      for (i64 r = 0; r < repeats; ++r) {
        const auto t0 = Clock::now();
        forward_rows(m, t, V, out.data());
        sec.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      }
      return sec;
    });
  }

  py::array_t<float> logits_at(py::handle tokens, py::handle positions) {
    s_->check_open();
    const TokenRows t = token_rows(tokens, vocab(s_), max_len(s_), "tokens");
    py::array pa = py::module_::import("numpy").attr("asarray")(positions);
    if (pa.ndim() != 1 || (pa.size() > 0 && pa.dtype().kind() != 'i' && pa.dtype().kind() != 'u'))
      raise<ArgumentTypeError>("positions: expected a 1-D integer array of flat positions "
                               "b * L + t, got dtype ", py::str(pa.dtype()).cast<std::string>(),
                               " with ", pa.ndim(), " dimensions");
    auto p64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(pa);
    if (!p64) throw py::error_already_set();
    std::vector<i64> pos(p64.data(), p64.data() + p64.size());
    const i64 N = t.B * t.L, V = vocab(s_);
    for (size_t i = 0; i < pos.size(); ++i)
      if (pos[i] < 0 || pos[i] >= N)
        raise<ArgumentError>("positions: position ", pos[i], " at [", i, "] is outside [0, B*L) = [0, ",
                             N, ")");
    py::array_t<float> out(std::vector<py::ssize_t>{py::ssize_t(pos.size()), V});
    if (pos.empty()) return out;
    float* o = out.mutable_data();
    s_->run([&](LanguageModel& m) {
      m.logits_at(t.ids.data(), t.B, t.L, pos.data(), i64(pos.size()), o);
    });
    return out;
  }

  py::tuple boundaries(py::handle tokens, std::optional<double> tau) {
    s_->check_open();
    require_concepts(s_, "boundaries");
    const float ta = tau_arg(tau);
    const TokenRows t = token_rows(tokens, vocab(s_), max_len(s_), "tokens");
    auto shape = t.batched ? std::vector<py::ssize_t>{t.B, t.L} : std::vector<py::ssize_t>{t.L};
    py::array_t<float> p(shape);
    py::array_t<bool> b(shape);
    float* pp = p.mutable_data();
    // NumPy's bool is one byte holding 0 or 1, the layout boundaries() writes.
    static_assert(sizeof(bool) == sizeof(uint8_t));
    uint8_t* bp = reinterpret_cast<uint8_t*>(b.mutable_data());
    s_->run([&](LanguageModel& m) {
      for (i64 r = 0; r < t.B; ++r)
        m.boundaries(t.ids.data() + r * t.L, 1, t.L, pp + r * t.L, bp + r * t.L, ta);
    });
    return py::make_tuple(p, b);
  }

  py::list concepts(const std::string& text, std::optional<double> tau) {
    s_->check_open();
    require_concepts(s_, "concepts");
    const float ta = tau_arg(tau);
    if (text.empty()) raise<ArgumentError>("text: empty; nothing to cut into concepts");
    auto seg = s_->run([&](LanguageModel& m) {
      return segment_texts(m, *s_->tok, {"text"}, {text}, ta);
    });
    const SegmentedText& st = seg[0];
    py::list spans;
    const i64 n = st.tokens();
    for (i64 a = 0; a < n;) {
      i64 e = a + 1;
      while (e < n && !st.b[e]) ++e;
      std::string shown;
      py::list ids, ps;
      for (i64 i = a; i < e; ++i) {
        shown += st.shown[i];
        ids.append(st.ids[i]);
        ps.append(st.p[i]);
      }
      py::dict d;
      d["index"] = st.concept_index[a];
      d["start"] = a;
      d["end"] = e;
      d["text"] = to_str(shown);
      d["p"] = st.p[a];
      d["forced"] = bool(st.forced[a]);
      d["ids"] = ids;
      d["token_p"] = ps;
      spans.append(d);
      a = e;
    }
    return spans;
  }

  py::tuple score(py::handle context, py::handle continuation) {
    s_->check_open();
    py::list r = score_batch(py::make_tuple(py::make_tuple(context, continuation)), 2048);
    return r[0].cast<py::tuple>();
  }

  py::list score_batch(py::handle pairs, i64 batch_tokens) {
    s_->check_open();
    if (batch_tokens < 1) raise<ArgumentError>("batch_tokens: expected >= 1, got ", batch_tokens);
    std::vector<ScoreRequest> reqs;
    for (auto pr : pairs) {
      if (!py::isinstance<py::sequence>(pr) || py::isinstance<py::str>(pr) || py::len(pr) != 2)
        raise<ArgumentTypeError>("pairs: expected (context, continuation) pairs");
      auto seq = pr.cast<py::sequence>();
      reqs.push_back(score_request(s_, seq[0], seq[1]));
    }
    if (reqs.empty()) return py::list();
    ScorerOptions o;
    o.batch_tokens = batch_tokens;
    auto scores = s_->run([&](LanguageModel& m) {
      Scorer sc(m, s_->tok->bos_id(), s_->tok->pad_id());
      return sc.score(reqs, o);
    });
    py::list out;
    for (const Score& sc : scores) out.append(py::make_tuple(sc.loglik, sc.greedy));
    return out;
  }

  py::object generate(py::handle prompts, i64 max_new_tokens, double temperature, i64 top_k,
                      double top_p, uint64_t seed, py::handle stop, bool stream,
                      std::optional<double> tau, bool ignore_eos, i64 batch, bool details) {
    s_->check_open();
    const bool multi = !py::isinstance<py::str>(prompts);
    std::vector<std::string> ps = str_list(prompts, "prompts");
    if (ps.empty()) raise<ArgumentError>("prompts: empty list; give at least one prompt");
    if (max_new_tokens < 1) raise<ArgumentError>("max_new_tokens: expected >= 1, got ", max_new_tokens);
    if (batch < 1) raise<ArgumentError>("batch: expected >= 1, got ", batch);
    if (!(temperature == 0 || float(temperature) != 0))
      raise<ArgumentError>("temperature: expected 0 (greedy) or a value in [1e-6, 100], got ",
                           temperature);
    GenerateOptions o;
    o.sampler = {float(temperature), top_k, float(top_p)};
    try {
      validate_sampler(o.sampler);
    } catch (const Error& e) {
      throw ArgumentError(e.what());
    }
    o.seed = seed;
    o.max_new_tokens = max_new_tokens;
    o.stop = str_list(stop, "stop");
    o.stop_at_eos = !ignore_eos;
    o.max_batch = batch;
    o.tau = tau_arg(tau);
    if (stream) {
      if (details) raise<ArgumentError>("details: not available with stream=True");
      return py::cast(std::make_unique<PyGenerateStream>(s_, std::move(ps), std::move(o), multi));
    }
    SignalCheck sig;
    GenerateEvents ev;
    ev.on_token = [&](i64, i32, const TokenConcept*) { sig.poll(); };
    std::vector<Completion> done;
    try {
      done = s_->run([&](LanguageModel& m) { return dlcm::generate(m, *s_->tok, ps, o, ev); });
    } catch (const Cancelled&) {
      sig.raise_pending();
    }
    py::list out;
    for (const Completion& c : done) {
      if (!details) {
        out.append(to_str(c.text));
        continue;
      }
      py::dict d;
      d["text"] = to_str(c.text);
      d["ids"] = py::cast(c.ids);
      d["prompt_ids"] = py::cast(c.prompt_ids);
      d["stop_reason"] = c.stop_reason;
      out.append(d);
    }
    if (multi) return out;
    return out[0];
  }

  py::dict state_dict() {
    s_->check_open();
    py::dict d;
    std::shared_ptr<LanguageModel> keep;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(s_->mu);
      keep = s_->model;
    }
    if (!keep) throw ClosedError(s_->closed_message());
    // Each array is a read-only view of the parameter's storage; the capsule keeps the model's
    // storage alive as long as any view exists (also after close()).
    auto* holder = new std::shared_ptr<LanguageModel>(keep);
    py::capsule base(holder, [](void* p) { delete static_cast<std::shared_ptr<LanguageModel>*>(p); });
    for (const Param& p : keep->params().params()) {
      std::vector<py::ssize_t> shape(p.shape.begin(), p.shape.end()), strides(shape.size());
      py::ssize_t st = sizeof(float);
      for (size_t k = shape.size(); k-- > 0;) {
        strides[k] = st;
        st *= shape[k];
      }
      py::array_t<float> a(shape, strides, p.w, base);
      py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
      d[py::str(p.name)] = a;
    }
    return d;
  }

  void load_state_dict(py::handle sd, bool strict) {
    s_->check_open();
    if (!py::isinstance<py::dict>(sd))
      raise<ArgumentTypeError>("state_dict: expected a dict of name -> array");
    // Convert and check everything first, then copy under the lock: a bad entry changes nothing.
    std::vector<std::pair<std::string, py::array_t<float, py::array::c_style | py::array::forcecast>>> items;
    std::vector<std::pair<std::string, std::vector<i64>>> shapes;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(s_->mu);
      if (!s_->model) throw ClosedError(s_->closed_message());
      for (const Param& p : s_->model->params().params()) shapes.emplace_back(p.name, p.shape);
    }
    py::dict d = sd.cast<py::dict>();
    for (auto [k, v] : d) {
      if (!py::isinstance<py::str>(k))
        raise<ArgumentTypeError>("state_dict: keys must be parameter names (str)");
      const std::string name = k.cast<std::string>();
      auto it = std::find_if(shapes.begin(), shapes.end(), [&](auto& s) { return s.first == name; });
      if (it == shapes.end()) {
        if (strict)
          raise<ArgumentError>("state_dict: unexpected key '", name, "' (not a parameter of this ",
                               s_->arch, " model; strict=False skips it)");
        continue;
      }
      py::array a = py::module_::import("numpy").attr("asarray")(v);
      if (a.dtype().kind() != 'f')
        raise<ArgumentTypeError>("state_dict['", name, "']: expected a floating-point array, got dtype ",
                                 py::str(a.dtype()).cast<std::string>());
      std::vector<i64> shape(a.shape(), a.shape() + a.ndim());
      if (shape != it->second) {
        std::ostringstream want, got;
        for (i64 x : it->second) want << (want.tellp() ? ", " : "") << x;
        for (i64 x : shape) got << (got.tellp() ? ", " : "") << x;
        raise<ArgumentError>("state_dict['", name, "']: shape [", got.str(), "] but the model's is [",
                             want.str(), "]");
      }
      auto f = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
      if (!f) throw py::error_already_set();
      items.emplace_back(name, std::move(f));
    }
    if (strict && items.size() != shapes.size()) {
      for (auto& [name, shape] : shapes)
        if (!d.contains(py::str(name)))
          raise<ArgumentError>("state_dict: missing key '", name, "' (", shapes.size() - items.size(),
                               " of ", shapes.size(), " parameters missing; strict=False loads the rest)");
    }
    s_->run([&](LanguageModel& m) {
      for (auto& [name, a] : items) {
        Param* p = m.params().find(name);
        std::memmove(p->w, a.data(), sizeof(float) * p->numel);
      }
    });
  }

 private:
  State s_;
};

}  // namespace

void bind_model(py::module_& m) {
  py::class_<PyTokenizer>(m, "Tokenizer", doc::Tokenizer)
      .def("encode",
           [](const PyTokenizer& t, py::handle text) {
             std::string s;
             if (py::isinstance<py::bytes>(text)) s = text.cast<std::string>();
             else if (py::isinstance<py::str>(text)) s = text.cast<std::string>();
             else raise<ArgumentTypeError>("text: expected str or bytes, got ",
                                           py::str(text.get_type().attr("__name__")).cast<std::string>());
             py::gil_scoped_release nogil;
             return t.get().encode(s);
           },
           py::arg("text"), doc::Tokenizer_encode)
      .def("decode",
           [](const PyTokenizer& t, py::handle ids) {
             std::vector<i32> v = token_list(ids, t.get().vocab_size(), "ids", true);
             return to_str(t.get().decode(v));
           },
           py::arg("ids"), doc::Tokenizer_decode)
      .def("decode_piece",
           [](const PyTokenizer& t, i64 id) {
             if (id < 0 || id >= t.get().vocab_size())
               raise<ArgumentError>("id: ", id, " is outside the vocabulary [0, ", t.get().vocab_size(), ")");
             return py::bytes(t.get().decode_piece(i32(id)));
           },
           py::arg("id"), doc::Tokenizer_decode_piece)
      .def_property_readonly("kind", [](const PyTokenizer& t) { return t.get().kind(); })
      .def_property_readonly("vocab_size", [](const PyTokenizer& t) { return t.get().vocab_size(); })
      .def_property_readonly("bos_id", [](const PyTokenizer& t) { return t.get().bos_id(); })
      .def_property_readonly("eos_id", [](const PyTokenizer& t) { return t.get().eos_id(); })
      .def_property_readonly("pad_id", [](const PyTokenizer& t) { return t.get().pad_id(); })
      .def("__repr__", [](const PyTokenizer& t) {
        return "<dlcm.Tokenizer " + t.get().kind() + ", " + std::to_string(t.get().vocab_size()) + " ids>";
      });

  py::class_<PyGenerateStream>(m, "GenerateStream", doc::GenerateStream)
      .def("__iter__", [](py::object self) { return self; })
      .def("__next__", &PyGenerateStream::next)
      .def("close", &PyGenerateStream::stop, doc::GenerateStream_close);

  py::class_<PyModel>(m, "Model", doc::Model)
      .def("close", &PyModel::close, doc::Model_close)
      .def_property_readonly("closed", [](const PyModel& p) { return p.state()->closed.load(); })
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyModel& p, py::args) { p.close(); })
      .def_property_readonly("path", [](const PyModel& p) { return p.state()->dir; },
                             doc::Model_path)
      .def_property_readonly("config", [](const PyModel& p) { return to_py(p.state()->config); },
                             doc::Model_config)
      .def_property_readonly("arch", [](const PyModel& p) { return p.state()->arch; })
      .def_property_readonly("vocab_size", [](const PyModel& p) { return vocab(p.state()); })
      .def_property_readonly("max_seq_len", [](const PyModel& p) { return max_len(p.state()); })
      .def_property_readonly("tokenizer", [](const PyModel& p) { return PyTokenizer(p.state()->tok); })
      .def("forward", &PyModel::forward, py::arg("tokens"), py::arg("out") = py::none(),
           doc::Model_forward)
      .def("logits_at", &PyModel::logits_at, py::arg("tokens"), py::arg("positions"), doc::Model_logits_at)
      .def("boundaries", &PyModel::boundaries, py::arg("tokens"), py::arg("tau") = py::none(),
           doc::Model_boundaries)
      .def("concepts", &PyModel::concepts, py::arg("text"), py::arg("tau") = py::none(),
           doc::Model_concepts)
      .def("score", &PyModel::score, py::arg("context"), py::arg("continuation"), doc::Model_score)
      .def("score_batch", &PyModel::score_batch, py::arg("pairs"), py::arg("batch_tokens") = 2048,
           doc::Model_score_batch)
      .def("generate", &PyModel::generate, py::arg("prompts"), py::arg("max_new_tokens") = 100,
           py::arg("temperature") = 0.8, py::arg("top_k") = 0, py::arg("top_p") = 1.0,
           py::arg("seed") = 0, py::arg("stop") = py::none(), py::arg("stream") = false,
           py::arg("tau") = py::none(), py::arg("ignore_eos") = false, py::arg("batch") = 8,
           py::arg("details") = false, doc::Model_generate)
      .def("state_dict", &PyModel::state_dict, doc::Model_state_dict)
      .def("load_state_dict", &PyModel::load_state_dict, py::arg("state_dict"), py::arg("strict") = true,
           doc::Model_load_state_dict)
      .def("_time_forward", &PyModel::time_forward, py::arg("tokens"), py::arg("repeats") = 5,
           doc::Model__time_forward)
      .def("__repr__", [](const PyModel& p) {
        const auto& s = p.state();
        return "<dlcm.Model " + s->arch + " from " + s->dir +
               (s->closed ? " (closed)>" : ">");
      });

  m.def(
      "load",
      [](py::handle path) {
        const std::string pth = path_arg(path, "path");
        auto s = std::make_shared<ModelState>();
        {
          py::gil_scoped_release nogil;
          std::string dir;
          std::unique_ptr<LanguageModel> model = load_model_with_tokenizer(pth, &dir);
          s->tok = load_tokenizer(dir);
          s->config = config_to_json(load_checkpoint_config(dir));
          tidy_floats(s->config);
          s->arch = model->config().arch;
          s->vocab_size = model->config().vocab_size;
          s->max_seq_len = model->config().max_seq_len;
          s->model = std::move(model);
          s->dir = dir;
        }
        return PyModel(std::move(s));
      },
      py::arg("path"), doc::load);
}

}  // namespace dlcm::py_bind
