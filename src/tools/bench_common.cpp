#include "tools/bench_common.h"

#include <omp.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "kernels/gemm.h"

namespace dlcm::bench {

void take_gemm_shape_stats(GemmShapeRows& rows) {
  for (const ops::GemmShapeStat& g : ops::gemm_shape_stats(true)) {
    char key[112], at[24] = "";
    if (g.order >= 0) std::snprintf(at, sizeof at, "#%4lld  ", (long long)g.order);
    std::snprintf(key, sizeof key, "%s%s%s%s %6lld x %5lld x %5lld", at, g.trans_a ? "T" : "N",
                  g.trans_b ? "T" : "N", g.accumulate ? "+C" : "  ", (long long)g.M,
                  (long long)g.N, (long long)g.K);
    GemmShapeRow& row = rows[key];
    row.calls += g.calls;
    row.sec += g.seconds;
    row.flops += 2.0 * double(g.M) * double(g.N) * double(g.K) * double(g.calls);
    row.impl = g.impl;
  }
}

double cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

std::map<long, double> thread_cpu_seconds() {
  std::map<long, double> r;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task", ec)) {
    const long tid = std::stol(e.path().filename().string());
    // The thread's CPU clock (Linux encodes a thread's clock id from its id as glibc's
    // pthread_getcpuclockid does: ~tid << 3 | CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED): exact to
    // the nanosecond, where schedstat lags a running thread by up to a scheduler tick (several
    // ms: as long as a whole 128-token prefill).
    timespec ts;
    if (clock_gettime((~clockid_t(tid)) << 3 | 6, &ts) == 0) {
      r[tid] = ts.tv_sec + 1e-9 * ts.tv_nsec;
      continue;
    }
    std::ifstream f(e.path() / "schedstat");
    double ns = 0;
    if (f >> ns) r[tid] = ns * 1e-9;
  }
  return r;
}

double busiest_thread_seconds(const std::map<long, double>& before,
                              const std::map<long, double>& after) {
  double m = 0;
  for (const auto& [tid, t] : after) {
    auto it = before.find(tid);
    m = std::max(m, t - (it == before.end() ? 0.0 : it->second));
  }
  return m;
}

Peak measure_peak(double seconds, i64 n) {
  // Kept between calls: allocating and freeing 3 n^2 floats every repeat would make the
  // benchmark's own RSS samples swing by tens of MiB (glibc's adaptive mmap threshold).
  static Buf a, b, c;
  if (a.size() < size_t(n * n)) {
    a.assign(n * n, 0.5f);
    b.assign(n * n, 0.25f);
    c.assign(n * n, 0.f);
  }
  std::vector<double> w, u, b1;
  ops::gemm(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);  // warm-up
  auto t_end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  const double flop = 2.0 * n * n * n / 1e9;
  do {
    const double c0 = cpu_seconds();
    const auto th0 = thread_cpu_seconds();
    auto t0 = std::chrono::steady_clock::now();
    ops::gemm(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
    w.push_back(flop / seconds_since(t0));
    u.push_back(flop / std::max(1e-9, cpu_seconds() - c0));
    b1.push_back(flop / std::max(1e-9, busiest_thread_seconds(th0, thread_cpu_seconds())));
  } while (std::chrono::steady_clock::now() < t_end || w.size() < 3);
  return {median(w), median(u), median(b1)};
}

Rss read_rss() {
  Rss r;
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return r;
  char line[256];
  while (std::fgets(line, sizeof line, f)) {
    long kb = 0;
    if (std::sscanf(line, "VmRSS: %ld kB", &kb) == 1) r.now_mib = kb / 1024.0;
    if (std::sscanf(line, "VmHWM: %ld kB", &kb) == 1) r.peak_mib = kb / 1024.0;
  }
  std::fclose(f);
  return r;
}

// ---- PyTorch peers ----

std::string peer_script(const std::string& name) {
  const char* env = std::getenv("DLCM_SOURCE_DIR");
  const bool from_env = env && *env;
  const std::string dir = from_env ? env : DLCM_SOURCE_DIR;
  const std::string path = dir + "/python/" + name;
  if (from_env) {
    static bool logged = false;
    if (!logged) std::printf("pytorch: peer scripts from DLCM_SOURCE_DIR=%s\n", env);
    logged = true;
  }
  DLCM_CHECK(std::filesystem::exists(path), "bench: the PyTorch peer's script ", path,
             " does not exist (", from_env ? "DLCM_SOURCE_DIR" : "the checkout dlcm was built from",
             "; set DLCM_SOURCE_DIR to a dlcm checkout, or run with --no-torch)");
  return path;
}

std::vector<std::string> torch_peer_env(bool best, std::vector<std::string>& unset) {
  std::vector<std::string> env = {"OMP_NUM_THREADS=" + std::to_string(omp_get_max_threads())};
  // Best settings for the PyTorch side: jemalloc without decay, OpenBLAS's own AVX-512
  // kernel choice (an OPENBLAS_CORETYPE forcing an AVX2 core is removed).
  // ATen's own vector kernels default to AVX2; AVX-512 measured faster here.
  const char* jem = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
  if (best) {
    if (std::filesystem::exists(jem)) {
      env.push_back(std::string("LD_PRELOAD=") + jem);
      env.push_back("MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1");
    }
    env.push_back("ATEN_CPU_CAPABILITY=avx512");
  }
  if (const char* ct = std::getenv("OPENBLAS_CORETYPE")) {
    std::string s(ct);
    for (auto& ch : s) ch = char(std::toupper(ch));
    if (s != "SKYLAKEX" && s != "COOPERLAKE" && s != "SAPPHIRERAPIDS") {
      unset.push_back("OPENBLAS_CORETYPE");
      std::printf("pytorch: OPENBLAS_CORETYPE=%s unset for the peer (not an AVX-512 core)\n", ct);
    }
  }
  return env;
}

// ---- LineProcess ----

LineProcess::LineProcess(const std::vector<std::string>& argv,
                         const std::vector<std::string>& env,
                         const std::vector<std::string>& unset) {
  // A peer that dies (e.g. killed for memory) must give an error naming it, not kill the
  // benchmark with SIGPIPE on the next write.
  signal(SIGPIPE, SIG_IGN);
  int in[2], out[2];
  DLCM_CHECK(pipe(in) == 0 && pipe(out) == 0, "bench: cannot create pipes");
  pid_ = fork();
  DLCM_CHECK(pid_ >= 0, "bench: fork failed");
  if (pid_ == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    dup2(out[1], 2);
    close(in[1]);
    close(out[0]);
    for (auto& u : unset) unsetenv(u.c_str());
    for (auto& e : env) putenv(const_cast<char*>(e.c_str()));
    std::vector<char*> args;
    for (auto& s : argv) args.push_back(const_cast<char*>(s.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    std::fprintf(stderr, "exec %s failed\n", args[0]);
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  to_ = fdopen(in[1], "w");
  from_ = fdopen(out[0], "r");
}

LineProcess::~LineProcess() {
  if (to_) {
    std::fputs("quit\n", to_);
    std::fclose(to_);
  }
  if (from_) std::fclose(from_);
  if (pid_ > 0) waitpid(pid_, nullptr, 0);
}

void LineProcess::send(const std::string& line) {
  std::fputs((line + "\n").c_str(), to_);
  std::fflush(to_);
}

bool LineProcess::reply(nlohmann::json& j) {
  char buf[8192];
  while (std::fgets(buf, sizeof buf, from_)) {
    std::string s(buf);
    if (!s.empty() && s[0] == '{') {
      try {
        j = nlohmann::json::parse(s);
        return true;
      } catch (...) {
      }
    }
    log_ += s;
  }
  return false;
}

std::string LineProcess::log() {
  int st = 0;
  if (pid_ > 0 && waitpid(pid_, &st, WNOHANG) == pid_) {
    pid_ = -1;
    if (WIFSIGNALED(st))
      log_ += "[the peer was killed by signal " + std::to_string(WTERMSIG(st)) +
              (WTERMSIG(st) == SIGKILL ? " (out of memory? see dmesg)" : "") + "]\n";
    else if (WIFEXITED(st))
      log_ += "[the peer exited with status " + std::to_string(WEXITSTATUS(st)) + "]\n";
  }
  return log_;
}

}  // namespace dlcm::bench
