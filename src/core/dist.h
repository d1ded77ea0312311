// Data-parallel communication over MPI (Open MPI from Debian): the few collectives the
// trainer needs, an OpenMP thread plan per rank, and the bucketed gradient all-reduce.
//
// MPI is used only when the process was started by an MPI launcher (mpirun/mpiexec, or srun
// with PMI) and dist::init() was called; otherwise (and in builds without MPI, where
// DLCM_MPI is not defined) there is one rank and every collective is a no-op, so a plain
// `dlcm train` runs exactly the code it ran before MPI existed.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/common.h"

namespace dlcm::dist {

bool built_with_mpi();
// World size announced by an MPI launcher's environment; 0 when not launched by one.
int launcher_world_size();

// Initialises MPI when launched by an MPI launcher (idempotent); fails with a clear message
// when launched with several ranks by a binary built without MPI.
void init(int* argc, char*** argv);
void finalize();  // MPI_Finalize when init started MPI

int rank();  // 0 without MPI
int size();  // 1 without MPI
// Stops every rank of the job (MPI_Abort); exits with `code` without MPI.
[[noreturn]] void abort_all(int code);

// In-place element-wise sums over all ranks (no-ops with one rank).
void allreduce_sum(double* x, i64 n);
// Min and max of v over the ranks.
void allreduce_minmax(uint64_t v, uint64_t* mn, uint64_t* mx);
// s on every rank becomes rank 0's s.
void broadcast(std::string& s);
void barrier();

// OpenMP threads for this rank: the CPUs of its affinity mask divided by the ranks on this
// host whose masks overlap it (so K ranks never oversubscribe the cores they share). A
// collective: every rank calls it.
struct ThreadPlan {
  int threads = 1;
  int cpus = 1;         // CPUs in this rank's affinity mask
  int sharing = 1;      // ranks on this host (this one included) whose masks overlap it
  int local_ranks = 1;  // ranks on this host
};
ThreadPlan plan_threads();

// Sums a gradient block over the ranks in buckets of `bucket_elems` floats, cut from the end
// of the block (parameters near the output sit there and their gradients are final first).
// With overlap, ready_from() starts non-blocking all-reduces (MPI_Iallreduce) of every
// bucket lying wholly in [offset, n) while backward goes on, and drives their progress;
// finish() reduces what is left and waits. Without overlap, finish() does blocking
// all-reduces bucket by bucket. Every rank must make the same calls in the same order
// (they do: the ranks run the same model on the same shapes).
class GradAllreduce {
 public:
  GradAllreduce() = default;
  ~GradAllreduce() = default;
  GradAllreduce(const GradAllreduce&) = delete;
  GradAllreduce& operator=(const GradAllreduce&) = delete;

  void init(float* grad, i64 n, i64 bucket_elems, bool overlap);
  void begin_step();
  // Every gradient at offset >= `offset` is final for this step.
  void ready_from(i64 offset);
  // Reduces the remaining buckets and waits for all; returns seconds spent here.
  double finish();
  i64 buckets() const { return n_buckets_; }
  i64 started_early() const { return early_; }  // buckets started before finish() (last step)

 private:
  void start(i64 j);
  float* g_ = nullptr;
  i64 n_ = 0, bucket_ = 0, n_buckets_ = 0, next_ = 0, early_ = 0;
  bool overlap_ = false;
  std::vector<char> req_;  // MPI_Request storage, one per bucket (opaque here)
};

}  // namespace dlcm::dist
