#include "kernels/gemm.h"

#include <dnnl.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <dnnl.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace dlcm::ops {

namespace {

Precision g_precision = Precision::FP32;

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
void sgemm(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, const float* A, i64 lda,
           const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  const int T = omp_in_parallel() ? 1 : omp_get_max_threads();
  const bool by_rows = T > 1 && !trans_a && trans_b && N <= 512 && M >= 2048 && K >= 256;
  const bool by_cols = T > 1 && !trans_a && trans_b && M <= 512 && N >= 2048 && K >= 256;
  if (!by_rows && !by_cols) return sgemm_1(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
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

// dst [rows, cols] contiguous = bf16(src rows ld apart).
void convert_rows(uint16_t* dst, const float* src, i64 rows, i64 cols, i64 ld) {
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (i64 r = 0; r < rows; ++r) {
    const float* s = src + r * ld;
    uint16_t* d = dst + r * cols;
    i64 c = 0;
#if defined(__AVX512BF16__)
    for (; c + 32 <= cols; c += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + c + 16), _mm512_loadu_ps(s + c));
      _mm512_storeu_si512(d + c, (__m512i)v);
    }
#endif
    for (; c < cols; ++c) d[c] = to_bf16(s[c]);
  }
}

using U16Buf = std::vector<uint16_t, AlignedAlloc<uint16_t>>;

dnnl::engine& engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// One matmul primitive per (transposes, beta), with every dimension, stride and alpha given at
// run time: oneDNN 2.6 then runs its gemm-based bf16 kernels (avx512_core_bf16), which on this
// CPU are as fast as the shape-specialised brgemm ones, and a batch's new concept count costs
// no primitive creation (~0.3-1 ms each).
struct Prim {
  dnnl::matmul mm;
  dnnl::memory::desc sp;  // scratchpad
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
  slot = std::make_unique<Prim>(Prim{dnnl::matmul(pd), pd.scratchpad_desc()});
  return *slot;
}

void bf16_gemm(bool ta, bool tb, i64 M, i64 N, i64 K, float alpha, const float* A, i64 lda,
               const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  thread_local U16Buf abuf, bbuf;
  thread_local std::vector<uint8_t> scratch;
  thread_local std::unique_ptr<dnnl::stream> strm;
  if (abuf.size() < size_t(M * K)) abuf.resize(M * K);
  if (bbuf.size() < size_t(K * N)) bbuf.resize(K * N);
  // operands into contiguous bf16 buffers in their stored layout
  if (ta)
    convert_rows(abuf.data(), A, K, M, lda);
  else
    convert_rows(abuf.data(), A, M, K, lda);
  if (tb)
    convert_rows(bbuf.data(), B, N, K, ldb);
  else
    convert_rows(bbuf.data(), B, K, N, ldb);
  try {
    using dt = dnnl::memory::data_type;
    using dims = dnnl::memory::dims;
    const Prim& p = primitive(ta, tb, beta);
    const size_t sp_bytes = p.sp.get_size();
    if (scratch.size() < sp_bytes) scratch.resize(sp_bytes);
    if (!strm) strm = std::make_unique<dnnl::stream>(engine());
    dnnl::memory ma({{M, K}, dt::bf16, ta ? dims{1, M} : dims{K, 1}}, engine(), abuf.data());
    dnnl::memory mb({{K, N}, dt::bf16, tb ? dims{1, K} : dims{N, 1}}, engine(), bbuf.data());
    dnnl::memory mc({{M, N}, dt::f32, dims{ldc, 1}}, engine(), C);
    dnnl::memory ms({{1}, dt::f32, dnnl::memory::format_tag::x}, engine(), &alpha);
    std::unordered_map<int, dnnl::memory> args = {{DNNL_ARG_SRC, ma},
                                                  {DNNL_ARG_WEIGHTS, mb},
                                                  {DNNL_ARG_DST, mc},
                                                  {DNNL_ARG_ATTR_OUTPUT_SCALES, ms}};
    if (sp_bytes > 0)
      args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(p.sp, engine(), scratch.data()));
    p.mm.execute(*strm, args);
    strm->wait();
  } catch (const dnnl::error& e) {
    fail("oneDNN bf16 matmul failed (M=", M, " N=", N, " K=", K, "): ", e.what());
  }
}

}  // namespace

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

std::string onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
         std::to_string(v->patch) + " (commit " + (v->hash ? v->hash : "unknown") + ")";
}

void set_gemm_precision(Precision p) {
  DLCM_CHECK(p != Precision::BF16 || cpu_has_bf16(),
             "bf16 precision needs a CPU with AVX512-BF16 (this one has none); use fp32");
  g_precision = p;
}

Precision gemm_precision() { return g_precision; }

void gemm(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, const float* A, i64 lda,
          const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  if (M == 0 || N == 0) return;
  if (g_precision == Precision::BF16 && K > 0)
    bf16_gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else
    sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void linear_forward(float* y, const float* x, const float* W, i64 N, i64 in, i64 out) {
  gemm(false, true, N, out, in, 1.0f, x, in, W, in, 0.0f, y, out);
}

void linear_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, i64 N,
                     i64 in, i64 out) {
  if (dx) gemm(false, false, N, in, out, 1.0f, dy, out, W, in, 1.0f, dx, in);
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
