#include "convert.h"

#include <cstdio>
#include <cstdlib>
#include <type_traits>

namespace dlcm::py_bind {
using nlohmann::json;

py::str to_str(const std::string& s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), py::ssize_t(s.size()), "replace");
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(o);
}

// Floats as the 7 significant digits a float holds (0.03, not 0.029999999329447746).
void tidy_floats(json& j) {
  if (j.is_object() || j.is_array()) {
    for (auto& v : j) tidy_floats(v);
  } else if (j.is_number_float()) {
    char b[32];
    std::snprintf(b, sizeof b, "%.7g", j.get<double>());
    j = std::strtod(b, nullptr);
  }
}

py::object to_py(const json& j) {
  switch (j.type()) {
    case json::value_t::boolean: return py::bool_(j.get<bool>());
    case json::value_t::number_integer: return py::int_(j.get<int64_t>());
    case json::value_t::number_unsigned: return py::int_(j.get<uint64_t>());
    case json::value_t::number_float: return py::float_(j.get<double>());
    case json::value_t::string: return to_str(j.get_ref<const std::string&>());
    case json::value_t::array: {
      py::list l;
      for (const auto& v : j) l.append(to_py(v));
      return l;
    }
    case json::value_t::object: {
      py::dict d;
      for (const auto& [k, v] : j.items()) d[to_str(k)] = to_py(v);
      return d;
    }
    default: return py::none();
  }
}

json from_py(py::handle h, const std::string& what) {
  if (h.is_none()) return nullptr;
  if (py::isinstance<py::bool_>(h)) return h.cast<bool>();
  if (py::isinstance<py::int_>(h)) {
    try {
      return h.cast<int64_t>();
    } catch (const py::cast_error&) {
      raise<ArgumentError>(what, ": integer ", py::str(h).cast<std::string>(),
                           " does not fit in 64 bits");
    }
  }
  if (py::isinstance<py::float_>(h)) return h.cast<double>();
  if (py::isinstance<py::str>(h)) return h.cast<std::string>();
  if (py::isinstance<py::dict>(h)) {
    json o = json::object();
    for (auto [k, v] : h.cast<py::dict>()) {
      if (!py::isinstance<py::str>(k))
        raise<ArgumentTypeError>(what, ": keys must be str, got ", py::repr(k).cast<std::string>());
      const std::string key = k.cast<std::string>();
      o[key] = from_py(v, what + "." + key);
    }
    return o;
  }
  if (py::isinstance<py::list>(h) || py::isinstance<py::tuple>(h)) {
    json a = json::array();
    i64 i = 0;
    for (auto v : h) a.push_back(from_py(v, what + "[" + std::to_string(i++) + "]"));
    return a;
  }
  // NumPy scalars (np.float32(0.1), np.int64(3), np.bool_(True)) as their Python value.
  // Leaked on purpose: a static py::object would be released after the interpreter is gone.
  static py::handle generic = py::object(py::module_::import("numpy").attr("generic")).release();
  if (py::isinstance(h, generic)) return from_py(h.attr("item")(), what);
  raise<ArgumentTypeError>(what, ": a value of type ", py::str(h.get_type().attr("__name__")).cast<std::string>(),
                           " cannot be a config value (use dict, list, str, int, float, bool or None)");
}

std::string path_arg(py::handle h, const char* what) {
  if (py::isinstance<py::str>(h)) return h.cast<std::string>();
  static py::handle fspath = py::object(py::module_::import("os").attr("fspath")).release();
  try {
    py::object s = fspath(h);
    if (py::isinstance<py::str>(s)) return s.cast<std::string>();
  } catch (const py::error_already_set&) {
  }
  raise<ArgumentTypeError>(what, ": expected a path (str or os.PathLike), got ",
                           py::str(h.get_type().attr("__name__")).cast<std::string>());
}

std::vector<std::string> str_list(py::handle h, const char* what) {
  std::vector<std::string> out;
  if (h.is_none()) return out;
  if (py::isinstance<py::str>(h)) return {h.cast<std::string>()};
  if (!py::isinstance<py::list>(h) && !py::isinstance<py::tuple>(h))
    raise<ArgumentTypeError>(what, ": expected a str or a list of str, got ",
                             py::str(h.get_type().attr("__name__")).cast<std::string>());
  for (auto v : h) {
    if (!py::isinstance<py::str>(v))
      raise<ArgumentTypeError>(what, ": expected a list of str, got an item of type ",
                               py::str(v.get_type().attr("__name__")).cast<std::string>());
    out.push_back(v.cast<std::string>());
  }
  return out;
}

// obj as an integer NumPy array (no copy when it already is one); Error for anything else.
static py::array int_array(py::handle obj, const char* what, const char* expected) {
  py::array a;
  try {
    a = py::module_::import("numpy").attr("asarray")(obj);
  } catch (const py::error_already_set& e) {
    raise<ArgumentError>(what, ": expected ", expected, " (", e.what(), ")");
  }
  const char kind = a.dtype().kind();
  // An empty list comes out as float64: report it by its size, not its dtype.
  if (kind != 'i' && kind != 'u' && a.size() > 0)
    raise<ArgumentTypeError>(what, ": expected integer token ids (", expected, "), got dtype ",
                             py::str(a.dtype()).cast<std::string>());
  return a;
}

// Copies n ids from p (contiguous) into out, checking each against [0, V).
template <typename T>
static void copy_ids(const T* p, i64 n, i64 V, i64 L, bool batched, const char* what,
                     std::vector<i32>& out) {
  out.resize(n);
  for (i64 i = 0; i < n; ++i) {
    const T v = p[i];
    bool ok = uint64_t(v) < uint64_t(V);
    if constexpr (std::is_signed_v<T>) ok = ok && v >= 0;
    if (!ok) {
      if (batched)
        raise<ArgumentError>(what, ": token id ", +v, " at [", i / L, ", ", i % L,
                             "] is outside the vocabulary [0, ", V, ")");
      raise<ArgumentError>(what, ": token id ", +v, " at [", i, "] is outside the vocabulary [0, ",
                           V, ")");
    }
    out[i] = i32(v);
  }
}

static void copy_array_ids(const py::array& a, i64 V, i64 L, bool batched, const char* what,
                           std::vector<i32>& out) {
  const i64 n = a.size();
  if (n == 0) {
    out.clear();
    return;
  }
  // int32 in C order (what forward's docs ask for) is read in place.
  if (py::isinstance<py::array_t<int32_t>>(a) && (a.flags() & py::array::c_style)) {
    copy_ids(static_cast<const int32_t*>(a.data()), n, V, L, batched, what, out);
    return;
  }
  if (a.dtype().kind() == 'u') {
    auto u = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    if (!u) throw py::error_already_set();
    copy_ids(u.data(), n, V, L, batched, what, out);
    return;
  }
  auto s = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!s) throw py::error_already_set();
  copy_ids(s.data(), n, V, L, batched, what, out);
}

TokenRows token_rows(py::handle obj, i64 V, i64 max_len, const char* what) {
  py::array a = int_array(obj, what, "int32 [B, L]");
  TokenRows t;
  if (a.ndim() == 2) {
    t.B = a.shape(0);
    t.L = a.shape(1);
  } else if (a.ndim() == 1) {
    t.B = 1;
    t.L = a.shape(0);
    t.batched = false;
  } else {
    raise<ArgumentError>(what, ": expected shape [B, L] (or [L] for one row), got ", a.ndim(),
                         " dimensions");
  }
  if (t.B < 1 || t.L < 1)
    raise<ArgumentError>(what, ": empty (shape [", t.B, ", ", t.L, "]); give at least one token");
  if (t.L > max_len)
    raise<ArgumentError>(what, ": rows have ", t.L, " tokens but the model's max_seq_len is ",
                         max_len);
  copy_array_ids(a, V, t.L, t.batched, what, t.ids);
  return t;
}

std::vector<i32> token_list(py::handle obj, i64 V, const char* what, bool allow_empty) {
  py::array a = int_array(obj, what, "a list of token ids");
  if (a.ndim() != 1)
    raise<ArgumentError>(what, ": expected a flat list of token ids, got ", a.ndim(), " dimensions");
  if (!allow_empty && a.size() == 0) raise<ArgumentError>(what, ": empty; give at least one token id");
  std::vector<i32> ids;
  copy_array_ids(a, V, a.size(), false, what, ids);
  return ids;
}

}  // namespace dlcm::py_bind
