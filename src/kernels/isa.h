// Run-time choice of the hand-written kernels' instruction set (docs/install.md).
//
// The portable build (default, DLCM_NATIVE=OFF) targets baseline x86-64 and compiles the kernel
// sources three times: scalar (baseline, SSE2), avx2 (AVX2 + FMA, the portable loops
// auto-vectorised) and avx512 (AVX-512 F/BW/VL/DQ, the intrinsic paths). The best level the CPU
// supports is chosen once at the first kernel call; DLCM_ISA=scalar|avx2|avx512 forces one
// (logged once to stderr; an unknown value or a level the CPU lacks is an error). oneDNN
// (ops::gemm) dispatches on its own. The native build (-DDLCM_NATIVE=ON, -march=native) has one
// variant only, the level its compiler flags give.
#pragma once
#include <string>
#include <vector>

#include "core/common.h"

namespace dlcm::ops {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

const char* isa_name(Isa i);  // "scalar" | "avx2" | "avx512"
// "scalar" | "avx2" | "avx512"; anything else throws naming `what` (e.g. "DLCM_ISA").
Isa parse_isa(const std::string& s, const std::string& what);

bool isa_native_build();  // built with -DDLCM_NATIVE=ON: one kernel variant
// Levels this binary can run on this CPU (compiled in and supported), lowest first.
std::vector<Isa> isa_available();
// The level in use: on first call, DLCM_ISA if set, else the best available.
Isa isa();
// Switches the kernels to level i (tests, benchmarks); throws when it is not available. Not
// while kernels run on other threads.
void set_isa(Isa i);
// set_isa for a scope (tests, benchmarks), the level before it restored at its end.
using IsaScope = SettingScope<Isa, isa, set_isa>;
// The level (int(Isa)) the kernels in use were compiled for, as each variant reports it:
// the tests' check that set_isa runs the variant it names.
int kernel_variant();
// The CPU's vector extensions that matter here, e.g. "avx2 fma avx512f avx512bw avx512vl
// avx512dq avx512bf16" (amx-tile / amx-bf16 appended where present).
std::string cpu_isa_features();
// The CPU has AMX-BF16 (and AVX512-BF16) and the kernel granted this process the tile state.
bool amx_bf16_usable();
// One line for --version and benchmarks: "avx512 (dispatched; available: scalar avx2 avx512;
// CPU: avx2 fma ...)" or "avx512 (native build; CPU: ...)".
std::string isa_summary();

// An on/off switch read from the environment once, by the caller's static initialiser: unset or
// empty is on; "0" is off, anything else on. A value that is set is logged to stderr as
// "dlcm: NAME=VALUE: <when_on or when_off>" (every forced setting is logged).
bool env_switch(const char* name, const char* when_on, const char* when_off);

// Kernels that open a parallel region of their own (attention, the packed products) call this
// first. It counts calls made from inside a parallel region that an `if` clause left inactive
// while more than one thread is allowed: libgomp runs the kernel's region there as a nested
// team and starts and ends a thread at every call, beside its pool's own threads, which spin
// under OMP_WAIT_POLICY=active (a 2-thread prefill ran 3x slower that way, session 27). Such a
// call site should branch instead of using the `if` clause; tests check that none is left.
void note_parallel_entry();
i64 parallel_entries_in_inactive_regions();

}  // namespace dlcm::ops
