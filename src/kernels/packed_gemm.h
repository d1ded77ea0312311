// Products with few rows against weights packed once (inference: decode steps, the DLCM
// backbone's few concepts per prefill).
//
// A product y[M, N] = alpha * x[M, K] W^T with W[N, K] in PyTorch layout and M small is bound by
// reading W: a general GEMM repacks W's panels on every call (oneDNN sgemm does), which costs as
// much as the arithmetic when M is a few dozen rows or less. A PackedMatrix holds W once in
// the layout the micro-kernel streams: blocks of 64 output columns, [N/64][K][64] in FP32,
// weight-only BF16 [N/64][Kp/2][64][2] (pairs of consecutive k per column; half the bytes to
// read, widened to FP32 exactly in registers), or weight-only int8 [N/64][K][64] with one FP32
// scale per output column (symmetric, scale = max |W[c][:]| / 127; a quarter of the bytes,
// widened to FP32 in registers, the scale applied to the column's sum). x stays FP32 and every
// product accumulates in FP32, so BF16 / int8 change only W's rounding (relative 2^-9 / half a
// step of max|row| / 127) and a row's result is a continuous function of x: streaming results
// stay split-independent to FP32 rounding. (Rounding x to BF16 or int8 as well, for
// AVX512-BF16 or VNNI dot products, turns FP32 rounding differences of x between a prefill and
// a step into steps of the coarse format and breaks that.)
//
// PackedWeights maps weight pointers to their packed copies; while a PackedScope is active on a
// thread, ops::gemm on that thread sends every product it can serve (x W^T with a registered
// W, beta 0, at most max_rows rows) to packed_gemm. The copies are taken when registered: the
// owner re-registers (or drops the table) when the weights change.
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/common.h"

namespace dlcm::ops {

// The format of a packed copy's weights (a stream's "precision": fp32 | bf16 | int8).
enum class PackFormat : uint8_t { F32, BF16, Q8 };
// "fp32" | "bf16" | "int8"; anything else throws naming `what` (e.g. "--precision").
PackFormat parse_pack_format(const std::string& s, const std::string& what);
const char* pack_format_name(PackFormat f);

struct PackedMatrix;
// A product expected to come next: its matrix and the first column block it reads.
struct NextProduct {
  const PackedMatrix* mat = nullptr;
  i64 blk = 0;
};

struct PackedMatrix {
  i64 N = 0, K = 0;  // W[N, K]
  PackFormat fmt = PackFormat::F32;
  i64 Np = 0, Kp = 0;  // N rounded up to 64 (each part's); K rounded up to 2 (BF16)
  // Several matrices of the same K stacked (pack_matrices): the N of each, and the first
  // column block of each (part_blk0[i], with a last entry nb); one entry for a plain W.
  std::vector<i64> parts, part_blk0;
  Buf f;                       // FP32 [Np/64][K][64]
  std::vector<uint16_t> h;     // BF16 [Np/64][Kp/2][64][2]
  std::vector<int8_t> q;       // int8 [Np/64][K][64]
  std::vector<float> qscale;   // int8: W[c][k] ~ qscale[c] * q (packed column order, [Np])
  // The packed weights the kernels read, data_bytes long: f, h or q's data, or a slot of a
  // PackedWeights table's arena (PackedWeights::reserve), where f, h and q stay empty.
  const char* data = nullptr;
  i64 data_bytes = 0;
  // Per first part of a call (a call may run a run of consecutive parts, packed_gemm_parts):
  // the product that came after it the last time (PackedWeights::served), whose first panel
  // is prefetched while this one finishes. A matrix can serve two calls in one pass (the
  // final layer's k/v, then its q for the last rows), each with its own successor.
  mutable std::vector<NextProduct> next;
  mutable bool read = false;  // a product has run on it (PackedWeights::served)

  PackedMatrix() = default;
  PackedMatrix(const PackedMatrix&) = delete;  // `data` points into its own buffers
  PackedMatrix& operator=(const PackedMatrix&) = delete;
  PackedMatrix(PackedMatrix&&) = default;
  PackedMatrix& operator=(PackedMatrix&&) = default;
};

// Packs W[N, K] (row stride K); padding columns and k are zero.
void pack_matrix(PackedMatrix& p, const float* W, i64 N, i64 K, PackFormat fmt);
// Packs n matrices W[i][N[i], K] of one input width into one, each from a fresh column block:
// products of one input (q/k/v, w1/w3) run as one call (packed_gemm_parts), one pass over
// the rows and one parallel region instead of n. dst: packed_bytes(N, n, K, fmt) bytes,
// 64-byte aligned, to pack into (nullptr: into p's own buffer).
void pack_matrices(PackedMatrix& p, const float* const* W, const i64* N, int n, i64 K,
                   PackFormat fmt, char* dst = nullptr);
// The bytes of the packed weights of W[0..n) (pack_matrices).
i64 packed_bytes(const i64* N, int n, i64 K, PackFormat fmt);
// Whether the AVX-512 micro-kernels were compiled in (else a portable loop, correct but slower
// than sgemm: streams then keep FP32 products on the general GEMM).
bool packed_gemm_native();
// Whether BF16 / int8 products of at least 40 rows widen each column block's weights to FP32
// once and run the FP32 micro-kernel (default: on; DLCM_PACKED_WIDEN=0 turns it off at start,
// logged), rather than widening in every micro-kernel call. The bits are the same either way.
// For A/B benchmarks and tests.
void set_packed_widen(bool on);
bool packed_widen_on();
// Whether each micro-kernel call prefetches its output lines for writing before it accumulates
// (default: on; DLCM_PACKED_PREFETCH_C=0 turns it off at start, logged). Only cache lines
// move: the results are the same. For A/B benchmarks and tests.
void set_packed_prefetch_c(bool on);
bool packed_prefetch_c_on();
// C[M, N] (row stride ldc) = alpha * A[M, K] (row stride lda) W^T. Parallel over column
// blocks outside parallel regions when the product is large enough. While it runs, each column
// block's weights are prefetched during the block before, and `next`'s first block (the
// product expected after this one, if any) during the last; with several micro-kernel calls
// per block each call also prefetches its output lines for writing (set_packed_prefetch_c).
// Only cache lines move: the result is the same.
void packed_gemm(float* C, i64 ldc, const float* A, i64 lda, const PackedMatrix& p, i64 M,
                 float alpha, NextProduct next = {});
// The same for stacked matrices: C[i][M, N[part0 + i]] (row stride ldc[i]) = alpha * A
// W[part0 + i]^T for the n_parts parts from part0 (-1: all from part0). Each output row is bit
// for bit the one packed_gemm gives with that W alone (same kernel, same order), whichever
// rows and parts a call runs.
void packed_gemm_parts(float* const* C, const i64* ldc, const float* A, i64 lda,
                       const PackedMatrix& p, i64 M, float alpha, NextProduct next = {},
                       int part0 = 0, int n_parts = -1);

// The gate/up pair of a feed-forward layer with SwiGLU in the epilogue: H[M, F] (row stride ldh)
// = silu(A W1^T) * (A W3^T), where W1 and W3 are parts part0 and part0 + 1 of p, both F wide,
// in any format. Each call multiplies its rows by a W1 block and the matching W3 block into
// scratch in L1 (with the kernel, rows per call and widening packed_gemm_parts would use) and
// applies ops::swiglu_rows to them, so the gate and up outputs never reach memory; H is bit for
// bit packed_gemm_parts (alpha 1) followed by ops::swiglu_forward.
bool packed_swiglu_fusable(const PackedMatrix& p, int part0);
void packed_gemm_swiglu(float* H, i64 ldh, const float* A, i64 lda, const PackedMatrix& p,
                        i64 M, NextProduct next = {}, int part0 = 0);
// Whether stream FFNs use packed_gemm_swiglu (default: on; DLCM_PACKED_SWIGLU=0 turns it off at
// start, logged). The same bits either way. For A/B benchmarks and tests.
void set_packed_swiglu(bool on);
bool packed_swiglu_on();

class PackedWeights {
 public:
  explicit PackedWeights(i64 max_rows = 32) : max_rows_(max_rows) {}
  PackedWeights(const PackedWeights&) = delete;  // the matrices point at each other
  PackedWeights& operator=(const PackedWeights&) = delete;
  // Registers (or re-packs) W[N, K].
  void add(const float* W, i64 N, i64 K, PackFormat fmt);
  // The packed copy serving x[M, K] W^T, or nullptr.
  const PackedMatrix* find(const float* W, i64 N, i64 K, i64 M) const;
  // Registers the stacked copy of W[0..n) (pack_matrices), and finds it for x[M, K] W[i]^T:
  // W[0..n) a run of consecutive parts of a registered group, from its part *part0 (the
  // final layer's k/v without its q, or its q alone).
  void add_group(const float* const* W, const i64* N, int n, i64 K, PackFormat fmt);
  const PackedMatrix* find_group(const float* const* W, const i64* N, int n, i64 K, i64 M,
                                 int* part0) const;
  // Records that p serves the current product (after the one served before it) and returns
  // the matrix that followed p last time, for packed_gemm's `next`. A forward pass runs its
  // products in the same order every time, so from the second pass on each product's
  // successor is known. Not thread-safe: a table serves one thread at a time (a stream's).
  // part0: the call's first part (0 for a plain matrix).
  NextProduct served(const PackedMatrix* p, int part0 = 0) const;
  // Reserves one arena of `bytes` (the sum of packed_bytes of what will be added) that the
  // next add / add_group calls pack into, each in a slot of its own (64-byte aligned), until
  // it is full (then into their own buffers). A buffer of 2 MiB or more sits on transparent
  // huge pages (core/common.h), so the weights a prefill streams take one TLB entry per 2 MiB
  // and the hardware prefetchers cross no 4 KiB page ends; matrices of their own (most under
  // 1 MiB) would each stay on 4 KiB pages. Only where the bytes live changes. Packing straight
  // into the arena keeps the peak memory at one packed copy.
  void reserve(i64 bytes);
  i64 max_rows() const { return max_rows_; }
  i64 bytes() const { return sum_bytes(false); }
  // Bytes of the copies no product has run on yet (served): after a stream's prefill and steps,
  // a copy that stays unread is memory spent for nothing.
  i64 unread_bytes() const { return sum_bytes(true); }

 private:
  i64 max_rows_;
  std::unordered_map<const float*, PackedMatrix> mats_;
  struct Group {
    std::vector<const float*> srcs;
    PackedMatrix mat;
  };
  std::unordered_map<const float*, Group> groups_;  // by the first matrix
  std::vector<char, AlignedAlloc<char>> arena_;      // reserve(): the packed weights
  i64 arena_used_ = 0;
  char* take(i64 bytes);  // the next arena slot, or nullptr when it does not fit
  i64 sum_bytes(bool unread_only) const;
  // every grouped matrix: its group's first matrix and its part
  std::unordered_map<const float*, std::pair<const float*, int>> member_;
  // the previous product served: its matrix and first part
  mutable const PackedMatrix* last_ = nullptr;
  mutable int last_part_ = 0;
};

// Makes `w` the table gemm() consults on this thread for the scope's lifetime (nullptr: none).
class PackedScope {
 public:
  explicit PackedScope(const PackedWeights* w);
  ~PackedScope();
  PackedScope(const PackedScope&) = delete;
  PackedScope& operator=(const PackedScope&) = delete;

 private:
  const PackedWeights* prev_;
};
// The table active on this thread (nullptr when none).
const PackedWeights* active_packed_weights();

}  // namespace dlcm::ops
