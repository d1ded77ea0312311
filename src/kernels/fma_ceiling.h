// The FP32 FMA rate the cores sustain with no memory traffic: a register loop of independent
// fused multiply-adds at the widest vector width of the kernel level in use (kernels/isa.h);
// and the rate of a GEMM micro-kernel's inner loop with its operands in L1 (FmaLoop::L1Operands),
// which no GEMM's inner loop exceeds.
//
// Why: MFU in `dlcm bench` is computed against a measured GEMM (the library's sgemm on the
// 2048^3 product), so a library that runs at half the hardware's rate on some CPU makes a
// training step look efficient while it is not. On the issue-19 Xeon (family 6 model 167) this
// loop runs at 130-139 GFLOP/s per core and register-blocked micro-kernels with their operands
// in L1 reach 95-100% of it, while oneDNN 2.6's sgemm reaches 65-72% on the 2048^3 product
// (docs/performance.md, session 21). The benchmarks print this ceiling beside the GEMM peak.
// On one core the two loops run at the same rate; on the Emerald Rapids host (family 6 model
// 207, 2 vCPUs), in its fast periods, the register loop doubles with the second core while the
// L1 loop gains only 1.35-1.5x, so there the register ceiling overstates what any two-thread
// GEMM can reach (docs/performance.md, session 42). The benchmarks print both.
#pragma once
#include "core/common.h"

namespace dlcm::ops {

// Which loop a ceiling runs: independent FMA chains in registers, or a 6 x 64 (AVX2: 6 x 16)
// micro-kernel tile fed from L1 (4 (2) vector loads and 6 broadcasts per k step).
enum class FmaLoop { Registers, L1Operands };

struct FmaCeiling {
  double gflops = 0;       // FP32 GFLOP/s over all threads, per wall second (0: not measured)
  int threads = 0;
  const char* unit = "";   // "avx512" (16 lanes) or "avx2" (8 lanes); "" at the scalar level
};

// Runs the loop on `threads` threads (0: omp_get_max_threads()) for about `seconds` and returns
// the rate. At the scalar kernel level nothing runs (gflops 0): there is no vector unit to
// measure.
FmaCeiling fma_ceiling(double seconds, int threads = 0, FmaLoop loop = FmaLoop::Registers);

// The loop itself on the calling thread, for tests: `n` iterations of acc = acc * b + c on
// every accumulator (chains x lanes of them, chain i starting at i); returns the sum of the
// accumulators (in double) and sets *flops to the FP32 operations done. With b = c = 1 every
// accumulator ends at i + n exactly (n < 2^23), so the sum shows that every FMA ran.
double fma_loop(i64 n, float b, float c, double* flops);
// The L1 loop on the calling thread, for tests: `n` k steps of acc[r][j] += A[k][r] * B[k][j]
// with every A value a and every B value b; accumulator (r, j) (rows x vectors of them, in that
// order) starts at its index. Returns the sum of all lanes (in double) and sets *flops. With
// a = b = 1 accumulator i ends at i + n exactly (n < 2^23).
double fma_loop_l1(i64 n, float a, float b, double* flops);

}  // namespace dlcm::ops
