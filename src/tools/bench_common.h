// Small helpers shared by the `dlcm bench` subcommands: medians, wall clock, resident memory.
#pragma once
#include <algorithm>
#include <chrono>
#include <map>
#include <string>
#include <vector>

#include <cstdio>
#include <nlohmann/json.hpp>

#include "core/common.h"

namespace dlcm::bench {

// A child process we talk to by lines (the PyTorch peers of `bench train` and `bench gemm` in
// --serve mode): lines out, JSON replies back.
class LineProcess {
 public:
  // Runs `argv` with `env` added to this process's environment (and `unset` removed).
  LineProcess(const std::vector<std::string>& argv, const std::vector<std::string>& env,
              const std::vector<std::string>& unset);
  ~LineProcess();
  LineProcess(const LineProcess&) = delete;
  LineProcess& operator=(const LineProcess&) = delete;
  void send(const std::string& line);
  // The next line that starts with '{' (a JSON reply); other lines are kept as the log.
  bool reply(nlohmann::json& j);
  // The log, and how the process ended if it did ("killed by signal 9 (out of memory?)").
  std::string log();

 private:
  int pid_ = -1;
  FILE* to_ = nullptr;
  FILE* from_ = nullptr;
  std::string log_;
};

// The environment of a PyTorch peer process (bench train, bench gemm): OMP_NUM_THREADS of this
// process and, with best = true, PyTorch's best settings here (jemalloc without decay, ATen's
// AVX-512 kernels); an OPENBLAS_CORETYPE that forces a core without AVX-512 goes into `unset`
// (logged).
std::vector<std::string> torch_peer_env(bool best, std::vector<std::string>& unset);

// The PyTorch peer's script python/NAME of the checkout: $DLCM_SOURCE_DIR if set (a dlcm run
// from scripts/portable_bundle.sh on another machine, the checkout elsewhere; logged), else
// the checkout dlcm was built from. A missing script is an error naming both.
std::string peer_script(const std::string& name);

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The q-quantile (0 <= q <= 1) of v, interpolating linearly between order statistics.
inline double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double at = q * double(v.size() - 1);
  const size_t lo = size_t(at), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (at - double(lo)) * (v[hi] - v[lo]);
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Wall time of f() in seconds.
template <typename F>
double time_it(F&& f) {
  auto t0 = std::chrono::steady_clock::now();
  f();
  return seconds_since(t0);
}

// Process CPU time (all threads), seconds.
double cpu_seconds();

// On-CPU time of every thread of this process (each thread's CPU clock; schedstat where that
// fails), seconds by thread id. Over an interval, the busiest thread's time is what a
// dedicated machine's wall time could not go below: with idle threads sleeping (OMP_WAIT_POLICY=passive) waits are not
// counted, so tokens / (busiest thread's time) estimates the throughput on an idle machine
// from a run on a loaded one. A program with serial phases has one thread busier than the rest.
std::map<long, double> thread_cpu_seconds();
double busiest_thread_seconds(const std::map<long, double>& before,
                              const std::map<long, double>& after);

// GEMM throughput of square products of size n for about `seconds`: median GFLOP per wall
// second and per process CPU-second (the engine's own ops::gemm, current precision). Per
// CPU-second is the figure that survives a loaded machine (with OMP_WAIT_POLICY=passive).
struct Peak {
  double wall = 0, cpu = 0, idle = 0;  // per wall second, per CPU-second, per busiest-thread second
};
Peak measure_peak(double seconds, i64 n);

// The --breakdown-gemm tables: each product shape's calls, wall time, FLOPs (2MNK per call) and
// last implementation, summed over runs, by a label such as "NT+C   4096 x   512 x  1536"
// (transposes, accumulation, M x N x K); with ops::set_gemm_shape_by_call, each call apart,
// the label led by its index ("#  12  NT ...").
struct GemmShapeRow {
  i64 calls = 0;
  double sec = 0, flops = 0;
  std::string impl;
};
using GemmShapeRows = std::map<std::string, GemmShapeRow>;
// Adds ops::gemm_shape_stats() to rows and resets the stats.
void take_gemm_shape_stats(GemmShapeRows& rows);

// Resident set size now and its peak (high-water mark) in MiB, from /proc/self/status
// (VmRSS, VmHWM); 0 where unavailable.
struct Rss {
  double now_mib = 0, peak_mib = 0;
};
Rss read_rss();

}  // namespace dlcm::bench
