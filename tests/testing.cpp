#include "testing.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>

#include <sys/wait.h>

namespace dlcm::test {

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

i64 count_of(const std::string& s, const std::string& what) {
  i64 n = 0;
  for (size_t p = 0; (p = s.find(what, p)) != std::string::npos; p += what.size()) ++n;
  return n;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

std::vector<std::string> file_names(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

i64 open_descriptors() { return i64(file_names("/proc/self/fd").size()); }

bool is_mapped(const std::string& path) {
  const std::string real = std::filesystem::weakly_canonical(path).string();
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line))
    if (line.find(real) != std::string::npos) return true;
  return false;
}

CommandResult run_command(const std::string& cmd) {
  CommandResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) r.out.append(buf, n);
  const int st = pclose(p);
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

void fill_normal(float* x, i64 n, uint64_t seed, float std) {
  Rng r(seed);
  for (i64 i = 0; i < n; ++i) x[i] = r.normal() * std;
}

void fill_uniform(float* x, i64 n, uint64_t seed, float lo, float hi) {
  Rng r(seed);
  for (i64 i = 0; i < n; ++i) x[i] = lo + (hi - lo) * r.uniform();
}

double dot(const float* a, const float* b, i64 n) {
  double s = 0;
  for (i64 i = 0; i < n; ++i) s += double(a[i]) * double(b[i]);
  return s;
}

double check_grad(const std::string& what, float* x, const float* analytic, i64 n,
                  const std::function<double()>& loss, double h, double tol, i64 max_probes,
                  uint64_t seed, double floor) {
  Rng r(seed);
  double worst = 0;
  i64 probes = std::min(n, max_probes);
  for (i64 p = 0; p < probes; ++p) {
    i64 i = (probes == n) ? p : i64(r.next() % uint64_t(n));
    float orig = x[i];
    x[i] = orig + float(h);
    double lp = loss();
    x[i] = orig - float(h);
    double lm = loss();
    x[i] = orig;
    double fd = (lp - lm) / (2 * h);
    double an = analytic[i];
    double err = std::abs(fd - an) / std::max(std::abs(fd) + std::abs(an), floor);
    worst = std::max(worst, err);
    EXPECT_LE(err, tol) << what << "[" << i << "]: finite difference " << fd << " vs analytic "
                        << an;
  }
  return worst;
}

double rel_err(const float* a, const float* b, i64 n) {
  double scale = 1e-30;
  for (i64 i = 0; i < n; ++i)
    if (std::isfinite(b[i])) scale = std::max(scale, double(std::abs(b[i])));
  return max_abs_diff(a, b, n) / scale;
}

double max_abs_diff(const float* a, const float* b, i64 n) {
  double diff = 0;
  for (i64 i = 0; i < n; ++i) {
    // std::max drops a NaN difference: a NaN on one side only is the largest difference there is
    // (NaN on both sides, or the same infinity, compares equal)
    const bool na = std::isnan(a[i]), nb = std::isnan(b[i]);
    if (na || nb) {
      if (na != nb) return std::numeric_limits<double>::infinity();
      continue;
    }
    if (a[i] == b[i]) continue;  // equal infinities: inf - inf would be NaN
    diff = std::max(diff, double(std::abs(a[i] - b[i])));
  }
  return diff;
}

CmdResult run_dlcm(const std::string& args) {
  return run_command(std::string(DLCM_BINARY) + " " + args + " 2>&1");
}

const char* name_of(Pattern p) {
  switch (p) {
    case Pattern::Random: return "random";
    case Pattern::AllOnes: return "one-token concepts";
    case Pattern::WholeRow: return "whole row one concept";
    case Pattern::MultiDoc: return "several documents per row";
    case Pattern::Uneven: return "very different concept counts";
  }
  return "?";
}

void make_pattern(Pattern pat, i64 B, i64 L, uint64_t seed, std::vector<i32>& tokens,
                  std::vector<uint8_t>& b) {
  Rng r(seed);
  tokens.assign(B * L, 0);
  b.assign(B * L, 0);
  for (i64 n = 0; n < B * L; ++n) tokens[n] = 2 + i32(r.next() % 50);
  for (i64 row = 0; row < B; ++row) {
    tokens[row * L] = kBos;
    for (i64 t = 0; t < L; ++t) {
      const i64 n = row * L + t;
      uint8_t v = 0;
      switch (pat) {
        case Pattern::Random: v = r.uniform() < 0.35f; break;
        case Pattern::AllOnes: v = 1; break;
        case Pattern::WholeRow: v = 0; break;
        case Pattern::MultiDoc:
          if (t > 0 && r.uniform() < 0.12f) tokens[n] = kBos;
          v = r.uniform() < 0.25f;
          break;
        case Pattern::Uneven:
          v = (row % 3 == 0) ? 1 : (row % 3 == 1 ? 0 : r.uniform() < 0.2f);
          break;
      }
      if (t == 0 || tokens[n] == kBos) v = 1;
      b[n] = v;
    }
  }
}

TempDir::TempDir() {
  std::random_device rd;
  auto base = std::filesystem::temp_directory_path();
  for (;;) {
    auto p = base / ("dlcm-test-" + std::to_string(rd()) + std::to_string(rd()));
    if (std::filesystem::create_directory(p)) {
      path = p.string();
      break;
    }
  }
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

}  // namespace dlcm::test
