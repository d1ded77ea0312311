// Helpers shared by the tests: random fills, finite-difference gradient checks, temp dirs.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/common.h"
#include "core/rng.h"

namespace dlcm::test {

// A whole file's bytes ("" when it cannot be opened), and the non-overlapping occurrences of
// `what` in s: for the tests that read what a command wrote.
std::string read_text(const std::string& path);
i64 count_of(const std::string& s, const std::string& what);

// The message of the dlcm::Error that f throws, or "(no error)" when it throws none.
std::string error_of(const std::function<void()>& f);

void fill_normal(float* x, i64 n, uint64_t seed, float std = 1.0f);
void fill_uniform(float* x, i64 n, uint64_t seed, float lo, float hi);

// Dot product in double (for projected losses sum(out * r)).
double dot(const float* a, const float* b, i64 n);

// Central finite differences of loss() with respect to x[i] for a sample of indices, compared
// with analytic[i]. The error measure is |fd - an| / max(|fd| + |an|, floor) per probe, and
// the check fails when any probe exceeds tol. loss() must be a pure function of x (double).
// Returns the worst error seen. `what` names the tensor in failure messages.
double check_grad(const std::string& what, float* x, const float* analytic, i64 n,
                  const std::function<double()>& loss, double h = 1e-2, double tol = 2e-2,
                  i64 max_probes = 48, uint64_t seed = 7, double floor = 1e-3);

// Max |a-b| / max(max|b|, tiny) over n (relative to the reference's scale).
double rel_err(const float* a, const float* b, i64 n);
// NaN on one side only is an infinite difference (std::max would drop it); NaN on both sides,
// or the same infinity, is no difference.
double max_abs_diff(const float* a, const float* b, i64 n);
// worst = max(worst, e) for error tracking: a NaN e makes it +inf (std::max(worst, NaN) is worst,
// so a NaN result would pass every bound).
inline double worse(double worst, double e) { return std::isnan(e) ? INFINITY : std::max(worst, e); }

// Runs a shell command; returns its exit code (-1 if it did not exit normally) and its standard output (add " 2>&1" to the
// command for standard error too).
struct CommandResult {
  int rc = -1;
  std::string out;
};
CommandResult run_command(const std::string& cmd);
// The names of the entries of a folder, sorted.
std::vector<std::string> file_names(const std::string& dir);
// What this process holds open: its file descriptors (/proc/self/fd), and whether some memory
// mapping is of `path` (/proc/self/maps), for tests that refused input leaks neither.
i64 open_descriptors();
bool is_mapped(const std::string& path);
// Runs the dlcm binary under test with `args`; out holds stdout and stderr together.
using CmdResult = CommandResult;
CmdResult run_dlcm(const std::string& args);

// Boundary patterns for the DLCM kernels: tokens (random ids >= 2, kBos at every row start;
// MultiDoc also puts kBos inside rows) and decisions b (1 at every row start and BOS token).
constexpr i32 kBos = 1;
enum class Pattern { Random, AllOnes, WholeRow, MultiDoc, Uneven };
const char* name_of(Pattern p);
void make_pattern(Pattern pat, i64 B, i64 L, uint64_t seed, std::vector<i32>& tokens,
                  std::vector<uint8_t>& b);

// A fresh empty directory under the system temp dir, removed by the destructor.
struct TempDir {
  std::string path;
  TempDir();
  ~TempDir();
};

}  // namespace dlcm::test
