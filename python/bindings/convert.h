// Conversions between Python objects and the library's types, and the Python exceptions the
// bindings raise (docs/python.md, "Errors"). Everything here runs with the GIL held.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/common.h"

namespace dlcm::py_bind {
namespace py = pybind11;

// Errors of the bindings' own argument checks. They derive from dlcm::Error, so a library
// error and a binding error read alike; the translator (module.cpp) maps each to its Python
// class: Error -> dlcm.Error, ArgumentError -> dlcm.ArgumentError (also a ValueError),
// ArgumentTypeError -> dlcm.ArgumentTypeError (also a TypeError), ClosedError -> dlcm.ClosedError.
struct ArgumentError : Error {
  using Error::Error;
};
struct ArgumentTypeError : ArgumentError {
  using ArgumentError::ArgumentError;
};
struct ClosedError : Error {
  using Error::Error;
};

template <typename E, typename... Args>
[[noreturn]] void raise(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw E(os.str());
}

// UTF-8 bytes -> str; malformed bytes become U+FFFD (token pieces may split a character).
py::str to_str(const std::string& s);
// Floats as the 7 significant digits a float holds (0.03, not 0.029999999329447746).
void tidy_floats(nlohmann::json& j);
// JSON -> dict / list / int / float / str / bool / None.
py::object to_py(const nlohmann::json& j);
// Python data (dict, list, tuple, str, int, float, bool, None, NumPy scalars) -> JSON; `what`
// names the argument in errors.
nlohmann::json from_py(py::handle h, const std::string& what);
// str or os.PathLike -> path string.
std::string path_arg(py::handle h, const char* what);
// str or a list/tuple of str -> list (an empty list for None).
std::vector<std::string> str_list(py::handle h, const char* what);

// Token ids from Python (an integer NumPy array or nested lists), checked and copied: shape
// [B, L] (or [L]: one row, then batched = false), 1 <= L <= max_len, every id in [0, V). The
// copy is a single pass over B*L ids and keeps the values fixed while the GIL is released.
struct TokenRows {
  std::vector<i32> ids;
  i64 B = 0, L = 0;
  bool batched = true;
};
TokenRows token_rows(py::handle obj, i64 V, i64 max_len, const char* what);
// A flat list of token ids (1-D), each in [0, V); may be empty when allow_empty.
std::vector<i32> token_list(py::handle obj, i64 V, const char* what, bool allow_empty);

}  // namespace dlcm::py_bind
