#include "kernels/gemm.h"

#include <dnnl.h>

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

void sgemm(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, const float* A, i64 lda,
           const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  dnnl_status_t st = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A, lda,
                                B, ldb, beta, C, ldc);
  DLCM_CHECK(st == dnnl_success, "oneDNN sgemm failed with status ", int(st), " (M=", M,
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

struct Key {
  bool ta, tb;
  i64 M, N, K, ldc;
  float alpha, beta;
  bool operator<(const Key& o) const {
    return std::tie(ta, tb, M, N, K, ldc, alpha, beta) <
           std::tie(o.ta, o.tb, o.M, o.N, o.K, o.ldc, o.alpha, o.beta);
  }
};

struct Prim {
  dnnl::memory::desc a, b, c, sp;
  dnnl::matmul mm;
};

dnnl::engine& engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// Matmul primitives by shape. Creating one costs ~0.3-1 ms, executing it is what we want;
// the shapes of a training run are few (concept counts add some), so the cache stays small.
std::shared_ptr<Prim> primitive(const Key& k) {
  static std::mutex mu;
  static std::map<Key, std::shared_ptr<Prim>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(k);
  if (it != cache.end()) return it->second;
  if (cache.size() >= 4096) cache.clear();  // runaway shapes: start over rather than grow
  using dt = dnnl::memory::data_type;
  using dims = dnnl::memory::dims;
  auto p = std::make_shared<Prim>();
  // Operands arrive converted into contiguous buffers in their stored layout: A is [M,K]
  // (or [K,M] when transposed), B is [K,N] (or [N,K]); the strides express the transposes.
  p->a = dnnl::memory::desc({k.M, k.K}, dt::bf16, k.ta ? dims{1, k.M} : dims{k.K, 1});
  p->b = dnnl::memory::desc({k.K, k.N}, dt::bf16, k.tb ? dims{1, k.K} : dims{k.N, 1});
  p->c = dnnl::memory::desc({k.M, k.N}, dt::f32, dims{k.ldc, 1});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per-thread scratch: concurrent use
  if (k.alpha != 1.0f) attr.set_output_scales(0, {k.alpha});
  if (k.beta != 0.0f) {
    dnnl::post_ops po;
    po.append_sum(k.beta);
    attr.set_post_ops(po);
  }
  auto pd = dnnl::matmul::primitive_desc(dnnl::matmul::desc(p->a, p->b, p->c), attr, engine());
  p->mm = dnnl::matmul(pd);
  p->sp = pd.scratchpad_desc();
  cache.emplace(k, p);
  return p;
}

void bf16_gemm(bool ta, bool tb, i64 M, i64 N, i64 K, float alpha, const float* A, i64 lda,
               const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  thread_local U16Buf abuf, bbuf;
  thread_local std::vector<uint8_t> scratch;
  thread_local std::unique_ptr<dnnl::stream> strm;
  if (abuf.size() < size_t(M * K)) abuf.resize(M * K);
  if (bbuf.size() < size_t(K * N)) bbuf.resize(K * N);
  if (ta)
    convert_rows(abuf.data(), A, K, M, lda);
  else
    convert_rows(abuf.data(), A, M, K, lda);
  if (tb)
    convert_rows(bbuf.data(), B, N, K, ldb);
  else
    convert_rows(bbuf.data(), B, K, N, ldb);
  try {
    auto p = primitive(Key{ta, tb, M, N, K, ldc, alpha, beta});
    const size_t sp_bytes = p->sp.get_size();
    if (scratch.size() < sp_bytes) scratch.resize(sp_bytes);
    if (!strm) strm = std::make_unique<dnnl::stream>(engine());
    dnnl::memory ma(p->a, engine(), abuf.data()), mb(p->b, engine(), bbuf.data()),
        mc(p->c, engine(), C);
    std::unordered_map<int, dnnl::memory> args = {
        {DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}};
    if (sp_bytes > 0)
      args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(p->sp, engine(), scratch.data()));
    p->mm.execute(*strm, args);
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
