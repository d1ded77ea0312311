// Shared basics: errors with context, aligned float buffers, small helpers.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace dlcm {

using i64 = int64_t;
using i32 = int32_t;

// Every user-facing failure is an Error whose message names the file, field or flag at fault
// and what was expected. The CLI prints it on one line and exits non-zero.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] inline void fail(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw Error(os.str());
}

#define DLCM_CHECK(cond, ...)              \
  do {                                     \
    if (!(cond)) ::dlcm::fail(__VA_ARGS__); \
  } while (0)

// 64-byte aligned allocator so that AVX-512 loads never split cache lines.
template <typename T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64 + 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const AlignedAlloc<U>&) const { return true; }
};

// Activation/parameter storage: allocated once at model set-up, reused every step.
using Buf = std::vector<float, AlignedAlloc<float>>;

inline void zero(Buf& b) { std::fill(b.begin(), b.end(), 0.0f); }

}  // namespace dlcm
