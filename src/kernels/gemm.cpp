#include "kernels/gemm.h"
#include "kernels/amx_gemm.h"
#include "kernels/blocked_sgemm.h"
#include "kernels/packed_gemm.h"

#include <dnnl.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <dnnl.hpp>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include <immintrin.h>

#include "core/parallel.h"
#include "core/profiler.h"
#include "kernels/isa.h"

namespace dlcm::ops {

namespace {

Precision g_precision = Precision::FP32;

std::mutex g_shape_mu;
// key: precision, transposes, M, N, K, accumulation, and the call's index since the last reset
// when products are kept by call (-1 otherwise)
std::map<std::tuple<int, bool, bool, i64, i64, i64, bool, i64>, GemmShapeStat> g_shape_stats;
std::atomic<bool> g_shape_by_call{false};
i64 g_shape_calls = 0;  // products timed since the last reset (under g_shape_mu)

// Per-shape time of the products while GEMM profiling is on (driving thread only).
struct ShapeTimer {
  bool on;
  std::chrono::steady_clock::time_point t0;
  ShapeTimer() : on(prof::g_detail && prof::g_enabled && !omp_in_parallel()) {
    if (on) t0 = std::chrono::steady_clock::now();
  }
  void done(bool ta, bool tb, i64 M, i64 N, i64 K, bool accumulate, const char* impl) {
    if (!on) return;
    const double sec =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::lock_guard<std::mutex> lock(g_shape_mu);
    const i64 order = g_shape_by_call.load() ? g_shape_calls : -1;
    ++g_shape_calls;
    GemmShapeStat& st = g_shape_stats[{int(g_precision), ta, tb, M, N, K, accumulate, order}];
    st.order = order;
    st.precision = g_precision;
    st.trans_a = ta, st.trans_b = tb, st.M = M, st.N = N, st.K = K, st.accumulate = accumulate;
    st.impl = impl;
    ++st.calls;
    st.seconds += sec;
  }
};

void sgemm_1(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, const float* A,
             i64 lda, const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  dnnl_status_t st = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A, lda,
                                B, ldb, beta, C, ldc);
  DLCM_CHECK(st == dnnl_success, "oneDNN sgemm failed with status ", int(st), " (M=", M,
             " N=", N, " K=", K, ")");
}

// oneDNN 2.6's threaded sgemm partitions two training shapes poorly on this CPU (2 threads,
// idle-machine estimates): x W^T with a narrow output (N <= 512, M >= 2048: the q/k/v/o and
// w2 projections) runs at 178 GFLOP/s against 199-210 when each thread multiplies its own
// block of rows, and the LM head's chunks (M <= 512 rows, N = vocab >= 2048) at 150 against 206
// when each thread takes a block of columns. For those, split the product here; sgemm called
// inside the parallel region runs on its calling thread. Every element of C is still one
// sgemm's full K reduction.
// The weight-gradient form (A^T B) runs on dlcm's blocked sgemm instead (kernels/blocked_sgemm.h).
// Returns the implementation that ran (sgemm_impl), one of these two names.
constexpr const char* kSgemm = "sgemm";
constexpr const char* kBlocked = "dlcm blocked sgemm";
const char* sgemm_impl(bool trans_a, bool trans_b, i64 M, i64 N, i64 K) {
  return blocked_sgemm_serves(trans_a, trans_b, M, N, K) ? kBlocked : kSgemm;
}
const char* sgemm(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, const float* A,
                  i64 lda, const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  if (blocked_sgemm_serves(trans_a, trans_b, M, N, K)) {
    blocked_sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return kBlocked;
  }
  const int T = omp_in_parallel() ? 1 : omp_get_max_threads();
  const bool by_rows = T > 1 && !trans_a && trans_b && N <= 512 && M >= 2048 && K >= 256;
  const bool by_cols = T > 1 && !trans_a && trans_b && M <= 512 && N >= 2048 && K >= 256;
  if (!by_rows && !by_cols) {
    sgemm_1(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return kSgemm;
  }
  // rows: A is [M, K] row-major (not transposed); columns: B^T is [N, K] row-major.
  // Failures are collected and reported after the region (no throwing inside it).
  dnnl_status_t worst = dnnl_success;
#pragma omp parallel num_threads(T)
  {
    const i64 t = omp_get_thread_num(), n = omp_get_num_threads();
    dnnl_status_t st = dnnl_success;
    if (by_rows) {
      const i64 r0 = M * t / n, r1 = M * (t + 1) / n;
      if (r1 > r0)
        st = dnnl_sgemm('N', 'T', r1 - r0, N, K, alpha, A + r0 * lda, lda, B, ldb, beta,
                        C + r0 * ldc, ldc);
    } else {
      // column blocks of 16 floats, so that every thread's C block starts on a cache line
      const i64 nb = (N + 15) / 16, c0 = nb * t / n * 16, c1 = std::min(N, nb * (t + 1) / n * 16);
      if (c1 > c0)
        st = dnnl_sgemm('N', 'T', M, c1 - c0, K, alpha, A, lda, B + c0 * ldb, ldb, beta, C + c0,
                        ldc);
    }
    if (st != dnnl_success) {
#pragma omp critical(dlcm_sgemm_status)
      worst = st;
    }
  }
  DLCM_CHECK(worst == dnnl_success, "oneDNN sgemm failed with status ", int(worst), " (M=", M,
             " N=", N, " K=", K, ")");
  return kSgemm;
}

// ---- BF16 path ----------------------------------------------------------------------------

// Scalar rounding with the semantics of VCVTNE2PS2BF16: nearest even, denormals to (signed)
// zero, NaN stays a quiet NaN.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  if ((u & 0x7F800000u) == 0) return uint16_t((u >> 16) & 0x8000u);       // denormal, zero
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return uint16_t(u >> 16);
}

// d[c] = bf16(s[c]) for c < cols with VCVTNE2PS2BF16, 32 at a time; returns the columns done.
// Compiled for AVX512-BF16 whatever the build's target; called only where the CPU has it.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) i64 convert_row_avx512bf16(
    uint16_t* d, const float* s, i64 cols) {
  i64 c = 0;
  for (; c + 32 <= cols; c += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + c + 16), _mm512_loadu_ps(s + c));
    _mm512_storeu_si512(d + c, (__m512i)v);
  }
  return c;
}

// convert_row_avx512bf16 with non-temporal stores: d 64-byte aligned.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) i64 convert_row_avx512bf16_nt(
    uint16_t* d, const float* s, i64 cols) {
  i64 c = 0;
  for (; c + 32 <= cols; c += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + c + 16), _mm512_loadu_ps(s + c));
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + c), (__m512i)v);
  }
  return c;
}

// dst [rows, cols] contiguous = bf16(src rows ld apart), row by row (round_row_to_bf16: the
// instruction when the kernels run at the avx512 level on a CPU with AVX512-BF16, the same
// rounding in plain code otherwise).
// No region for small calls: packing BF16 weights rounds one column of K at a time, tens of
// thousands of calls per stream (core/parallel.h).
void convert_rows(uint16_t* dst, const float* src, i64 rows, i64 cols, i64 ld) {
  parallel_for(rows, parallel_worth(rows * cols),
               [&](i64 r) { round_row_to_bf16(dst + r * cols, src + r * ld, cols); });
}

using U16Buf = std::vector<uint16_t, AlignedAlloc<uint16_t>>;

// d[c] = float(bf16(s[c])) with the rounding of to_bf16, in integer arithmetic (AVX-512F: the
// FP32-units path needs no bf16 instruction); returns the columns done.
__attribute__((target("avx512f"))) i64 round_row_f32_avx512(float* d, const float* s,
                                                             i64 cols) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000),
                hi = _mm512_set1_epi32(int(0xFFFF0000u)), one = _mm512_set1_epi32(1),
                half = _mm512_set1_epi32(0x7FFF), quiet = _mm512_set1_epi32(0x00400000),
                sign = _mm512_set1_epi32(int(0x80000000u));
  i64 c = 0;
  for (; c + 16 <= cols; c += 16) {
    const __m512i u = _mm512_loadu_si512(s + c);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
    const __mmask16 tiny = _mm512_testn_epi32_mask(u, inf);  // exponent 0: zero, denormal
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(half, odd)), hi);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_and_si512(u, hi), quiet));
    r = _mm512_mask_mov_epi32(r, tiny, _mm512_and_si512(u, sign));
    _mm512_storeu_si512(d + c, r);
  }
  return c;
}
// d[c] = float(s[c]) for bf16 s; returns the columns done.
__attribute__((target("avx512f"))) i64 widen_row_avx512(float* d, const uint16_t* s, i64 cols) {
  i64 c = 0;
  for (; c + 16 <= cols; c += 16) {
    const __m512i w = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + c)));
    _mm512_storeu_si512(d + c, _mm512_slli_epi32(w, 16));
  }
  return c;
}

// dst [rows, cols] contiguous = float(bf16(src rows ld apart)): the values convert_rows
// rounds to, kept as floats.
void round_rows_f32(float* dst, const float* src, i64 rows, i64 cols, i64 ld) {
  const bool vec = isa() == Isa::Avx512;
  parallel_for(rows, parallel_worth(rows * cols), [&](i64 r) {
    const float* s = src + r * ld;
    float* d = dst + r * cols;
    i64 c = vec ? round_row_f32_avx512(d, s, cols) : 0;
    for (; c < cols; ++c) d[c] = bf16_to_float(to_bf16(s[c]));
  });
}
// dst [n] = float(src [n]) for bf16 src.
void widen_f32(float* dst, const uint16_t* src, i64 n) {
  const bool vec = isa() == Isa::Avx512;
  constexpr i64 kChunk = 1 << 14;
  const i64 chunks = (n + kChunk - 1) / kChunk;
  parallel_for(chunks, parallel_worth(n), [&](i64 ch) {
    const i64 c0 = ch * kChunk, m = std::min(kChunk, n - c0);
    i64 c = vec ? widen_row_avx512(dst + c0, src + c0, m) : 0;
    for (; c < m; ++c) dst[c0 + c] = bf16_to_float(src[c0 + c]);
  });
}

// The BF16 units decision: -1 not made yet, else int(Bf16Units).
std::atomic<int> g_units{-1};
std::mutex g_units_mu;
Bf16UnitsChoice g_units_choice;
bool units_fp32() { return g_units.load(std::memory_order_relaxed) == int(Bf16Units::Fp32); }

dnnl::engine& engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// Runtime path: one matmul primitive per (transposes, beta), with every dimension, stride and
// alpha given at run time: oneDNN 2.6 then runs its gemm-based bf16 kernels ("gemm:jit"), and a
// new shape costs no primitive creation (~0.3-1 ms each).
struct Prim {
  dnnl::matmul mm;
  dnnl::memory::desc sp;  // scratchpad
  std::string impl;       // primitive_desc::impl_info_str()
};

const Prim& primitive(bool ta, bool tb, float beta) {
  static std::mutex mu;
  static std::map<std::tuple<bool, bool, float>, std::unique_ptr<Prim>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[{ta, tb, beta}];
  if (slot) return *slot;
  using dt = dnnl::memory::data_type;
  using dims = dnnl::memory::dims;
  const dnnl::memory::dim R = DNNL_RUNTIME_DIM_VAL;
  // A [M,K] stored as rows of K (or, transposed, rows of M); B [K,N] likewise.
  dnnl::memory::desc a({R, R}, dt::bf16, ta ? dims{1, R} : dims{R, 1});
  dnnl::memory::desc b({R, R}, dt::bf16, tb ? dims{1, R} : dims{R, 1});
  dnnl::memory::desc c({R, R}, dt::f32, dims{R, 1});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per-thread scratch: concurrent use
  attr.set_output_scales(0, {DNNL_RUNTIME_F32_VAL});      // alpha
  if (beta != 0.0f) {
    dnnl::post_ops po;
    po.append_sum(beta);
    attr.set_post_ops(po);
  }
  auto pd = dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, b, c), attr, engine());
  slot = std::make_unique<Prim>(Prim{dnnl::matmul(pd), pd.scratchpad_desc(), pd.impl_info_str()});
  return *slot;
}

// Per-thread scratch: the bf16 operands, the primitives' scratchpad and a stream, so that
// concurrent calls (parallel regions, several driving threads) share nothing mutable.
struct ThreadScratch {
  U16Buf a, b;
  Buf fa, fb;  // BF16 on the FP32 units: the operands' rounded values as floats
  std::vector<uint8_t> sp;
  std::unique_ptr<dnnl::stream> strm;
};
ThreadScratch& scratch() {
  thread_local ThreadScratch t;
  if (!t.strm) t.strm = std::make_unique<dnnl::stream>(engine());
  return t;
}

// Stored blocks already rounded to bf16, which products on this thread read instead of rounding
// them again (the same rounding, so the same bits): a call's shared A operand (linear_backward's
// dy, linear_forward_multi's x) and a layer's kept copy of its input (Bf16Copy). Each entry
// lives for the span of a call that does not modify its source (KnownScope).
struct Known {
  const float* src;
  i64 rows, cols, ld;  // stored layout: rows of cols floats, ld apart
  const uint16_t* data;
  uint64_t version;  // of the rounding that wrote data (new_copy_version)
};
// Every rounding into a kept or shared copy gets a number no other one has: what the AMX path's
// cache of packed operands is keyed by, so a copy rewritten in place is never matched.
std::atomic<uint64_t> g_copy_version{0};
uint64_t new_copy_version() { return g_copy_version.fetch_add(1) + 1; }
constexpr int kMaxKnown = 4;
thread_local Known t_known[kMaxKnown];
thread_local int t_n_known = 0;

std::atomic<bool> g_bf16_reuse{env_switch("DLCM_BF16_REUSE",
                                          "linear layers reuse their BF16 input copies",
                                          "linear layers do not reuse their BF16 input copies")};
std::atomic<i64> g_copies_reused{0};

const Known* find_known_entry(const float* src, i64 rows, i64 cols, i64 ld) {
  for (int i = t_n_known - 1; i >= 0; --i) {
    const Known& k = t_known[i];
    if (k.src == src && k.rows == rows && k.cols == cols && k.ld == ld) return &k;
  }
  return nullptr;
}
const uint16_t* find_known(const float* src, i64 rows, i64 cols, i64 ld) {
  const Known* k = find_known_entry(src, rows, cols, ld);
  return k ? k->data : nullptr;
}

class KnownScope {
 public:
  KnownScope() = default;
  // required: src's floats were never written (Bf16Copy::floats_absent), so the products
  // cannot round it themselves
  void add(const float* src, i64 rows, i64 cols, i64 ld, const uint16_t* data,
           uint64_t version, bool required = false) {
    if (t_n_known >= kMaxKnown) {  // not remembered: the products round it themselves
      if (required)
        fail("BF16 products: more than ", kMaxKnown, " operand copies in one call, and one of "
             "them has no floats to round (a producer skipped them); this is a bug: run with "
             "DLCM_BF16_SKIP_FLOATS=0 meanwhile");
      return;
    }
    t_known[t_n_known++] = {src, rows, cols, ld, data, version};
    ++added_;
  }
  ~KnownScope() { t_n_known -= added_; }
  KnownScope(const KnownScope&) = delete;
  KnownScope& operator=(const KnownScope&) = delete;

 private:
  int added_ = 0;
};

// Rounds src (rows of cols floats, ld apart) into dst, charged to the profiler's rounding row.
void round_block(U16Buf& dst, const float* src, i64 rows, i64 cols, i64 ld) {
  prof::DetailScope ps("  GEMM: bf16 operand rounding", 0);
  if (dst.size() < size_t(rows * cols)) dst.resize(rows * cols);
  convert_rows(dst.data(), src, rows, cols, ld);
}

// One A operand rounded for all the products of a call (in a per-thread buffer; a nested
// scope leaves the outer copy in place).
thread_local U16Buf t_shared_buf;
thread_local bool t_shared_busy = false;
class SharedAScope {
 public:
  SharedAScope(const float* src, i64 rows, i64 cols, i64 ld) {
    if (g_precision != Precision::BF16 || rows * cols == 0 || t_shared_busy) return;
    round_block(t_shared_buf, src, rows, cols, ld);
    known_.add(src, rows, cols, ld, t_shared_buf.data(), new_copy_version());
    t_shared_busy = owner_ = true;
  }
  ~SharedAScope() {
    if (owner_) t_shared_busy = false;
  }
  SharedAScope(const SharedAScope&) = delete;
  SharedAScope& operator=(const SharedAScope&) = delete;

 private:
  KnownScope known_;
  bool owner_ = false;
};

struct Bf16Operands {
  const uint16_t* a;
  const uint16_t* b;
};

// Operands into contiguous bf16 buffers in their stored layout (A from the shared copy when it
// is exactly that block).
Bf16Operands convert_operands(ThreadScratch& t, bool ta, bool tb, i64 M, i64 N, i64 K,
                              const float* A, i64 lda, const float* B, i64 ldb) {
  prof::DetailScope ps("  GEMM: bf16 operand rounding", 0);
  const i64 ar = ta ? K : M, ac = ta ? M : K;  // A's stored rows and columns
  const uint16_t* a = find_known(A, ar, ac, lda);
  if (!a) {
    if (t.a.size() < size_t(M * K)) t.a.resize(M * K);
    convert_rows(t.a.data(), A, ar, ac, lda);
    a = t.a.data();
  }
  const i64 br = tb ? N : K, bc = tb ? K : N;  // B's stored rows and columns
  const uint16_t* b = find_known(B, br, bc, ldb);
  if (b) {
    g_copies_reused.fetch_add(1, std::memory_order_relaxed);
  } else {
    if (t.b.size() < size_t(K * N)) t.b.resize(K * N);
    convert_rows(t.b.data(), B, br, bc, ldb);
    b = t.b.data();
  }
  return {a, b};
}

void execute(ThreadScratch& t, const dnnl::matmul& mm, const dnnl::memory::desc& sp,
             std::unordered_map<int, dnnl::memory> args) {
  const size_t sp_bytes = sp.get_size();
  if (t.sp.size() < sp_bytes) t.sp.resize(sp_bytes);
  if (sp_bytes > 0) args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(sp, engine(), t.sp.data()));
  mm.execute(*t.strm, args);
  t.strm->wait();
}

void bf16_gemm(bool ta, bool tb, i64 M, i64 N, i64 K, float alpha, const float* A, i64 lda,
               const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  ThreadScratch& t = scratch();
  const Bf16Operands ops16 = convert_operands(t, ta, tb, M, N, K, A, lda, B, ldb);
  try {
    using dt = dnnl::memory::data_type;
    using dims = dnnl::memory::dims;
    const Prim& p = primitive(ta, tb, beta);
    dnnl::memory ma({{M, K}, dt::bf16, ta ? dims{1, M} : dims{K, 1}}, engine(),
                    const_cast<uint16_t*>(ops16.a));
    dnnl::memory mb({{K, N}, dt::bf16, tb ? dims{1, K} : dims{N, 1}}, engine(),
                    const_cast<uint16_t*>(ops16.b));
    dnnl::memory mc({{M, N}, dt::f32, dims{ldc, 1}}, engine(), C);
    dnnl::memory ms({{1}, dt::f32, dnnl::memory::format_tag::x}, engine(), &alpha);
    execute(t, p.mm, p.sp,
            {{DNNL_ARG_SRC, ma},
             {DNNL_ARG_WEIGHTS, mb},
             {DNNL_ARG_DST, mc},
             {DNNL_ARG_ATTR_OUTPUT_SCALES, ms}});
  } catch (const dnnl::error& e) {
    fail("oneDNN bf16 matmul failed (M=", M, " N=", N, " K=", K, "): ", e.what());
  }
}

// ---- fixed-shape path ----------------------------------------------------------------------

// Everything a fixed-shape primitive bakes in. BF16 operands are packed contiguously, so their
// lda/ldb are not part of the key (0).
struct FixedKey {
  Precision prec;
  bool ta, tb;
  i64 M, N, K, lda, ldb, ldc;
  float alpha, beta;
  bool operator==(const FixedKey& o) const {
    return prec == o.prec && ta == o.ta && tb == o.tb && M == o.M && N == o.N && K == o.K &&
           lda == o.lda && ldb == o.ldb && ldc == o.ldc &&
           std::memcmp(&alpha, &o.alpha, 4) == 0 && std::memcmp(&beta, &o.beta, 4) == 0;
  }
};
struct FixedKeyHash {
  size_t operator()(const FixedKey& k) const {
    uint32_t a, b;
    std::memcpy(&a, &k.alpha, 4);
    std::memcpy(&b, &k.beta, 4);
    size_t h = size_t(k.prec) * 4 + size_t(k.ta) * 2 + size_t(k.tb);
    for (uint64_t v : {uint64_t(k.M), uint64_t(k.N), uint64_t(k.K), uint64_t(k.lda),
                       uint64_t(k.ldb), uint64_t(k.ldc), uint64_t(a), uint64_t(b)})
      h = (h ^ v) * 0x100000001b3ull + (h >> 29);
    return h;
  }
};

std::unique_ptr<Prim> create_fixed(const FixedKey& k) {
  using dt = dnnl::memory::data_type;
  using dims = dnnl::memory::dims;
  const dt in = k.prec == Precision::BF16 ? dt::bf16 : dt::f32;
  dnnl::memory::desc a({k.M, k.K}, in, k.ta ? dims{1, k.lda} : dims{k.lda, 1});
  dnnl::memory::desc b({k.K, k.N}, in, k.tb ? dims{1, k.ldb} : dims{k.ldb, 1});
  dnnl::memory::desc c({k.M, k.N}, dt::f32, dims{k.ldc, 1});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (k.alpha != 1.0f) attr.set_output_scales(0, {k.alpha});
  if (k.beta != 0.0f) {
    dnnl::post_ops po;
    po.append_sum(k.beta);
    attr.set_post_ops(po);
  }
  auto pd = dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, b, c), attr, engine());
  return std::make_unique<Prim>(Prim{dnnl::matmul(pd), pd.scratchpad_desc(), pd.impl_info_str()});
}

// Bounded LRU of fixed-shape primitives; entries are shared so that an eviction while another
// thread runs the primitive keeps it alive until that call returns.
struct FixedCache {
  std::mutex mu;
  GemmCacheConfig cfg;
  std::list<std::pair<FixedKey, std::shared_ptr<const Prim>>> lru;  // most recent first
  std::unordered_map<FixedKey, decltype(lru)::iterator, FixedKeyHash> index;
  std::unordered_map<FixedKey, int, FixedKeyHash> seen;  // uses of shapes not cached yet
  // Per family (the key with one of M, N, K and the leading dimensions left out): the distinct
  // values that dimension took, up to cfg.varying_values.
  std::unordered_map<FixedKey, std::vector<i64>, FixedKeyHash> family[3];
  GemmCacheStats stats;

  // Whether k belongs to a family whose free dimension has taken cfg.varying_values values
  // (k's own included when `record`). A DLCM's concept count differs at every training step,
  // and each of its backbone products is called several times per step: with min_uses alone,
  // every step would create (JIT) a primitive per backbone shape and evict stable ones. Such
  // products stay on the runtime path once their family shows that it varies.
  bool varying(const FixedKey& k, bool record) {
    if (cfg.varying_values <= 0) return false;
    bool out = false;
    for (int d = 0; d < 3; ++d) {
      FixedKey f = k;  // k's family: without dimension d and the leading dimensions
      f.lda = f.ldb = f.ldc = 0;
      const i64 v = std::exchange(d == 0 ? f.M : d == 1 ? f.N : f.K, 0);
      auto& m = family[d];
      if (record) {
        bound(m);
        std::vector<i64>& vals = m[f];
        if (i64(vals.size()) < cfg.varying_values &&
            std::find(vals.begin(), vals.end(), v) == vals.end())
          vals.push_back(v);
        out |= i64(vals.size()) >= cfg.varying_values;
      } else if (auto it = m.find(f); it != m.end()) {
        out |= i64(it->second.size()) >= cfg.varying_values;
      }
    }
    return out;
  }

  // The bookkeeping maps of shapes not cached stay bounded: cleared when they grow large.
  template <class Map>
  void bound(Map& m) const {
    if (m.size() > 16 * cfg.capacity + 1024) m.clear();
  }

  // The primitive for k, or null when k stays on the runtime path for now.
  std::shared_ptr<const Prim> get(const FixedKey& k, bool count_use) {
    std::lock_guard<std::mutex> lock(mu);
    if (cfg.capacity == 0 || 2.0 * double(k.M) * double(k.N) * double(k.K) < cfg.min_flops)
      return nullptr;
    if (auto it = index.find(k); it != index.end()) {
      lru.splice(lru.begin(), lru, it->second);
      if (count_use) ++stats.fixed_calls;
      return lru.front().second;
    }
    if (varying(k, count_use)) {
      if (count_use) ++stats.varying_calls;
      return nullptr;
    }
    if (count_use) {
      bound(seen);
      if (++seen[k] < cfg.min_uses) return nullptr;
      seen.erase(k);
    }
    std::shared_ptr<const Prim> p = create_fixed(k);  // under the lock: creation is rare
    if (lru.size() >= cfg.capacity) {
      index.erase(lru.back().first);
      lru.pop_back();
      ++stats.evicted;
    }
    lru.emplace_front(k, p);
    index[k] = lru.begin();
    ++stats.created;
    if (count_use) ++stats.fixed_calls;
    return p;
  }
};
FixedCache& fixed_cache() {
  static FixedCache c;
  return c;
}

// DLCM_GEMM read once, before the first product. Without it: fixed where oneDNN runs AMX
// (brgemm AMX kernels exist only for fixed shapes: 1.1-1.9x on the issue-19 Xeon for BF16),
// runtime elsewhere (on the AMD Zen 4/5 hosts of docs/performance.md, fixed-shape brgemm
// trains 4-5% slower than sgemm / the runtime-shape bf16 kernels).
GemmPath initial_path() {
  const char* e = std::getenv("DLCM_GEMM");
  if (!e || !*e) {
    const unsigned amx = dnnl_cpu_isa_avx512_core_amx;
    return (unsigned(dnnl_get_effective_cpu_isa()) & amx) == amx ? GemmPath::Fixed
                                                                  : GemmPath::Runtime;
  }
  const GemmPath p = parse_gemm_path(e, "DLCM_GEMM");
  std::fprintf(stderr, "dlcm: DLCM_GEMM=%s: GEMMs use the %s-shape oneDNN path\n", e,
               gemm_path_name(p));
  return p;
}
GemmPath& path_ref() {
  static GemmPath p = initial_path();
  return p;
}

FixedKey fixed_key(bool ta, bool tb, i64 M, i64 N, i64 K, float alpha, i64 lda, i64 ldb,
                   float beta, i64 ldc, Precision prec = g_precision) {
  const bool bf = prec == Precision::BF16;
  // BF16 operands are packed: [M,K] (or [K,M]) and [K,N] (or [N,K]) without padding
  return {prec, ta, tb, M, N, K, bf ? (ta ? M : K) : lda, bf ? (tb ? K : N) : ldb,
          ldc, alpha, beta};
}

// FP32 products x W^T (A as stored, B transposed: the linear layers' forward) run on oneDNN's
// sgemm on the fixed path too: 1.04-1.06x the fixed-shape brgemm alone and 1.02-1.17x inside
// the reference's FP32 training step (the step median 1.04x), where the other forms are even (the
// Emerald Rapids host, docs/performance.md, session 47). DLCM_FP32_NT_SGEMM=0 keeps them fixed.
std::atomic<bool> g_fp32_nt_sgemm{env_switch(
    "DLCM_FP32_NT_SGEMM", "FP32 x W^T products on oneDNN's sgemm on the fixed path too",
    "FP32 x W^T products on fixed-shape primitives like the other forms")};

// The fixed-shape primitive this call runs, or null for the runtime path.
std::shared_ptr<const Prim> fixed_for(const FixedKey& k, bool count_use) {
  if (path_ref() != GemmPath::Fixed || k.K == 0 || omp_in_parallel()) return nullptr;
  if (k.prec == Precision::FP32 && !k.ta && k.tb && g_fp32_nt_sgemm.load(std::memory_order_relaxed))
    return nullptr;
  return fixed_cache().get(k, count_use);
}

void fixed_gemm(const Prim& p, const FixedKey& k, const float* A, i64 lda, const float* B,
                i64 ldb, float* C) {
  ThreadScratch& t = scratch();
  using dt = dnnl::memory::data_type;
  using dims = dnnl::memory::dims;
  const bool bf = k.prec == Precision::BF16;
  Bf16Operands ops16{nullptr, nullptr};
  if (bf) ops16 = convert_operands(t, k.ta, k.tb, k.M, k.N, k.K, A, lda, B, ldb);
  try {
    const dt in = bf ? dt::bf16 : dt::f32;
    // A's and B's stored layout (BF16: the packed copies; k.lda/k.ldb are their row widths)
    void* pa = bf ? static_cast<void*>(const_cast<uint16_t*>(ops16.a)) : const_cast<float*>(A);
    void* pb = bf ? static_cast<void*>(const_cast<uint16_t*>(ops16.b)) : const_cast<float*>(B);
    dnnl::memory ma({{k.M, k.K}, in, k.ta ? dims{1, k.lda} : dims{k.lda, 1}}, engine(), pa);
    dnnl::memory mb({{k.K, k.N}, in, k.tb ? dims{1, k.ldb} : dims{k.ldb, 1}}, engine(), pb);
    dnnl::memory mc({{k.M, k.N}, dt::f32, dims{k.ldc, 1}}, engine(), C);
    execute(t, p.mm, p.sp, {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}});
  } catch (const dnnl::error& e) {
    fail("oneDNN fixed-shape matmul failed (M=", k.M, " N=", k.N, " K=", k.K, "): ", e.what());
  }
}

// BF16 products that amx_gemm serves (kernels/amx_gemm.h): outside parallel regions, plain
// products (alpha 1; beta 0 or 1), a shape amx_gemm_fits (M, N padded to 32 by at most 25%),
// large enough to be worth a parallel region (the fixed-shape cache's min_flops: tests lower
// it to reach every shape). The operands' known bf16 copies are packed instead of the floats
// (the same bits).
std::atomic<double> g_amx_min_flops{GemmCacheConfig{}.min_flops};
bool amx_gemm_serves(i64 M, i64 N, i64 K, float alpha, float beta) {
  return g_precision == Precision::BF16 && !units_fp32() && amx_gemm_on() && alpha == 1.0f &&
         (beta == 0.0f || beta == 1.0f) &&
         2.0 * double(M) * double(N) * double(K) >= g_amx_min_flops.load() &&
         !omp_in_parallel() && amx_gemm_fits(M, N, K);
}

void amx_product(bool ta, bool tb, i64 M, i64 N, i64 K, const float* A, i64 lda, const float* B,
                 i64 ldb, float beta, float* C, i64 ldc) {
  const i64 ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
  const Known* a16 = find_known_entry(A, ar, ac, lda);
  const Known* b16 = find_known_entry(B, br, bc, ldb);
  if (b16) g_copies_reused.fetch_add(1, std::memory_order_relaxed);
  amx_gemm(ta, tb, M, N, K, A, lda, {a16 ? a16->data : nullptr, ac, a16 ? a16->version : 0}, B,
           ldb, {b16 ? b16->data : nullptr, bc, b16 ? b16->version : 0}, beta != 0.0f, C, ldc);
}

// A BF16 product on the FP32 units: the operands rounded to bf16 (or a known copy widened)
// into FP32 scratch in their stored layout, then the FP32 product of the path (a fixed-shape
// f32 primitive or sgemm). Returns the implementation that ran.
const char* bf16_on_fp32_units(bool ta, bool tb, i64 M, i64 N, i64 K, float alpha,
                               const float* A, i64 lda, const float* B, i64 ldb, float beta,
                               float* C, i64 ldc) {
  ThreadScratch& t = scratch();
  const i64 ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
  {
    prof::DetailScope ps("  GEMM: bf16 operand rounding", 0);
    if (t.fa.size() < size_t(M * K)) t.fa.resize(M * K);
    if (t.fb.size() < size_t(K * N)) t.fb.resize(K * N);
    if (const uint16_t* a = find_known(A, ar, ac, lda))
      widen_f32(t.fa.data(), a, ar * ac);
    else
      round_rows_f32(t.fa.data(), A, ar, ac, lda);
    if (const uint16_t* b = find_known(B, br, bc, ldb)) {
      g_copies_reused.fetch_add(1, std::memory_order_relaxed);
      widen_f32(t.fb.data(), b, br * bc);
    } else {
      round_rows_f32(t.fb.data(), B, br, bc, ldb);
    }
  }
  const FixedKey key = fixed_key(ta, tb, M, N, K, alpha, ac, bc, beta, ldc, Precision::FP32);
  if (auto p = fixed_for(key, true)) {
    fixed_gemm(*p, key, t.fa.data(), ac, t.fb.data(), bc, C);
    return "f32 primitive, bf16-rounded operands";
  }
  return sgemm(ta, tb, M, N, K, alpha, t.fa.data(), ac, t.fb.data(), bc, beta, C, ldc) == kBlocked
             ? "dlcm blocked sgemm, bf16-rounded operands"
             : "sgemm, bf16-rounded operands";
}

// Times BF16 products of one training-sized shape (x W^T, 512 x 1024 x 512) on each kind of
// units, alternating, on one thread, by that thread's CPU time, and returns the medians in
// GFLOP/s {native, fp32}. One thread and its own clock, because the units' ratio is a property
// of a core: a wall-clock figure on the run's threads measured the host instead whenever
// something else ran (a benchmark's PyTorch peers starting: both kinds at ~105 GFLOP/s, the
// FP32 units no faster). Runs with the precision set to BF16 and the profiler off; restores
// both and the thread count.
double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}
std::pair<double, double> measure_bf16_units() {
  constexpr i64 M = 512, N = 1024, K = 512;
  Buf a(M * K), b(N * K), c(M * N);
  for (i64 i = 0; i < M * K; ++i) a[i] = float((i * 37) % 101) / 101.0f - 0.5f;
  for (i64 i = 0; i < N * K; ++i) b[i] = float((i * 53) % 97) / 97.0f - 0.5f;
  const Precision prec0 = g_precision;
  const bool prof0 = prof::g_enabled;
  const int threads0 = omp_get_max_threads();
  prof::g_enabled = false;
  g_precision = Precision::BF16;
  omp_set_num_threads(1);
  std::vector<double> rate[2];
  for (int rep = 0; rep < 7; ++rep)
    for (int u = 0; u < 2; ++u) {
      g_units = u;
      const double t0 = thread_seconds();
      gemm(false, true, M, N, K, 1.0f, a.data(), K, b.data(), K, 0.0f, c.data(), N);
      const double sec = std::max(thread_seconds() - t0, 1e-9);
      if (rep >= 2) rate[u].push_back(2.0 * M * N * K / sec / 1e9);  // 2 warm-ups each
    }
  omp_set_num_threads(threads0);
  g_precision = prec0;
  prof::g_enabled = prof0;
  for (auto& r : rate) std::sort(r.begin(), r.end());
  return {rate[0][rate[0].size() / 2], rate[1][rate[1].size() / 2]};
}

// Makes the decision (caller holds g_units_mu).
void decide_bf16_units() {
  Bf16UnitsChoice c;
  c.decided = true;
  const char* e = std::getenv("DLCM_BF16_UNITS");
  if (e && *e) {
    c.units = parse_bf16_units(e, "DLCM_BF16_UNITS");
    c.how = std::string("DLCM_BF16_UNITS=") + e;
    std::fprintf(stderr, "dlcm: %s: BF16 products run on the %s units\n", c.how.c_str(),
                 bf16_units_name(c.units));
  } else {
    std::tie(c.native_gflops, c.fp32_gflops) = measure_bf16_units();
    c.units = c.fp32_gflops >= 1.1 * c.native_gflops ? Bf16Units::Fp32 : Bf16Units::Native;
    char buf[160];
    std::snprintf(buf, sizeof buf, "measured on one core: native %.1f, fp32 %.1f GFLOP/s",
                  c.native_gflops, c.fp32_gflops);
    c.how = buf;
    if (c.units == Bf16Units::Fp32)
      std::fprintf(stderr,
                   "dlcm: BF16 products run on the FP32 units (operands rounded to bf16, FP32 "
                   "accumulation): %.0f GFLOP/s against %.0f for this CPU's bf16 kernels, "
                   "measured on one core (DLCM_BF16_UNITS=native|fp32 chooses)\n",
                   c.fp32_gflops, c.native_gflops);
  }
  g_units_choice = c;
  g_units = int(c.units);
}

}  // namespace

Bf16Units parse_bf16_units(const std::string& s, const std::string& what) {
  if (s == "native") return Bf16Units::Native;
  if (s == "fp32") return Bf16Units::Fp32;
  fail(what, ": expected \"native\" or \"fp32\" (the units that run the BF16 products), got \"",
       s, "\"");
}
const char* bf16_units_name(Bf16Units u) { return u == Bf16Units::Fp32 ? "fp32" : "native"; }

Bf16UnitsChoice bf16_units_choice() {
  std::lock_guard<std::mutex> lock(g_units_mu);
  if (!g_units_choice.decided && !omp_in_parallel()) decide_bf16_units();
  return g_units_choice;
}
Bf16Units bf16_units() {
  const int u = g_units.load(std::memory_order_relaxed);
  if (u >= 0) return Bf16Units(u);
  return bf16_units_choice().units;
}
void set_bf16_units(Bf16Units u) {
  std::lock_guard<std::mutex> lock(g_units_mu);
  g_units_choice = Bf16UnitsChoice{u, true, "set", 0, 0};
  g_units = int(u);
}

Precision parse_precision(const std::string& s, const std::string& what) {
  if (s == "fp32") return Precision::FP32;
  if (s == "bf16") return Precision::BF16;
  fail(what, ": expected \"fp32\" or \"bf16\", got \"", s, "\"");
}

const char* precision_name(Precision p) { return p == Precision::BF16 ? "bf16" : "fp32"; }

bool cpu_has_bf16() {
#if defined(__GNUC__)
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

namespace {
std::atomic<bool> g_bf16_attention{
    env_switch("DLCM_BF16_ATTENTION",
               "BF16 attention runs on bf16 operands (AMX tiles or AVX512-BF16 dot products)",
               "BF16 attention runs the FP32 kernel")};
std::atomic<bool> g_attention_tiles{true};
}  // namespace

AttentionUnits attention_units() {
  if (gemm_precision() != Precision::BF16 || !g_bf16_attention.load(std::memory_order_relaxed) ||
      isa() != Isa::Avx512 || !cpu_has_bf16() || bf16_units() != Bf16Units::Native)
    return AttentionUnits::Fp32;
  if (g_attention_tiles.load(std::memory_order_relaxed) && amx_bf16_usable())
    return AttentionUnits::Tiles;
  return AttentionUnits::Dot;
}

const char* attention_units_name(AttentionUnits u) {
  return u == AttentionUnits::Tiles ? "AMX tiles"
         : u == AttentionUnits::Dot  ? "AVX512-BF16 dot products"
                                     : "the FP32 kernel";
}

void set_bf16_attention(bool on) { g_bf16_attention = on; }
void set_attention_tiles(bool on) { g_attention_tiles = on; }

std::string onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
         std::to_string(v->patch) + " (commit " + (v->hash ? v->hash : "unknown") + ")";
}

void set_gemm_precision(Precision p) {
  DLCM_CHECK(p != Precision::BF16 || cpu_has_bf16(),
             "bf16 precision needs a CPU with AVX512-BF16 (this one has none); use fp32");
  if (p == Precision::BF16 && g_units.load() < 0) bf16_units_choice();
  g_precision = p;
}

Precision gemm_precision() { return g_precision; }

GemmPath parse_gemm_path(const std::string& s, const std::string& what) {
  if (s == "runtime") return GemmPath::Runtime;
  if (s == "fixed") return GemmPath::Fixed;
  fail(what, ": expected \"runtime\" or \"fixed\", got \"", s, "\"");
}

const char* gemm_path_name(GemmPath p) { return p == GemmPath::Fixed ? "fixed" : "runtime"; }
void set_gemm_path(GemmPath p) { path_ref() = p; }
void set_fp32_nt_sgemm(bool on) { g_fp32_nt_sgemm = on; }
bool fp32_nt_sgemm() { return g_fp32_nt_sgemm.load(); }
std::vector<GemmShapeStat> gemm_shape_stats(bool reset) {
  std::lock_guard<std::mutex> lock(g_shape_mu);
  std::vector<GemmShapeStat> v;
  for (auto& [k, st] : g_shape_stats) v.push_back(st);
  if (reset) {
    g_shape_stats.clear();
    g_shape_calls = 0;
  }
  return v;
}
void set_gemm_shape_by_call(bool on) { g_shape_by_call = on; }
GemmPath gemm_path() { return path_ref(); }
void read_kernel_settings() {
  isa();
  path_ref();
  blocked_use();
  if (const char* e = std::getenv("DLCM_BF16_UNITS"); e && *e) bf16_units_choice();  // no measuring
}

void set_gemm_cache_config(const GemmCacheConfig& c) {
  FixedCache& f = fixed_cache();
  std::lock_guard<std::mutex> lock(f.mu);
  f.cfg = c;
  g_amx_min_flops = c.min_flops;
  f.lru.clear();
  f.index.clear();
  f.seen.clear();
  for (auto& m : f.family) m.clear();
  f.stats.size = 0;
}

GemmCacheConfig gemm_cache_config() {
  FixedCache& f = fixed_cache();
  std::lock_guard<std::mutex> lock(f.mu);
  return f.cfg;
}

GemmCacheStats gemm_cache_stats() {
  FixedCache& f = fixed_cache();
  std::lock_guard<std::mutex> lock(f.mu);
  GemmCacheStats s = f.stats;
  s.size = i64(f.lru.size());
  return s;
}

std::string gemm_impl(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, i64 lda,
                      i64 ldb, float beta, i64 ldc) {
  if (K == 0) return "none (K = 0: C = beta C)";  // as gemm() runs it, reading no operand
  if (g_precision == Precision::BF16 && units_fp32()) {
    const FixedKey key = fixed_key(trans_a, trans_b, M, N, K, alpha, trans_a ? M : K,
                                   trans_b ? K : N, beta, ldc, Precision::FP32);
    if (auto p = fixed_for(key, false)) return p->impl + ", bf16-rounded operands";
    return sgemm_impl(trans_a, trans_b, M, N, K) + std::string(", bf16-rounded operands");
  }
  if (amx_gemm_serves(M, N, K, alpha, beta)) return "amx tiles (dlcm)";
  if (auto p = fixed_for(fixed_key(trans_a, trans_b, M, N, K, alpha, lda, ldb, beta, ldc), false))
    return p->impl;
  if (g_precision == Precision::BF16) return primitive(trans_a, trans_b, beta).impl;
  return sgemm_impl(trans_a, trans_b, M, N, K);
}

void gemm(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, const float* A, i64 lda,
          const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // C = beta C without reading A or B: an empty operand may be null, which
                 // oneDNN's sgemm refuses (a weight gradient over zero rows)
    for (i64 i = 0; i < M; ++i) {
      float* c = C + i * ldc;
      if (beta == 0.0f) std::fill_n(c, N, 0.0f);
      else if (beta != 1.0f) for (i64 j = 0; j < N; ++j) c[j] *= beta;
    }
    return;
  }
  prof::DetailScope ps("  GEMM", 2.0 * double(M) * double(N) * double(K));
  ShapeTimer timer;
  const bool acc = beta != 0;
  // x W^T with weights packed by an inference stream on this thread (kernels/packed_gemm.h)
  if (const PackedWeights* pw = active_packed_weights();
      pw && !trans_a && trans_b && beta == 0 && ldb == K)
    if (const PackedMatrix* pm = pw->find(B, N, K, M)) {
      packed_gemm(C, ldc, A, lda, *pm, M, alpha, pw->served(pm));
      return timer.done(trans_a, trans_b, M, N, K, acc, "packed");
    }
  if (g_precision == Precision::BF16 && units_fp32()) {
    const char* impl =
        bf16_on_fp32_units(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return timer.done(trans_a, trans_b, M, N, K, acc, impl);
  }
  if (amx_gemm_serves(M, N, K, alpha, beta)) {
    amx_product(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
    return timer.done(trans_a, trans_b, M, N, K, acc, "amx tiles (dlcm)");
  }
  const FixedKey key = fixed_key(trans_a, trans_b, M, N, K, alpha, lda, ldb, beta, ldc);
  if (auto p = fixed_for(key, true)) {
    fixed_gemm(*p, key, A, lda, B, ldb, C);
    return timer.done(trans_a, trans_b, M, N, K, acc, p->impl.c_str());
  }
  if (g_precision == Precision::BF16) {
    bf16_gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return timer.done(trans_a, trans_b, M, N, K, acc, "runtime bf16");
  }
  timer.done(trans_a, trans_b, M, N, K, acc,
             sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc));
}

namespace {
std::atomic<i64> g_copies_produced{0};
// DLCM_BF16_PRODUCERS=0: the producers write floats only and the products round them (the same
// bits; for A/B timing).
const bool g_producers = env_switch("DLCM_BF16_PRODUCERS", "producers write the bf16 roundings",
                                   "producers do not write the bf16 roundings");
bool copies_wanted(i64 rows, i64 cols) {
  return g_precision == Precision::BF16 && g_bf16_reuse.load() && rows * cols > 0 &&
         !active_packed_weights();
}
// Rounds x into keep when the BF16 linear layers use their copies; otherwise marks it empty, so
// that a backward never reads a copy older than its x.
// A copy its producer wrote for this x (CopyProducer) is taken as it is.
// A copy whose floats its producer skipped, for this block, that a product is about to pass
// over (and read the floats instead): never silently.
void check_floats_present(const Bf16Copy* keep, const float* x, const char* who) {
  if (keep && keep->floats_absent && keep->src == x)
    fail(who, ": a BF16 operand's floats were skipped by its producer (only its bf16 copy "
         "holds it), but this product cannot read the copy (BF16 copies or BF16 precision "
         "switched off between the producer and the product?); set DLCM_BF16_SKIP_FLOATS=0, or "
         "switch the copies before the forward pass");
}

bool fill_copy(Bf16Copy* keep, const float* x, i64 N, i64 in) {
  if (!keep) return false;
  const bool produced = keep->produced && keep->src == x && keep->rows == N && keep->cols == in;
  keep->produced = false;
  const bool wanted = copies_wanted(N, in);
  if (wanted && produced) {
    g_copies_produced.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  check_floats_present(keep, x, "linear_forward");
  keep->src = nullptr;
  keep->floats_absent = false;
  if (!wanted) return false;
  round_block(keep->data, x, N, in, in);
  keep->src = x, keep->rows = N, keep->cols = in, keep->version = new_copy_version();
  return true;
}

// The kept copy when it was made from this block (src, rows x cols, dense) and copies are on.
const Bf16Copy* usable_copy(const Bf16Copy* keep, const float* src, i64 rows, i64 cols) {
  if (keep && keep->src == src && keep->rows == rows && keep->cols == cols &&
      g_precision == Precision::BF16 && g_bf16_reuse.load())
    return keep;
  check_floats_present(keep, src, "linear_backward");
  return nullptr;
}

std::atomic<bool> g_skip_floats{env_switch(
    "DLCM_BF16_SKIP_FLOATS", "producers read only by BF16 products skip their floats",
    "producers write their floats also where only BF16 products read them")};
std::atomic<bool> g_poison_skipped{false};
std::atomic<i64> g_floats_skipped{0};
}  // namespace

CopyProducer::CopyProducer(Bf16Copy* keep, i64 rows, i64 cols)
    : keep_(keep), rows_(rows), cols_(cols) {
  keep->src = nullptr;
  keep->produced = false;
  keep->floats_absent = false;
  if (!g_producers || !copies_wanted(rows, cols)) return;
  if (keep->data.size() < size_t(rows * cols)) keep->data.resize(rows * cols);
  data_ = keep->data.data();
}
float* CopyProducer::floats(float* dst) {
  if (!data_ || !g_skip_floats.load(std::memory_order_relaxed)) return dst;
  skipped_ = dst;
  keep_->floats_absent = true;
  g_floats_skipped.fetch_add(1, std::memory_order_relaxed);
  return nullptr;
}
void CopyProducer::done(const float* src) {
  // after the producer ran: an in-place producer (RoPE's backward) reads the buffer first
  if (skipped_ && g_poison_skipped.load(std::memory_order_relaxed))
    std::fill(skipped_, skipped_ + rows_ * cols_, std::numeric_limits<float>::quiet_NaN());
  if (!data_) return;
  keep_->src = src, keep_->rows = rows_, keep_->cols = cols_;
  keep_->version = new_copy_version();
  keep_->produced = true;
}
i64 bf16_copies_produced() { return g_copies_produced.load(); }
void set_bf16_skip_floats(bool on) { g_skip_floats = on; }
bool bf16_skip_floats() { return g_skip_floats.load(); }
i64 bf16_floats_skipped() { return g_floats_skipped.load(); }
void set_poison_skipped_floats(bool on) { g_poison_skipped = on; }
bool poison_skipped_floats() { return g_poison_skipped.load(); }

void round_row_to_bf16(uint16_t* dst, const float* src, i64 n) {
  i64 c = isa() == Isa::Avx512 && cpu_has_bf16() ? convert_row_avx512bf16(dst, src, n) : 0;
  for (; c < n; ++c) dst[c] = to_bf16(src[c]);
}
void round_row_to_bf16_stream(uint16_t* dst, const float* src, i64 n) {
  const bool nt = (reinterpret_cast<uintptr_t>(dst) & 63) == 0;
  i64 c = nt && isa() == Isa::Avx512 && cpu_has_bf16() ? convert_row_avx512bf16_nt(dst, src, n)
                                                          : 0;
  if (c < n) round_row_to_bf16(dst + c, src + c, n - c);
}

// SwiGLU's and the BF16 attention's outputs of 1 MiB or more (docs/performance.md, session 44)
static std::atomic<i64> g_stream_outputs{i64(1) << 20};
static std::atomic<i64> g_streamed_outputs{0};
void set_stream_outputs(i64 bytes) { g_stream_outputs = std::max<i64>(0, bytes); }
i64 stream_outputs() { return g_stream_outputs.load(std::memory_order_relaxed); }
bool stream_output(i64 bytes) {
  const i64 t = stream_outputs();
  return t > 0 && bytes >= t;
}
void count_streamed_output() { g_streamed_outputs.fetch_add(1, std::memory_order_relaxed); }
i64 streamed_outputs() { return g_streamed_outputs.load(); }

void set_bf16_reuse(bool on) { g_bf16_reuse = on; }
bool bf16_reuse() { return g_bf16_reuse.load(); }
i64 bf16_copies_reused() { return g_copies_reused.load(); }

void linear_forward(float* y, const float* x, const float* W, i64 N, i64 in, i64 out,
                    Bf16Copy* keep, Bf16Copy* wkeep) {
  KnownScope known;
  if (fill_copy(keep, x, N, in))
    known.add(x, N, in, in, keep->data.data(), keep->version, keep->floats_absent);
  if (fill_copy(wkeep, W, out, in))
    known.add(W, out, in, in, wkeep->data.data(), wkeep->version);
  gemm(false, true, N, out, in, 1.0f, x, in, W, in, 0.0f, y, out);
}

void linear_forward_multi(float* const* y, const float* x, const float* const* W, i64 N, i64 in,
                          const i64* out, int n, Bf16Copy* keep, Bf16Copy* const* wkeep) {
  if (N == 0) return;
  int part0 = 0;
  if (const PackedWeights* pw = active_packed_weights())
    if (const PackedMatrix* pm = pw->find_group(W, out, n, in, N, &part0)) {
      if (keep) keep->src = nullptr;
      for (int i = 0; wkeep && i < n; ++i)
        if (wkeep[i]) wkeep[i]->src = nullptr;
      i64 out_sum = 0;
      for (int i = 0; i < n; ++i) out_sum += out[i];
      prof::DetailScope ps("  GEMM", 2.0 * double(N) * double(out_sum) * double(in));
      ShapeTimer timer;
      packed_gemm_parts(y, out, x, in, *pm, N, 1.0f, pw->served(pm, part0), part0, n);
      return timer.done(false, true, N, out_sum, in, false, "packed group");
    }
  KnownScope known;
  std::optional<SharedAScope> shared;  // BF16: x rounded once for the n products
  if (fill_copy(keep, x, N, in))
    known.add(x, N, in, in, keep->data.data(), keep->version, keep->floats_absent);
  else
    shared.emplace(x, N, in, in);
  for (int i = 0; i < n; ++i)
    linear_forward(y[i], x, W[i], N, in, out[i], nullptr, wkeep ? wkeep[i] : nullptr);
}

bool linear_swiglu_packed(float* h, const float* x, const float* const* W, i64 N, i64 in, i64 F,
                          Bf16Copy* keep, Bf16Copy* const* wkeep, Bf16Copy* hkeep) {
  if (N == 0 || !packed_swiglu_on()) return false;
  const PackedWeights* pw = active_packed_weights();
  if (!pw) return false;
  const i64 out[2] = {F, F};
  int part0 = 0;
  const PackedMatrix* pm = pw->find_group(W, out, 2, in, N, &part0);
  if (!pm || !packed_swiglu_fusable(*pm, part0)) return false;
  for (Bf16Copy* c : {keep, hkeep, wkeep ? wkeep[0] : nullptr, wkeep ? wkeep[1] : nullptr})
    if (c) c->src = nullptr;
  prof::DetailScope ps("  GEMM", 2.0 * double(N) * double(2 * F) * double(in));
  ShapeTimer timer;
  packed_gemm_swiglu(h, F, x, in, *pm, N, pw->served(pm, part0), part0);
  timer.done(false, true, N, 2 * F, in, false, "packed gate/up + SwiGLU");
  return true;
}

void linear_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, i64 N,
                     i64 in, i64 out, const Bf16Copy* keep, bool dx_accumulate,
                     const Bf16Copy* wkeep, const Bf16Copy* dykeep) {
  // BF16: x, the B operand of dW = dy^T x, and W, the B operand of dx = dy W, from the
  // forward's copies when there are
  KnownScope known;
  if (const Bf16Copy* c = dW ? usable_copy(keep, x, N, in) : nullptr)
    known.add(x, N, in, in, c->data.data(), c->version, c->floats_absent);
  if (const Bf16Copy* c = dx ? usable_copy(wkeep, W, out, in) : nullptr)
    known.add(W, out, in, in, c->data.data(), c->version);
  // BF16: dy, the A operand of both products (read transposed for dW), rounded once, or not
  // at all where its producer wrote its rounding
  std::optional<SharedAScope> shared;
  if (const Bf16Copy* c = usable_copy(dykeep, dy, N, out)) {
    known.add(dy, N, out, out, c->data.data(), c->version, c->floats_absent);
    g_copies_produced.fetch_add(1, std::memory_order_relaxed);
  } else if (dx && dW) {
    shared.emplace(dy, N, out, out);
  }
  if (dx) gemm(false, false, N, in, out, 1.0f, dy, out, W, in, dx_accumulate ? 1.0f : 0.0f, dx, in);
  if (dW) gemm(true, false, out, in, N, 1.0f, dy, out, x, in, 1.0f, dW, in);
}

void round_to_bf16(uint16_t* dst, const float* src, i64 n) { convert_rows(dst, src, 1, n, n); }

float bf16_to_float(uint16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace dlcm::ops
