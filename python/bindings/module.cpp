// dlcm._core: the C++ library as a Python module (docs/python.md). The package dlcm
// (python/dlcm/__init__.py) re-exports it; the type stub is python/dlcm/_core.pyi.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "convert.h"
#include "docs.h"
#include "data/prepare.h"
#include "model.h"
#include "models/config.h"
#include "tools/commands.h"

namespace dlcm::py_bind {
namespace {
using nlohmann::json;

PyObject* g_error = nullptr;
PyObject* g_argument = nullptr;
PyObject* g_argument_type = nullptr;
PyObject* g_closed = nullptr;

PyObject* new_exception(py::module_& m, const char* name, const char* doc, PyObject* bases) {
  const std::string full = std::string("dlcm.") + name;
  PyObject* e = PyErr_NewExceptionWithDoc(full.c_str(), doc, bases, nullptr);
  if (!e) throw py::error_already_set();
  m.add_object(name, py::handle(e));
  return e;
}

// A config given as a dict, or as a path to a JSON file, plus overrides given as a dict
// ({"train.lr": 1e-3}) or as "key=value" strings (dlcm train --set).
struct ConfigArg {
  json j;
  std::string source;
  std::vector<std::string> sets;
};

ConfigArg config_arg(py::handle config, py::handle overrides) {
  ConfigArg c;
  if (config.is_none()) {
    c.j = json::object();
    c.source = "config";
  } else if (py::isinstance<py::dict>(config)) {
    c.j = from_py(config, "config");
    c.source = "config (dict)";
  } else {
    c.source = path_arg(config, "config");
    c.j = load_config_json(c.source);
  }
  if (py::isinstance<py::dict>(overrides)) {
    for (auto [k, v] : overrides.cast<py::dict>()) {
      if (!py::isinstance<py::str>(k)) raise<ArgumentTypeError>("overrides: keys must be str");
      const std::string key = k.cast<std::string>();
      c.sets.push_back(key + "=" + (py::isinstance<py::str>(v) ? v.cast<std::string>()
                                                              : from_py(v, "overrides." + key).dump()));
    }
  } else {
    c.sets = str_list(overrides, "overrides");
  }
  return c;
}

py::dict val_dict(const ValResult& v) {
  py::dict d;
  d["val_loss"] = v.loss;
  d["val_ppl"] = v.ppl;
  d["val_bpb"] = v.bpb;
  d["val_tokens"] = v.tokens;
  if (v.compression > 0) d["val_compression"] = v.compression;
  return d;
}

py::dict train(py::handle config, py::handle data, py::handle out, std::optional<i64> steps,
               py::handle overrides, py::object on_log, bool resume, bool overwrite,
               py::handle init_from, bool quiet, bool final_eval, bool concept_usage) {
  ConfigArg c = config_arg(config, overrides);
  TrainArgs a;
  // The overrides are applied here rather than passed as a.sets, which the CLI echoes.
  apply_overrides(c.j, c.sets);
  a.config_json = std::move(c.j);
  a.config = c.source;
  a.data = path_arg(data, "data");
  a.out = path_arg(out, "out");
  if (!init_from.is_none()) a.init_from = path_arg(init_from, "init_from");
  if (steps && *steps < 0) raise<ArgumentError>("steps: expected >= 0, got ", *steps);
  a.steps = steps ? *steps : -1;
  a.resume = resume;
  a.overwrite = overwrite;
  a.quiet = quiet;
  a.final_eval = final_eval;
  a.concept_usage = concept_usage;
  if (!on_log.is_none() && !PyCallable_Check(on_log.ptr()))
    raise<ArgumentTypeError>("on_log: expected a callable taking one dict (a log record)");

  // The hooks run on this thread, inside train_run, without the GIL; they take it to call
  // Python. A Python error (in on_log, or KeyboardInterrupt from Ctrl-C) stops the run after
  // the current step with a checkpoint and is raised once train_run has returned.
  std::unique_ptr<py::error_already_set> pending;
  bool stop = false;
  if (!on_log.is_none()) {
    a.on_log = [&](const std::string& line) {
      if (pending) return;
      py::gil_scoped_acquire gil;
      try {
        py::object r = on_log(to_py(json::parse(line)));
        if (r.is(py::bool_(false))) stop = true;  // the callback asks to stop
      } catch (py::error_already_set& e) {
        pending = std::make_unique<py::error_already_set>(std::move(e));
      }
    };
  }
  a.stop_requested = [&]() {
    if (pending || stop) return true;
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      pending = std::make_unique<py::error_already_set>();
      return true;
    }
    return false;
  };
  TrainSummary r;
  {
    py::gil_scoped_release nogil;
    r = train_run(a);
  }
  if (pending) {
    pending->restore();
    throw py::error_already_set();
  }
  py::dict d;
  d["step"] = r.step;
  d["checkpoint"] = r.checkpoint.empty() ? py::object(py::none()) : py::object(py::str(r.checkpoint));
  d["stopped"] = r.stopped;
  if (r.validated) d.attr("update")(val_dict(r.val));
  return d;
}

}  // namespace
}  // namespace dlcm::py_bind

PYBIND11_MODULE(_core, m) {
  using namespace dlcm;
  using namespace dlcm::py_bind;
  m.doc() = "dlcm's C++ engine (use the package dlcm; docs/python.md)";

  g_error = new_exception(m, "Error", doc::Error, PyExc_RuntimeError);
  g_argument = new_exception(m, "ArgumentError", doc::ArgumentError,
                             py::make_tuple(py::handle(g_error), py::handle(PyExc_ValueError)).ptr());
  g_argument_type = new_exception(
      m, "ArgumentTypeError", doc::ArgumentTypeError,
      py::make_tuple(py::handle(g_argument), py::handle(PyExc_TypeError)).ptr());
  g_closed = new_exception(m, "ClosedError", doc::ClosedError, g_error);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ClosedError& e) {
      PyErr_SetString(g_closed, e.what());
    } catch (const ArgumentTypeError& e) {
      PyErr_SetString(g_argument_type, e.what());
    } catch (const ArgumentError& e) {
      PyErr_SetString(g_argument, e.what());
    } catch (const Error& e) {
      PyErr_SetString(g_error, e.what());
    } catch (const py::builtin_exception&) {
      throw;  // pybind11's own (stop_iteration, value_error, ...)
    } catch (const std::bad_alloc&) {
      throw;  // MemoryError
    } catch (const std::exception& e) {
      // Whatever else the library lets through (filesystem, JSON) is an engine error too.
      PyErr_SetString(g_error, e.what());
    }
  });

  bind_model(m);

  m.def(
      "prepare",
      [](py::handle inputs, py::handle out, const std::string& tokenizer, i64 vocab_size,
         double val_fraction, bool quiet) {
        std::vector<std::string> in;
        if (py::isinstance<py::str>(inputs) || !py::isinstance<py::sequence>(inputs))
          in.push_back(path_arg(inputs, "inputs"));
        else
          for (auto h : inputs) in.push_back(path_arg(h, "inputs"));
        if (in.empty()) raise<ArgumentError>("inputs: empty list; give text files or folders");
        PrepareOptions o;
        o.tokenizer = tokenizer;
        if (vocab_size < 1 || vocab_size > (1 << 30))
          raise<ArgumentError>("vocab_size: expected a positive size, got ", vocab_size);
        o.vocab_size = int32_t(vocab_size);
        o.val_fraction = val_fraction;
        o.quiet = quiet;
        const std::string o_dir = path_arg(out, "out");
        json meta;
        {
          py::gil_scoped_release nogil;
          meta = prepare(in, o_dir, o);
        }
        return to_py(meta);
      },
      py::arg("inputs"), py::arg("out"), py::arg("tokenizer") = "bpe", py::arg("vocab_size") = 8192,
      py::arg("val_fraction") = 0.01, py::arg("quiet") = true, doc::prepare);

  m.def("train", &train, py::arg("config"), py::arg("data"), py::arg("out"),
        py::arg("steps") = py::none(), py::arg("overrides") = py::none(),
        py::arg("on_log") = py::none(), py::arg("resume") = false, py::arg("overwrite") = false,
        py::arg("init_from") = py::none(), py::arg("quiet") = false, py::arg("final_eval") = true,
        py::arg("concept_usage") = false, doc::train);

  m.def(
      "eval",
      [](py::handle checkpoint, py::handle data, py::handle tasks, i64 limit, i64 batch_size,
         i64 seq_len, py::handle bench_dir, py::handle task_file, i64 batch_tokens,
         bool concept_usage, i64 usage_batches, bool quiet) {
        EvalArgs a;
        a.ckpt = path_arg(checkpoint, "checkpoint");
        if (!data.is_none()) a.data = path_arg(data, "data");
        std::vector<std::string> t = str_list(tasks, "tasks");
        for (size_t i = 0; i < t.size(); ++i) a.tasks += (i ? "," : "") + t[i];
        a.limit = limit;
        if (batch_size < 1) raise<ArgumentError>("batch_size: expected >= 1, got ", batch_size);
        a.batch_size = batch_size;
        a.seq_len = seq_len;
        if (!bench_dir.is_none()) a.bench_dir = path_arg(bench_dir, "bench_dir");
        if (!task_file.is_none()) a.task_file = path_arg(task_file, "task_file");
        a.batch_tokens = batch_tokens;
        a.concept_usage = concept_usage;
        a.usage_batches = usage_batches;
        a.quiet = quiet;
        json r;
        {
          py::gil_scoped_release nogil;
          r = eval_report(a);
        }
        return to_py(r);
      },
      py::arg("checkpoint"), py::arg("data") = py::none(), py::arg("tasks") = py::none(),
      py::arg("limit") = -1, py::arg("batch_size") = 8, py::arg("seq_len") = 0,
      py::arg("bench_dir") = py::none(), py::arg("task_file") = py::none(),
      py::arg("batch_tokens") = 2048, py::arg("concept_usage") = false,
      py::arg("usage_batches") = -1, py::arg("quiet") = true, doc::eval);

  m.def(
      "resolve_config",
      [](py::handle config, py::handle overrides) {
        ConfigArg c = config_arg(config, overrides);
        json j = config_to_json(config_with_overrides(c.j, c.source, c.sets));
        tidy_floats(j);
        return to_py(j);
      },
      py::arg("config") = py::none(), py::arg("overrides") = py::none(), doc::resolve_config);
}
