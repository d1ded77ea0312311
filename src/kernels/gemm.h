// Row-major GEMM through oneDNN: C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C.
//
// Precision: every product goes through ops::gemm, so one switch selects how all of them run.
//   FP32 (default): FP32 products (oneDNN sgemm or an f32 matmul, see the path below).
//   BF16: mixed precision. A and B are rounded to bfloat16 (round to nearest even) into
//         scratch buffers, multiplied by a cached oneDNN bf16 matmul primitive (AVX512-BF16
//         brgemm kernels) with FP32 accumulation, alpha/beta applied in FP32, C stays FP32.
//         Weights, gradients and optimizer state stay FP32 (master weights); only the
//         operands of the products are rounded. Needs a CPU with AVX512-BF16.
//         Which units run them is decided once per process (bf16_units() below): the CPU's
//         BF16 kernels, or its FP32 units on the rounded operands where those are faster.
// The switch is process-wide (set it from the thread that drives training, outside parallel
// regions); the BF16 path itself may be called from inside parallel regions.
//
// Path (both precisions): oneDNN 2.6 picks its fastest kernels (brgemm; AMX where the CPU has
// it) only for matmul primitives created with fixed shapes.
//   fixed (default where oneDNN runs AMX): a product called outside a parallel region with at
//         least min_flops FLOPs, once its exact (precision, transposes, M, N, K, leading
//         dimensions, alpha, beta) has been seen min_uses times, runs a fixed-shape primitive
//         from a bounded LRU cache (a run's shapes are few; a new one costs ~0.3-1 ms to create). Everything
//         else (small per-head products, calls inside parallel regions, and FP32 x W^T products:
//         set_fp32_nt_sgemm below) runs as `runtime`.
//   runtime (default elsewhere: as fast or faster on AMD Zen 4/5, docs/performance.md): FP32
//         through oneDNN sgemm, BF16 through one runtime-shape matmul primitive per
//         (transposes, beta): no primitive creation per shape.
// The environment variable DLCM_GEMM=runtime|fixed sets the initial path (logged to stderr).
#pragma once
#include <string>
#include <vector>

#include "core/common.h"

namespace dlcm::ops {

enum class Precision { FP32, BF16 };
// "fp32" | "bf16"; anything else throws naming `what` (e.g. "train.precision").
Precision parse_precision(const std::string& s, const std::string& what);
const char* precision_name(Precision p);
// Throws a clear error when BF16 is asked for on a CPU without AVX512-BF16.
void set_gemm_precision(Precision p);
Precision gemm_precision();
bool cpu_has_bf16();
// The oneDNN library in use, "3.0.0 (commit abc123)" (provenance).
std::string onednn_version();

// Sets the precision for a scope and restores the previous one at exit.
using PrecisionScope = SettingScope<Precision, gemm_precision, set_gemm_precision>;

// The units that run the BF16 products. Native: oneDNN's bf16 kernels (AVX512-BF16 dot
// products, AMX brgemm) and dlcm's AMX tiles. Fp32: the operands rounded to bf16 as above but
// stored as FP32 values, then the FP32 product (sgemm or an f32 primitive) and, in the
// attention, the FP32 kernel. The product of two bf16 values is exact in FP32 and both
// accumulate in FP32, so both compute the BF16 mixed-precision product; only the order of
// the FP32 sums differs. Fp32 wins on CPUs whose bf16 dot products run at a fraction of
// their FMA rate (an Intel Xeon without AMX: bf16 products at 0.55x the sgemm rate,
// docs/performance.md). The first set_gemm_precision(BF16) of a process decides: the
// environment variable DLCM_BF16_UNITS=native|fp32 when set (logged), else a measurement of
// both on one training-sized product, on one thread by its CPU time (~0.1 s; the ratio is a
// core's, and the thread's clock ignores whatever else runs), keeping the native units unless
// the FP32 ones are at least 10% faster (logged with the two rates).
enum class Bf16Units { Native, Fp32 };
// "native" | "fp32"; anything else throws naming `what` (e.g. "DLCM_BF16_UNITS").
Bf16Units parse_bf16_units(const std::string& s, const std::string& what);
const char* bf16_units_name(Bf16Units u);
// The decision (made now if it was not: call it from the driving thread, outside parallel
// regions) and how it was made.
struct Bf16UnitsChoice {
  Bf16Units units = Bf16Units::Native;
  bool decided = false;
  std::string how;  // "DLCM_BF16_UNITS=fp32", "measured on one core: native 70.1, fp32 ..."
  double native_gflops = 0, fp32_gflops = 0;  // the measurement's medians (0 when not measured)
};
Bf16UnitsChoice bf16_units_choice();  // a copy: set_bf16_units may replace it
Bf16Units bf16_units();
// Overrides the decision for the rest of the process (tests, benchmarks comparing both).
void set_bf16_units(Bf16Units u);

// Sets the units for a scope and restores the previous ones at exit.
using Bf16UnitsScope = SettingScope<Bf16Units, bf16_units, set_bf16_units>;

// The units of the block attention kernels (causal and compact concept attention, forward
// and backward) under BF16 precision on the native units: AMX tiles where the CPU grants them,
// else AVX512-BF16 dot products (vdpbf16ps) in the tiles' operand layouts; both round Q, K, V,
// P, dO and dS to bf16 as the BF16 GEMMs round their operands and keep the softmax and every
// accumulation in FP32. Fp32: the FP32 kernel (FP32 precision, the Fp32 units, kernels below
// avx512, a CPU without AVX512-BF16, or DLCM_BF16_ATTENTION=0, logged). Decoding's few-query
// row path stays FP32 in every case.
enum class AttentionUnits { Fp32, Tiles, Dot };
AttentionUnits attention_units();
// "the FP32 kernel" | "AMX tiles" | "AVX512-BF16 dot products"
const char* attention_units_name(AttentionUnits u);
// Tests and A/B benchmarks: whether BF16 attention may run in bf16 at all (default: on, or
// DLCM_BF16_ATTENTION), and whether it may use the AMX tiles (default on; off: the dot
// products on an AMX CPU too).
void set_bf16_attention(bool on);
void set_attention_tiles(bool on);

enum class GemmPath { Runtime, Fixed };
// "runtime" | "fixed"; anything else throws naming `what` (e.g. "DLCM_GEMM").
GemmPath parse_gemm_path(const std::string& s, const std::string& what);
const char* gemm_path_name(GemmPath p);
void set_gemm_path(GemmPath p);
GemmPath gemm_path();
// Reads the environment's kernel settings now: DLCM_ISA, DLCM_GEMM, DLCM_SGEMM_OWN and, when set,
// DLCM_BF16_UNITS (each logged once, a bad value an Error naming it), instead of at the first
// product, which may run inside a parallel region. The command line calls it at start-up.
void read_kernel_settings();
// Whether FP32 products x W^T (A as stored, B transposed) run on oneDNN's sgemm on the fixed
// path as well (default on; DLCM_FP32_NT_SGEMM=0 turns it off at start, logged): faster than
// the fixed-shape brgemm on the AMX Xeon of docs/performance.md. For A/B timing and tests.
void set_fp32_nt_sgemm(bool on);
bool fp32_nt_sgemm();
using Fp32NtSgemmScope = SettingScope<bool, fp32_nt_sgemm, set_fp32_nt_sgemm>;

// Benchmarks (`bench train --breakdown-gemm`): with the profiler's detail rows on
// (core/profiler.h), every product called on the driving thread is charged to a row "  GEMM"
// (with its FLOPs), the BF16 operand rounding to "  GEMM: bf16 operand rounding", and its time
// per product shape is kept here (wall seconds of the calls, FLOPs 2MNK).
struct GemmShapeStat {
  Precision precision = Precision::FP32;
  bool trans_a = false, trans_b = false, accumulate = false;
  i64 M = 0, N = 0, K = 0, calls = 0;
  double seconds = 0;
  std::string impl;  // the last call's path: oneDNN implementation, "sgemm", "packed", ...
  i64 order = -1;    // by call: the product's index among those timed since the last reset
};
std::vector<GemmShapeStat> gemm_shape_stats(bool reset);
// Keeps each product call apart, by its index since the last gemm_shape_stats(true), instead
// of summing the calls of a shape (`bench prefill --products-in-order`: a stream's prefill
// calls its products in the same order every time, so index i is the same weight matrix).
void set_gemm_shape_by_call(bool on);

// Fixed-shape cache tuning (tests shrink it to reach the eviction path and every shape).
struct GemmCacheConfig {
  size_t capacity = 64;        // primitives kept; the least recently used one is evicted
  double min_flops = 1 << 22;  // 2*M*N*K below this: runtime path (creation would not pay)
  int min_uses = 2;            // a shape seen once (e.g. a batch's concept count) stays runtime
  // A shape whose M, N or K has taken this many values with the rest of the shape the same
  // (a DLCM's concept rows, new at every step) stays runtime unless already cached (0: off).
  i64 varying_values = 4;
};
void set_gemm_cache_config(const GemmCacheConfig& c);  // also empties the cache
GemmCacheConfig gemm_cache_config();
struct GemmCacheStats {
  i64 fixed_calls = 0, created = 0, evicted = 0, size = 0;
  i64 varying_calls = 0;  // calls kept on the runtime path because their shape family varies
};
GemmCacheStats gemm_cache_stats();

// The oneDNN implementation that gemm() runs for this product now (current precision and path,
// the fixed-shape primitive is created if it would be used), e.g. "brg:avx512_core" or
// "gemm:jit"; "sgemm" for oneDNN's sgemm function; "none (K = 0: ...)" for an empty K. For
// benchmarks' provenance.
std::string gemm_impl(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, i64 lda,
                      i64 ldb, float beta, i64 ldc);

void gemm(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, const float* A, i64 lda,
          const float* B, i64 ldb, float beta, float* C, i64 ldc);

// Linear layer with PyTorch weight layout W[out, in], no bias.
//   forward : y[N,out] = x[N,in] W^T          (beta = 0: overwrites y)
//   backward: dx[N,in] += dy W   (skipped when dx == nullptr; dx = dy W, without reading dx,
//                                  when dx_accumulate is false: no clearing needed)
//             dW[out,in] += dy^T x
//
// BF16: the forward rounds x for x W^T and the backward rounds it again for dy^T x (the same
// stored block). A layer that keeps its input until its backward may pass a Bf16Copy to both
// calls: the forward rounds x into it, and the backward reads it instead of rounding x again (the
// same rounding, so the same bits; 2 bytes per element of x kept). The backward uses the copy
// only when it was made from this x pointer and shape, and x must not have changed since that
// forward (true of activations a layer writes in its forward and reads in its backward).
// Ignored in FP32, for products an inference stream packed, and with set_bf16_reuse(false).
// The same holds for the weight: a layer may pass a second Bf16Copy (wkeep) to both calls, so
// that W, rounded for x W^T, is not rounded again for dx = dy W (W must not change in between,
// as in training: the optimizer steps after the backward).
struct Bf16Copy {
  std::vector<uint16_t, AlignedAlloc<uint16_t>> data;
  const float* src = nullptr;  // the x it was made from (null: no valid copy)
  i64 rows = 0, cols = 0;
  uint64_t version = 0;  // unique per rounding into it (the AMX path caches packed copies by it)
  bool produced = false;  // written by x's producer (CopyProducer), not yet read by a forward
  // x's floats were never written (CopyProducer::floats): only this copy holds x, so a product
  // that cannot read it fails instead of reading the stale floats
  bool floats_absent = false;
};

// BF16: the producer of a linear layer's input (RMSNorm, SwiGLU, their backwards) may write the
// input's bf16 rounding in the same pass as the floats, while each row is still in L1, instead
// of the product reading the floats back and rounding them (the same rounding: the same bits).
//   ops::CopyProducer p(&keep, rows, cols);       // p.data(): where, or null (nothing to write)
//   ops::rmsnorm_forward(y, ..., p.data());        // writes y and its rounding
//   p.done(y);                                     // keep now holds y's rounding
// The next linear_forward(_multi) given keep for y reads it instead of rounding y (the forward
// copy as before, kept for the backward), and a linear_backward given it as dy's copy (dykeep)
// reads it for dy. data() is null in FP32, with the copies off (set_bf16_reuse(false)) and in
// a packed inference stream: the producer then writes floats only and keep stays invalid.
//
// Where every reader of the output is a BF16 product given keep (the q/k/v, w1/w3, w2 inputs
// and the w1/w3 dy's of a transformer block), the producer may skip the floats altogether:
//   ops::rmsnorm_forward(p.floats(y), ..., p.data());  // y's rounding only, where it can
//   p.done(y);                                          // y still names the block for products
// floats(dst) is dst, or null where data() is set and set_bf16_skip_floats is on (default); the
// kernels then write the rounding alone. The copy is marked floats_absent: a product handed x
// without being able to read the copy (copies switched off in between) fails with a message.
class CopyProducer {
 public:
  CopyProducer(Bf16Copy* keep, i64 rows, i64 cols);
  uint16_t* data() const { return data_; }
  float* floats(float* dst);
  void done(const float* src);  // src [rows, cols] was written with its rounding in data()

 private:
  Bf16Copy* keep_;
  uint16_t* data_ = nullptr;
  float* skipped_ = nullptr;  // the floats floats() skipped (tests poison them in done())
  i64 rows_, cols_;
};
// Roundings producers wrote that a product then read instead of rounding (since the start).
i64 bf16_copies_produced();
// Whether producers whose outputs only BF16 products read skip the floats (CopyProducer::floats;
// default on, DLCM_BF16_SKIP_FLOATS=0 turns it off at start, logged): the same bits, a pass
// that writes a third to a half less. `bench train --gemm tiles,tiles-floats` times both.
void set_bf16_skip_floats(bool on);
bool bf16_skip_floats();
i64 bf16_floats_skipped();  // outputs whose floats a producer skipped (since the start)
using Bf16SkipFloatsScope = SettingScope<bool, bf16_skip_floats, set_bf16_skip_floats>;
// Tests: the skipped floats are filled with NaN (by CopyProducer::done) instead of left as they
// were, so that any reader left behind shows.
void set_poison_skipped_floats(bool on);
bool poison_skipped_floats();
using PoisonSkippedFloatsScope =
    SettingScope<bool, poison_skipped_floats, set_poison_skipped_floats>;
// dst [n] = bf16(src [n]), the rounding of the BF16 products, without a parallel region (one
// row of a producer).
void round_row_to_bf16(uint16_t* dst, const float* src, i64 n);
// The same with non-temporal stores where dst is 64-byte aligned and the CPU has AVX512-BF16
// (ordinary ones otherwise); the caller fences (_mm_sfence) before another thread reads dst.
void round_row_to_bf16_stream(uint16_t* dst, const float* src, i64 n);
// Outputs of at least this many bytes that a training step writes to lines no cache holds
// (SwiGLU's h and its rounding, the roundings of its backward's da and db, the BF16 attention's
// output and, where its backward overwrites them, dq, dk and dv; the FP32 attention backward's
// dk and dv) go out with non-temporal stores at the avx512 level (default 1 MiB; 0: never): an
// ordinary store first reads each line it writes. The bits do not change. `bench train --gemm
// tiles,tiles-plain-outputs` times both.
void set_stream_outputs(i64 bytes);
i64 stream_outputs();
bool stream_output(i64 bytes);  // whether an output of this many bytes streams
void count_streamed_output();   // a pass took the streaming path (the kernels call it)
i64 streamed_outputs();         // passes that did, since the start (tests)
void linear_forward(float* y, const float* x, const float* W, i64 N, i64 in, i64 out,
                    Bf16Copy* keep = nullptr, Bf16Copy* wkeep = nullptr);
// dykeep: dy's rounding written by dy's producer (CopyProducer), read for both products.
void linear_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, i64 N,
                     i64 in, i64 out, const Bf16Copy* keep = nullptr, bool dx_accumulate = true,
                     const Bf16Copy* wkeep = nullptr, const Bf16Copy* dykeep = nullptr);
// Several linear layers of one input: y[i][N, out[i]] = x[N, in] W[i]^T for i < n (q/k/v,
// w1/w3). One product over the stacked weights where an inference stream packed them together
// (kernels/packed_gemm.h; the same rows as the separate packed products), else linear_forward
// for each (x rounded once for all of them, into `keep` when given; W[i] into wkeep[i]).
void linear_forward_multi(float* const* y, const float* x, const float* const* W, i64 N, i64 in,
                          const i64* out, int n, Bf16Copy* keep = nullptr,
                          Bf16Copy* const* wkeep = nullptr);
// A feed-forward layer's gate/up products with SwiGLU: h[N, F] = silu(x W1^T) * (x W3^T), W[0] =
// W1 and W[1] = W3 [F, in], where an inference stream packed them together, in any of its
// formats (packed_gemm_swiglu: the gate and up outputs never reach memory; the same bits as the
// products and swiglu_forward). Returns false, doing nothing, anywhere else: the caller then
// runs linear_forward_multi and swiglu_forward. The copies given (x's, W's, h's) are marked
// invalid, as a packed product leaves them.
bool linear_swiglu_packed(float* h, const float* x, const float* const* W, i64 N, i64 in, i64 F,
                          Bf16Copy* keep = nullptr, Bf16Copy* const* wkeep = nullptr,
                          Bf16Copy* hkeep = nullptr);
// Whether linear layers use their Bf16Copy (default on; DLCM_BF16_REUSE=0 turns it off at start,
// logged). Off, every product rounds its operands itself: the same bits, for A/B timing and tests.
void set_bf16_reuse(bool on);
bool bf16_reuse();
// Products (since the start) whose operand came from a kept copy instead of being rounded.
i64 bf16_copies_reused();

// Rounds n floats to bfloat16 (nearest even; NaN stays NaN), as the BF16 path does (tests).
void round_to_bf16(uint16_t* dst, const float* src, i64 n);
float bf16_to_float(uint16_t x);

}  // namespace dlcm::ops
