// dlcm's own FP32 GEMM for AVX-512 CPUs (cache-blocked, packed panels), for the products
// where oneDNN 2.6's sgemm is slow.
//
// Why: on an Intel Xeon (family 6 model 207) oneDNN's sgemm runs the weight-gradient form
// dW += dy^T x (A transposed, B not) at 0.65-0.75x the rate of MKL's sgemm for the FFN shapes
// (1536 x 512 x 4096 and 512 x 1536 x 4096), one thread or two, while its other forms match
// MKL's (docs/performance.md, "Intel Xeon without AMX", session 17). These products are a
// third of an FP32 training step, and they are where PyTorch (MKL) gained its time.
//
// What: C[M, N] = alpha op(A)[M, K] op(B)[K, N] + beta C, row-major, every transpose. k runs
// in blocks of 384; for each block and 512 columns, the threads pack op(B) into panels of 32
// columns (one shared copy, 768 KB), and a micro-kernel multiplies 12 rows of A (read in place,
// or packed when A is transposed) by one panel into 24 AVX-512 accumulators held across the k
// block. With beta 0 C is never read (NaN in it does not propagate), as in BLAS.
//
// Bits: every element of C is the same sequence of FP32 operations whatever the thread count
// and whichever thread computes it (the k blocking is fixed, a 12-row tile's block is one
// thread's), so results do not depend on the number of threads or the schedule. Threads take
// tiles dynamically, so a core slowed by another program does less of the work instead of
// holding the product back (the 2-thread products of this host model ran at their slower
// thread's pace, docs/performance.md).
#pragma once
#include <string>

#include "core/common.h"

namespace dlcm::ops {

// Whether the AVX-512 kernels can run here (ops::isa() is avx512); else blocked_sgemm throws.
bool blocked_sgemm_native();

// C = alpha op(A) op(B) + beta C (row-major; op(A) is M x K, op(B) is K x N). Parallel over
// tiles outside parallel regions, on the calling thread inside one.
void blocked_sgemm(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, const float* A,
                   i64 lda, const float* B, i64 ldb, float beta, float* C, i64 ldc);

// Which products ops::gemm's FP32 path (and the BF16 path on the FP32 units) sends here:
// Tn (default on Intel AVX-512 CPUs): the weight-gradient form (A transposed, B not) with
// K >= 1024 and M N >= 2^19 (the FFN's; for q/k/v/o's 512 x 512 oneDNN splits K across the
// threads and is faster);
// Off (default elsewhere: on AMD Zen 4 oneDNN's sgemm is the faster at these products): none,
// oneDNN's sgemm for all. The environment variable DLCM_SGEMM_OWN=tn|off sets it at start
// (logged).
enum class BlockedUse { Off, Tn };
BlockedUse parse_blocked_use(const std::string& s, const std::string& what);
void set_blocked_use(BlockedUse u);
BlockedUse blocked_use();
using BlockedUseScope = SettingScope<BlockedUse, blocked_use, set_blocked_use>;
// Whether ops::gemm sends this FP32 product to blocked_sgemm now.
bool blocked_sgemm_serves(bool trans_a, bool trans_b, i64 M, i64 N, i64 K);

}  // namespace dlcm::ops
