#include "core/profiler.h"

#include <omp.h>
#include <time.h>

#include <chrono>
#include <cstring>

namespace dlcm::prof {

bool g_enabled = false;
bool g_detail = false;

namespace {

using Clock = std::chrono::steady_clock;
std::vector<Entry> g_entries;
struct Frame {
  i64 index;
  Clock::time_point start;
  double cpu_start;
};

double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
std::vector<Frame> g_stack;

i64 index_of(const char* name) {
  for (size_t i = 0; i < g_entries.size(); ++i)
    if (g_entries[i].name == name || std::strcmp(g_entries[i].name, name) == 0) return i64(i);
  g_entries.push_back(Entry{name});
  return i64(g_entries.size()) - 1;
}

double since(Clock::time_point t0, Clock::time_point t1) {
  return std::chrono::duration<double>(t1 - t0).count();
}

}  // namespace

void enable(bool on) {
  g_enabled = on;
  g_stack.clear();
}

void reset() {
  for (auto& e : g_entries) {
    e.seconds = 0;
    e.cpu_seconds = 0;
    e.calls = 0;
    e.flops = 0;
  }
}

std::vector<Entry> entries() { return g_entries; }

double seconds_of(const std::string& name) {
  for (auto& e : g_entries)
    if (name == e.name) return e.seconds;
  return 0;
}

// Charges the time since the top frame (re)started to its entry.
void charge_top(Clock::time_point now, double cpu) {
  Frame& f = g_stack.back();
  g_entries[f.index].seconds += since(f.start, now);
  g_entries[f.index].cpu_seconds += cpu - f.cpu_start;
}

void enter(const char* name) {
  const auto now = Clock::now();
  const double cpu = cpu_now();
  if (!g_stack.empty()) charge_top(now, cpu);
  const i64 i = index_of(name);
  ++g_entries[i].calls;
  g_stack.push_back(Frame{i, now, cpu});
}

void leave() {
  if (g_stack.empty()) return;  // enabled inside an open scope: nothing to close
  const auto now = Clock::now();
  const double cpu = cpu_now();
  charge_top(now, cpu);
  g_stack.pop_back();
  if (!g_stack.empty()) {
    g_stack.back().start = now;
    g_stack.back().cpu_start = cpu;
  }
}

void set_detail(bool on) { g_detail = on; }

DetailScope::DetailScope(const char* name, double flops) {
  if (!g_enabled || !g_detail || omp_in_parallel()) return;
  on_ = true;
  enter(name);
  add_flops(flops);
}

void add_flops(double f) {
  if (!g_stack.empty()) g_entries[g_stack.back().index].flops += f;
}

}  // namespace dlcm::prof
