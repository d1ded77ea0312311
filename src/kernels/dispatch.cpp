// The public kernels (ops.h, dlcm_ops.h, tile_gemm.h) as forwarders to the instruction-set
// variant in use (kernels/isa.h). Compiled once, for the baseline target.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "kernels/dlcm_ops.h"
#include "kernels/isa.h"
#include "kernels/kernel_list.h"
#include "kernels/ops.h"
#include "kernels/tile_gemm.h"

#define DLCM_DECLARE_KERNEL(ret, name, params, args) ret name params;
#ifdef DLCM_ISA_NATIVE
namespace dlcm::ops::isa_native {
DLCM_KERNEL_OPS(DLCM_DECLARE_KERNEL)
}
#else
namespace dlcm::ops::isa_scalar {
DLCM_KERNEL_OPS(DLCM_DECLARE_KERNEL)
}
namespace dlcm::ops::isa_avx2 {
DLCM_KERNEL_OPS(DLCM_DECLARE_KERNEL)
}
namespace dlcm::ops::isa_avx512 {
DLCM_KERNEL_OPS(DLCM_DECLARE_KERNEL)
}
#endif
#undef DLCM_DECLARE_KERNEL

namespace dlcm::ops {

namespace {

struct Kernels {
#define DLCM_KERNEL_POINTER(ret, name, params, args) ret(*name) params;
  DLCM_KERNEL_OPS(DLCM_KERNEL_POINTER)
#undef DLCM_KERNEL_POINTER
};

#define DLCM_KERNEL_ENTRY(ret, name, params, args) &DLCM_VARIANT::name,
#ifdef DLCM_ISA_NATIVE
#define DLCM_VARIANT isa_native
const Kernels kNative = {DLCM_KERNEL_OPS(DLCM_KERNEL_ENTRY)};
#undef DLCM_VARIANT
// The level -march=native gave the kernels (kernels/isa_target.h compiles them the same way).
#if defined(__AVX512F__)
constexpr Isa kNativeLevel = Isa::Avx512;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr Isa kNativeLevel = Isa::Avx2;
#else
constexpr Isa kNativeLevel = Isa::Scalar;
#endif
#else
#define DLCM_VARIANT isa_scalar
const Kernels kScalar = {DLCM_KERNEL_OPS(DLCM_KERNEL_ENTRY)};
#undef DLCM_VARIANT
#define DLCM_VARIANT isa_avx2
const Kernels kAvx2 = {DLCM_KERNEL_OPS(DLCM_KERNEL_ENTRY)};
#undef DLCM_VARIANT
#define DLCM_VARIANT isa_avx512
const Kernels kAvx512 = {DLCM_KERNEL_OPS(DLCM_KERNEL_ENTRY)};
#undef DLCM_VARIANT
#endif
#undef DLCM_KERNEL_ENTRY

// What the CPU (and the OS, which must save the wide registers: libgcc checks XGETBV) offers.
bool cpu_supports(Isa i) {
  __builtin_cpu_init();
  switch (i) {
    case Isa::Scalar:
      return true;
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::Avx512:
      return cpu_supports(Isa::Avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
  }
  return false;
}

bool available(Isa i) {
#ifdef DLCM_ISA_NATIVE
  return i == kNativeLevel;
#else
  return cpu_supports(i);
#endif
}

const Kernels* kernels_of(Isa i) {
#ifdef DLCM_ISA_NATIVE
  (void)i;
  return &kNative;
#else
  switch (i) {
    case Isa::Avx512:
      return &kAvx512;
    case Isa::Avx2:
      return &kAvx2;
    case Isa::Scalar:
      break;
  }
  return &kScalar;
#endif
}

std::string names(const std::vector<Isa>& v) {
  std::string s;
  for (Isa i : v) s += std::string(s.empty() ? "" : " ") + isa_name(i);
  return s;
}

void check_available(Isa i, const char* what) {
  DLCM_CHECK(available(i), what, ": the ", isa_name(i), " kernels are not available here (",
             isa_native_build() ? "native build with only the " : "this CPU supports ",
             names(isa_available()), isa_native_build() ? " kernels" : "",
             "); choose one of those or leave it unset");
}

std::atomic<Isa> g_isa{Isa::Scalar};
std::atomic<const Kernels*> g_kernels{nullptr};

// DLCM_ISA read once, at the first kernel call (or isa()/set_isa()).
const Kernels& init_kernels() {
  static std::once_flag once;
  std::call_once(once, [] {
    Isa level = isa_available().back();
    if (const char* e = std::getenv("DLCM_ISA"); e && *e) {
      level = parse_isa(e, "DLCM_ISA");
      check_available(level, "DLCM_ISA");
      std::fprintf(stderr, "dlcm: DLCM_ISA=%s: the kernels run their %s variant\n", e,
                   isa_name(level));
    }
    g_isa.store(level);
    g_kernels.store(kernels_of(level));
  });
  return *g_kernels.load();
}

inline const Kernels& kernels() {
  const Kernels* k = g_kernels.load(std::memory_order_acquire);
  return k ? *k : init_kernels();
}

}  // namespace

namespace {
std::atomic<i64> g_inactive_entries{0};
}  // namespace

void note_parallel_entry() {
  if (omp_get_level() > omp_get_active_level() && omp_get_max_threads() > 1)
    g_inactive_entries.fetch_add(1, std::memory_order_relaxed);
}
i64 parallel_entries_in_inactive_regions() { return g_inactive_entries.load(); }

bool env_switch(const char* name, const char* when_on, const char* when_off) {
  const char* e = std::getenv(name);
  if (!e || !*e) return true;
  const bool on = std::string(e) != "0";
  std::fprintf(stderr, "dlcm: %s=%s: %s\n", name, e, on ? when_on : when_off);
  return on;
}

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::Scalar:
      return "scalar";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
  }
  return "?";
}

Isa parse_isa(const std::string& s, const std::string& what) {
  for (Isa i : {Isa::Scalar, Isa::Avx2, Isa::Avx512})
    if (s == isa_name(i)) return i;
  fail(what, ": expected \"scalar\", \"avx2\" or \"avx512\", got \"", s, "\"");
}

bool isa_native_build() {
#ifdef DLCM_ISA_NATIVE
  return true;
#else
  return false;
#endif
}

std::vector<Isa> isa_available() {
  std::vector<Isa> v;
  for (Isa i : {Isa::Scalar, Isa::Avx2, Isa::Avx512})
    if (available(i)) v.push_back(i);
  return v;
}

Isa isa() {
  kernels();
  return g_isa.load();
}

void set_isa(Isa i) {
  kernels();  // DLCM_ISA is read (and checked) first, so it cannot override this later
  check_available(i, "ops::set_isa");
  g_isa.store(i);
  g_kernels.store(kernels_of(i), std::memory_order_release);
}

std::string cpu_isa_features() {
  __builtin_cpu_init();
  std::string s;
  auto add = [&](bool has, const char* name) {
    if (has) s += std::string(s.empty() ? "" : " ") + name;
  };
  add(__builtin_cpu_supports("avx2"), "avx2");
  add(__builtin_cpu_supports("fma"), "fma");
  add(__builtin_cpu_supports("avx512f"), "avx512f");
  add(__builtin_cpu_supports("avx512bw"), "avx512bw");
  add(__builtin_cpu_supports("avx512vl"), "avx512vl");
  add(__builtin_cpu_supports("avx512dq"), "avx512dq");
  add(__builtin_cpu_supports("avx512bf16"), "avx512bf16");
  add(__builtin_cpu_supports("amx-tile"), "amx-tile");
  add(__builtin_cpu_supports("amx-bf16"), "amx-bf16");
  return s.empty() ? "none" : s;
}

bool amx_bf16_usable() {
  // Linux hands out the tile data state only on request (ARCH_REQ_XCOMP_PERM, feature 18,
  // XTILEDATA); without it the first tile instruction faults. Asked once per process.
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") ||
        !__builtin_cpu_supports("avx512bf16"))
      return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

std::string isa_summary() {
  std::string s = isa_name(isa());
  if (isa_native_build())
    s += " (native build";
  else
    s += " (dispatched; available: " + names(isa_available());
  return s + "; CPU: " + cpu_isa_features() + ")";
}

// The forwarders. Qualified definitions: a signature that drifts from its header declaration
// does not compile.
#define DLCM_FORWARD(ret, name, params, args) \
  auto dlcm::ops::name params -> ret { return kernels().name args; }
}  // namespace dlcm::ops

DLCM_KERNEL_OPS(DLCM_FORWARD)
#undef DLCM_FORWARD
