// StepProfiler: wall time per named component of a training step (benchmarks only).
//
//   { prof::Scope s("encoder"); ... }     // time of the block is charged to "encoder"
//
// Disabled (the default) a scope is one load of a global flag and a branch. Enabled, scopes
// nest with exclusive attribution: entering a scope pauses the enclosing one, so every
// second is charged to exactly one component and the parts add up to the timed total.
// Wall time and process CPU time are both kept.
// Scopes belong on the thread that drives the step (kernels parallelise inside them).
// Names must be string literals (kept by pointer).
#pragma once
#include <string>
#include <vector>

#include "core/common.h"

namespace dlcm::prof {

extern bool g_enabled;
extern bool g_detail;  // DetailScope rows (bench train --breakdown-gemm)

struct Entry {
  const char* name;
  double seconds = 0;      // wall time
  double cpu_seconds = 0;  // process CPU time (all threads): robust to a loaded machine when
                           // idle threads sleep (OMP_WAIT_POLICY=passive)
  i64 calls = 0;
  double flops = 0;        // work counted by add_flops while this entry was on top
};

void enable(bool on);
void reset();                  // zero every accumulator (names stay registered)
std::vector<Entry> entries();  // in first-use order
double seconds_of(const std::string& name);  // 0 when unknown

void enter(const char* name);
void leave();
// Adds FLOPs to the innermost open scope (a GFLOP/s column for components without a model
// FLOP count, e.g. the GEMM scopes of kernels/gemm.cpp).
void add_flops(double f);

class Scope {
 public:
  explicit Scope(const char* name) : on_(g_enabled) {
    if (on_) enter(name);
  }
  ~Scope() {
    if (on_) leave();
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  bool on_;
};

// A finer row (GEMMs, attention kernels) inside the components, opened only when detail is on
// (set_detail) and only on the driving thread outside parallel regions.
void set_detail(bool on);
class DetailScope {
 public:
  explicit DetailScope(const char* name, double flops = 0);
  ~DetailScope() {
    if (on_) leave();
  }
  DetailScope(const DetailScope&) = delete;
  DetailScope& operator=(const DetailScope&) = delete;

 private:
  bool on_ = false;
};

// Consecutive components of straight-line code without extra braces:
//   prof::Section sec; sec.next("pooling"); ...; sec.next("backbone"); ...   (closed at exit)
class Section {
 public:
  Section() = default;
  ~Section() {
    if (open_) leave();
  }
  void next(const char* name) {
    if (open_) leave();
    open_ = g_enabled;
    if (open_) enter(name);
  }
  Section(const Section&) = delete;
  Section& operator=(const Section&) = delete;

 private:
  bool open_ = false;
};

}  // namespace dlcm::prof
