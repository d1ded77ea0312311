#include "core/dist.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#ifdef DLCM_MPI
#include <mpi.h>
#endif

namespace dlcm::dist {

namespace {
int env_int(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : 0;
}
}  // namespace

bool built_with_mpi() {
#ifdef DLCM_MPI
  return true;
#else
  return false;
#endif
}

int launcher_world_size() {
  if (int n = env_int("OMPI_COMM_WORLD_SIZE")) return n;  // Open MPI's mpirun
  if (int n = env_int("PMI_SIZE")) return n;              // MPICH/Hydra, srun --mpi=pmi2
  if (std::getenv("PMIX_RANK")) return 1;                 // PMIx launcher, size from MPI
  return 0;
}

#ifdef DLCM_MPI

namespace {
bool g_started = false;  // this process called MPI_Init
int g_rank = 0, g_size = 1;
}  // namespace

void init(int* argc, char*** argv) {
  if (g_started || launcher_world_size() == 0) return;
  int already = 0;
  MPI_Initialized(&already);
  if (!already) MPI_Init(argc, argv);
  g_started = true;
  // Errors inside MPI end the job with MPI's own message rather than hang the other ranks.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
}

void finalize() {
  if (!g_started) return;
  int done = 0;
  MPI_Finalized(&done);
  if (!done) MPI_Finalize();
  g_started = false;
  g_rank = 0;
  g_size = 1;
}

int rank() { return g_rank; }
int size() { return g_size; }

void abort_all(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  if (g_started) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

void allreduce_sum(double* x, i64 n) {
  if (g_size > 1 && n > 0) MPI_Allreduce(MPI_IN_PLACE, x, int(n), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
}

void allreduce_minmax(uint64_t v, uint64_t* mn, uint64_t* mx) {
  *mn = *mx = v;
  if (g_size <= 1) return;
  MPI_Allreduce(&v, mn, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(&v, mx, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
}

void broadcast(std::string& s) {
  if (g_size <= 1) return;
  long long n = (long long)s.size();
  MPI_Bcast(&n, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
  s.resize(size_t(n));
  MPI_Bcast(s.data(), int(n), MPI_CHAR, 0, MPI_COMM_WORLD);
}

void barrier() {
  if (g_size > 1) MPI_Barrier(MPI_COMM_WORLD);
}

ThreadPlan plan_threads() {
  ThreadPlan p;
  cpu_set_t mine;
  CPU_ZERO(&mine);
  if (sched_getaffinity(0, sizeof mine, &mine) != 0) return p;
  p.cpus = std::max(1, CPU_COUNT(&mine));
  if (g_size <= 1) {
    p.threads = p.cpus;
    return p;
  }
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local);
  MPI_Comm_size(local, &p.local_ranks);
  std::vector<cpu_set_t> all(size_t(p.local_ranks));
  MPI_Allgather(&mine, int(sizeof mine), MPI_BYTE, all.data(), int(sizeof mine), MPI_BYTE, local);
  MPI_Comm_free(&local);
  // Ranks bound to disjoint cores (mpirun's default for few ranks) each get their mask's
  // CPUs; unbound ranks sharing all cores split them.
  p.sharing = 0;
  for (auto& other : all) {
    cpu_set_t both;
    CPU_AND(&both, &mine, &other);
    p.sharing += CPU_COUNT(&both) > 0;
  }
  p.sharing = std::max(1, p.sharing);
  p.threads = std::max(1, p.cpus / p.sharing);
  return p;
}

void GradAllreduce::init(float* grad, i64 n, i64 bucket_elems, bool overlap) {
  g_ = grad;
  n_ = n;
  bucket_ = std::clamp<i64>(bucket_elems, 1, i64(1) << 30);
  n_buckets_ = (n + bucket_ - 1) / bucket_;
  overlap_ = overlap;
  req_.assign(size_t(n_buckets_) * sizeof(MPI_Request), 0);
  begin_step();
}

void GradAllreduce::begin_step() {
  next_ = 0;
  early_ = 0;
  auto* r = reinterpret_cast<MPI_Request*>(req_.data());
  for (i64 j = 0; j < n_buckets_; ++j) r[j] = MPI_REQUEST_NULL;
}

// Bucket j covers [max(0, n - (j+1) S), n - j S): bucket 0 is the block's tail.
void GradAllreduce::start(i64 j) {
  const i64 hi = n_ - j * bucket_, lo = std::max<i64>(0, hi - bucket_);
  auto* r = reinterpret_cast<MPI_Request*>(req_.data());
  if (overlap_)
    MPI_Iallreduce(MPI_IN_PLACE, g_ + lo, int(hi - lo), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &r[j]);
  else
    MPI_Allreduce(MPI_IN_PLACE, g_ + lo, int(hi - lo), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
}

void GradAllreduce::ready_from(i64 offset) {
  if (g_size <= 1 || !overlap_) return;
  while (next_ < n_buckets_ && std::max<i64>(0, n_ - (next_ + 1) * bucket_) >= offset) {
    start(next_++);
    ++early_;
  }
  // Open MPI progresses non-blocking collectives only inside MPI calls: test them here.
  if (next_ > 0) {
    int flag = 0;
    MPI_Testall(int(next_), reinterpret_cast<MPI_Request*>(req_.data()), &flag,
                MPI_STATUSES_IGNORE);
  }
}

double GradAllreduce::finish() {
  if (g_size <= 1) return 0;
  auto t0 = std::chrono::steady_clock::now();
  while (next_ < n_buckets_) start(next_++);
  if (overlap_)
    MPI_Waitall(int(n_buckets_), reinterpret_cast<MPI_Request*>(req_.data()), MPI_STATUSES_IGNORE);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

#else  // one process, no MPI

void init(int*, char***) {
  int n = launcher_world_size();
  DLCM_CHECK(n <= 1, "started by an MPI launcher with ", n, " ranks, but this dlcm was built ",
             "without MPI (install libopenmpi-dev and rebuild; scripts/setup.sh does both)");
}
void finalize() {}
int rank() { return 0; }
int size() { return 1; }
void abort_all(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  std::exit(code);
}
void allreduce_sum(double*, i64) {}
void allreduce_minmax(uint64_t v, uint64_t* mn, uint64_t* mx) { *mn = *mx = v; }
void broadcast(std::string&) {}
void barrier() {}
ThreadPlan plan_threads() {
  ThreadPlan p;
  cpu_set_t mine;
  CPU_ZERO(&mine);
  if (sched_getaffinity(0, sizeof mine, &mine) == 0) p.cpus = p.threads = std::max(1, CPU_COUNT(&mine));
  return p;
}
void GradAllreduce::init(float* grad, i64 n, i64 bucket_elems, bool overlap) {
  g_ = grad;
  n_ = n;
  bucket_ = std::max<i64>(1, bucket_elems);
  n_buckets_ = (n + bucket_ - 1) / bucket_;
  overlap_ = overlap;
}
void GradAllreduce::begin_step() {}
void GradAllreduce::ready_from(i64) {}
double GradAllreduce::finish() { return 0; }
void GradAllreduce::start(i64) {}

#endif

}  // namespace dlcm::dist
