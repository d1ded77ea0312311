// Parallel regions only where a team of more than one thread can run them.
//
// libgomp (GCC 12) ends every parallel region with a futex wake system call, a team of one
// thread included: a region whose `if` clause is false, any region under OMP_NUM_THREADS=1, or
// one nested in an active region. That is ~0.3 us per region on the machine measured, and a
// decode step entered 86-100 of them for its small ops (docs/performance.md, session 33), so
// the kernels of the decode path go through these helpers instead of `#pragma omp parallel ...
// if`.
// Off the parallel path the body runs on the calling thread; outside any active region its
// `#pragma omp for` loops then run every iteration there, omp_get_thread_num() is 0 and
// omp_get_num_threads() 1, exactly as in a team of one.
#pragma once
#include <omp.h>

#include "core/common.h"

namespace dlcm {

// Below this much work (elements touched, or multiply-adds) a parallel region costs more than
// it saves: every kernel asks parallel_worth() rather than spelling a threshold of its own.
inline constexpr i64 kParallelMinWork = i64(1) << 15;
inline bool parallel_worth(i64 work) { return work >= kParallelMinWork; }

// Whether a parallel region entered here would get more than one thread.
inline bool team_possible() { return !omp_in_parallel() && omp_get_max_threads() > 1; }

// f() inside `#pragma omp parallel` when `par` and a team is possible, else f() here. Inside an
// active region f() still gets a region of its own (a team of one): its `#pragma omp for` loops
// would otherwise bind to the enclosing team, whose other threads never reach them.
template <class F>
inline void parallel_region(bool par, F&& f) {
  if (omp_in_parallel()) {
#pragma omp parallel num_threads(1)
    f();
  } else if (par && omp_get_max_threads() > 1) {
#pragma omp parallel
    f();
  } else {
    f();
  }
}

// f(i) for i in [0, n): `#pragma omp parallel for schedule(static)` when `par` and a team is
// possible, else a plain loop here.
template <class F>
inline void parallel_for(i64 n, bool par, F&& f) {
  if (par && team_possible()) {
#pragma omp parallel for schedule(static)
    for (i64 i = 0; i < n; ++i) f(i);
  } else {
    for (i64 i = 0; i < n; ++i) f(i);
  }
}

}  // namespace dlcm
