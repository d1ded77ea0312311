// One table-driven test over the kernels, in the style of ggml's test-backend-ops: ops.h,
// linear (gemm.h) and the DLCM kernels (dlcm_ops.h). For every case of a differentiable op:
//   1. the fast forward equals the reference forward (ops_ref.h), every output;
//   2. the fast backward equals the reference backward, every gradient, and both ACCUMULATE
//      (gradients start from random values, and the increments are compared);
//   3. the fast gradients match central finite differences of the projected loss
//      sum(out * R), R random, computed in double (the reference forward instantiated for
//      double), so that float rounding does not drown small gradients.
// Ops without a gradient (boundary decisions, segments) check step 1 exactly. Plus per-op
// extras: attention causality, ignored cross-entropy targets, AdamW over three steps against a
// double-precision transcription of the formula, router forced positions, concept attention's
// never-attended entries.
//
// The same table drives a perf mode: `test_ops --perf` times the fast forward and backward of
// the rows marked perf (realistic shapes: the reference configs' d=512, L=512, B=8 and DLCM
// concept shapes) and prints GFLOP/s (or GB/s for bandwidth-bound ops). The test never times.
//
// The table runs once per instruction-set level of the kernels (kernels/isa.h) that this build
// and CPU offer: scalar, avx2, avx512 (DLCM_ISA=... picks the level of the perf mode).
#include <gtest/gtest-spi.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <functional>
#include <string>
#include <vector>

#include "kernels/amx_gemm.h"
#include "kernels/blocked_sgemm.h"
#include "kernels/dlcm_ops.h"
#include "kernels/fma_ceiling.h"
#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "kernels/ops.h"
#include "kernels/ops_ref.h"
#include "kernels/packed_gemm.h"
#include "kernels/tile_gemm.h"
#include "testing.h"

using namespace dlcm;
using test::kBos;
using test::Pattern;

namespace {

struct Case {
  const char* op;
  i64 N = 1, d = 1, V = 1;  // rows, width, vocab/table rows (also n = N*d for elementwise ops);
                            // linear: in = d, out = V
  i64 B = 1, Lq = 1, Lk = 1, Hq = 1, Hkv = 1, hd = 2, q_offset = 0;  // attention; rope and
                                                                     // head_rmsnorm: N,Hq,hd
  float std = 1.0f;  // input scale
  // DLCM ops: B rows of Lq tokens with this boundary pattern; d is the feature width (router
  // ds, pooled/smoothed width, gather width); concept_list uses Lq as Mmax.
  Pattern pat = Pattern::Random;
  bool perf = false;  // a perf-mode shape: skipped by the test, timed by --perf
};

// The fields a row sets (defaults left out).
std::string describe(const Case& c) {
  const Case z{.op = c.op};
  std::string s;
  auto add = [&](const char* k, i64 v, i64 dflt) {
    if (v != dflt) s += std::string(" ") + k + "=" + std::to_string(v);
  };
  add("N", c.N, z.N);
  add("d", c.d, z.d);
  add("V", c.V, z.V);
  add("B", c.B, z.B);
  add("L", c.Lq, z.Lq);
  add("Lk", c.Lk, z.Lk);
  add("Hq", c.Hq, z.Hq);
  add("Hkv", c.Hkv, z.Hkv);
  add("hd", c.hd, z.hd);
  add("q_offset", c.q_offset, z.q_offset);
  if (c.std != z.std) s += " std=" + std::to_string(c.std);
  const std::string op = c.op;
  for (const char* uses : {"router", "boundaries", "segments", "pool_mean", "smoother",
                           "concept_gather", "concept_attention"})
    if (op.find(uses) != std::string::npos) s += std::string(" (") + test::name_of(c.pat) + ")";
  return s.empty() ? s : s.substr(1);
}

const Case kCases[] = {
    {.op = "embedding", .N = 37, .d = 19, .V = 11},
    {.op = "embedding", .N = 1, .d = 1, .V = 1},
    {.op = "embedding", .N = 300, .d = 80, .V = 7},  // parallel path, many repeated ids
    {.op = "embedding", .N = 4096, .d = 512, .V = 4096, .perf = true},
    {.op = "rmsnorm", .N = 13, .d = 33},
    {.op = "rmsnorm", .N = 1, .d = 4},
    {.op = "rmsnorm", .N = 300, .d = 96, .std = 3.0f},  // parallel path
    {.op = "rmsnorm", .N = 4096, .d = 512, .perf = true},
    {.op = "rmsnorm", .N = 128, .d = 256, .perf = true},  // a 128-token prefill
    {.op = "head_rmsnorm", .N = 5, .Hq = 3, .hd = 8},
    {.op = "head_rmsnorm", .N = 200, .Hq = 4, .hd = 64, .std = 2.0f},  // parallel path
    {.op = "head_rmsnorm", .N = 4096, .Hq = 8, .hd = 64, .perf = true},
    {.op = "linear", .N = 7, .d = 5, .V = 3},
    {.op = "linear", .N = 1, .d = 1, .V = 1},
    {.op = "linear", .N = 65, .d = 130, .V = 33},
    {.op = "linear", .N = 300, .d = 96, .V = 200},
    {.op = "linear", .N = 4096, .d = 512, .V = 1536, .perf = true},  // FFN up projection
    {.op = "linear", .N = 4096, .d = 512, .V = 512, .perf = true},   // attention projection
    // packed_linear: an inference stream's products of one input (linear_forward_multi over
    // weights packed together, kernels/packed_gemm.h): Hq matrices of V + 7 i outputs each
    // (partial column blocks), in = d; rows above the kernel's 6-row and 96-row tiles
    {.op = "packed_linear", .N = 7, .d = 5, .V = 3, .Hq = 1},
    {.op = "packed_linear", .N = 1, .d = 33, .V = 64, .Hq = 3},
    {.op = "packed_linear", .N = 26, .d = 130, .V = 57, .Hq = 2},
    {.op = "packed_linear", .N = 200, .d = 64, .V = 128, .Hq = 3},
    {.op = "packed_linear", .N = 26, .d = 384, .V = 1024, .Hq = 2, .perf = true},  // backbone w1|w3
    {.op = "packed_linear", .N = 128, .d = 256, .V = 256, .Hq = 3, .perf = true},  // token q|k|v
    // a 128-token prefill's products (dlcm-small's 35 concepts: backbone w2, q|k|v; the token
    // layers' w2, q|k|v, wo) with every output block full (the Hq > 1 rows above add 7 columns
    // per matrix: partial blocks); here the weights stay in cache between repeats, in a prefill
    // they stream from memory
    {.op = "packed_linear", .N = 35, .d = 1024, .V = 384, .Hq = 1, .perf = true},
    {.op = "packed_linear", .N = 35, .d = 384, .V = 1152, .Hq = 1, .perf = true},
    {.op = "packed_linear", .N = 35, .d = 384, .V = 384, .Hq = 1, .perf = true},
    {.op = "packed_linear", .N = 128, .d = 768, .V = 256, .Hq = 1, .perf = true},
    {.op = "packed_linear", .N = 128, .d = 256, .V = 768, .Hq = 1, .perf = true},
    {.op = "packed_linear", .N = 128, .d = 256, .V = 256, .Hq = 1, .perf = true},
    // gemm: M = N, K = d, N = V; every transpose, beta, alpha and padding, both paths
    {.op = "gemm", .N = 7, .d = 5, .V = 3},
    {.op = "gemm", .N = 1, .d = 1, .V = 1},
    {.op = "gemm", .N = 65, .d = 130, .V = 33},
    {.op = "gemm", .N = 96, .d = 300, .V = 200},
    {.op = "gemm", .N = 2048, .d = 2048, .V = 2048, .perf = true},  // the GEMM peak's product
    {.op = "gemm", .N = 4096, .d = 512, .V = 1536, .perf = true},   // FFN up projection
    // gemm_blocked: dlcm's blocked FP32 GEMM (M = N, K = d, N = V): every form against the
    // double product; sizes around its blocks (12 rows, 32-column panels, 48-row tiles, 384 k,
    // 512 columns), so partial panels, tiles and k blocks are all reached
    {.op = "gemm_blocked", .N = 1, .d = 1, .V = 1},
    {.op = "gemm_blocked", .N = 13, .d = 385, .V = 33},
    {.op = "gemm_blocked", .N = 50, .d = 769, .V = 70},
    {.op = "gemm_blocked", .N = 97, .d = 1030, .V = 530},
    {.op = "gemm_blocked", .N = 48, .d = 384, .V = 512},
    {.op = "gemm_blocked", .N = 1536, .d = 4096, .V = 512, .perf = true},  // FFN up dW
    {.op = "gemm_blocked", .N = 512, .d = 4096, .V = 1536, .perf = true},  // FFN down dW
    {.op = "gemm_blocked", .N = 512, .d = 4096, .V = 512, .perf = true},   // q/k/v/o dW
    // gemm_amx: BF16 products on the dlcm AMX tile kernel (M = N, K = d, N = V): every
    // transpose, beta and padding; K below, at and across the 32-wide tile step; M and N
    // past a multiple of 32 (edge blocks); a shape the padding would grow by more than 25%
    // stays on oneDNN
    {.op = "gemm_amx", .N = 64, .d = 40, .V = 96},
    {.op = "gemm_amx", .N = 96, .d = 1, .V = 64},
    {.op = "gemm_amx", .N = 32, .d = 300, .V = 160},
    {.op = "gemm_amx", .N = 128, .d = 64, .V = 32},
    {.op = "gemm_amx", .N = 130, .d = 40, .V = 128},
    {.op = "gemm_amx", .N = 128, .d = 33, .V = 250},
    {.op = "gemm_amx", .N = 250, .d = 70, .V = 230},
    {.op = "gemm_amx", .N = 33, .d = 8, .V = 64},  // 64 x 64 for 33 x 64: oneDNN
    // B wider than the column budget (1 MiB: 30 column blocks of 544 k): chunks of 30 and 20
    // blocks, the last column block an edge
    {.op = "gemm_amx", .N = 64, .d = 520, .V = 1590},
    // K across two chunks of the default 2048 k (C loaded and stored between them), with edges
    {.op = "gemm_amx", .N = 130, .d = 2100, .V = 96},
    {.op = "gemm_amx", .N = 4096, .d = 512, .V = 1536, .perf = true},  // FFN up projection
    {.op = "gemm_amx", .N = 4096, .d = 512, .V = 512, .perf = true},   // attention projection
    {.op = "rope", .N = 9, .Hq = 3, .hd = 8},
    {.op = "rope", .N = 1, .Hq = 1, .hd = 2},
    {.op = "rope", .N = 70, .Hq = 4, .hd = 64},
    {.op = "rope", .N = 4096, .Hq = 8, .hd = 64, .perf = true},
    {.op = "swiglu", .N = 1, .d = 1, .std = 3.0f},
    {.op = "swiglu", .N = 37, .d = 1, .std = 3.0f},
    {.op = "swiglu", .N = 20011, .d = 1, .std = 3.0f},  // parallel path and a 16-lane tail
    {.op = "swiglu", .N = 4096, .d = 1536, .perf = true},
    // attention: self, GQA 1/2/4, odd sizes, L not a multiple of 64, L=1, decode, chunked
    // prefill (q_offset>0, Lq<Lk), queries that do not reach the end of the cache, hd > 64.
    // Lq < 16 exercises the few-queries forward path, larger Lq the transposed-tile path.
    {.op = "attention", .B = 2, .Lq = 7, .Lk = 7, .Hq = 2, .Hkv = 2, .hd = 8},
    {.op = "attention", .B = 1, .Lq = 67, .Lk = 67, .Hq = 4, .Hkv = 2, .hd = 16},
    {.op = "attention", .B = 2, .Lq = 130, .Lk = 130, .Hq = 4, .Hkv = 1, .hd = 5},
    {.op = "attention", .B = 1, .Lq = 1, .Lk = 1, .Hq = 2, .Hkv = 1, .hd = 3},
    {.op = "attention", .B = 2, .Lq = 1, .Lk = 70, .Hq = 4, .Hkv = 2, .hd = 64, .q_offset = 69},
    {.op = "attention", .B = 2, .Lq = 3, .Lk = 100, .Hq = 8, .Hkv = 2, .hd = 16, .q_offset = 97},
    // decode's scores as dot products (rows x group <= 4): 16-key groups and a tail in each key
    // block, hd in 16-lane chunks with a masked tail
    {.op = "attention", .B = 2, .Lq = 1, .Lk = 150, .Hq = 3, .Hkv = 3, .hd = 40, .q_offset = 149},
    {.op = "attention", .B = 1, .Lq = 1, .Lk = 90, .Hq = 8, .Hkv = 2, .hd = 24, .q_offset = 89},
    {.op = "attention", .B = 1, .Lq = 20, .Lk = 90, .Hq = 2, .Hkv = 1, .hd = 24, .q_offset = 70},
    {.op = "attention", .B = 1, .Lq = 10, .Lk = 80, .Hq = 4, .Hkv = 4, .hd = 7, .q_offset = 5},
    {.op = "attention", .B = 1, .Lq = 33, .Lk = 33, .Hq = 2, .Hkv = 2, .hd = 80},
    {.op = "attention", .B = 2, .Lq = 150, .Lk = 150, .Hq = 2, .Hkv = 1, .hd = 64, .std = 2.0f},
    {.op = "attention", .B = 8, .Lq = 512, .Lk = 512, .Hq = 8, .Hkv = 8, .hd = 64, .perf = true},
    // a 128-token prefill's token layers and its 35 concepts' backbone layers (dlcm-small)
    {.op = "attention", .B = 1, .Lq = 128, .Lk = 128, .Hq = 4, .Hkv = 4, .hd = 64, .perf = true},
    {.op = "attention", .B = 1, .Lq = 35, .Lk = 35, .Hq = 6, .Hkv = 6, .hd = 64, .perf = true},
    {.op = "attention", .B = 1, .Lq = 1, .Lk = 256, .Hq = 4, .Hkv = 4, .hd = 64, .q_offset = 255, .perf = true},
    {.op = "attention", .B = 1, .Lq = 1, .Lk = 128, .Hq = 4, .Hkv = 4, .hd = 64, .q_offset = 127, .perf = true},
    {.op = "attention", .B = 1, .Lq = 1, .Lk = 64, .Hq = 4, .Hkv = 4, .hd = 64, .q_offset = 63, .perf = true},
    {.op = "attention", .B = 1, .Lq = 1, .Lk = 256, .Hq = 4, .Hkv = 2, .hd = 64, .q_offset = 255, .perf = true},
    {.op = "attention", .B = 1, .Lq = 1, .Lk = 256, .Hq = 8, .Hkv = 2, .hd = 64, .q_offset = 255, .perf = true},
    {.op = "attention", .B = 1, .Lq = 1, .Lk = 256, .Hq = 8, .Hkv = 1, .hd = 64, .q_offset = 255, .perf = true},
    // BF16 precision: bf16 operands in the tiles' layouts, on AMX tiles (and, there, again as
    // AVX512-BF16 dot products) or, on a CPU with AVX512-BF16 only, as dot products; with the
    // BF16 products on the FP32 units the FP32 kernel runs (same rows, tighter result).
    {.op = "attention_bf16", .B = 2, .Lq = 7, .Lk = 7, .Hq = 2, .Hkv = 2, .hd = 8},
    {.op = "attention_bf16", .B = 1, .Lq = 67, .Lk = 67, .Hq = 4, .Hkv = 2, .hd = 16},
    {.op = "attention_bf16", .B = 2, .Lq = 130, .Lk = 130, .Hq = 4, .Hkv = 1, .hd = 5},
    {.op = "attention_bf16", .B = 1, .Lq = 20, .Lk = 90, .Hq = 2, .Hkv = 1, .hd = 24, .q_offset = 70},
    // keys after every query (Lk > q_offset + Lq): never seen, zero gradients
    {.op = "attention_bf16", .B = 1, .Lq = 40, .Lk = 200, .Hq = 2, .Hkv = 1, .hd = 16, .q_offset = 60},
    {.op = "attention_bf16", .B = 1, .Lq = 33, .Lk = 33, .Hq = 2, .Hkv = 2, .hd = 80},
    {.op = "attention_bf16", .B = 2, .Lq = 150, .Lk = 150, .Hq = 2, .Hkv = 1, .hd = 64, .std = 2.0f},
    {.op = "attention_bf16", .B = 8, .Lq = 512, .Lk = 512, .Hq = 8, .Hkv = 8, .hd = 64, .perf = true},
    {.op = "cross_entropy", .N = 9, .V = 13},
    {.op = "cross_entropy", .N = 4, .V = 1000},
    {.op = "cross_entropy", .N = 1, .V = 1},
    {.op = "cross_entropy", .N = 6, .V = 50, .std = 40.0f},  // would overflow without max-sub
    {.op = "cross_entropy", .N = 40, .V = 500},              // parallel path
    {.op = "cross_entropy", .N = 4096, .V = 4096, .perf = true},
    {.op = "adamw", .N = 1000, .d = 1},
    {.op = "adamw", .N = 40000, .d = 1},
    {.op = "adamw", .N = 512, .d = 1536, .perf = true},
    {.op = "reduce", .N = 1, .d = 1},
    {.op = "reduce", .N = 100003, .d = 1},
    {.op = "reduce", .N = 512, .d = 1536, .perf = true},
    // ---- DLCM kernels ----
    // router: projected (separate q, k) and raw (q = k = H, aliased gradients), single-token
    // rows, BOS tokens inside rows, a parallel-path shape.
    {.op = "router_prob", .d = 6, .B = 2, .Lq = 9, .pat = Pattern::MultiDoc},
    {.op = "router_prob_raw", .d = 5, .B = 3, .Lq = 8, .pat = Pattern::MultiDoc},
    {.op = "router_prob", .d = 4, .B = 3, .Lq = 1},
    {.op = "router_prob", .d = 32, .B = 4, .Lq = 300, .pat = Pattern::MultiDoc},
    {.op = "router_prob", .d = 512, .B = 8, .Lq = 512, .perf = true},
    {.op = "sample_boundaries", .B = 4, .Lq = 64, .pat = Pattern::MultiDoc},
    {.op = "sample_boundaries", .B = 8, .Lq = 512},  // parallel path
    {.op = "sample_boundaries", .B = 8, .Lq = 512, .perf = true},
    {.op = "threshold_boundaries", .B = 3, .Lq = 40, .pat = Pattern::MultiDoc},
    {.op = "threshold_boundaries", .B = 8, .Lq = 5000},  // parallel path
    {.op = "threshold_boundaries", .B = 8, .Lq = 512, .perf = true},
    {.op = "segments", .B = 3, .Lq = 30, .pat = Pattern::MultiDoc},
    {.op = "segments", .B = 6, .Lq = 21, .pat = Pattern::Uneven},
    {.op = "segments", .B = 2, .Lq = 17, .pat = Pattern::AllOnes},
    {.op = "segments", .B = 2, .Lq = 19, .pat = Pattern::WholeRow},
    {.op = "segments", .B = 8, .Lq = 512, .perf = true},
    {.op = "pool_mean", .d = 5, .B = 2, .Lq = 7},
    {.op = "pool_mean", .d = 6, .B = 3, .Lq = 25, .pat = Pattern::Uneven},
    {.op = "pool_mean", .d = 64, .B = 3, .Lq = 300, .pat = Pattern::MultiDoc},  // parallel
    {.op = "pool_mean", .d = 512, .B = 8, .Lq = 512, .perf = true},
    {.op = "smoother", .d = 4, .B = 3, .Lq = 12, .pat = Pattern::MultiDoc},
    {.op = "smoother", .d = 3, .B = 3, .Lq = 10, .pat = Pattern::Uneven},
    {.op = "smoother", .d = 100, .B = 3, .Lq = 400, .pat = Pattern::MultiDoc},  // parallel
    {.op = "smoother", .d = 768, .B = 8, .Lq = 512, .perf = true},
    {.op = "concept_list", .d = 4, .B = 2, .Lq = 3},
    {.op = "concept_list", .d = 1, .B = 1, .Lq = 0},
    {.op = "concept_list", .d = 48, .B = 3, .Lq = 300},  // parallel path
    {.op = "concept_list", .d = 768, .B = 8, .Lq = 180, .perf = true},
    {.op = "concept_gather", .d = 6, .B = 3, .Lq = 11, .pat = Pattern::Uneven},
    {.op = "concept_gather", .d = 32, .B = 2, .Lq = 600, .pat = Pattern::MultiDoc},  // parallel
    {.op = "concept_gather", .d = 512, .B = 8, .Lq = 512, .perf = true},
    // concept attention: the compact kernel, the replicate path (gather + flash attention +
    // scatter) and the masked dense baseline, all against the definition (ref: replicate with
    // the reference attention). Every pattern; chunking (> 16 tokens), several key tiles,
    // hd > 64, GQA, a single-token row; masked: two or three chunks of kMaskedChunk rows.
    {.op = "concept_attention_compact", .B = 2, .Lq = 23, .Hq = 4, .Hkv = 2, .hd = 8},
    {.op = "concept_attention_compact",
     .B = 2, .Lq = 17, .Hq = 4, .Hkv = 1, .hd = 8, .pat = Pattern::AllOnes},
    {.op = "concept_attention_compact",
     .B = 2, .Lq = 19, .Hq = 2, .Hkv = 2, .hd = 8, .pat = Pattern::WholeRow},
    {.op = "concept_attention_compact",
     .B = 3, .Lq = 40, .Hq = 6, .Hkv = 3, .hd = 8, .pat = Pattern::MultiDoc},
    {.op = "concept_attention_compact",
     .B = 6, .Lq = 21, .Hq = 4, .Hkv = 2, .hd = 16, .pat = Pattern::Uneven},
    {.op = "concept_attention_compact", .B = 2, .Lq = 37, .Hq = 1, .Hkv = 1, .hd = 4},
    {.op = "concept_attention_compact",
     .B = 2, .Lq = 160, .Hq = 8, .Hkv = 2, .hd = 64, .pat = Pattern::MultiDoc},
    {.op = "concept_attention_compact",
     .B = 1, .Lq = 70, .Hq = 4, .Hkv = 2, .hd = 32, .pat = Pattern::WholeRow},
    {.op = "concept_attention_compact",
     .B = 1, .Lq = 150, .Hq = 2, .Hkv = 1, .hd = 24, .pat = Pattern::AllOnes},
    {.op = "concept_attention_compact", .B = 1, .Lq = 260, .Hq = 2, .Hkv = 2, .hd = 80},
    {.op = "concept_attention_compact",
     .B = 3, .Lq = 130, .Hq = 3, .Hkv = 1, .hd = 16, .pat = Pattern::Uneven},
    {.op = "concept_attention_compact",
     .B = 3, .Lq = 1, .Hq = 2, .Hkv = 1, .hd = 8, .pat = Pattern::Uneven},
    {.op = "concept_attention_replicate", .B = 2, .Lq = 23, .Hq = 4, .Hkv = 2, .hd = 8},
    {.op = "concept_attention_replicate",
     .B = 3, .Lq = 40, .Hq = 6, .Hkv = 3, .hd = 8, .pat = Pattern::MultiDoc},
    {.op = "concept_attention_replicate",
     .B = 1, .Lq = 150, .Hq = 2, .Hkv = 1, .hd = 24, .pat = Pattern::AllOnes},
    {.op = "concept_attention_replicate",
     .B = 1, .Lq = 70, .Hq = 4, .Hkv = 2, .hd = 32, .pat = Pattern::WholeRow},
    {.op = "concept_attention_masked", .B = 1, .Lq = 40, .Hq = 2, .Hkv = 2, .hd = 8},
    {.op = "concept_attention_masked",
     .B = 2, .Lq = 300, .Hq = 4, .Hkv = 2, .hd = 16, .pat = Pattern::MultiDoc},
    {.op = "concept_attention_masked",
     .B = 1, .Lq = 520, .Hq = 2, .Hkv = 1, .hd = 8, .pat = Pattern::AllOnes},
    {.op = "concept_attention_masked",
     .B = 1, .Lq = 257, .Hq = 2, .Hkv = 2, .hd = 8, .pat = Pattern::WholeRow},
    {.op = "concept_attention_compact",
     .B = 8, .Lq = 512, .Hq = 8, .Hkv = 8, .hd = 64, .perf = true},
    // dlcm-small's training step and its 128-token prefill
    {.op = "concept_attention_compact",
     .B = 8, .Lq = 256, .Hq = 4, .Hkv = 4, .hd = 64, .perf = true},
    {.op = "concept_attention_compact",
     .B = 1, .Lq = 128, .Hq = 4, .Hkv = 4, .hd = 64, .perf = true},
    // BF16 precision: the compact kernel on bf16 operands, on AMX tiles and as AVX512-BF16 dot
    // products as attention_bf16 (several key tiles, hd > 64 and odd, GQA, every pattern,
    // padded query blocks)
    {.op = "concept_attention_compact_bf16", .B = 2, .Lq = 23, .Hq = 4, .Hkv = 2, .hd = 8},
    {.op = "concept_attention_compact_bf16",
     .B = 2, .Lq = 160, .Hq = 8, .Hkv = 2, .hd = 64, .pat = Pattern::MultiDoc},
    {.op = "concept_attention_compact_bf16",
     .B = 1, .Lq = 150, .Hq = 2, .Hkv = 1, .hd = 24, .pat = Pattern::AllOnes},
    {.op = "concept_attention_compact_bf16",
     .B = 2, .Lq = 19, .Hq = 2, .Hkv = 2, .hd = 8, .pat = Pattern::WholeRow},
    {.op = "concept_attention_compact_bf16", .B = 1, .Lq = 260, .Hq = 2, .Hkv = 2, .hd = 80},
    {.op = "concept_attention_compact_bf16",
     .B = 3, .Lq = 130, .Hq = 3, .Hkv = 1, .hd = 5, .std = 2.0f, .pat = Pattern::Uneven},
    {.op = "concept_attention_compact_bf16",
     .B = 3, .Lq = 1, .Hq = 2, .Hkv = 1, .hd = 8, .pat = Pattern::Uneven},
    {.op = "concept_attention_compact_bf16",
     .B = 8, .Lq = 512, .Hq = 8, .Hkv = 8, .hd = 64, .perf = true},
    {.op = "concept_attention_replicate",
     .B = 8, .Lq = 512, .Hq = 8, .Hkv = 8, .hd = 64, .perf = true},
    {.op = "concept_attention_masked",
     .B = 8, .Lq = 512, .Hq = 8, .Hkv = 8, .hd = 64, .perf = true},
    {.op = "aux_loss", .B = 4, .Lq = 16},
    {.op = "aux_loss", .B = 8, .Lq = 5000},  // parallel path
    {.op = "aux_loss", .B = 8, .Lq = 512, .perf = true},
    {.op = "aux_loss_sequence", .B = 1, .Lq = 7},
    {.op = "aux_loss_sequence", .B = 5, .Lq = 16},
    {.op = "aux_loss_sequence", .B = 8, .Lq = 5000},  // parallel path
    {.op = "aux_loss_sequence", .B = 8, .Lq = 512, .perf = true},
};

enum Impl { Fast, Ref };
enum Mode { Check, Perf };
using Vec = std::vector<double>;

// An op: named inputs (finite differences perturb them in place), a forward that fills outs
// (outs[0] is projected by R; the rest, e.g. rstd or lse, are compared and passed to backward),
// and a backward that accumulates into grads given dout = R (none for ops without a gradient).
struct Harness {
  std::vector<std::string> names;
  std::vector<Buf> in;
  std::vector<i64> out_sizes;
  std::function<void(Impl, std::vector<Buf>&)> fwd;
  std::function<void(Impl, const std::vector<Buf>&, const float*, std::vector<Buf>&)> bwd;
  // Reference forward in double: inputs (converted from in), writes the projected output.
  std::function<void(const std::vector<Vec>&, Vec&)> fwd64;
  // Fast vs reference: max |fast - ref| / max(max |ref|, floor) <= tol. floor = 1 where an
  // exact-zero reference is legitimate (fast rounding noise there is not an error).
  double tol = 1e-5, floor = 1e-30;
  double fd_h = 1e-2, fd_tol = 2e-2;
  i64 fd_probes = 48;
  // Perf mode: FLOPs (compute-bound ops) or bytes moved (bandwidth-bound ops), {fwd, bwd}.
  std::array<double, 2> flops{}, bytes{};
};

std::vector<Buf> alloc(const std::vector<i64>& sizes, float fill = 0.0f) {
  std::vector<Buf> v;
  for (i64 s : sizes) v.emplace_back(size_t(s), fill);
  return v;
}

double scaled_err(const Buf& a, const Buf& b, double floor) {
  double scale = floor;
  for (float x : b) scale = std::max(scale, double(std::abs(x)));
  return test::max_abs_diff(a.data(), b.data(), i64(a.size())) / scale;
}

// Outputs and gradients get kGuard floats of kSentinel after them: an op that writes past a
// buffer (a loop bound off by one, a vector too many per row) fails the table, not only a
// sanitizer run (mutation checks found two such writers that no test saw, session 48 and 49).
constexpr i64 kGuard = 16;
constexpr float kSentinel = -12345.5f;
std::vector<Buf> with_guards(std::vector<Buf> v) {
  for (Buf& b : v) b.resize(b.size() + kGuard, kSentinel);
  return v;
}
// Checks each buffer's guard and removes it. A buffer the call replaced (an in-place op run on a
// copy of its input) has no guard left to check.
void check_guards(std::vector<Buf>& v, const std::vector<i64>& sizes, const std::string& what) {
  for (size_t i = 0; i < v.size(); ++i) {
    if (i64(v[i].size()) != sizes[i] + kGuard) continue;
    i64 written = 0;
    for (i64 e = sizes[i]; e < sizes[i] + kGuard; ++e) written += !(v[i][e] == kSentinel);
    EXPECT_EQ(written, 0) << what << " " << i << ": floats written past its end";
    v[i].resize(sizes[i]);
  }
}

// DLCM_OPS_TABLE_FD=0: the table without its finite differences, which check the double
// reference's gradient (test code) and are most of the table's time in an unoptimized build.
// The sanitizer phase (scripts/test_sanitize.sh) sets it: there the kernels' accesses are what
// is checked, and they all still run.
bool skip_finite_differences() {
  static const bool skip = [] {
    const char* v = std::getenv("DLCM_OPS_TABLE_FD");
    if (!v) return false;
    const std::string s(v);
    if (s != "0" && s != "1")
      throw std::runtime_error("DLCM_OPS_TABLE_FD='" + s + "': expected 0 (skip) or 1 (run)");
    if (s == "0") std::fprintf(stderr, "[test_ops] DLCM_OPS_TABLE_FD=0: no finite differences\n");
    return s == "0";
  }();
  return skip;
}

void run_harness(Harness& H, uint64_t seed) {
  std::vector<i64> in_sizes;
  for (auto& x : H.in) in_sizes.push_back(i64(x.size()));
  // NaN-poisoned, not zeroed: every element an op must write (pads included) is checked written
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto of = with_guards(alloc(H.out_sizes, nan)), orf = with_guards(alloc(H.out_sizes, nan));
  H.fwd(Fast, of);
  H.fwd(Ref, orf);
  check_guards(of, H.out_sizes, "forward output");
  check_guards(orf, H.out_sizes, "reference forward output");
  for (size_t i = 0; i < of.size(); ++i)
    EXPECT_LE(scaled_err(of[i], orf[i], H.floor), H.tol) << "forward output " << i;
  if (!H.bwd) return;

  Buf R(of[0].size());
  test::fill_normal(R.data(), i64(R.size()), seed + 100);
  // Gradients start from the same random values G0, so accumulation (+=) is part of the test.
  auto g0 = alloc(in_sizes);
  for (size_t i = 0; i < g0.size(); ++i)
    test::fill_normal(g0[i].data(), i64(g0[i].size()), seed + 200 + i);
  auto gf = with_guards(g0), gr = with_guards(g0);
  H.bwd(Fast, of, R.data(), gf);
  H.bwd(Ref, orf, R.data(), gr);
  check_guards(gf, in_sizes, "gradient");
  check_guards(gr, in_sizes, "reference gradient");
  for (size_t i = 0; i < gf.size(); ++i) {
    for (size_t e = 0; e < gf[i].size(); ++e) {
      gf[i][e] -= g0[i][e];
      gr[i][e] -= g0[i][e];
    }
    EXPECT_LE(scaled_err(gf[i], gr[i], H.floor), H.tol)
        << "gradient of " << H.names[i] << " vs reference";
  }

  if (skip_finite_differences()) return;
  std::vector<Vec> in64(H.in.size());
  Vec out64(R.size());
  for (size_t i = 0; i < H.in.size(); ++i) {
    auto loss = [&] {
      for (size_t u = 0; u < H.in.size(); ++u) in64[u].assign(H.in[u].begin(), H.in[u].end());
      H.fwd64(in64, out64);
      double s = 0;
      for (size_t e = 0; e < R.size(); ++e) s += out64[e] * double(R[e]);
      return s;
    };
    test::check_grad(H.names[i], H.in[i].data(), gf[i].data(), i64(H.in[i].size()), loss,
                     H.fd_h, H.fd_tol, H.fd_probes);
  }
}

// Non-temporal store thresholds set for a scope, restored at exit (also when a check throws).
using StreamOutputsScope = SettingScope<i64, ops::stream_outputs, ops::set_stream_outputs>;
using AmxStreamScope = SettingScope<i64, ops::amx_stream_bytes, ops::set_amx_stream_bytes>;

// Writes 64 MB (untimed, a float per 64-byte line of a buffer kept between calls), so that the
// next timed call finds its operands in memory, as a training step's or a prefill's other work
// between two products leaves them, not in the caches of the call before.
void evict_caches() {
  static std::vector<float> junk((64 << 20) / 4);
  for (size_t i = 0; i < junk.size(); i += 16) junk[i] += 1.f;
}

// Perf mode: best time of fn over repeated calls (at least 3, about 0.3 s), printed with the
// rate: GFLOP/s when flops > 0, else GB/s of `bytes`.
void perf_row(const Case& c, const char* pass, double flops, double bytes,
              const std::function<void()>& fn) {
  using clk = std::chrono::steady_clock;
  fn();  // warm-up: first-touch pages, oneDNN primitive creation
  double best = 1e30, total = 0;
  // DLCM_PERF_COLD=1: the caches evicted before each repeat, so the operands come from memory
  // as a prefill's weights do
  static const bool cold = std::getenv("DLCM_PERF_COLD") != nullptr;
  for (int rep = 0; rep < 200 && (rep < 3 || total < 0.3); ++rep) {
    if (cold) evict_caches();
    const auto t0 = clk::now();
    fn();
    const double s = std::chrono::duration<double>(clk::now() - t0).count();
    best = std::min(best, s);
    total += s;
  }
  const bool compute = flops > 0;
  std::printf("%-28s %-44s %-11s %9.3f ms %9.1f %s\n", c.op, describe(c).c_str(), pass,
              best * 1e3, (compute ? flops : bytes) / best * 1e-9, compute ? "GFLOP/s" : "GB/s");
  std::fflush(stdout);
}

// Perf mode: time ratios of fn under two settings in adjacent calls (set(false), then
// set(true): the second's time over the first's), 31 pairs, median and quartiles; the caches are
// evicted before each timed call (a training step's other work leaves them so between two
// passes). On hosts whose rate swings between periods (this AMX host's 2x), best-of rows of
// their own would compare the periods.
void paired_row(const Case& c, const char* pass, const char* what,
                const std::function<void(bool)>& set, const std::function<void()>& fn) {
  using clk = std::chrono::steady_clock;
  std::vector<double> r;
  for (int i = 0; i < 31; ++i) {
    double t[2];
    for (bool second : {false, true}) {
      set(second);
      fn();  // unmeasured: scratch sized
      evict_caches();
      const auto t0 = clk::now();
      fn();
      t[second] = std::chrono::duration<double>(clk::now() - t0).count();
    }
    r.push_back(t[1] / t[0]);
  }
  std::sort(r.begin(), r.end());
  std::printf("%-28s %-44s %-11s %.3fx (quartiles %.3fx-%.3fx): %s, 31 pairs\n", c.op,
              describe(c).c_str(), pass, r[15], r[7], r[23], what);
  std::fflush(stdout);
}

// Check: run the harness and return true (the caller goes on with its extras). Perf: time the
// fast forward and backward and return false.
bool finish(Harness& H, const Case& c, Mode m, uint64_t seed) {
  if (m == Check) {
    run_harness(H, seed);
    return true;
  }
  auto outs = alloc(H.out_sizes);
  perf_row(c, "forward", H.flops[0], H.bytes[0], [&] { H.fwd(Fast, outs); });
  if (H.bwd) {
    std::vector<i64> in_sizes;
    for (auto& x : H.in) in_sizes.push_back(i64(x.size()));
    auto grads = alloc(in_sizes);
    Buf R(outs[0].size());
    test::fill_normal(R.data(), i64(R.size()), seed + 100);
    perf_row(c, "backward", H.flops[1], H.bytes[1],
             [&] { H.bwd(Fast, outs, R.data(), grads); });
  }
  return false;
}

void run_embedding(const Case& c, Mode m) {
  const i64 N = c.N, d = c.d, V = c.V;
  std::vector<i32> ids(N);
  for (i64 n = 0; n < N; ++n) ids[n] = i32((n * 7 + 3) % V);
  Harness H;
  H.names = {"table"};
  H.in = {Buf(V * d)};
  test::fill_normal(H.in[0].data(), V * d, 1, c.std);
  H.out_sizes = {N * d};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    (im == Fast ? ops::embedding_forward : ops::ref::embedding_forward<float>)(o[0].data(), ids.data(),
                                                                        H.in[0].data(), N, d);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    ops::ref::embedding_forward<double>(o.data(), ids.data(), in[0].data(), N, d);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>&, const float* dout, std::vector<Buf>& g) {
    (im == Fast ? ops::embedding_backward : ops::ref::embedding_backward)(g[0].data(), dout,
                                                                          ids.data(), N, d);
  };
  H.bytes = {2.0 * N * d * 4, 3.0 * N * d * 4};
  if (!finish(H, c, m, 11)) return;
}

// A producer's optional bf16 output (kernels/gemm.h, ops::CopyProducer): with it the floats are
// those of the call without it (want), and r16 holds their rounding as the BF16 products round.
void expect_rounding_written(const std::string& what, const Buf& want, const Buf& got,
                             const std::vector<uint16_t>& r16) {
  ASSERT_EQ(want.size(), got.size());
  ASSERT_EQ(got.size(), r16.size());
  EXPECT_EQ(0, std::memcmp(want.data(), got.data(), sizeof(float) * got.size()))
      << what << ": the floats changed";
  std::vector<uint16_t> r(got.size());
  ops::round_to_bf16(r.data(), got.data(), i64(got.size()));
  i64 bad = 0;
  for (size_t i = 0; i < r.size(); ++i) bad += r[i] != r16[i];
  EXPECT_EQ(bad, 0) << what << ": elements whose bf16 copy is not their rounding";
}

void run_rmsnorm(const Case& c, Mode m) {
  const i64 N = c.N, d = c.d;
  const float eps = 1e-5f;
  Harness H;
  H.names = {"x", "w"};
  H.in = {Buf(N * d), Buf(d)};
  test::fill_normal(H.in[0].data(), N * d, 2, c.std);
  test::fill_uniform(H.in[1].data(), d, 3, 0.5f, 1.5f);
  H.out_sizes = {N * d, N};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    if (im == Fast)
      ops::rmsnorm_forward(o[0].data(), o[1].data(), H.in[0].data(), H.in[1].data(), N, d, eps);
    else
      ops::ref::rmsnorm_forward<float>(o[0].data(), o[1].data(), H.in[0].data(), H.in[1].data(),
                                       N, d, eps);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    Vec r(N);
    ops::ref::rmsnorm_forward<double>(o.data(), r.data(), in[0].data(), in[1].data(), N, d, eps);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>& o, const float* dout, std::vector<Buf>& g) {
    if (im == Fast)
      ops::rmsnorm_backward(g[0].data(), g[1].data(), dout, H.in[0].data(), H.in[1].data(),
                            o[1].data(), N, d);
    else
      ops::ref::rmsnorm_backward(g[0].data(), g[1].data(), dout, H.in[0].data(), H.in[1].data(),
                                 o[1].data(), N, d);
  };
  H.bytes = {2.0 * N * d * 4, 4.0 * N * d * 4};
  if (!finish(H, c, m, 12)) return;

  // A residual gradient res joins in the same pass: dx (+)= res + the gradient is bit for bit
  // (dx + res) accumulated with the gradient, and accumulate = false never reads dx (NaN there
  // must not leak). dw accumulates in every form.
  auto o = alloc(H.out_sizes);
  H.fwd(Fast, o);
  Buf dy(N * d), res(N * d), dx0(N * d);
  test::fill_normal(dy.data(), N * d, 13);
  test::fill_normal(res.data(), N * d, 14);
  test::fill_normal(dx0.data(), N * d, 15);
  const float* x = H.in[0].data();
  const float* w = H.in[1].data();
  for (const float* r : {static_cast<const float*>(nullptr), static_cast<const float*>(res.data())})
    for (bool acc : {true, false}) {
      Buf want(acc ? dx0 : Buf(N * d, 0.f)), dw1(d, 0.5f);
      if (r)
        for (i64 i = 0; i < N * d; ++i) want[i] += r[i];
      ops::rmsnorm_backward(want.data(), dw1.data(), dy.data(), x, w, o[1].data(), N, d);
      // dx with a guard after it: each form writes its rows and nothing past them
      constexpr i64 kGuard = 16;
      Buf got(acc ? dx0 : Buf(N * d, NAN)), dw2(d, 0.5f);
      got.resize(N * d + kGuard, -7.f);
      ops::rmsnorm_backward(got.data(), dw2.data(), dy.data(), x, w, o[1].data(), N, d, r, acc);
      i64 bad = 0, guard = 0;
      for (i64 i = 0; i < N * d; ++i) bad += !(got[i] == want[i]);
      for (i64 i = N * d; i < N * d + kGuard; ++i) guard += got[i] != -7.f;
      got.resize(N * d);
      EXPECT_EQ(bad, 0) << c.op << " res=" << (r != nullptr) << " accumulate=" << acc;
      EXPECT_EQ(guard, 0) << c.op << " res=" << (r != nullptr) << " accumulate=" << acc
                          << ": written past dx";
      EXPECT_EQ(dw1, dw2) << c.op << " res=" << (r != nullptr) << " accumulate=" << acc;
      // the same call writing dx's rounding too (a producer of a BF16 product's dy)
      Buf got16(acc ? dx0 : Buf(N * d, NAN)), dw3(d, 0.5f);
      std::vector<uint16_t> dx16(N * d);
      ops::rmsnorm_backward(got16.data(), dw3.data(), dy.data(), x, w, o[1].data(), N, d, r, acc,
                            dx16.data());
      expect_rounding_written(std::string(c.op) + " backward", got, got16, dx16);
    }
  // forward with y's rounding (a producer of a BF16 product's input)
  auto o16 = alloc(H.out_sizes);
  std::vector<uint16_t> y16(N * d);
  ops::rmsnorm_forward(o16[0].data(), o16[1].data(), x, w, N, d, eps, y16.data());
  expect_rounding_written(std::string(c.op) + " forward", o[0], o16[0], y16);
  EXPECT_EQ(o[1], o16[1]) << c.op << " rstd";
  // the rounding alone (y null: CopyProducer::floats skipped them): the same bits and rstd
  std::vector<uint16_t> y16only(N * d, 0xFFFF);
  Buf rstd_only(N, NAN);
  ops::rmsnorm_forward(nullptr, rstd_only.data(), x, w, N, d, eps, y16only.data());
  EXPECT_EQ(y16only, y16) << c.op << " forward, the rounding alone";
  EXPECT_EQ(rstd_only, o16[1]) << c.op << " forward, the rounding alone: rstd";
}

void run_rope(const Case& c, Mode m) {
  const i64 N = c.N, Hh = c.Hq, hd = c.hd;
  const float theta = 10000.0f;
  std::vector<i32> pos(N);
  for (i64 n = 0; n < N; ++n) pos[n] = i32((n * 2654435761u) % 16384);  // up to 16k
  Harness H;
  H.names = {"x"};
  H.in = {Buf(N * Hh * hd)};
  test::fill_normal(H.in[0].data(), N * Hh * hd, 4, c.std);
  H.out_sizes = {N * Hh * hd};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    if (m == Check) o[0] = H.in[0];  // perf: rotate in place, the rotation keeps the scale
    if (im == Fast)
      ops::rope_apply(o[0].data(), pos.data(), N, Hh, hd, theta, false);
    else
      ops::ref::rope_apply<float>(o[0].data(), pos.data(), N, Hh, hd, theta, false);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    o = in[0];
    ops::ref::rope_apply<double>(o.data(), pos.data(), N, Hh, hd, theta, false);
  };
  // The transpose rotation is the backward.
  H.bwd = [&](Impl im, const std::vector<Buf>&, const float* dout, std::vector<Buf>& g) {
    if (m == Perf) {
      ops::rope_apply(g[0].data(), pos.data(), N, Hh, hd, theta, true);
      return;
    }
    Buf t(dout, dout + N * Hh * hd);
    if (im == Fast)
      ops::rope_apply(t.data(), pos.data(), N, Hh, hd, theta, true);
    else
      ops::ref::rope_apply<float>(t.data(), pos.data(), N, Hh, hd, theta, true);
    for (size_t i = 0; i < t.size(); ++i) g[0][i] += t[i];
  };
  H.bytes = {2.0 * N * Hh * hd * 4, 2.0 * N * Hh * hd * 4};
  if (!finish(H, c, m, 13)) return;

  // inverse(forward(x)) == x.
  Buf x = H.in[0];
  ops::rope_apply(x.data(), pos.data(), N, Hh, hd, theta, false);
  ops::rope_apply(x.data(), pos.data(), N, Hh, hd, theta, true);
  EXPECT_LT(test::rel_err(x.data(), H.in[0].data(), i64(x.size())), 1e-5);

  // BF16 producer forms (the q/k products' dy, both directions): the rotated values' rounding
  // with them, the same floats; or the rounding alone, x left as it was
  for (bool inverse : {false, true}) {
    const std::string at = std::string(c.op) + (inverse ? " inverse" : " forward");
    Buf want = H.in[0], got = H.in[0], kept = H.in[0];
    ops::rope_apply(want.data(), pos.data(), N, Hh, hd, theta, inverse);
    std::vector<uint16_t> x16(N * Hh * hd), only16(N * Hh * hd, 0xFFFF);
    ops::rope_apply(got.data(), pos.data(), N, Hh, hd, theta, inverse, x16.data());
    expect_rounding_written(at, want, got, x16);
    ops::rope_apply(kept.data(), pos.data(), N, Hh, hd, theta, inverse, only16.data(), false);
    EXPECT_EQ(only16, x16) << at << ", the rounding alone";
    EXPECT_EQ(0, std::memcmp(kept.data(), H.in[0].data(), sizeof(float) * kept.size()))
        << at << ": x changed without write_x";
  }
}

void run_swiglu(const Case& c, Mode m) {
  const i64 n = c.N * c.d;
  Harness H;
  H.names = {"a", "b"};
  H.in = {Buf(n), Buf(n)};
  test::fill_normal(H.in[0].data(), n, 5, c.std);
  test::fill_normal(H.in[1].data(), n, 6, 1.0f);
  H.out_sizes = {n};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    if (im == Fast)
      ops::swiglu_forward(o[0].data(), H.in[0].data(), H.in[1].data(), n);
    else
      ops::ref::swiglu_forward<float>(o[0].data(), H.in[0].data(), H.in[1].data(), n);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    ops::ref::swiglu_forward<double>(o.data(), in[0].data(), in[1].data(), n);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>&, const float* dout, std::vector<Buf>& g) {
    if (im == Fast)
      ops::swiglu_backward(g[0].data(), g[1].data(), dout, H.in[0].data(), H.in[1].data(), n);
    else
      ops::ref::swiglu_backward(g[0].data(), g[1].data(), dout, H.in[0].data(), H.in[1].data(),
                                n, true);
  };
  H.bytes = {3.0 * n * 4, 7.0 * n * 4};
  if (m == Perf) {  // BF16's forms, non-temporal outputs or ordinary stores (set_stream_outputs)
    finish(H, c, m, 14);
    const i64 stream0 = ops::stream_outputs();
    const StreamOutputsScope restore(stream0);
    const auto plain = [&](bool p) { ops::set_stream_outputs(p ? 0 : stream0); };
    const char* what = "ordinary stores' time / non-temporal's";
    Buf h(n), dh(n), da(n), db(n);
    std::vector<uint16_t> h16(n), da16(n), db16(n);
    test::fill_normal(dh.data(), n, 15);
    const float *a = H.in[0].data(), *b = H.in[1].data();
    paired_row(c, "fwd nt/pl", what, plain,
               [&] { ops::swiglu_forward(h.data(), a, b, n, h16.data()); });
    paired_row(c, "bwd nt/pl", what, plain, [&] {
      ops::swiglu_backward(da.data(), db.data(), dh.data(), a, b, n, false, da16.data(),
                           db16.data());
    });
    return;
  }
  if (!finish(H, c, m, 14)) return;

  // accumulate = false writes the gradients without reading da/db (NaN there must not leak):
  // the bits of accumulating into zeros, in both implementations
  Buf dh(n), z0(n, 0.f), z1(n, 0.f), w0(n, NAN), w1(n, NAN);
  test::fill_normal(dh.data(), n, 15);
  for (Impl im : {Fast, Ref}) {
    auto bwd = [im](float* da, float* db, const float* dh, const float* a, const float* b, i64 n,
                    bool acc) {
      if (im == Fast)
        ops::swiglu_backward(da, db, dh, a, b, n, acc);
      else
        ops::ref::swiglu_backward(da, db, dh, a, b, n, acc);
    };
    std::fill(z0.begin(), z0.end(), 0.f), std::fill(z1.begin(), z1.end(), 0.f);
    std::fill(w0.begin(), w0.end(), NAN), std::fill(w1.begin(), w1.end(), NAN);
    bwd(z0.data(), z1.data(), dh.data(), H.in[0].data(), H.in[1].data(), n, true);
    bwd(w0.data(), w1.data(), dh.data(), H.in[0].data(), H.in[1].data(), n, false);
    EXPECT_EQ(0, std::memcmp(z0.data(), w0.data(), sizeof(float) * n)) << c.op << " da";
    EXPECT_EQ(0, std::memcmp(z1.data(), w1.data(), sizeof(float) * n)) << c.op << " db";
  }
  // The producer forms (the outputs' bf16 roundings written in the same pass), both backward
  // forms: the same floats, and the roundings of the BF16 products bit for bit.
  Buf h(n), h2(n);
  std::vector<uint16_t> h16(n), da16(n), db16(n);
  ops::swiglu_forward(h.data(), H.in[0].data(), H.in[1].data(), n);
  ops::swiglu_forward(h2.data(), H.in[0].data(), H.in[1].data(), n, h16.data());
  expect_rounding_written(std::string(c.op) + " forward", h, h2, h16);
  for (bool acc : {true, false}) {
    Buf a0(n, 0.25f), b0(n, -0.5f), a1(a0), b1(b0);
    ops::swiglu_backward(a0.data(), b0.data(), dh.data(), H.in[0].data(), H.in[1].data(), n, acc);
    ops::swiglu_backward(a1.data(), b1.data(), dh.data(), H.in[0].data(), H.in[1].data(), n, acc,
                         da16.data(), db16.data());
    expect_rounding_written(std::string(c.op) + " backward da", a0, a1, da16);
    expect_rounding_written(std::string(c.op) + " backward db", b0, b1, db16);
  }
  // the roundings alone (the floats null: CopyProducer::floats skipped them), ordinary and
  // non-temporal stores: the same bits as with the floats
  for (i64 stream : {i64(0), i64(1)}) {
    const StreamOutputsScope restore(stream);
    const std::string at = std::string(c.op) + (stream ? " streamed" : " plain");
    Buf hf(n), af(n), bf(n);
    std::vector<uint16_t> h16f(n), a16f(n), b16f(n), h16o(n, 0xFFFF), a16o(n, 0xFFFF),
        b16o(n, 0xFFFF);
    ops::swiglu_forward(hf.data(), H.in[0].data(), H.in[1].data(), n, h16f.data());
    ops::swiglu_forward(nullptr, H.in[0].data(), H.in[1].data(), n, h16o.data());
    EXPECT_EQ(h16o, h16f) << at << " forward, the rounding alone";
    ops::swiglu_backward(af.data(), bf.data(), dh.data(), H.in[0].data(), H.in[1].data(), n,
                         false, a16f.data(), b16f.data());
    ops::swiglu_backward(nullptr, nullptr, dh.data(), H.in[0].data(), H.in[1].data(), n, false,
                         a16o.data(), b16o.data());
    EXPECT_EQ(a16o, a16f) << at << " backward, da's rounding alone";
    EXPECT_EQ(b16o, b16f) << at << " backward, db's rounding alone";
    Buf keep_b(n, 0.5f);  // one of the two skipped, the other written
    ops::swiglu_backward(nullptr, keep_b.data(), dh.data(), H.in[0].data(), H.in[1].data(), n,
                         false, a16o.data(), nullptr);
    EXPECT_EQ(a16o, a16f) << at << " backward, da's rounding alone, db written";
    EXPECT_EQ(0, std::memcmp(keep_b.data(), bf.data(), sizeof(float) * n)) << at << " db";
  }
  EXPECT_THROW(ops::swiglu_backward(nullptr, nullptr, dh.data(), H.in[0].data(), H.in[1].data(),
                                    n, true, da16.data(), db16.data()),
               Error)
      << "accumulating into a gradient that is not there";

  // Non-temporal outputs (ops::set_stream_outputs; every size streams with a threshold of one
  // byte): the same bits as ordinary stores, also where the outputs start off the 64-byte grid
  // (offset 1: the ordinary-store fallback), and the streaming path ran at the AVX-512 level.
  const StreamOutputsScope restore(ops::stream_outputs());
  for (i64 off : {i64(0), i64(1)}) {
    const std::string at = std::string(c.op) + " offset " + std::to_string(off);
    Buf hs(n + 16), hp(n + 16), gs[2] = {Buf(n + 16), Buf(n + 16)}, gp[2] = {gs[0], gs[1]};
    std::vector<uint16_t> h16s(n + 32), h16p(n + 32), c16s[2], c16p[2];
    for (int i = 0; i < 2; ++i) c16s[i] = c16p[i] = h16s;
    for (bool stream : {false, true}) {
      ops::set_stream_outputs(stream ? 1 : 0);
      const i64 before = ops::streamed_outputs();
      Buf& ho = stream ? hs : hp;
      std::vector<uint16_t>& h16o = stream ? h16s : h16p;
      ops::swiglu_forward(ho.data() + off, H.in[0].data(), H.in[1].data(), n, h16o.data() + off);
      Buf* g = stream ? gs : gp;
      std::vector<uint16_t>* c16 = stream ? c16s : c16p;
      ops::swiglu_backward(g[0].data() + off, g[1].data() + off, dh.data(), H.in[0].data(),
                           H.in[1].data(), n, false, c16[0].data() + off, c16[1].data() + off);
      if (stream && ops::isa() == ops::Isa::Avx512) {
        EXPECT_EQ(ops::streamed_outputs(), before + 2) << at << ": the streaming path ran";
      }
      if (!stream) {
        EXPECT_EQ(ops::streamed_outputs(), before) << at;
      }
    }
    EXPECT_EQ(0, std::memcmp(hs.data(), hp.data(), sizeof(float) * hs.size())) << at << " h";
    EXPECT_EQ(h16s, h16p) << at << " h's rounding";
    for (int i = 0; i < 2; ++i) {
      EXPECT_EQ(0, std::memcmp(gs[i].data(), gp[i].data(), sizeof(float) * gs[i].size()))
          << at << (i ? " db" : " da");
      EXPECT_EQ(c16s[i], c16p[i]) << at << (i ? " db's rounding" : " da's rounding");
    }
  }
}

void run_attention_at(const Case& c, Mode m, bool bf16) {
  const i64 B = c.B, Lq = c.Lq, Lk = c.Lk, Hq = c.Hq, Hkv = c.Hkv, hd = c.hd, qo = c.q_offset;
  const float scale = 1.0f / std::sqrt(float(hd));
  Harness H;
  H.names = {"q", "k", "v"};
  H.in = {Buf(B * Lq * Hq * hd), Buf(B * Lk * Hkv * hd), Buf(B * Lk * Hkv * hd)};
  for (int i = 0; i < 3; ++i) test::fill_normal(H.in[i].data(), i64(H.in[i].size()), 20 + i, c.std);
  H.out_sizes = {B * Lq * Hq * hd, B * Hq * Lq};
  // A query that sees one key has dq = 0 and gives that key dk = 0 in theory; in practice the
  // rounding noise of dP - D (a few 1e-9 where Lq = Lk = 1, all of dq and dk) is what is left,
  // and its bits depend on how the compiler contracted the sums (an -O0 build differs). So the
  // errors are measured against max(max |ref|, 1), as for the concept attention.
  H.floor = 1;
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    (im == Fast ? ops::attention_forward : ops::ref::attention_forward<float>)(
        o[0].data(), o[1].data(), H.in[0].data(), H.in[1].data(), H.in[2].data(), B, Lq, Lk, Hq,
        Hkv, hd, qo, scale, 0);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    Vec lse(B * Hq * Lq);
    ops::ref::attention_forward<double>(o.data(), lse.data(), in[0].data(), in[1].data(),
                                        in[2].data(), B, Lq, Lk, Hq, Hkv, hd, qo, scale);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>& o, const float* dout, std::vector<Buf>& g) {
    if (im == Fast)
      ops::attention_backward(g[0].data(), g[1].data(), g[2].data(), dout, o[0].data(),
                              o[1].data(), H.in[0].data(), H.in[1].data(), H.in[2].data(), B, Lq,
                              Lk, Hq, Hkv, hd, qo, scale, 0);
    else
      ops::ref::attention_backward(g[0].data(), g[1].data(), g[2].data(), dout, o[0].data(),
                                   o[1].data(), H.in[0].data(), H.in[1].data(), H.in[2].data(), B,
                                   Lq, Lk, Hq, Hkv, hd, qo, scale, 0);
  };
  // Multiply-adds of the visible (query, key) pairs: QK^T and PV forward; the backward
  // recomputes QK^T and forms dP, dV, dQ, dK.
  double pairs = 0;
  for (i64 i = 0; i < Lq; ++i) pairs += double(std::min(Lk, qo + i + 1));
  H.flops = {4.0 * B * Hq * pairs * hd, 10.0 * B * Hq * pairs * hd};
  std::optional<ops::PrecisionScope> prec;
  if (bf16) prec.emplace(ops::Precision::BF16);
  // bf16 operands (AMX tiles or AVX512-BF16 dot products) where BF16 meets such a CPU, the
  // native units and the avx512 kernels
  const bool amx = ops::attention_units() != ops::AttentionUnits::Fp32;
  if (amx) {
    // bf16 operands (8 significant bits) in every tile product: within 2% of the largest
    // output or gradient of the reference (whose gradients the FP32 rows check by finite
    // differences; per-entry finite differences do not fit bf16 noise on near-zero entries)
    H.tol = 2e-2;
    H.fd_probes = 0;
  }
  if (m == Perf && amx) {  // the forward's output with non-temporal stores or ordinary ones
    finish(H, c, m, 15);
    const i64 stream0 = ops::stream_outputs();
    const StreamOutputsScope restore(stream0);
    std::vector<Buf> o = {Buf(H.out_sizes[0]), Buf(H.out_sizes[1])};
    paired_row(
        c, "fwd nt/pl", "ordinary stores' time / non-temporal's",
        [&](bool p) { ops::set_stream_outputs(p ? 0 : stream0); }, [&] { H.fwd(Fast, o); });
    return;
  }
  if (!finish(H, c, m, 15)) return;
  if (amx) {  // the output streamed (every size with a threshold of one byte): the same bits
    std::vector<Buf> o0 = {Buf(H.out_sizes[0]), Buf(H.out_sizes[1])}, o1 = o0;
    {
      const StreamOutputsScope plain(0);
      H.fwd(Fast, o0);
      ops::set_stream_outputs(1);
      const i64 before = ops::streamed_outputs();
      H.fwd(Fast, o1);
      // the few-queries path (decoding: attention_forward_rows) keeps ordinary stores
      if (!ops::attention_forward_uses_rows(Lq, Hq, Hkv)) {
        EXPECT_EQ(ops::streamed_outputs(), before + 1) << c.op << ": the streaming path ran";
      }
    }
    EXPECT_EQ(0, std::memcmp(o0[0].data(), o1[0].data(), sizeof(float) * o0[0].size()))
        << c.op << " " << describe(c) << ": streamed output";
    EXPECT_EQ(0, std::memcmp(o0[1].data(), o1[1].data(), sizeof(float) * o0[1].size()))
        << c.op << " " << describe(c) << ": lse";
  }
  if (amx) {
    // the bf16 path really ran: the backward (always bf16) is not the FP32 kernel's
    auto o = alloc(H.out_sizes);
    H.fwd(Fast, o);
    std::vector<i64> in_sizes;
    for (auto& x : H.in) in_sizes.push_back(i64(x.size()));
    auto g16 = alloc(in_sizes), g32 = alloc(in_sizes);
    Buf R(o[0].size());
    test::fill_normal(R.data(), i64(R.size()), 99);
    H.bwd(Fast, o, R.data(), g16);
    {
      ops::PrecisionScope fp(ops::Precision::FP32);
      H.bwd(Fast, o, R.data(), g32);
    }
    EXPECT_GT(scaled_err(g16[2], g32[2], 1e-30), 1e-5) << "bf16 attention equals the FP32 one";
    // and the forward ran on the tiles too (the row path for few queries stays FP32)
    if (c.Lq >= 16) {
      auto o32 = alloc(H.out_sizes);
      ops::PrecisionScope fp(ops::Precision::FP32);
      H.fwd(Fast, o32);
      EXPECT_GT(scaled_err(o[0], o32[0], 1e-30), 1e-5) << "bf16 forward equals the FP32 one";
    }
  }

  // accumulate = false writes dq/dk/dv without reading them (NaN there must not leak, keys no
  // query sees get 0): the values of accumulating into zeros, FP32 and on the tiles alike
  {
    auto o = alloc(H.out_sizes);
    H.fwd(Fast, o);
    Buf R(o[0].size());
    test::fill_normal(R.data(), i64(R.size()), 98);
    std::vector<i64> in_sizes;
    for (auto& x : H.in) in_sizes.push_back(i64(x.size()));
    auto acc = alloc(in_sizes), set = alloc(in_sizes);
    for (auto& g : set) std::fill(g.begin(), g.end(), NAN);
    H.bwd(Fast, o, R.data(), acc);
    ops::attention_backward(set[0].data(), set[1].data(), set[2].data(), R.data(), o[0].data(),
                            o[1].data(), H.in[0].data(), H.in[1].data(), H.in[2].data(), B, Lq,
                            Lk, Hq, Hkv, hd, qo, scale, 0, false);
    for (int x = 0; x < 3; ++x) {
      i64 bad = 0;
      for (size_t e = 0; e < acc[x].size(); ++e) bad += !(acc[x][e] == set[x][e]);
      EXPECT_EQ(bad, 0) << c.op << " accumulate=false, " << H.names[x] << ": " << bad
                        << " entries differ from accumulating into zeros";
    }
    {  // the gradients streamed (threshold of one byte; the avx512 level): the same bits
      auto streamed = alloc(in_sizes);
      const StreamOutputsScope restore(1);
      const i64 before = ops::streamed_outputs();
      ops::attention_backward(streamed[0].data(), streamed[1].data(), streamed[2].data(),
                              R.data(), o[0].data(), o[1].data(), H.in[0].data(),
                              H.in[1].data(), H.in[2].data(), B, Lq, Lk, Hq, Hkv, hd, qo, scale,
                              0, false);
      EXPECT_EQ(ops::streamed_outputs(), before + (ops::isa() == ops::Isa::Avx512 ? 1 : 0))
          << c.op << ": the backward streamed at the avx512 level only";
      for (int x = 0; x < 3; ++x)
        EXPECT_EQ(0, std::memcmp(streamed[x].data(), set[x].data(), sizeof(float) * set[x].size()))
            << c.op << " " << describe(c) << ": streamed " << H.names[x];
    }
  }

  // Causality: replacing k/v at positions > q_offset + i leaves rows <= i bit-identical.
  const i64 i = Lq / 2, first_hidden = qo + i + 1;
  if (first_hidden < Lk) {
    auto o1 = alloc(H.out_sizes), o2 = alloc(H.out_sizes);
    H.fwd(Fast, o1);
    for (i64 b = 0; b < B; ++b)
      for (i64 j = first_hidden; j < Lk; ++j)
        for (i64 x = 0; x < Hkv * hd; ++x) {
          H.in[1][(b * Lk + j) * Hkv * hd + x] += 5.0f;
          H.in[2][(b * Lk + j) * Hkv * hd + x] -= 7.0f;
        }
    H.fwd(Fast, o2);
    bool later_changed = false;
    for (i64 b = 0; b < B; ++b)
      for (i64 r = 0; r < Lq; ++r) {
        const i64 off = (b * Lq + r) * Hq * hd;
        double diff = test::max_abs_diff(o1[0].data() + off, o2[0].data() + off, Hq * hd);
        if (r <= i) {
          EXPECT_EQ(diff, 0.0) << "row " << r << " saw a key after position " << qo + r;
        } else {
          later_changed |= diff > 0;
        }
      }
    // The perturbation is real: rows that may see those keys do change.
    if (qo + Lq - 1 >= first_hidden) {
      EXPECT_TRUE(later_changed);
    }
  }
}

void run_attention(const Case& c, Mode m) { run_attention_at(c, m, false); }
// On an AMX CPU the BF16 attention also runs as AVX512-BF16 dot products (the units of a CPU
// without AMX) for the scope.
struct AttentionTilesOff {
  AttentionTilesOff() { ops::set_attention_tiles(false); }
  ~AttentionTilesOff() { ops::set_attention_tiles(true); }
};
bool amx_kernels() { return ops::amx_bf16_usable() && ops::isa() == ops::Isa::Avx512; }

void run_attention_bf16(const Case& c, Mode m) {
  if (!ops::cpu_has_bf16()) return;  // BF16 precision needs AVX512-BF16
  run_attention_at(c, m, true);  // AMX tiles where there are, else dot products
  if (amx_kernels()) {
    AttentionTilesOff dot;
    run_attention_at(c, m, true);
  }
}

void run_cross_entropy(const Case& c, Mode m) {
  const i64 N = c.N, V = c.V;
  std::vector<i32> tg(N);
  for (i64 n = 0; n < N; ++n) tg[n] = (N > 1 && n % 3 == 1) ? -1 : i32((n * 5 + 2) % V);
  Harness H;
  H.names = {"logits"};
  H.in = {Buf(N * V)};
  test::fill_normal(H.in[0].data(), N * V, 7, c.std);
  H.out_sizes = {N};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    (im == Fast ? ops::cross_entropy_forward : ops::ref::cross_entropy_forward<float>)(
        H.in[0].data(), tg.data(), N, V, o[0].data());
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    ops::ref::cross_entropy_forward<double>(in[0].data(), tg.data(), N, V, o.data());
  };
  // The fused kernel takes one grad_scale for all rows; dout (per-row) is applied afterwards.
  const float gs = 0.37f;
  H.bwd = [&](Impl im, const std::vector<Buf>&, const float* dout, std::vector<Buf>& g) {
    if (m == Perf) {  // the fused kernel alone, in place (gradients are valid logits too)
      ops::cross_entropy_fused(g[0].data(), tg.data(), N, V, gs);
      return;
    }
    Buf x = H.in[0];
    (im == Fast ? ops::cross_entropy_fused : ops::ref::cross_entropy_fused)(x.data(), tg.data(),
                                                                            N, V, gs);
    for (i64 n = 0; n < N; ++n)
      for (i64 v = 0; v < V; ++v) g[0][n * V + v] += x[n * V + v] / gs * dout[n];
  };
  H.bytes = {1.0 * N * V * 4, 2.0 * N * V * 4};
  if (!finish(H, c, m, 16)) return;

  // Losses: fused == forward == reference; ignored rows contribute nothing.
  Buf rl(N), x = H.in[0];
  double lf = ops::cross_entropy_forward(H.in[0].data(), tg.data(), N, V, rl.data());
  double lr = ops::ref::cross_entropy_forward<float>(H.in[0].data(), tg.data(), N, V, nullptr);
  double lfused = ops::cross_entropy_fused(x.data(), tg.data(), N, V, 1.0f);
  EXPECT_NEAR(lf, lr, 1e-5 * std::max(1.0, std::abs(lr)));
  EXPECT_NEAR(lfused, lr, 1e-5 * std::max(1.0, std::abs(lr)));
  for (i64 n = 0; n < N; ++n) {
    EXPECT_TRUE(std::isfinite(rl[n]));
    if (tg[n] < 0) {
      EXPECT_EQ(rl[n], 0.0f);
      for (i64 v = 0; v < V; ++v) EXPECT_EQ(x[n * V + v], 0.0f);
    }
  }
  // a target outside the vocabulary is named, before any logit is read or written
  std::vector<i32> bad = tg;
  bad[N - 1] = i32(V);
  Buf xb = H.in[0];
  for (const std::string who : {"cross_entropy_forward", "cross_entropy_fused"}) {
    try {
      if (who == "cross_entropy_forward") ops::cross_entropy_forward(xb.data(), bad.data(), N, V, rl.data());
      else ops::cross_entropy_fused(xb.data(), bad.data(), N, V, 1.0f);
      ADD_FAILURE() << who << ": no error for target " << V;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(who + ": target " + std::to_string(V) +
                                           " at row " + std::to_string(N - 1) +
                                           " is outside the vocabulary"),
                std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(std::memcmp(xb.data(), H.in[0].data(), N * V * sizeof(float)), 0);
}

void run_adamw(const Case& c, Mode m) {
  const i64 n = c.N * c.d;
  const float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
  if (m == Perf) {  // reads w, g, m, v and writes w, m, v
    Buf w(n), mm(n, 0.f), v(n, 0.f), g(n);
    test::fill_normal(w.data(), n, 30);
    test::fill_normal(g.data(), n, 31);
    i64 t = 0;
    perf_row(c, "update", 0, 28.0 * n, [&] {
      ops::adamw_update(w.data(), g.data(), mm.data(), v.data(), n, lr, b1, b2, eps, 0.1f, ++t);
    });
    return;
  }
  for (float wd : {0.0f, 0.1f}) {
    Buf w(n), m(n, 0.f), v(n, 0.f), g(n);
    test::fill_normal(w.data(), n, 30);
    std::vector<double> W(w.begin(), w.end()), M(n, 0.0), Vv(n, 0.0);
    for (i64 t = 1; t <= 3; ++t) {
      test::fill_normal(g.data(), n, 40 + t);
      if (t == 2) g[0] = 0.0f;  // a zero gradient still decays and follows the momentum
      ops::adamw_update(w.data(), g.data(), m.data(), v.data(), n, lr, b1, b2, eps, wd, t);
      // The formula, in double.
      for (i64 i = 0; i < n; ++i) {
        W[i] -= double(lr) * wd * W[i];
        M[i] = b1 * M[i] + (1.0 - b1) * g[i];
        Vv[i] = b2 * Vv[i] + (1.0 - b2) * double(g[i]) * g[i];
        const double mh = M[i] / (1.0 - std::pow(double(b1), double(t)));
        const double vh = Vv[i] / (1.0 - std::pow(double(b2), double(t)));
        W[i] -= double(lr) * mh / (std::sqrt(vh) + eps);
      }
    }
    // A few float ulps of |w| (~1), far below the size of any formula slip (~lr).
    double worst = 0, worst_m = 0, worst_v = 0;
    for (i64 i = 0; i < n; ++i) {
      worst = test::worse(worst, std::abs(w[i] - W[i]) / std::max(1.0, std::abs(W[i])));
      worst_m = test::worse(worst_m, std::abs(m[i] - M[i]));
      worst_v = test::worse(worst_v, std::abs(v[i] - Vv[i]));
    }
    EXPECT_LT(worst, 1e-6) << "wd=" << wd;
    EXPECT_LT(worst_m, 1e-6);
    EXPECT_LT(worst_v, 1e-6);
  }
  // The update reports a weight or second moment it made non-finite, wherever it sits (the
  // vector body, the scalar tail, either thread's share): an infinite weight, a gradient whose
  // square overflows v, and 0/0 from eps 0 over a zero gradient.
  const float inf = std::numeric_limits<float>::infinity();
  for (i64 at : {i64(0), n / 2, n - 1}) {
    for (int kind = 0; kind < 3; ++kind) {
      Buf w(n), mm(n, 0.f), v(n, 0.f), g(n);
      test::fill_normal(w.data(), n, 30);
      test::fill_normal(g.data(), n, 31);
      float e = eps;
      if (kind == 0) w[at] = inf;
      if (kind == 1) g[at] = 1e30f;
      if (kind == 2) g[at] = 0.f, e = 0.f;
      EXPECT_FALSE(ops::adamw_update(w.data(), g.data(), mm.data(), v.data(), n, lr, b1, b2, e,
                                     0.1f, 1))
          << "kind " << kind << " at " << at << " of " << n;
      Buf w2(n), m2(n, 0.f), v2(n, 0.f);
      test::fill_normal(w2.data(), n, 30);
      if (kind == 0) w2[at] = inf;
      EXPECT_FALSE(ops::ref::adamw_update(w2.data(), g.data(), m2.data(), v2.data(), n, lr, b1,
                                          b2, e, 0.1f, 1));
    }
  }
  Buf w(n), mm(n, 0.f), v(n, 0.f), g(n);
  test::fill_normal(w.data(), n, 30);
  test::fill_normal(g.data(), n, 31);
  g[n / 3] = 0.f;  // a zero gradient with eps > 0 stays finite
  EXPECT_TRUE(ops::adamw_update(w.data(), g.data(), mm.data(), v.data(), n, lr, b1, b2, eps,
                                0.1f, 1));
}

void run_reduce(const Case& c, Mode m) {
  const i64 n = c.N * c.d;
  Buf x(n);
  test::fill_normal(x.data(), n, 50);
  if (m == Perf) {
    double sink = 0;
    perf_row(c, "sum_squares", 0, 4.0 * n, [&] { sink += ops::sum_squares(x.data(), n); });
    perf_row(c, "scale", 0, 8.0 * n, [&] { ops::scale_inplace(x.data(), n, 1.0f); });
    Buf y(n, 0.f);
    perf_row(c, "add", 0, 12.0 * n, [&] { ops::add_inplace(y.data(), x.data(), n); });
    EXPECT_TRUE(std::isfinite(sink));
    return;
  }
  double a = ops::sum_squares(x.data(), n), r = ops::ref::sum_squares(x.data(), n);
  EXPECT_NEAR(a, r, 1e-12 * r);
  Buf y = x;
  ops::scale_inplace(y.data(), n, -0.25f);
  for (i64 i = 0; i < n; ++i) ASSERT_EQ(y[i], x[i] * -0.25f);
  // every element once, whatever the chunking and the thread split (n is not a multiple of
  // a chunk in the table's cases)
  Buf z(n);
  test::fill_normal(z.data(), n, 51);
  Buf s = z;
  ops::add_inplace(s.data(), x.data(), n);
  for (i64 i = 0; i < n; ++i) ASSERT_EQ(s[i], z[i] + x[i]) << "element " << i << " of " << n;
}


void run_head_rmsnorm(const Case& c, Mode m) {
  const i64 N = c.N, Hh = c.Hq, hd = c.hd, n = N * Hh * hd;
  const float eps = 1e-6f;
  Harness H;
  H.names = {"x", "w"};
  H.in = {Buf(n), Buf(hd)};
  test::fill_normal(H.in[0].data(), n, 2, c.std);
  test::fill_uniform(H.in[1].data(), hd, 3, 0.5f, 1.5f);
  H.out_sizes = {n, N * Hh};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    (im == Fast ? ops::head_rmsnorm_forward : ops::ref::head_rmsnorm_forward<float>)(
        o[0].data(), o[1].data(), H.in[0].data(), H.in[1].data(), N, Hh, hd, eps);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    Vec r(N * Hh);
    ops::ref::head_rmsnorm_forward<double>(o.data(), r.data(), in[0].data(), in[1].data(), N, Hh,
                                           hd, eps);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>& o, const float* dout, std::vector<Buf>& g) {
    (im == Fast ? ops::head_rmsnorm_backward : ops::ref::head_rmsnorm_backward)(
        g[0].data(), g[1].data(), dout, H.in[0].data(), H.in[1].data(), o[1].data(), N, Hh, hd);
  };
  H.bytes = {2.0 * n * 4, 4.0 * n * 4};
  finish(H, c, m, 17);
}

void run_linear(const Case& c, Mode m) {
  const i64 N = c.N, in = c.d, out = c.V;
  Harness H;
  H.names = {"x", "W"};
  H.in = {Buf(N * in), Buf(out * in)};
  test::fill_normal(H.in[0].data(), N * in, 8, c.std);
  test::fill_normal(H.in[1].data(), out * in, 9, 1.0f / std::sqrt(float(in)));
  H.out_sizes = {N * out};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    if (im == Fast)
      ops::linear_forward(o[0].data(), H.in[0].data(), H.in[1].data(), N, in, out);
    else
      ops::ref::linear_forward<float>(o[0].data(), H.in[0].data(), H.in[1].data(), N, in, out);
  };
  H.fwd64 = [&](const std::vector<Vec>& x, Vec& o) {
    ops::ref::linear_forward<double>(o.data(), x[0].data(), x[1].data(), N, in, out);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>&, const float* dout, std::vector<Buf>& g) {
    if (im == Fast)
      ops::linear_backward(g[0].data(), g[1].data(), dout, H.in[0].data(), H.in[1].data(), N, in,
                           out);
    else
      ops::ref::linear_backward(g[0].data(), g[1].data(), dout, H.in[0].data(), H.in[1].data(), N,
                                in, out);
  };
  H.flops = {2.0 * N * in * out, 4.0 * N * in * out};
  if (!finish(H, c, m, 18)) return;

  // dx == nullptr skips the input gradient and still accumulates dW.
  Buf dy(N * out), dW1(out * in, 0.5f), dW2(out * in, 0.5f), dx(N * in, 0.f);
  test::fill_normal(dy.data(), N * out, 19);
  ops::linear_backward(dx.data(), dW1.data(), dy.data(), H.in[0].data(), H.in[1].data(), N, in,
                       out);
  ops::linear_backward(nullptr, dW2.data(), dy.data(), H.in[0].data(), H.in[1].data(), N, in,
                       out);
  EXPECT_EQ(dW1, dW2);
  // dx_accumulate = false writes dx = dy W without reading dx (NaN there must not leak), the
  // values of accumulating into zeros (ulp-level: another oneDNN primitive may run)
  std::vector<ops::Precision> precs = {ops::Precision::FP32};
  if (ops::cpu_has_bf16()) precs.push_back(ops::Precision::BF16);
  for (ops::Precision p : precs) {
    ops::PrecisionScope ps(p);
    Buf acc(N * in, 0.f), set(N * in, NAN), dWa(out * in, 0.f), dWs(out * in, 0.f);
    ops::linear_backward(acc.data(), dWa.data(), dy.data(), H.in[0].data(), H.in[1].data(), N, in,
                         out);
    ops::linear_backward(set.data(), dWs.data(), dy.data(), H.in[0].data(), H.in[1].data(), N, in,
                         out, nullptr, false);
    double worst = 0, scale = 1e-30;
    for (i64 i = 0; i < N * in; ++i) {
      if (!std::isfinite(set[i])) worst = INFINITY;  // dx was read
      worst = test::worse(worst, double(std::abs(acc[i] - set[i])));
      scale = std::max(scale, double(std::abs(acc[i])));
    }
    EXPECT_LE(worst, 1e-6 * scale) << c.op << " " << ops::precision_name(p);
    EXPECT_EQ(dWa, dWs) << c.op << " " << ops::precision_name(p);
  }
}

// No gradient (inference only): the fast side packs the weights into a stream's table, the
// reference multiplies each matrix on its own.
void run_packed_linear(const Case& c, Mode m) {
  const i64 N = c.N, in = c.d;
  const int n = int(c.Hq);
  std::vector<i64> out(n), off(n + 1, 0);
  for (int i = 0; i < n; ++i) {
    out[i] = c.V + 7 * i;
    off[i + 1] = off[i] + out[i];
  }
  Harness H;
  H.names = {"x", "W"};
  H.in = {Buf(N * in), Buf(off[n] * in)};
  test::fill_normal(H.in[0].data(), N * in, 8, c.std);
  test::fill_normal(H.in[1].data(), off[n] * in, 9, 1.0f / std::sqrt(float(in)));
  std::vector<const float*> W(n);
  for (int i = 0; i < n; ++i) W[i] = H.in[1].data() + off[i] * in;
  ops::PackedWeights pw(N);
  if (n == 1)
    pw.add(W[0], out[0], in, ops::PackFormat::F32);
  else
    pw.add_group(W.data(), out.data(), n, in, ops::PackFormat::F32);
  H.out_sizes = {N * off[n]};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    std::vector<float*> y(n);
    for (int i = 0; i < n; ++i) y[i] = o[0].data() + N * off[i];
    if (im == Ref) {
      for (int i = 0; i < n; ++i) ops::ref::linear_forward<float>(y[i], H.in[0].data(), W[i], N, in, out[i]);
      return;
    }
    ops::PackedScope scope(&pw);
    ops::linear_forward_multi(y.data(), H.in[0].data(), W.data(), N, in, out.data(), n);
  };
  H.flops = {2.0 * N * in * off[n], 0};
  if (!finish(H, c, m, 18)) return;
  // the packed copies were taken at registration: scaling W afterwards must not change the
  // result (it would if the product had gone to the general GEMM)
  auto a = alloc(H.out_sizes), b = alloc(H.out_sizes);
  H.fwd(Fast, a);
  for (auto& v : H.in[1]) v *= 2;
  H.fwd(Fast, b);
  EXPECT_EQ(a[0], b[0]);
}

// Fixed-shape cache settings for a scope (restored, with an empty cache, at exit). FP32 x W^T
// products take the fixed path like every other form inside (ops::set_fp32_nt_sgemm off), so
// that the cache's tests reach it with any form; Ops.GemmFp32NtOnSgemm checks the rule itself.
struct GemmCacheScope {
  ops::GemmCacheConfig prev = ops::gemm_cache_config();
  ops::GemmPath prev_path = ops::gemm_path();
  ops::Fp32NtSgemmScope nt_fixed{false};
  GemmCacheScope(ops::GemmCacheConfig c) { ops::set_gemm_cache_config(c); }
  ~GemmCacheScope() {
    ops::set_gemm_cache_config(prev);
    ops::set_gemm_path(prev_path);
  }
};

const ops::Bf16Units kBothUnits[2] = {ops::Bf16Units::Native, ops::Bf16Units::Fp32};

// f() under each precision this CPU runs and, for BF16, each kind of units (BF16 on the FP32
// units multiplies the rounded operands too); FP32 once.
void for_each_precision_and_units(const std::function<void(ops::Precision, ops::Bf16Units)>& f) {
  std::vector<ops::Precision> precs = {ops::Precision::FP32};
  if (ops::cpu_has_bf16()) precs.push_back(ops::Precision::BF16);
  for (ops::Precision p : precs) {
    ops::PrecisionScope ps(p);
    for (ops::Bf16Units u : kBothUnits) {
      if (p == ops::Precision::FP32 && u == ops::Bf16Units::Fp32) continue;
      ops::Bf16UnitsScope units(u);
      f(p, u);
    }
  }
}

// C = alpha op(A) op(B) + beta C against a double product of the operands (for BF16: of the
// operands rounded to bf16, so only the FP32 accumulation differs). Returns the worst error
// relative to sum |alpha a b| + |beta c| of each entry, and checks C's padding is untouched.
// blocked: through ops::blocked_sgemm (kernels/blocked_sgemm.h) instead of ops::gemm, with NaN
// in C when beta is 0 (BLAS semantics: C is not read then).
// Operands of the GEMM checks: uniform with unit variance. The error bound is relative to each
// entry's magnitude, so the distribution's shape does not matter, and a normal fill's log and
// cos were half of the op table's minutes in the ASan build.
void fill_operand(float* x, i64 n, uint64_t seed) {
  test::fill_uniform(x, n, seed, -1.7320508f, 1.7320508f);
}

double gemm_error(bool ta, bool tb, i64 M, i64 N, i64 K, float alpha, float beta, i64 pad,
                  uint64_t seed, bool blocked = false) {
  const i64 ar = ta ? K : M, ac = ta ? M : K, lda = ac + pad;
  const i64 br = tb ? N : K, bc = tb ? K : N, ldb = bc + pad, ldc = N + pad;
  Buf A(ar * lda), B(br * ldb), C(M * ldc);
  fill_operand(A.data(), ar * lda, seed);
  fill_operand(B.data(), br * ldb, seed + 1);
  fill_operand(C.data(), M * ldc, seed + 2);
  const Buf C0 = C;
  if (blocked) {
    if (beta == 0.f)
      for (i64 i = 0; i < M; ++i) C[i * ldc] = std::numeric_limits<float>::quiet_NaN();
    ops::blocked_sgemm(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
  } else {
    ops::gemm(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
  }
  // the values the product multiplies (rounded to bf16 under BF16 precision), as rows of K
  // (a: M rows, b: N rows), so the reference's inner loop runs over contiguous memory (the ASan
  // build's op table spent most of its minutes in strided reads)
  const bool bf16 = ops::gemm_precision() != ops::Precision::FP32;
  auto value = [bf16](float x) -> double {
    if (!bf16) return x;
    uint16_t h;
    ops::round_to_bf16(&h, &x, 1);
    return ops::bf16_to_float(h);
  };
  std::vector<double> a(std::max<i64>(M * K, 1)), b(std::max<i64>(N * K, 1));
  for (i64 i = 0; i < M; ++i)
    for (i64 k = 0; k < K; ++k) a[i * K + k] = value(A[ta ? k * lda + i : i * lda + k]);
  for (i64 j = 0; j < N; ++j)
    for (i64 k = 0; k < K; ++k) b[j * K + k] = value(B[tb ? j * ldb + k : k * ldb + j]);
  double worst = 0;
  for (i64 i = 0; i < M; ++i) {
    for (i64 j = 0; j < N; ++j) {
      double ref = 0, mag = 0;
      const double* ai = a.data() + i * K;
      const double* bj = b.data() + j * K;
      for (i64 k = 0; k < K; ++k) {
        const double p = ai[k] * bj[k];
        ref += p;
        mag += std::abs(p);
      }
      const double c0 = beta == 0.f ? 0.0 : beta * double(C0[i * ldc + j]);
      ref = alpha * ref + c0;
      mag = std::abs(alpha) * mag + std::abs(c0) + 1e-30;
      worst = test::worse(worst, std::abs(C[i * ldc + j] - ref) / mag);
    }
    for (i64 j = N; j < ldc; ++j) EXPECT_EQ(C[i * ldc + j], C0[i * ldc + j]) << "padding written";
  }
  return worst;
}

// Every product form on both oneDNN paths (the fixed one forced for every size) and both
// precisions, against the double reference: FP32 to accumulation rounding, BF16 likewise on
// the rounded operands (bf16 operands are exact in the FP32 accumulation).
void run_gemm(const Case& c, Mode m) {
  const i64 M = c.N, K = c.d, N = c.V;
  if (m == Perf) {
    const i64 lda = K, ldb = N;
    Buf A(M * K), B(K * N), C(M * N);
    test::fill_normal(A.data(), M * K, 1);
    test::fill_normal(B.data(), K * N, 2);
    std::vector<ops::Precision> precs = {ops::Precision::FP32};
    if (ops::cpu_has_bf16()) precs.push_back(ops::Precision::BF16);
    const bool amx_was = ops::amx_gemm_on();
    ops::set_amx_gemm(false);  // oneDNN's two paths (gemm_amx times the tiles)
    for (ops::Precision p : precs) {
      ops::PrecisionScope ps(p);
      for (ops::Bf16Units u : kBothUnits) {
        if (p == ops::Precision::FP32 && u == ops::Bf16Units::Fp32) continue;
        ops::Bf16UnitsScope units(u);
        for (ops::GemmPath path : {ops::GemmPath::Runtime, ops::GemmPath::Fixed}) {
          ops::set_gemm_path(path);
          std::string pass = std::string(ops::gemm_path_name(path)) + " " + ops::precision_name(p);
          if (p == ops::Precision::BF16) pass += std::string("/") + ops::bf16_units_name(u);
          perf_row(c, pass.c_str(), 2.0 * M * N * K, 0, [&] {
            ops::gemm(false, false, M, N, K, 1.f, A.data(), lda, B.data(), ldb, 0.f, C.data(), N);
          });
        }
      }
    }
    ops::set_gemm_path(ops::GemmPath::Fixed);
    ops::set_amx_gemm(amx_was);
    return;
  }
  GemmCacheScope every_shape({.capacity = 64, .min_flops = 0, .min_uses = 1});
  // oneDNN's paths only (the AMX tile kernel has rows of its own, gemm_amx)
  const ops::AmxGemmScope amx_off(false);
  uint64_t seed = 1000;
  // BF16 on both kinds of units: the FP32 ones multiply the rounded operands too (a product of
  // the unrounded ones is ~2^-9 off the reference)
  for_each_precision_and_units([&](ops::Precision p, ops::Bf16Units u) {
    for (ops::GemmPath path : {ops::GemmPath::Runtime, ops::GemmPath::Fixed}) {
      ops::set_gemm_path(path);
      const i64 fixed0 = ops::gemm_cache_stats().fixed_calls;
      for (int form = 0; form < 32; ++form) {
        const bool ta = form & 1, tb = form & 2;
        const float beta = form & 4 ? 1.f : 0.f, alpha = form & 8 ? 0.7f : 1.f;
        const i64 pad = form & 16 ? 3 : 0;
        const double err = gemm_error(ta, tb, M, N, K, alpha, beta, pad, seed += 3);
        EXPECT_LT(err, 1e-5) << ops::precision_name(p) << " " << ops::bf16_units_name(u) << " "
                             << ops::gemm_path_name(path) << " ta=" << ta << " tb=" << tb
                             << " alpha=" << alpha << " beta=" << beta << " pad=" << pad;
      }
      // the path asked for is the path taken
      EXPECT_EQ(ops::gemm_cache_stats().fixed_calls - fixed0,
                path == ops::GemmPath::Fixed ? 32 : 0);
    }
  });
}

// dlcm's blocked FP32 GEMM (kernels/blocked_sgemm.h): every form (transposes, alpha, beta,
// padded leading dimensions) against the double product, the same bits on one thread as on
// all of them, beta 0 never reading C, and ops::gemm sending the weight-gradient form (and only
// it) there. Perf: the FFN and projection weight gradients on it and on oneDNN's sgemm.
void run_gemm_blocked(const Case& c, Mode m) {
  const i64 M = c.N, K = c.d, N = c.V;
  if (!ops::blocked_sgemm_native()) return;
  ops::BlockedUseScope restore(ops::blocked_use());
  if (m == Perf) {
    Buf A(K * M), B(K * N), C(M * N);  // dW[M, N] += dy^T x: dy [K, M], x [K, N]
    test::fill_normal(A.data(), K * M, 1);
    test::fill_normal(B.data(), K * N, 2);
    for (ops::BlockedUse u : {ops::BlockedUse::Tn, ops::BlockedUse::Off}) {
      ops::set_blocked_use(u);
      perf_row(c, u == ops::BlockedUse::Tn ? "TN+C dlcm blocked" : "TN+C oneDNN sgemm",
               2.0 * M * N * K, 0, [&] {
                 ops::gemm(true, false, M, N, K, 1.f, A.data(), M, B.data(), N, 1.f, C.data(), N);
               });
    }
    return;
  }
  uint64_t seed = 7000;
  for (int form = 0; form < 32; ++form) {
    const bool ta = form & 1, tb = form & 2;
    const float beta = form & 4 ? (form & 8 ? -0.5f : 1.f) : 0.f, alpha = form & 8 ? 0.7f : 1.f;
    const i64 pad = form & 16 ? 3 : 0;
    EXPECT_LT(gemm_error(ta, tb, M, N, K, alpha, beta, pad, seed += 3, true), 1e-5)
        << "ta=" << ta << " tb=" << tb << " alpha=" << alpha << " beta=" << beta << " pad=" << pad;
    // one thread (inside a parallel region) gives the same bits as the whole team
    const i64 lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
    Buf A((ta ? K : M) * lda), B((tb ? N : K) * ldb), C(M * ldc);
    fill_operand(A.data(), i64(A.size()), seed + 1);
    fill_operand(B.data(), i64(B.size()), seed + 2);
    fill_operand(C.data(), i64(C.size()), seed + 3);
    Buf C1 = C;
    ops::blocked_sgemm(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
#pragma omp parallel num_threads(2)
    {
#pragma omp single
      ops::blocked_sgemm(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C1.data(),
                         ldc);
    }
    EXPECT_EQ(0, std::memcmp(C.data(), C1.data(), C.size() * sizeof(float)))
        << "bits depend on the threads: ta=" << ta << " tb=" << tb;
  }
}

// The AMX tile kernel (kernels/amx_gemm.h) through ops::gemm: the path taken where it fits and
// not elsewhere, every form against the double product of the rounded operands, and the same
// products on oneDNN within accumulation rounding. Perf: both implementations, the three
// forms of a linear layer (x W^T, dy W, dW += dy^T x).
void run_gemm_amx(const Case& c, Mode m) {
  const i64 M = c.N, K = c.d, N = c.V;
  if (!ops::cpu_has_bf16()) return;  // no BF16 products at all
  ops::PrecisionScope ps(ops::Precision::BF16);
  const bool fits = ops::amx_gemm_fits(M, N, K) && ops::amx_gemm_on();
  if (m == Perf) {
    if (!fits) return;
    Buf x(M * K), W(N * K), y(M * N), dW(N * K);
    test::fill_normal(x.data(), M * K, 1);
    test::fill_normal(W.data(), N * K, 2);
    test::fill_normal(y.data(), M * N, 3);
    for (bool amx : {false, true}) {
      ops::set_amx_gemm(amx);
      const std::string tag = amx ? "amx" : "onednn";
      perf_row(c, (tag + " NT").c_str(), 2.0 * M * N * K, 0, [&] {
        ops::gemm(false, true, M, N, K, 1.f, x.data(), K, W.data(), K, 0.f, y.data(), N);
      });
      perf_row(c, (tag + " NN").c_str(), 2.0 * M * N * K, 0, [&] {
        ops::gemm(false, false, M, K, N, 1.f, y.data(), N, W.data(), K, 0.f, x.data(), K);
      });
      perf_row(c, (tag + " TN+C").c_str(), 2.0 * M * N * K, 0, [&] {
        ops::gemm(true, false, N, K, M, 1.f, y.data(), N, x.data(), K, 1.f, dW.data(), K);
      });
    }
    ops::set_amx_gemm(true);
    // The whole packs' non-temporal stores against ordinary ones (set_amx_stream_bytes(0));
    // called back to back, the last call's scratch lines would sit in a large L3 and an
    // ordinary store find them there.
    const i64 stream0 = ops::amx_stream_bytes();
    const AmxStreamScope restore(stream0);
    const auto plain = [&](bool p) { ops::set_amx_stream_bytes(p ? 0 : stream0); };
    const char* what = "plain stores' time / non-temporal's";
    paired_row(c, "NT st/plain", what, plain, [&] {
      ops::gemm(false, true, M, N, K, 1.f, x.data(), K, W.data(), K, 0.f, y.data(), N);
    });
    paired_row(c, "TN+C st/pl", what, plain, [&] {
      ops::gemm(true, false, N, K, M, 1.f, y.data(), N, x.data(), K, 1.f, dW.data(), K);
    });
    return;
  }
  const bool amx_cpu = ops::amx_bf16_usable() && ops::isa() == ops::Isa::Avx512;
  const i64 Mp = (M + 31) / 32 * 32, Np = (N + 31) / 32 * 32;
  EXPECT_EQ(fits, amx_cpu && Mp * Np <= 1.25 * M * N && ops::amx_gemm_on());
  GemmCacheScope every_shape({.capacity = 64, .min_flops = 0, .min_uses = 1});
  uint64_t seed = 2000;
  for (int form = 0; form < 16; ++form) {
    const bool ta = form & 1, tb = form & 2;
    const float beta = form & 4 ? 1.f : 0.f;
    const i64 pad = form & 8 ? 3 : 0;
    const i64 lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
    const std::string impl = ops::gemm_impl(ta, tb, M, N, K, 1.f, lda, ldb, beta, ldc);
    EXPECT_EQ(impl == "amx tiles (dlcm)", fits) << impl;
    const std::string what = "ta=" + std::to_string(ta) + " tb=" + std::to_string(tb) +
                             " beta=" + std::to_string(beta) + " pad=" + std::to_string(pad);
    const double err = gemm_error(ta, tb, M, N, K, 1.f, beta, pad, seed += 3);
    EXPECT_LT(err, 1e-5) << what << " (" << impl << ")";
  }
  if (!fits) return;
  // the kernel itself below the size gemm() sends it: every form, against oneDNN
  for (int form = 0; form < 8; ++form) {
    const bool ta = form & 1, tb = form & 2, acc = form & 4;
    const i64 lda = ta ? M : K, ldb = tb ? K : N;
    Buf A(M * K), B(K * N), C(M * N), C1;
    test::fill_normal(A.data(), M * K, 70 + form);
    test::fill_normal(B.data(), K * N, 80 + form);
    test::fill_normal(C.data(), M * N, 90 + form);
    C1 = C;
    ops::amx_gemm(ta, tb, M, N, K, A.data(), lda, {}, B.data(), ldb, {}, acc, C.data(), N);
    {
      ops::set_amx_gemm(false);
      ops::gemm(ta, tb, M, N, K, 1.f, A.data(), lda, B.data(), ldb, acc ? 1.f : 0.f, C1.data(),
                N);
      ops::set_amx_gemm(true);
    }
    EXPECT_LT(test::rel_err(C.data(), C1.data(), M * N), 1e-5) << "form " << form;
    // bf16 copies of the operands (as gemm.cpp's known copies) pack to the same tiles
    std::vector<uint16_t> a16(M * K), b16(K * N);
    ops::round_to_bf16(a16.data(), A.data(), M * K);
    ops::round_to_bf16(b16.data(), B.data(), K * N);
    Buf C2(M * N, 0.f), C3(M * N, 0.f), C4(M * N, 0.f);
    ops::amx_gemm(ta, tb, M, N, K, A.data(), lda, {}, B.data(), ldb, {}, false, C2.data(), N);
    ops::amx_gemm(ta, tb, M, N, K, nullptr, 0, {a16.data(), lda, 0}, nullptr, 0,
                  {b16.data(), ldb, 0}, false, C3.data(), N);
    EXPECT_EQ(std::memcmp(C2.data(), C3.data(), sizeof(float) * M * N), 0) << "form " << form;
    // column chunks (a wide B, the LM head's), K chunks (C loaded and stored between them) and A
    // packed whole instead of per strip and K chunk: the C blocks in another order, the same
    // bits, with and without accumulation, from the floats and from a bf16 copy
    {
      const i64 budget0 = ops::amx_column_budget(), kblock0 = ops::amx_k_block();
      const bool strips0 = ops::amx_strip_packing();
      const i64 nbs = (N + 31) / 32, Kp = (K + 31) / 32 * 32;
      Buf want(M * N);
      test::fill_normal(want.data(), M * N, 95 + form);
      Buf start = want;
      ops::amx_gemm(ta, tb, M, N, K, A.data(), lda, {}, B.data(), ldb, {}, acc, want.data(), N);
      for (bool strips : {true, false})
        for (i64 kblock : {kblock0, i64(32), i64(64)})
          for (i64 per_chunk : {i64(1), i64(3)}) {
            ops::set_amx_strip_packing(strips);
            ops::set_amx_k_block(kblock);
            ops::set_amx_column_budget(per_chunk * std::min(Kp, kblock) * 32 * 2);
            EXPECT_EQ(ops::amx_column_chunk(N, K), std::min(per_chunk, nbs));
            for (bool copy : {false, true}) {
              Buf got = start;
              if (copy)
                ops::amx_gemm(ta, tb, M, N, K, nullptr, 0, {a16.data(), lda, 0}, B.data(), ldb,
                              {}, acc, got.data(), N);
              else
                ops::amx_gemm(ta, tb, M, N, K, A.data(), lda, {}, B.data(), ldb, {}, acc,
                              got.data(), N);
              EXPECT_EQ(std::memcmp(got.data(), want.data(), sizeof(float) * M * N), 0)
                  << "form " << form << ", " << per_chunk << " column blocks per chunk, k per "
                  << "chunk " << kblock << (strips ? ", A per strip" : ", A whole")
                  << (copy ? ", A from its bf16 copy" : "");
            }
          }
      ops::set_amx_column_budget(budget0);
      ops::set_amx_k_block(kblock0);
      ops::set_amx_strip_packing(strips0);
      EXPECT_THROW(ops::set_amx_k_block(48), std::exception);
      EXPECT_EQ(ops::amx_k_block(), kblock0);
      // whole packs written with non-temporal stores (every one: 1 byte and up) or with
      // ordinary ones (0: never): the same bits
      const i64 stream0 = ops::amx_stream_bytes();
      for (i64 stream : {i64(1), i64(0)})
        for (bool strips : {true, false}) {
          ops::set_amx_stream_bytes(stream);
          ops::set_amx_strip_packing(strips);
          const i64 packs0 = ops::amx_stream_packs();
          Buf got = start;
          ops::amx_gemm(ta, tb, M, N, K, A.data(), lda, {}, B.data(), ldb, {}, acc, got.data(),
                        N);
          // B is always packed whole; A too unless per strip
          EXPECT_EQ(ops::amx_stream_packs() - packs0, stream == 0 ? 0 : strips && !ta ? 1 : 2)
              << "form " << form << ", stream from " << stream << " bytes";
          EXPECT_EQ(std::memcmp(got.data(), want.data(), sizeof(float) * M * N), 0)
              << "form " << form << ", stream from " << stream << " bytes"
              << (strips ? ", A per strip" : ", A whole");
        }
      ops::set_amx_stream_bytes(stream0);
      ops::set_amx_strip_packing(strips0);
      EXPECT_EQ(ops::amx_stream_bytes(), stream0);
    }
    // versioned copies: packed once, reused while the version stays, packed anew for a new one
    const uint64_t v = 1000003 * uint64_t(form + 1) + uint64_t(M * 7 + N * 3 + K);
    ops::amx_gemm(ta, tb, M, N, K, nullptr, 0, {a16.data(), lda, v}, nullptr, 0,
                  {b16.data(), ldb, v + 1}, false, C4.data(), N);
    EXPECT_EQ(std::memcmp(C2.data(), C4.data(), sizeof(float) * M * N), 0) << "form " << form;
    std::vector<uint16_t> a16b = a16;
    for (auto& h : a16b) h ^= 0x8000;  // -A: the product changes sign
    ops::amx_gemm(ta, tb, M, N, K, nullptr, 0, {a16b.data(), lda, v + 2}, nullptr, 0,
                  {b16.data(), ldb, v + 1}, false, C4.data(), N);
    for (i64 i = 0; i < M * N; ++i) ASSERT_EQ(C4[i], -C2[i]) << "form " << form << " at " << i;
  }
}

// ---- DLCM kernels ----

// Tokens and decisions of c's pattern, and their segments (an input of most DLCM ops).
struct Rows {
  std::vector<i32> tok;
  std::vector<uint8_t> b;
  ops::Segments sg;
  Rows(const Case& c, uint64_t seed) {
    test::make_pattern(c.pat, c.B, c.Lq, seed, tok, b);
    sg.build(b.data(), tok.data(), kBos, c.B, c.Lq);
  }
};

void run_router_prob(const Case& c, Mode m) {
  const bool raw = std::string(c.op) == "router_prob_raw";  // q = k = H, dq and dk alias
  const i64 B = c.B, L = c.Lq, ds = c.d, N = B * L, S = ops::kRouterCacheStride;
  Rows rw(c, 40 + L);
  const i32* tok = rw.tok.data();
  Harness H;
  H.names = raw ? std::vector<std::string>{"h"} : std::vector<std::string>{"q", "k"};
  H.in.assign(raw ? 1 : 2, Buf(N * ds));
  for (size_t i = 0; i < H.in.size(); ++i)
    test::fill_normal(H.in[i].data(), N * ds, 41 + i, c.std);
  auto K = [&](const auto& in) { return in[raw ? 0 : 1].data(); };
  H.out_sizes = {N, N * S};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    (im == Fast ? ops::router_prob_forward : ops::ref::router_prob_forward<float>)(
        o[0].data(), o[1].data(), H.in[0].data(), K(H.in), tok, kBos, B, L, ds);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    Vec cache(N * S);
    ops::ref::router_prob_forward<double>(o.data(), cache.data(), in[0].data(), K(in), tok, kBos,
                                          B, L, ds);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>& o, const float* dout, std::vector<Buf>& g) {
    (im == Fast ? ops::router_prob_backward : ops::ref::router_prob_backward)(
        g[0].data(), g[raw ? 0 : 1].data(), dout, o[1].data(), H.in[0].data(), K(H.in), tok,
        kBos, B, L, ds);
  };
  H.fd_h = 1e-3;
  H.bytes = {2.0 * N * ds * 4, 6.0 * N * ds * 4};
  if (!finish(H, c, m, 19)) return;

  // No gradient flows from forced positions: dp there is ignored.
  auto o = alloc(H.out_sizes);
  H.fwd(Fast, o);
  Buf dp(N);
  test::fill_normal(dp.data(), N, 42);
  std::vector<Buf> g1 = alloc({N * ds, N * ds}), g2 = g1;
  H.bwd(Fast, o, dp.data(), g1);
  for (i64 n = 0; n < N; ++n)
    if (n % L == 0 || tok[n] == kBos) dp[n] += 100.f;
  H.bwd(Fast, o, dp.data(), g2);
  EXPECT_EQ(g1, g2);
}

// Boundary decisions have no gradient: the fast and reference decisions must agree exactly.
void run_boundaries(const Case& c, Mode m) {
  const bool sample = std::string(c.op) == "sample_boundaries";
  const i64 B = c.B, L = c.Lq, N = B * L;
  Rows rw(c, 50 + L);
  Harness H;
  H.names = {"p"};
  H.in = {Buf(N)};
  test::fill_uniform(H.in[0].data(), N, 51, 0.f, 1.f);
  for (i64 n = 0; n < N; n += 7) H.in[0][n] = float(n % 3) * 0.5f;  // exactly 0, tau, 1
  H.out_sizes = {N};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    std::vector<uint8_t> b(N);
    if (sample)
      (im == Fast ? ops::sample_boundaries : ops::ref::sample_boundaries)(
          b.data(), H.in[0].data(), rw.tok.data(), kBos, B, L, 0.7f, 42, 3, 10);
    else
      (im == Fast ? ops::threshold_boundaries : ops::ref::threshold_boundaries)(
          b.data(), H.in[0].data(), rw.tok.data(), kBos, B, L, 0.5f);
    std::copy(b.begin(), b.end(), o[0].begin());
  };
  H.tol = 0;
  H.bytes = {9.0 * N, 0};
  finish(H, c, m, 20);
}

void run_segments(const Case& c, Mode m) {
  const i64 B = c.B, L = c.Lq;
  Rows rw(c, 60 + L);
  const ops::Segments& sg = rw.sg;
  Harness H;
  // Every field as a float output: seg, count, start, len, forced, Mmax.
  H.out_sizes = {B * L, B, B * sg.Mmax, B * sg.Mmax, B * sg.Mmax, 1};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    ops::Segments s;
    if (m == Perf) {  // the build alone
      s.build(rw.b.data(), rw.tok.data(), kBos, B, L);
      return;
    }
    if (im == Fast)
      s.build(rw.b.data(), rw.tok.data(), kBos, B, L);
    else
      s = ops::ref::build_segments(rw.b.data(), rw.tok.data(), kBos, B, L);
    ASSERT_EQ(s.Mmax, sg.Mmax);
    ASSERT_EQ(s.B, B);
    ASSERT_EQ(s.L, L);
    o[0].assign(s.seg.begin(), s.seg.end());
    o[1].assign(s.count.begin(), s.count.end());
    o[2].assign(s.start.begin(), s.start.end());
    o[3].assign(s.len.begin(), s.len.end());
    o[4].assign(s.forced.begin(), s.forced.end());
    o[5] = {float(s.Mmax)};
  };
  H.tol = 0;
  H.bytes = {5.0 * B * L + 4.0 * B * L, 0};
  finish(H, c, m, 21);
}

// Concept-slot buffers [B, Mmax, d] of random values with NaN pads: an op that reads a pad
// (which it must not) puts a NaN into its output, which the comparisons catch.
Buf slot_values(const ops::Segments& sg, i64 d, uint64_t seed) {
  Buf z(sg.B * sg.Mmax * d);
  test::fill_normal(z.data(), i64(z.size()), seed);
  for (i64 r = 0; r < sg.B; ++r)
    for (i64 j = sg.count[r]; j < sg.Mmax; ++j)
      std::fill_n(z.data() + sg.slot(r, j) * d, d, std::numeric_limits<float>::quiet_NaN());
  return z;
}

void run_pool_mean(const Case& c, Mode m) {
  const i64 d = c.d;
  Rows rw(c, 70 + c.Lq);
  const ops::Segments& sg = rw.sg;
  const i64 N = sg.B * sg.L, S = sg.B * sg.Mmax * d;
  Harness H;
  H.names = {"H"};
  H.in = {Buf(N * d)};
  test::fill_normal(H.in[0].data(), N * d, 71, c.std);
  H.out_sizes = {S};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    (im == Fast ? ops::pool_mean_forward : ops::ref::pool_mean_forward<float>)(
        o[0].data(), H.in[0].data(), sg, d);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    ops::ref::pool_mean_forward<double>(o.data(), in[0].data(), sg, d);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>&, const float* dout, std::vector<Buf>& g) {
    (im == Fast ? ops::pool_mean_backward : ops::ref::pool_mean_backward)(g[0].data(), dout, sg,
                                                                          d);
  };
  H.bytes = {4.0 * (N * d + S), 4.0 * (2 * N * d + S)};
  finish(H, c, m, 22);
}

// p in [0.1, 0.9] (inside the clamp's pass-through range, so dp is live) and 1 at forced
// positions, as the router produces.
void run_smoother(const Case& c, Mode m) {
  const i64 d = c.d;
  Rows rw(c, 80 + c.Lq);
  const ops::Segments& sg = rw.sg;
  const i64 N = sg.B * sg.L, S = sg.B * sg.Mmax * d;
  Harness H;
  H.names = {"z", "p"};
  H.in = {slot_values(sg, d, 81), Buf(N)};
  test::fill_uniform(H.in[1].data(), N, 82, 0.1f, 0.9f);
  for (i64 n = 0; n < N; ++n)
    if (n % sg.L == 0 || rw.tok[n] == kBos) H.in[1][n] = 1.f;
  H.out_sizes = {S};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    (im == Fast ? ops::smoother_forward : ops::ref::smoother_forward<float>)(
        o[0].data(), H.in[0].data(), H.in[1].data(), sg, d);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    ops::ref::smoother_forward<double>(o.data(), in[0].data(), in[1].data(), sg, d);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>& o, const float* dout, std::vector<Buf>& g) {
    (im == Fast ? ops::smoother_backward : ops::ref::smoother_backward)(
        g[0].data(), g[1].data(), dout, o[0].data(), H.in[0].data(), H.in[1].data(), sg, d);
  };
  H.fd_h = 1e-3;
  H.fd_probes = 2 * N;  // most p carry no gradient (not a concept start): probe them all
  H.bytes = {8.0 * S, 20.0 * S};
  finish(H, c, m, 23);
}

void run_concept_list(const Case& c, Mode m) {
  const i64 B = c.B, Mmax = c.Lq, d = c.d, K = B * (Mmax + 1) * d;
  Harness H;
  H.names = {"z_null", "zs"};
  H.in = {Buf(d), Buf(B * Mmax * d)};
  test::fill_normal(H.in[0].data(), d, 90);
  test::fill_normal(H.in[1].data(), B * Mmax * d, 91);
  H.out_sizes = {K};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    (im == Fast ? ops::concept_list_forward : ops::ref::concept_list_forward<float>)(
        o[0].data(), H.in[0].data(), H.in[1].data(), B, Mmax, d);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    ops::ref::concept_list_forward<double>(o.data(), in[0].data(), in[1].data(), B, Mmax, d);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>&, const float* dout, std::vector<Buf>& g) {
    (im == Fast ? ops::concept_list_backward : ops::ref::concept_list_backward)(
        g[0].data(), g[1].data(), dout, B, Mmax, d);
  };
  H.bytes = {8.0 * K, 12.0 * K};
  finish(H, c, m, 24);
}

void run_concept_gather(const Case& c, Mode m) {
  const i64 W = c.d;
  Rows rw(c, 100 + c.Lq);
  const ops::Segments& sg = rw.sg;
  const i64 N = sg.B * sg.L, K = sg.B * (sg.Mmax + 1) * W;
  Harness H;
  H.names = {"list"};
  H.in = {Buf(K)};
  test::fill_normal(H.in[0].data(), K, 101);
  H.out_sizes = {N * W};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    if (im == Fast)
      ops::concept_gather(o[0].data(), H.in[0].data(), sg, W);
    else
      ops::ref::concept_gather<float>(o[0].data(), H.in[0].data(), sg, W);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    ops::ref::concept_gather<double>(o.data(), in[0].data(), sg, W);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>&, const float* dout, std::vector<Buf>& g) {
    if (im == Fast)
      ops::concept_scatter_add(g[0].data(), dout, sg, W);
    else
      ops::ref::concept_scatter_add(g[0].data(), dout, sg, W);
  };
  H.bytes = {4.0 * (2 * N * W), 4.0 * (N * W + 2 * K)};
  finish(H, c, m, 25);
}

// compact / replicate / masked, all against ref::concept_attention (the definition).
void run_concept_attention(const Case& c, Mode m) {
  std::string kind = std::string(c.op).substr(std::string("concept_attention_").size());
  const bool bf16 = kind.size() > 5 && kind.substr(kind.size() - 5) == "_bf16";
  if (bf16) {
    if (!ops::cpu_has_bf16()) return;  // BF16 precision needs AVX512-BF16
    kind.resize(kind.size() - 5);
  }
  const i64 B = c.B, L = c.Lq, Hq = c.Hq, Hkv = c.Hkv, hd = c.hd, W = Hkv * hd;
  Rows rw(c, 300 + L);
  const ops::Segments& sg = rw.sg;
  const i64 K1 = sg.Mmax + 1;
  const float scale = 1.0f / std::sqrt(float(hd));
  Harness H;
  H.names = {"q", "k", "v"};
  H.in = {Buf(B * L * Hq * hd), Buf(B * K1 * W), Buf(B * K1 * W)};
  for (int i = 0; i < 3; ++i)
    test::fill_normal(H.in[i].data(), i64(H.in[i].size()), 301 + i, c.std);
  H.out_sizes = {B * L * Hq * hd, B * Hq * L};
  Buf krep(B * L * W), vrep(B * L * W), dkrep(B * L * W), dvrep(B * L * W);  // replicate scratch
  const float *q = H.in[0].data(), *k = H.in[1].data(), *v = H.in[2].data();
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    if (im == Ref)
      ops::ref::concept_attention_forward<float>(o[0].data(), o[1].data(), q, k, v, sg, B, L, Hq,
                                                 Hkv, hd, scale);
    else if (kind == "compact")
      ops::concept_attention_forward(o[0].data(), o[1].data(), q, k, v, sg, B, L, Hq, Hkv, hd,
                                     scale);
    else if (kind == "replicate")
      ops::concept_attention_replicate_forward(o[0].data(), o[1].data(), krep.data(),
                                               vrep.data(), q, k, v, sg, B, L, Hq, Hkv, hd,
                                               scale);
    else
      ops::concept_attention_masked_forward(o[0].data(), o[1].data(), q, k, v, sg, B, L, Hq, Hkv,
                                            hd, scale);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    Vec lse(B * Hq * L);
    ops::ref::concept_attention_forward<double>(o.data(), lse.data(), in[0].data(), in[1].data(),
                                                in[2].data(), sg, B, L, Hq, Hkv, hd, scale);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>& o, const float* dout, std::vector<Buf>& g) {
    float *dq = g[0].data(), *dk = g[1].data(), *dv = g[2].data();
    if (im == Ref)
      ops::ref::concept_attention_backward(dq, dk, dv, dout, o[0].data(), o[1].data(), q, k, v,
                                           sg, B, L, Hq, Hkv, hd, scale);
    else if (kind == "compact")
      ops::concept_attention_backward(dq, dk, dv, dout, o[0].data(), o[1].data(), q, k, v, sg, B,
                                      L, Hq, Hkv, hd, scale);
    else if (kind == "replicate")
      ops::concept_attention_replicate_backward(dq, dk, dv, dkrep.data(), dvrep.data(), dout,
                                                o[0].data(), o[1].data(), q, krep.data(),
                                                vrep.data(), sg, B, L, Hq, Hkv, hd, scale);
    else
      ops::concept_attention_masked_backward(dq, dk, dv, dout, o[0].data(), o[1].data(), q, k, v,
                                             sg, B, L, Hq, Hkv, hd, scale);
  };
  // A row in a single concept attends one key: its dq is exactly 0 in theory, rounding noise
  // in practice, so errors are measured against max(scale, 1).
  H.tol = kind == "compact" ? 5e-5 : 2e-4;
  H.floor = 1;
  // The function's cost, the same for all three forms (so they compare by time): the
  // multiply-adds of QK^T and PV over the list entries token t sees (seg(t) + 1 of them).
  double pairs = 0;
  for (i32 s : sg.seg) pairs += s + 1;
  H.flops = {4.0 * Hq * pairs * hd, 10.0 * Hq * pairs * hd};
  if (L > 100) H.fd_probes = 12;  // the double reference is O(L^2) per probe
  std::optional<ops::PrecisionScope> prec;
  if (bf16) prec.emplace(ops::Precision::BF16);
  const bool amx = ops::attention_units() != ops::AttentionUnits::Fp32;
  if (amx) {  // bf16 operands in every tile product: as attention_bf16
    H.tol = 2e-2;
    H.fd_probes = 0;
  }
  if (!finish(H, c, m, 30)) return;
  if (amx && L > 1) {
    // the bf16 path really ran: forward and backward differ from the FP32 kernel's
    auto o16 = alloc(H.out_sizes), o32 = alloc(H.out_sizes);
    H.fwd(Fast, o16);
    Buf R(o16[0].size());
    test::fill_normal(R.data(), i64(R.size()), 305);
    auto g16 = alloc({i64(H.in[0].size()), B * K1 * W, B * K1 * W});
    auto g32 = alloc({i64(H.in[0].size()), B * K1 * W, B * K1 * W});
    H.bwd(Fast, o16, R.data(), g16);
    {
      ops::PrecisionScope fp(ops::Precision::FP32);
      H.fwd(Fast, o32);
      H.bwd(Fast, o16, R.data(), g32);
    }
    EXPECT_GT(scaled_err(o16[0], o32[0], 1e-30), 1e-5) << "bf16 forward equals the FP32 one";
    EXPECT_GT(scaled_err(g16[2], g32[2], 1e-30), 1e-5) << "bf16 backward equals the FP32 one";
  }

  // The last concept of each row and the pads are never attended: zero gradient.
  auto o = alloc(H.out_sizes);
  H.fwd(Fast, o);
  Buf R(o[0].size());
  test::fill_normal(R.data(), i64(R.size()), 304);
  auto g = alloc({i64(H.in[0].size()), B * K1 * W, B * K1 * W});
  H.bwd(Fast, o, R.data(), g);
  for (i64 r = 0; r < B; ++r)
    for (i64 e = sg.count[r]; e < K1; ++e)
      for (i64 i = 0; i < W; ++i) {
        ASSERT_EQ(g[1][(r * K1 + e) * W + i], 0.f) << "row " << r << " entry " << e;
        ASSERT_EQ(g[2][(r * K1 + e) * W + i], 0.f) << "row " << r << " entry " << e;
      }
}

// On an AMX CPU the tiles, then the dot products; elsewhere the dot products.
void run_concept_attention_bf16(const Case& c, Mode m) {
  run_concept_attention(c, m);
  if (amx_kernels() && ops::cpu_has_bf16()) {
    AttentionTilesOff dot;
    run_concept_attention(c, m);
  }
}

// The Global Parser loss as a function of p (b fixed): one scalar output; its backward is
// aux_loss_backward with grad_p scaled by dout.
void run_aux_loss(const Case& c, Mode m) {
  const i64 n = c.B * c.Lq;
  const double R = 4.0;
  Harness H;
  H.names = {"p"};
  H.in = {Buf(n)};
  test::fill_uniform(H.in[0].data(), n, 110, 0.f, 1.f);
  std::vector<uint8_t> b(n);
  ops::sample_boundaries(b.data(), H.in[0].data(), nullptr, kBos, c.B, c.Lq, 1.f, 1, 1, 0);
  double sum_b = 0;
  for (uint8_t x : b) sum_b += x;
  auto sum = [](const auto& p) {
    double s = 0;
    for (auto x : p) s += double(x);
    return s;
  };
  H.out_sizes = {1};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    const double sp = sum(H.in[0]);
    o[0][0] = float(im == Fast ? ops::global_parser_loss(sum_b, sp, double(n), R).value
                               : ops::ref::global_parser_loss(sum_b, sp, double(n), R).value);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    o[0] = ops::ref::global_parser_loss(sum_b, sum(in[0]), double(n), R).value;
  };
  H.bwd = [&](Impl im, const std::vector<Buf>&, const float* dout, std::vector<Buf>& g) {
    const double sp = sum(H.in[0]);
    if (im == Fast)
      ops::aux_loss_backward(
          g[0].data(), n, float(ops::global_parser_loss(sum_b, sp, double(n), R, dout[0]).grad_p));
    else
      ops::ref::aux_loss_backward(
          g[0].data(), n,
          float(ops::ref::global_parser_loss(sum_b, sp, double(n), R, dout[0]).grad_p));
  };
  H.bytes = {4.0 * n, 8.0 * n};
  finish(H, c, m, 31);
}

// The per-sequence ratio loss (aux_kind = "sequence") as a function of p (b fixed): one scalar,
// the mean of the rows' L_r over rows = B + 3 (three rows of other micro-batches, absent here,
// count in the mean as they do in a step); its backward scales by dout.
void run_aux_loss_sequence(const Case& c, Mode m) {
  const i64 B = c.B, L = c.Lq, n = B * L, rows = B + 3;
  const double R = 3.0;
  Harness H;
  H.names = {"p"};
  H.in = {Buf(n)};
  test::fill_uniform(H.in[0].data(), n, 112, 0.f, 1.f);
  std::vector<uint8_t> b(n);
  // Rows with different boundary rates, so the per-row F_r differ.
  for (i64 r = 0; r < B; ++r)
    for (i64 t = 0; t < L; ++t) b[r * L + t] = (t == 0 || (t * (r + 2)) % 7 < 2) ? 1 : 0;
  H.out_sizes = {1};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    const double s = im == Fast ? ops::sequence_parser_loss_forward(b.data(), H.in[0].data(), B, L, R)
                                : ops::ref::sequence_parser_loss_forward(b.data(), H.in[0].data(),
                                                                         B, L, R);
    o[0][0] = float(s / double(rows));
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    o[0] = ops::ref::sequence_parser_loss_forward(b.data(), in[0].data(), B, L, R) / double(rows);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>&, const float* dout, std::vector<Buf>& g) {
    if (im == Fast)
      ops::sequence_parser_loss_backward(g[0].data(), b.data(), B, L, rows, R, dout[0]);
    else
      ops::ref::sequence_parser_loss_backward(g[0].data(), b.data(), B, L, rows, R, dout[0]);
  };
  H.bytes = {5.0 * n, 5.0 * n};
  if (!finish(H, c, m, 32)) return;
  // With one row and rows = 1 it is the Global Parser loss of that row.
  const double sp = [&] {
    double s = 0;
    for (i64 t = 0; t < L; ++t) s += H.in[0][t];
    return s;
  }();
  double sb = 0;
  for (i64 t = 0; t < L; ++t) sb += b[t];
  EXPECT_NEAR(ops::sequence_parser_loss_forward(b.data(), H.in[0].data(), 1, L, R),
              ops::global_parser_loss(sb, sp, double(L), R).value, 1e-9);
}

using Runner = void (*)(const Case&, Mode);
const std::pair<const char*, Runner> kOps[] = {
    {"embedding", run_embedding},
    {"rmsnorm", run_rmsnorm},
    {"head_rmsnorm", run_head_rmsnorm},
    {"linear", run_linear},
    {"packed_linear", run_packed_linear},
    {"gemm", run_gemm},
    {"gemm_amx", run_gemm_amx},
    {"gemm_blocked", run_gemm_blocked},
    {"rope", run_rope},
    {"swiglu", run_swiglu},
    {"attention", run_attention},
    {"attention_bf16", run_attention_bf16},
    {"cross_entropy", run_cross_entropy},
    {"adamw", run_adamw},
    {"reduce", run_reduce},
    {"router_prob", run_router_prob},
    {"router_prob_raw", run_router_prob},
    {"sample_boundaries", run_boundaries},
    {"threshold_boundaries", run_boundaries},
    {"segments", run_segments},
    {"pool_mean", run_pool_mean},
    {"smoother", run_smoother},
    {"concept_list", run_concept_list},
    {"concept_gather", run_concept_gather},
    {"concept_attention_compact", run_concept_attention},
    {"concept_attention_compact_bf16", run_concept_attention_bf16},
    {"concept_attention_replicate", run_concept_attention},
    {"concept_attention_masked", run_concept_attention},
    {"aux_loss", run_aux_loss},
    {"aux_loss_sequence", run_aux_loss_sequence},
};

Runner runner_of(const Case& c) {
  for (const auto& [name, fn] : kOps)
    if (std::string(name) == c.op) return fn;
  return nullptr;
}

// `test_ops --perf [op...]`: the perf rows (optionally only those of the named ops).
int run_perf(const std::vector<std::string>& only) {
  std::printf("kernels: %s\n", ops::isa_summary().c_str());
  std::printf("%-28s %-44s %-11s %12s %17s\n", "op", "shape", "pass", "best", "rate");
  for (const Case& c : kCases) {
    if (!c.perf) continue;
    if (!only.empty() && std::find(only.begin(), only.end(), c.op) == only.end()) continue;
    runner_of(c)(c, Perf);
  }
  return 0;
}

}  // namespace

// The whole table at each kernel level; a level this build or CPU lacks is skipped (and
// says so).
class OpsAtLevel : public ::testing::TestWithParam<ops::Isa> {};

TEST_P(OpsAtLevel, TableMatchesReferenceAndFiniteDifferences) {
  const ops::Isa level = GetParam();
  const std::vector<ops::Isa> have = ops::isa_available();
  if (std::find(have.begin(), have.end(), level) == have.end()) {
    GTEST_SKIP() << ops::isa_name(level) << " kernels not available: " << ops::isa_summary();
  }
  const ops::IsaScope at(level);
  ASSERT_EQ(ops::isa(), level);
  for (const Case& c : kCases) {
    if (c.perf) continue;
    SCOPED_TRACE(std::string(ops::isa_name(level)) + " " + c.op + " " + describe(c));
    Runner fn = runner_of(c);
    ASSERT_NE(fn, nullptr) << "unknown op " << c.op;
    fn(c, Check);
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, OpsAtLevel,
                         ::testing::Values(ops::Isa::Scalar, ops::Isa::Avx2, ops::Isa::Avx512),
                         [](const auto& info) { return std::string(ops::isa_name(info.param)); });

// The levels: the portable build offers scalar and whatever the CPU supports above it (all of
// them where the CPU has AVX-512); bad names and unavailable levels are errors that say what
// is available.
TEST(Ops, IsaLevelsAndErrors) {
  const std::vector<ops::Isa> have = ops::isa_available();
  ASSERT_FALSE(have.empty());
  EXPECT_NE(ops::isa_summary().find(ops::isa_name(ops::isa())), std::string::npos);
  if (!ops::isa_native_build()) {
    EXPECT_EQ(have.front(), ops::Isa::Scalar);
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      EXPECT_EQ(have.size(), 3u) << ops::isa_summary();
    }
  } else {
    EXPECT_EQ(have.size(), 1u);
  }
  // each level runs its own variant (the op table checks every level only if set_isa switches)
  {
    const ops::IsaScope restore(ops::isa());
    for (ops::Isa i : have) {
      ops::set_isa(i);
      EXPECT_EQ(ops::kernel_variant(), int(i)) << ops::isa_name(i);
    }
  }
  // the CPU's features as --version and the benchmarks print them: each name iff the CPU has it
  __builtin_cpu_init();
  const std::string feats = " " + ops::cpu_isa_features() + " ";
  const std::pair<const char*, bool> features[] = {
      {"avx2", __builtin_cpu_supports("avx2")},
      {"fma", __builtin_cpu_supports("fma")},
      {"avx512f", __builtin_cpu_supports("avx512f")},
      {"avx512bw", __builtin_cpu_supports("avx512bw")},
      {"avx512vl", __builtin_cpu_supports("avx512vl")},
      {"avx512dq", __builtin_cpu_supports("avx512dq")},
      {"avx512bf16", __builtin_cpu_supports("avx512bf16")},
      {"amx-tile", __builtin_cpu_supports("amx-tile")},
      {"amx-bf16", __builtin_cpu_supports("amx-bf16")}};
  bool any = false;
  for (const auto& [name, has] : features) {
    EXPECT_EQ(feats.find(std::string(" ") + name + " ") != std::string::npos, has) << name << ":" << feats;
    any = any || has;
  }
  if (!any) {
    EXPECT_EQ(feats, " none ");
  }
  try {
    ops::parse_isa("avx3", "DLCM_ISA");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("DLCM_ISA"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("avx512"), std::string::npos) << e.what();
  }
  for (ops::Isa i : {ops::Isa::Scalar, ops::Isa::Avx2, ops::Isa::Avx512}) {
    if (std::find(have.begin(), have.end(), i) != have.end()) continue;
    try {
      ops::set_isa(i);
      FAIL() << "no error for " << ops::isa_name(i);
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("not available"), std::string::npos) << e.what();
    }
  }
}

// A product over an empty K (dW += dy^T x over zero rows) is C = beta C on every path: each
// precision, both kinds of BF16 units, the AMX tiles on and off, both oneDNN paths, every
// form, and dlcm's blocked sgemm; its empty operands are null (an empty buffer), which
// oneDNN's sgemm refused.
TEST(Ops, GemmOverEmptyKIsBetaC) {
  GemmCacheScope every_shape({.capacity = 8, .min_flops = 0, .min_uses = 1});
  const ops::AmxGemmScope amx_restore(ops::amx_gemm_on());
  uint64_t seed = 500;
  for_each_precision_and_units([&](ops::Precision p, ops::Bf16Units u) {
    for (bool amx : {true, false}) {
      ops::set_amx_gemm(amx);
      for (ops::GemmPath path : {ops::GemmPath::Runtime, ops::GemmPath::Fixed}) {
        ops::set_gemm_path(path);
        for (int form = 0; form < 32; ++form) {
          const bool ta = form & 1, tb = form & 2;
          const float beta = form & 4 ? 1.f : 0.f, alpha = form & 8 ? 0.7f : 1.f;
          const i64 pad = form & 16 ? 3 : 1;  // a row of A or B is at least 1 wide (BLAS)
          EXPECT_EQ(gemm_error(ta, tb, 33, 40, 0, alpha, beta, pad, seed += 3), 0.0)
              << ops::precision_name(p) << " " << ops::bf16_units_name(u) << " amx=" << amx
              << " " << ops::gemm_path_name(path) << " ta=" << ta << " tb=" << tb
              << " alpha=" << alpha << " beta=" << beta << " pad=" << pad;
          // and a benchmark's provenance names what ran: no product
          EXPECT_EQ(ops::gemm_impl(ta, tb, 33, 40, 0, alpha, 40, 40, beta, 40).rfind("none", 0),
                    0u);
        }
      }
    }
  });
  // dlcm's blocked sgemm called directly (beta 0 never reading C: gemm_error poisons it)
  if (ops::blocked_sgemm_native())
    for (int form = 0; form < 16; ++form) {
      const bool ta = form & 1, tb = form & 2;
      const float beta = form & 4 ? 1.f : 0.f;
      const i64 pad = form & 8 ? 3 : 1;
      EXPECT_EQ(gemm_error(ta, tb, 33, 40, 0, 0.7f, beta, pad, seed += 3, true), 0.0)
          << "blocked ta=" << ta << " tb=" << tb << " beta=" << beta << " pad=" << pad;
    }
}

// The fixed-shape cache: bounded (least recently used shapes evicted, results unchanged when
// they come back), a shape below min_uses stays on the runtime path, and calls from inside a
// parallel region never use it.
TEST(Ops, GemmFixedCacheEvictsAndFallsBack) {
  GemmCacheScope small({.capacity = 2, .min_flops = 0, .min_uses = 1});
  ops::set_gemm_path(ops::GemmPath::Fixed);
  // four shapes cycled through a cache of two: every call creates and evicts
  const i64 sizes[] = {17, 18, 19, 20};
  for (int round = 0; round < 3; ++round)
    for (i64 n : sizes) {
      const ops::GemmCacheStats before = ops::gemm_cache_stats();
      EXPECT_LT(gemm_error(false, true, n, n + 1, n + 2, 0.5f, 1.f, 1, 7 + n), 1e-5) << n;
      const ops::GemmCacheStats after = ops::gemm_cache_stats();
      EXPECT_EQ(after.created - before.created, 1) << n;
      EXPECT_EQ(after.fixed_calls - before.fixed_calls, 1) << n;
      EXPECT_LE(after.size, 2);
    }
  EXPECT_EQ(ops::gemm_cache_stats().evicted, 3 * 4 - 2);
  // two shapes alternate within the capacity: hits, no more creation
  const ops::GemmCacheStats s0 = ops::gemm_cache_stats();
  for (int i = 0; i < 4; ++i) EXPECT_LT(gemm_error(false, true, 19 + i % 2, 20 + i % 2, 21 + i % 2, 0.5f, 1.f, 1, 1), 1e-5);
  EXPECT_EQ(ops::gemm_cache_stats().created, s0.created);
  // inside a parallel region: the runtime path
  const i64 fixed0 = ops::gemm_cache_stats().fixed_calls;
  double worst = 0;
#pragma omp parallel for num_threads(2) reduction(max : worst)
  for (int i = 0; i < 4; ++i) worst = std::max(worst, gemm_error(false, true, 20, 21, 22, 0.5f, 1.f, 1, 5 + i));
  EXPECT_LT(worst, 1e-5);
  EXPECT_EQ(ops::gemm_cache_stats().fixed_calls, fixed0);
  // min_uses = 2: a shape's first call runs on the runtime path, its second creates and uses
  ops::set_gemm_cache_config({.capacity = 2, .min_flops = 0, .min_uses = 2});
  for (int use = 0; use < 3; ++use) {
    const ops::GemmCacheStats before = ops::gemm_cache_stats();
    EXPECT_LT(gemm_error(true, false, 23, 24, 25, 1.f, 0.f, 0, 3), 1e-5);
    const ops::GemmCacheStats after = ops::gemm_cache_stats();
    EXPECT_EQ(after.created - before.created, use == 1 ? 1 : 0) << use;
    EXPECT_EQ(after.fixed_calls - before.fixed_calls, use == 0 ? 0 : 1) << use;
  }
  // a new configuration counts uses afresh: one call, the configuration set again, one more
  // call: each the shape's first under its configuration, so nothing is created
  {
    const ops::GemmCacheStats before = ops::gemm_cache_stats();
    for (int set = 0; set < 2; ++set) {
      ops::set_gemm_cache_config({.capacity = 2, .min_flops = 0, .min_uses = 2});
      EXPECT_LT(gemm_error(true, false, 26, 27, 28, 1.f, 0.f, 0, 3), 1e-5);
    }
    EXPECT_EQ(ops::gemm_cache_stats().created, before.created);
  }
  // min_flops: smaller products stay on the runtime path
  ops::set_gemm_cache_config({.capacity = 2, .min_flops = 2.0 * 23 * 24 * 25 + 1, .min_uses = 1});
  EXPECT_LT(gemm_error(true, false, 23, 24, 25, 1.f, 0.f, 0, 3), 1e-5);
  EXPECT_EQ(ops::gemm_cache_stats().size, 0);
  // bad DLCM_GEMM values are named
  try {
    ops::parse_gemm_path("amx", "DLCM_GEMM");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("DLCM_GEMM"), std::string::npos);
  }
}

// FP32 products x W^T (A as stored, B transposed) run on oneDNN's sgemm on the fixed path
// (set_fp32_nt_sgemm, default on), with the same results as the fixed-shape primitive; the
// other forms, and BF16 x W^T on oneDNN, still get primitives. Off, x W^T gets one too.
TEST(Ops, GemmFp32NtOnSgemm) {
  EXPECT_TRUE(ops::fp32_nt_sgemm());  // the default
  GemmCacheScope scope({.capacity = 8, .min_flops = 0, .min_uses = 1});
  ops::set_gemm_path(ops::GemmPath::Fixed);
  for (bool on : {true, false}) {
    ops::Fp32NtSgemmScope nt(on);
    SCOPED_TRACE(on ? "x W^T on sgemm" : "x W^T fixed");
    ops::GemmCacheStats s0 = ops::gemm_cache_stats();
    EXPECT_LT(gemm_error(false, true, 33, 40, 48, 1.f, 0.f, 0, 3), 1e-5);
    EXPECT_LT(gemm_error(false, true, 33, 40, 48, 0.5f, 1.f, 2, 4), 1e-5);
    ops::GemmCacheStats s1 = ops::gemm_cache_stats();
    EXPECT_EQ(s1.fixed_calls - s0.fixed_calls, on ? 0 : 2);
    const std::string impl = ops::gemm_impl(false, true, 33, 40, 48, 1.f, 48, 48, 0.f, 40);
    if (on) EXPECT_EQ(impl, "sgemm");
    else EXPECT_NE(impl, "sgemm");
    // dx = dy W and dW += dy^T x keep the fixed path either way
    EXPECT_LT(gemm_error(false, false, 33, 48, 40, 1.f, 1.f, 0, 5), 1e-5);
    EXPECT_LT(gemm_error(true, false, 40, 48, 33, 1.f, 1.f, 0, 6), 1e-5);
    EXPECT_EQ(ops::gemm_cache_stats().fixed_calls - s1.fixed_calls, 2);
    if (ops::cpu_has_bf16()) {  // BF16 x W^T on oneDNN (the AMX tiles off): fixed
      ops::PrecisionScope ps(ops::Precision::BF16);
      const ops::AmxGemmScope amx_off(false);
      const ops::GemmCacheStats s2 = ops::gemm_cache_stats();
      EXPECT_LT(gemm_error(false, true, 33, 40, 48, 1.f, 0.f, 0, 7), 2e-2);
      if (ops::bf16_units() == ops::Bf16Units::Native) {
        EXPECT_EQ(ops::gemm_cache_stats().fixed_calls - s2.fixed_calls, 1);
      }
    }
  }
}

// A product whose M (or K) takes a new value at every step -- a DLCM's concept rows -- gets
// primitives for its first values only: once its family (the shape with that dimension left
// out) has shown varying_values values, new values run on the runtime path (no primitive
// created per step, no stable shape evicted); a stable shape keeps its primitive, and results
// are the same either way.
TEST(Ops, GemmFixedCacheKeepsVaryingShapesOnTheRuntimePath) {
  GemmCacheScope scope({.capacity = 64, .min_flops = 0, .min_uses = 2, .varying_values = 4});
  ops::set_gemm_path(ops::GemmPath::Fixed);
  for (int dim = 0; dim < 2; ++dim) {  // 0: M varies (x W^T), 1: K varies (dW += dy^T x)
    const ops::GemmCacheStats s0 = ops::gemm_cache_stats();
    for (i64 step = 0; step < 8; ++step) {
      const i64 v = 40 + 3 * step;  // this step's concept count
      for (int call = 0; call < 3; ++call) {  // three layers of one shape per step
        const double err = dim == 0 ? gemm_error(false, true, v, 24, 32, 1.f, 0.f, 0, 3 + call)
                                    : gemm_error(true, false, 24, 32, v, 1.f, 1.f, 0, 3 + call);
        EXPECT_LT(err, 1e-5) << dim << " " << step;
      }
    }
    const ops::GemmCacheStats s1 = ops::gemm_cache_stats();
    // steps 0-2 create at their second call; from step 3 on the family varies
    EXPECT_EQ(s1.created - s0.created, 3) << dim;
    EXPECT_EQ(s1.fixed_calls - s0.fixed_calls, 3 * 2) << dim;
    EXPECT_EQ(s1.varying_calls - s0.varying_calls, 5 * 3) << dim;
    // a value seen before its family varied keeps its primitive
    const double err = dim == 0 ? gemm_error(false, true, 43, 24, 32, 1.f, 0.f, 0, 9)
                                : gemm_error(true, false, 24, 32, 43, 1.f, 1.f, 0, 9);
    EXPECT_LT(err, 1e-5);
    EXPECT_EQ(ops::gemm_cache_stats().fixed_calls, s1.fixed_calls + 1) << dim;
  }
  // a shape that repeats is unaffected by the varying families beside it
  const ops::GemmCacheStats s2 = ops::gemm_cache_stats();
  for (int call = 0; call < 3; ++call)
    EXPECT_LT(gemm_error(false, true, 64, 24, 48, 1.f, 0.f, 0, 5), 1e-5);
  EXPECT_EQ(ops::gemm_cache_stats().created - s2.created, 1);
  EXPECT_EQ(ops::gemm_cache_stats().fixed_calls - s2.fixed_calls, 2);
  // varying_values = 0: the old rule, a primitive per value
  ops::set_gemm_cache_config({.capacity = 64, .min_flops = 0, .min_uses = 2, .varying_values = 0});
  const ops::GemmCacheStats s3 = ops::gemm_cache_stats();
  for (i64 step = 0; step < 6; ++step)
    for (int call = 0; call < 2; ++call)
      EXPECT_LT(gemm_error(false, true, 50 + step, 24, 32, 1.f, 0.f, 0, 3), 1e-5);
  EXPECT_EQ(ops::gemm_cache_stats().created - s3.created, 6);
  EXPECT_EQ(ops::gemm_cache_stats().varying_calls, s3.varying_calls);
  // a new configuration forgets the values families took before it: three values, the
  // configuration set again, a fourth is its family's first (created at its second call)
  ops::set_gemm_cache_config({.capacity = 64, .min_flops = 0, .min_uses = 1, .varying_values = 4});
  for (i64 v : {70, 71, 72}) EXPECT_LT(gemm_error(false, true, v, 24, 32, 1.f, 0.f, 0, 3), 1e-5);
  ops::set_gemm_cache_config({.capacity = 64, .min_flops = 0, .min_uses = 2, .varying_values = 4});
  const ops::GemmCacheStats s4 = ops::gemm_cache_stats();
  for (int call = 0; call < 2; ++call)
    EXPECT_LT(gemm_error(false, true, 73, 24, 32, 1.f, 0.f, 0, 3), 1e-5);
  EXPECT_EQ(ops::gemm_cache_stats().created - s4.created, 1);
  EXPECT_EQ(ops::gemm_cache_stats().varying_calls, s4.varying_calls);
}

// BF16: linear_backward rounds dy once for dx and dW, linear_forward_multi x once for its
// products; the results must be the bits of the separate products, on both oneDNN paths.
TEST(Ops, Bf16SharedOperandRoundedOnceIsBitIdentical) {
  if (!ops::cpu_has_bf16()) GTEST_SKIP() << "no AVX512-BF16";
  GemmCacheScope every_shape({.capacity = 64, .min_flops = 0, .min_uses = 1});
  ops::PrecisionScope ps(ops::Precision::BF16);
  const i64 N = 37, in = 48, outs[3] = {40, 24, 56};
  Buf x(N * in), dy(N * outs[0]), W0(outs[0] * in), W1(outs[1] * in), W2(outs[2] * in);
  test::fill_normal(x.data(), N * in, 11);
  test::fill_normal(dy.data(), N * outs[0], 12);
  test::fill_normal(W0.data(), outs[0] * in, 13);
  test::fill_normal(W1.data(), outs[1] * in, 14);
  test::fill_normal(W2.data(), outs[2] * in, 15);
  for (int run = 0; run < 4; ++run) {
    const ops::GemmPath path = run & 1 ? ops::GemmPath::Fixed : ops::GemmPath::Runtime;
    ops::Bf16UnitsScope units(kBothUnits[run / 2]);
    ops::set_gemm_path(path);
    const std::string at = std::string(ops::gemm_path_name(path)) + " " +
                           ops::bf16_units_name(kBothUnits[run / 2]);
    // backward: dx += dy W, dW += dy^T x, from non-zero starting values
    Buf dx(N * in), dW(outs[0] * in);
    test::fill_normal(dx.data(), N * in, 16);
    test::fill_normal(dW.data(), outs[0] * in, 17);
    Buf dx_ref = dx, dW_ref = dW;
    ops::linear_backward(dx.data(), dW.data(), dy.data(), x.data(), W0.data(), N, in, outs[0]);
    ops::gemm(false, false, N, in, outs[0], 1.f, dy.data(), outs[0], W0.data(), in, 1.f,
              dx_ref.data(), in);
    ops::gemm(true, false, outs[0], in, N, 1.f, dy.data(), outs[0], x.data(), in, 1.f,
              dW_ref.data(), in);
    EXPECT_EQ(0, std::memcmp(dx.data(), dx_ref.data(), sizeof(float) * N * in)) << at;
    EXPECT_EQ(0, std::memcmp(dW.data(), dW_ref.data(), sizeof(float) * outs[0] * in)) << at;
    // forward of three products of one input
    Buf y0(N * outs[0]), y1(N * outs[1]), y2(N * outs[2]);
    float* y[3] = {y0.data(), y1.data(), y2.data()};
    const float* W[3] = {W0.data(), W1.data(), W2.data()};
    ops::linear_forward_multi(y, x.data(), W, N, in, outs, 3);
    for (int i = 0; i < 3; ++i) {
      Buf ref(N * outs[i]);
      ops::linear_forward(ref.data(), x.data(), W[i], N, in, outs[i]);
      EXPECT_EQ(0, std::memcmp(y[i], ref.data(), sizeof(float) * N * outs[i])) << at << " " << i;
    }
    // the shared copy ends with the call: new values in the same buffer are rounded anew (a
    // stale copy would multiply the old ones)
    for (float& v : x) v = -2.f * v;
    const Buf x2 = x;  // the new values at another address
    Buf a(N * outs[0]), b(N * outs[0]);
    ops::linear_forward(a.data(), x.data(), W0.data(), N, in, outs[0]);
    ops::linear_forward(b.data(), x2.data(), W0.data(), N, in, outs[0]);
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), sizeof(float) * N * outs[0])) << at;

    // a layer's kept copy of x (Bf16Copy): the forward rounds x into it, the backward's dW
    // product reads it; the same bits as rounding x again, and only for the x it was made from
    Buf k0(N * outs[0]), k1(N * outs[1]), k2(N * outs[2]);
    float* yk[3] = {k0.data(), k1.data(), k2.data()};
    ops::Bf16Copy keep;
    ops::linear_forward_multi(yk, x.data(), W, N, in, outs, 3, &keep);
    EXPECT_EQ(keep.src, x.data()) << at;
    EXPECT_EQ(0, std::memcmp(k0.data(), a.data(), sizeof(float) * N * outs[0])) << at;
    Buf dxk = dx, dWk = dW, dxn = dx, dWn = dW;
    i64 used = ops::bf16_copies_reused();
    ops::linear_backward(dxk.data(), dWk.data(), dy.data(), x.data(), W0.data(), N, in, outs[0],
                         &keep);
    EXPECT_EQ(ops::bf16_copies_reused(), used + 1) << at << ": the kept copy was not read";
    ops::linear_backward(dxn.data(), dWn.data(), dy.data(), x.data(), W0.data(), N, in, outs[0]);
    EXPECT_EQ(0, std::memcmp(dxk.data(), dxn.data(), sizeof(float) * N * in)) << at;
    EXPECT_EQ(0, std::memcmp(dWk.data(), dWn.data(), sizeof(float) * outs[0] * in)) << at;
    // a copy of another x (here x2, equal values at another address) is not taken for x
    used = ops::bf16_copies_reused();
    ops::linear_forward(a.data(), x2.data(), W0.data(), N, in, outs[0], &keep);
    EXPECT_EQ(keep.src, x2.data()) << at;
    ops::linear_backward(dxk.data(), dWk.data(), dy.data(), x.data(), W0.data(), N, in, outs[0],
                         &keep);
    EXPECT_EQ(ops::bf16_copies_reused(), used) << at << ": a copy of another x was read";
    // reuse off: the forward empties the copy, so no backward reads an old one
    ops::set_bf16_reuse(false);
    ops::linear_forward(a.data(), x.data(), W0.data(), N, in, outs[0], &keep);
    ops::set_bf16_reuse(true);
    EXPECT_EQ(keep.src, nullptr) << at;
    ops::linear_backward(dxk.data(), dWk.data(), dy.data(), x.data(), W0.data(), N, in, outs[0],
                         &keep);
    EXPECT_EQ(ops::bf16_copies_reused(), used) << at;

    // the weights' kept copies (wkeep): the forward rounds W[i] into them (and reads them), the
    // backward's dx = dy W reads W's; the same bits, and only for the W it was made from
    ops::Bf16Copy w16[3];
    ops::Bf16Copy* wk[3] = {&w16[0], &w16[1], &w16[2]};
    used = ops::bf16_copies_reused();
    ops::linear_forward_multi(yk, x.data(), W, N, in, outs, 3, &keep, wk);
    EXPECT_EQ(ops::bf16_copies_reused(), used + 3) << at << ": the weight copies were not read";
    for (int i = 0; i < 3; ++i) EXPECT_EQ(w16[i].src, W[i]) << at << " " << i;
    EXPECT_EQ(0, std::memcmp(k0.data(), a.data(), sizeof(float) * N * outs[0])) << at;
    dxk = dx, dWk = dW;
    used = ops::bf16_copies_reused();
    ops::linear_backward(dxk.data(), dWk.data(), dy.data(), x.data(), W0.data(), N, in, outs[0],
                         &keep, true, &w16[0]);
    EXPECT_EQ(ops::bf16_copies_reused(), used + 2) << at << ": x's and W's copies were not read";
    EXPECT_EQ(0, std::memcmp(dxk.data(), dxn.data(), sizeof(float) * N * in)) << at;
    EXPECT_EQ(0, std::memcmp(dWk.data(), dWn.data(), sizeof(float) * outs[0] * in)) << at;
    // a copy of another weight (W1's, offered for W0) is not read
    used = ops::bf16_copies_reused();
    ops::linear_backward(dxk.data(), nullptr, dy.data(), x.data(), W0.data(), N, in, outs[0],
                         nullptr, true, &w16[1]);
    EXPECT_EQ(ops::bf16_copies_reused(), used) << at << ": a copy of another W was read";
  }
}

// A producer read only by BF16 products may skip its floats (CopyProducer::floats): null where
// a copy is produced and skipping is on, the buffer itself in FP32, with skipping off and with
// the copies off. The products given the copy (forward and backward, dx and dW, on both kinds of
// units) give the bits of the same products from the floats; a product that cannot read the
// copy any more (the copies switched off in between) fails naming the switch instead of
// reading floats that were never written.
TEST(Ops, Bf16ProducerSkipsFloatsOnlyProductsRead) {
  if (!ops::cpu_has_bf16()) GTEST_SKIP() << "no AVX512-BF16";
  GemmCacheScope every_shape({.capacity = 64, .min_flops = 0, .min_uses = 1});
  const i64 N = 37, in = 48, out = 40;
  Buf x(N * in), w(in), dy(N * out), W(out * in);
  test::fill_normal(x.data(), N * in, 31);
  test::fill_uniform(w.data(), in, 32, 0.5f, 1.5f);
  test::fill_normal(dy.data(), N * out, 33);
  test::fill_normal(W.data(), out * in, 34);
  Buf xn(N * in), rstd(N);
  {  // FP32: no copy, the floats
    ops::Bf16Copy keep;
    ops::CopyProducer p(&keep, N, in);
    EXPECT_EQ(p.data(), nullptr);
    EXPECT_EQ(p.floats(xn.data()), xn.data());
  }
  ops::PrecisionScope ps(ops::Precision::BF16);
  ops::rmsnorm_forward(xn.data(), rstd.data(), x.data(), w.data(), N, in, 1e-5f);
  for (bool skip : {true, false}) {
    const ops::Bf16SkipFloatsScope skipping(skip);
    for (int run = 0; run < 2; ++run) {
      ops::Bf16UnitsScope units(kBothUnits[run]);
      const std::string at = std::string(skip ? "skip " : "floats ") +
                             ops::bf16_units_name(kBothUnits[run]);
      Buf y(N * out), dx(N * in, 0.f), dW(out * in, 0.f);
      Buf y_ref(N * out), dx_ref(N * in, 0.f), dW_ref(out * in, 0.f);
      ops::linear_forward(y_ref.data(), xn.data(), W.data(), N, in, out);
      ops::linear_backward(dx_ref.data(), dW_ref.data(), dy.data(), xn.data(), W.data(), N, in,
                           out);
      Buf xs(N * in, 7.0f), rs(N);  // the producer's output buffer (7: never written if skipped)
      ops::Bf16Copy keep;
      const i64 skipped = ops::bf16_floats_skipped();
      {
        ops::CopyProducer p(&keep, N, in);
        ASSERT_NE(p.data(), nullptr) << at;
        float* f = p.floats(xs.data());
        EXPECT_EQ(f, skip ? nullptr : xs.data()) << at;
        ops::rmsnorm_forward(f, rs.data(), x.data(), w.data(), N, in, 1e-5f, p.data());
        p.done(xs.data());
      }
      EXPECT_EQ(ops::bf16_floats_skipped(), skipped + (skip ? 1 : 0)) << at;
      EXPECT_EQ(keep.floats_absent, skip) << at;
      EXPECT_EQ(xs[0], skip ? 7.0f : xn[0]) << at;
      ops::linear_forward(y.data(), xs.data(), W.data(), N, in, out, &keep);
      ops::linear_backward(dx.data(), dW.data(), dy.data(), xs.data(), W.data(), N, in, out,
                           &keep);
      EXPECT_EQ(0, std::memcmp(y.data(), y_ref.data(), sizeof(float) * N * out)) << at;
      EXPECT_EQ(0, std::memcmp(dx.data(), dx_ref.data(), sizeof(float) * N * in)) << at;
      EXPECT_EQ(0, std::memcmp(dW.data(), dW_ref.data(), sizeof(float) * out * in)) << at;
      if (!skip) continue;
      // the copies switched off before the backward: an error naming the switch
      ops::set_bf16_reuse(false);
      try {
        ops::linear_backward(dx.data(), dW.data(), dy.data(), xs.data(), W.data(), N, in, out,
                             &keep);
        ADD_FAILURE() << at << ": read floats that were never written";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("DLCM_BF16_SKIP_FLOATS"), std::string::npos)
            << e.what();
      }
      // and the forward the same, for a produced copy
      {
        ops::set_bf16_reuse(true);
        ops::CopyProducer p(&keep, N, in);
        ops::rmsnorm_forward(p.floats(xs.data()), rs.data(), x.data(), w.data(), N, in, 1e-5f,
                             p.data());
        p.done(xs.data());
        ops::set_bf16_reuse(false);
      }
      EXPECT_THROW(ops::linear_forward(y.data(), xs.data(), W.data(), N, in, out, &keep), Error)
          << at;
      ops::set_bf16_reuse(true);
      {  // copies off from the start: the producer writes the floats
        ops::set_bf16_reuse(false);
        ops::CopyProducer p(&keep, N, in);
        EXPECT_EQ(p.data(), nullptr) << at;
        EXPECT_EQ(p.floats(xs.data()), xs.data()) << at;
        ops::set_bf16_reuse(true);
      }
    }
  }
}

// BF16 on the FP32 units rounds each operand as the bf16 kernels do (round_to_bf16): nearest
// even, ties both ways, denormals to signed zero, overflow to infinity, NaN kept, in the
// vector loop and its tail alike. A product with K = 1 and B = 1 gives the rounded A exactly.
TEST(Ops, Bf16OnFp32UnitsRoundsLikeTheBf16Kernels) {
  if (!ops::cpu_has_bf16()) GTEST_SKIP() << "no AVX512-BF16";
  ops::PrecisionScope ps(ops::Precision::BF16);
  ops::Bf16UnitsScope units(ops::Bf16Units::Fp32);
  auto bits = [](uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  std::vector<float> a = {1.0f, -1.0f, 0.0f, -0.0f, bits(0x3F808000u), bits(0x3F818000u),
                          bits(0x3F808001u), bits(0x3F817FFFu), bits(0x00000001u),
                          bits(0x807FFFFFu), bits(0x00800000u), bits(0x7F7FFFFFu),
                          bits(0xFF7FFFFFu), INFINITY, -INFINITY, NAN, bits(0xFF800001u),
                          3.14159265f, -2.7182818f, 1e-30f, 6.5e4f, -1e38f};
  for (int i = 0; a.size() < 53; ++i) a.push_back(std::ldexp(1.0f + 0.0078125f * i, i % 40 - 20));
  const i64 M = i64(a.size());  // 3 vectors of 16 and a tail of 5
  Buf A(a.begin(), a.end()), one(1, 1.0f), C(M, -7.0f);
  for (ops::GemmPath path : {ops::GemmPath::Runtime, ops::GemmPath::Fixed}) {
    GemmCacheScope every_shape({.capacity = 64, .min_flops = 0, .min_uses = 1});
    ops::set_gemm_path(path);
    // A stored [K = 1, M]: one row of M values, so the rounding runs along M
    ops::gemm(true, false, M, 1, 1, 1.0f, A.data(), M, one.data(), 1, 0.0f, C.data(), 1);
    for (i64 i = 0; i < M; ++i) {
      uint16_t h;
      ops::round_to_bf16(&h, &A[i], 1);
      const float want = ops::bf16_to_float(h);
      if (std::isnan(want) || want == 0.0f) {  // the sum starts at +0: a zero's sign is lost
        EXPECT_TRUE(std::isnan(want) ? std::isnan(C[i]) : C[i] == 0.0f)
            << ops::gemm_path_name(path) << " element " << i << " = " << A[i] << ": " << C[i];
        continue;
      }
      uint32_t got_u, want_u;
      std::memcpy(&got_u, &C[i], 4);
      std::memcpy(&want_u, &want, 4);
      EXPECT_EQ(got_u, want_u) << ops::gemm_path_name(path) << " element " << i << " = "
                               << A[i] << ": " << C[i] << " against " << want;
    }
  }
}

// The units' names parse both ways and a wrong one names the variable; the decision is made by
// the time BF16 is on, and a product on either kind of units is the BF16 product of the same
// operands (within FP32 accumulation rounding), away from the FP32 product.
TEST(Ops, Bf16UnitsDecisionAndAgreement) {
  EXPECT_EQ(ops::parse_bf16_units("native", "X"), ops::Bf16Units::Native);
  EXPECT_EQ(ops::parse_bf16_units("fp32", "X"), ops::Bf16Units::Fp32);
  try {
    ops::parse_bf16_units("fp16", "DLCM_BF16_UNITS");
    ADD_FAILURE() << "fp16 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("DLCM_BF16_UNITS"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("\"fp16\""), std::string::npos) << e.what();
  }
  if (!ops::cpu_has_bf16()) GTEST_SKIP() << "no AVX512-BF16";
  ops::PrecisionScope ps(ops::Precision::BF16);
  const ops::Bf16UnitsChoice c = ops::bf16_units_choice();
  EXPECT_TRUE(c.decided);
  EXPECT_FALSE(c.how.empty());
  const i64 M = 96, N = 80, K = 112;
  Buf A(M * K), B(N * K), C[3] = {Buf(M * N), Buf(M * N), Buf(M * N)};
  test::fill_normal(A.data(), M * K, 5);
  test::fill_normal(B.data(), N * K, 6);
  for (int u = 0; u < 2; ++u) {
    ops::Bf16UnitsScope units(kBothUnits[u]);
    ops::gemm(false, true, M, N, K, 1.0f, A.data(), K, B.data(), K, 0.0f, C[u].data(), N);
  }
  {
    ops::PrecisionScope fp(ops::Precision::FP32);
    ops::gemm(false, true, M, N, K, 1.0f, A.data(), K, B.data(), K, 0.0f, C[2].data(), N);
  }
  double d_units = 0, d_fp32 = 0, mag = 0;
  for (i64 i = 0; i < M * N; ++i) {
    d_units = test::worse(d_units, double(std::abs(C[0][i] - C[1][i])));
    d_fp32 = std::max(d_fp32, double(std::abs(C[1][i] - C[2][i])));
    mag = std::max(mag, double(std::abs(C[2][i])));
  }
  EXPECT_LT(d_units, 1e-5 * mag);  // FP32 sums in another order
  EXPECT_GT(d_fp32, 1e-4 * mag);   // the operands were rounded
}

// Which units the BF16 attention runs on: the FP32 kernel under FP32, with the BF16 products on
// the FP32 units and with DLCM_BF16_ATTENTION's switch off (then bit for bit the FP32
// precision's attention); bf16 operands on the native units (AMX tiles where they are granted
// and allowed, else AVX512-BF16 dot products), whose result differs from the FP32 kernel's.
TEST(Ops, AttentionUnitsFollowPrecisionUnitsAndSwitches) {
  EXPECT_EQ(ops::attention_units(), ops::AttentionUnits::Fp32);  // FP32 precision
  if (!ops::cpu_has_bf16()) GTEST_SKIP() << "no AVX512-BF16";
  const i64 B = 2, L = 70, H = 2, hd = 16;
  Buf q(B * L * H * hd), k(q.size()), v(q.size());
  test::fill_normal(q.data(), i64(q.size()), 41);
  test::fill_normal(k.data(), i64(k.size()), 42);
  test::fill_normal(v.data(), i64(v.size()), 43);
  auto run = [&] {
    Buf out(q.size()), lse(B * H * L);
    ops::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), B, L, L, H, H, hd,
                           0, 0.25f);
    return out;
  };
  const Buf fp32 = run();
  ops::PrecisionScope bf16(ops::Precision::BF16);
  {
    ops::Bf16UnitsScope units(ops::Bf16Units::Fp32);
    EXPECT_EQ(ops::attention_units(), ops::AttentionUnits::Fp32);
    EXPECT_EQ(run(), fp32) << "BF16 on the FP32 units: the FP32 kernel";
  }
  ops::Bf16UnitsScope units(ops::Bf16Units::Native);
  ops::set_bf16_attention(false);
  EXPECT_EQ(ops::attention_units(), ops::AttentionUnits::Fp32);
  EXPECT_EQ(run(), fp32) << "DLCM_BF16_ATTENTION=0: the FP32 kernel";
  ops::set_bf16_attention(true);
  if (ops::isa() != ops::Isa::Avx512) {
    EXPECT_EQ(ops::attention_units(), ops::AttentionUnits::Fp32) << "kernels below avx512";
    return;
  }
  const bool amx = ops::amx_bf16_usable();
  EXPECT_EQ(ops::attention_units(), amx ? ops::AttentionUnits::Tiles : ops::AttentionUnits::Dot);
  const Buf native = run();
  ops::set_attention_tiles(false);
  EXPECT_EQ(ops::attention_units(), ops::AttentionUnits::Dot);
  const Buf dot = run();
  ops::set_attention_tiles(true);
  EXPECT_GT(scaled_err(native, fp32, 1e-30), 1e-5) << "bf16 operands: not the FP32 kernel";
  EXPECT_LT(scaled_err(native, fp32, 1e-30), 2e-2);
  if (amx)  // the same bf16 operands, the FP32 sums in another order
    EXPECT_LT(scaled_err(dot, native, 1e-30), 1e-4) << "dot products against tiles";
  else
    EXPECT_EQ(dot, native);
}

// The BF16 attention's online softmax on scores its bf16 products compute exactly (operands
// multiples of 1/4, exact in bf16, sums exact in FP32), so that lse tests the softmax alone:
// base-2 exponentials to a few ulp, the running maximum moved only when a key block's maximum
// passes it by more than 8 (queries 0 mod 3: every block by 32; 2 mod 3: by exactly 8, kept,
// then by 16; 1 mod 3: the maximum in the first block and later probabilities that underflow
// to 0). Against double sums; the output (probabilities rounded to bf16) to 1e-2.
TEST(Ops, Bf16AttentionSoftmaxOnExactScores) {
  if (!ops::cpu_has_bf16() || ops::isa() != ops::Isa::Avx512)
    GTEST_SKIP() << "no AVX512-BF16 (or kernels below avx512): " << ops::isa_summary();
  const i64 L = 256, hd = 16;
  const float scale = 0.25f;
  Buf q(L * hd), k(L * hd), v(L * hd);
  for (i64 i = 0; i < L; ++i)
    for (i64 c = 0; c < hd; ++c) {
      const float sgn = (c * 5 + 1) % 3 == 0 ? -1.0f : 1.0f;
      q[i * hd + c] = sgn * (i % 3 == 0 ? 0.25f : i % 3 == 1 ? -0.25f : 0.0625f);
      k[i * hd + c] = sgn * float(i) / 2;  // scaled score: i / 2, -i / 2 or i / 8 per kind
      v[i * hd + c] = float((i * 7 + c * 3) % 9 - 4) / 4;
    }
  // double reference of the exact scores
  std::vector<double> lse_ref(L), o_ref(L * hd, 0.0);
  for (i64 i = 0; i < L; ++i) {
    std::vector<double> s(i + 1);
    double mx = -INFINITY, sum = 0;
    for (i64 j = 0; j <= i; ++j) {
      double d = 0;
      for (i64 c = 0; c < hd; ++c) d += double(q[i * hd + c]) * k[j * hd + c];
      s[j] = d * scale;
      mx = std::max(mx, s[j]);
    }
    for (i64 j = 0; j <= i; ++j) sum += std::exp(s[j] - mx);
    lse_ref[i] = mx + std::log(sum);
    for (i64 j = 0; j <= i; ++j)
      for (i64 c = 0; c < hd; ++c) o_ref[i * hd + c] += std::exp(s[j] - lse_ref[i]) * v[j * hd + c];
  }
  ops::PrecisionScope bf16(ops::Precision::BF16);
  ops::Bf16UnitsScope units(ops::Bf16Units::Native);
  for (bool tiles : {true, false}) {
    if (tiles && !amx_kernels()) continue;
    std::optional<AttentionTilesOff> dot;
    if (!tiles) dot.emplace();
    const std::string what = tiles ? "AMX tiles" : "dot products";
    EXPECT_EQ(ops::attention_units(), tiles ? ops::AttentionUnits::Tiles : ops::AttentionUnits::Dot);
    Buf out(L * hd), lse(L);
    ops::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), 1, L, L, 1, 1,
                           hd, 0, scale);
    double worst_lse = 0, worst_o = 0;
    for (i64 i = 0; i < L; ++i) {
      worst_lse = std::max(worst_lse, std::abs(lse[i] - lse_ref[i]) / (1e-5 + 2e-7 * std::abs(lse_ref[i])));
      for (i64 c = 0; c < hd; ++c)
        worst_o = std::max(worst_o, std::abs(out[i * hd + c] - o_ref[i * hd + c]) / 1e-2);
    }
    EXPECT_LE(worst_lse, 1.0) << what << ": lse off by more than 1e-5 + 2e-7 |lse| (in those units)";
    EXPECT_LE(worst_o, 1.0) << what << ": output off by more than 1e-2";
  }
}

// tile_mm_amx against a double product of the bf16-rounded operands, for every operand layout
// the attention kernels use (rows of A contiguous, A read transposed, any strides), sizes off
// the tiles' grid and beyond one 32 x 32 block, with and without accumulation.
TEST(Ops, TileMmAmxMatchesRoundedOperands) {
  if (!ops::amx_bf16_usable() || ops::isa() != ops::Isa::Avx512)
    GTEST_SKIP() << "no AMX-BF16 (or kernels below avx512): " << ops::isa_summary();
  auto rounded = [](float x) {
    uint16_t h;
    ops::round_to_bf16(&h, &x, 1);
    return double(ops::bf16_to_float(h));
  };
  const i64 shapes[][3] = {{5, 7, 3}, {64, 64, 64}, {37, 80, 45}, {100, 33, 70}, {16, 16, 32}};
  uint64_t seed = 500;
  double worst_vs_fp32 = 0;
  for (auto [M, N, K] : shapes)
    for (int layout = 0; layout < 3; ++layout)
      for (bool acc : {false, true}) {
        // layout 0: A(r,k) = A[r*(K+3) + k]; 1: A[r + k*(M+2)]; 2: A[2r + k*(2M+1)]
        const i64 rsa = layout == 0 ? K + 3 : layout == 1 ? 1 : 2;
        const i64 csa = layout == 0 ? 1 : layout == 1 ? M + 2 : 2 * M + 1;
        const i64 ldb = N + 5, ldc = N + 2;
        Buf A((M + 2) * rsa + (K + 1) * csa + 8), Bm(K * ldb), C(M * ldc);
        test::fill_normal(A.data(), i64(A.size()), seed++);
        test::fill_normal(Bm.data(), i64(Bm.size()), seed++);
        test::fill_normal(C.data(), i64(C.size()), seed++);
        const Buf C0 = C;
        const float alpha = 0.7f;
        ops::tile_mm_amx(C.data(), ldc, A.data(), rsa, csa, Bm.data(), ldb, M, N, K, alpha, acc);
        double worst = 0;
        for (i64 i = 0; i < M; ++i) {
          for (i64 j = 0; j < N; ++j) {
            double ref = 0, mag = 0, ref32 = 0;
            for (i64 k = 0; k < K; ++k) {
              const float a = A[i * rsa + k * csa], b = Bm[k * ldb + j];
              ref += rounded(a) * rounded(b);
              ref32 += double(a) * b;
              mag += std::abs(rounded(a) * rounded(b));
            }
            const double c0 = acc ? double(C0[i * ldc + j]) : 0.0;
            worst = test::worse(worst, std::abs(C[i * ldc + j] - (alpha * ref + c0)) /
                                        (alpha * mag + std::abs(c0) + 1e-30));
            worst_vs_fp32 = std::max(worst_vs_fp32, std::abs(C[i * ldc + j] - (alpha * ref32 + c0)) /
                                                        (alpha * mag + std::abs(c0) + 1e-30));
          }
          for (i64 j = N; j < ldc; ++j) EXPECT_EQ(C[i * ldc + j], C0[i * ldc + j]) << "padding";
        }
        EXPECT_LT(worst, 1e-5) << M << "x" << N << "x" << K << " layout " << layout << " acc " << acc;
      }
  EXPECT_GT(worst_vs_fp32, 1e-4) << "the operands were not rounded to bf16";
}

// tile_mm (the FP32 attention kernels' products) at every kernel level against a double product,
// and it writes nothing outside its M x N output: not the padding columns of C's rows, not past
// its last row (a guard after C; with ldc = N a store of a whole extra vector there would land
// in it). Widths on and off the 16-column vectors, one to four vectors per row.
TEST(Ops, TileMmWritesOnlyItsOutput) {
  const i64 shapes[][3] = {{1, 5, 3}, {7, 16, 9}, {13, 20, 17}, {6, 32, 8}, {5, 33, 4},
                           {12, 48, 11}, {9, 64, 16}, {14, 47, 5}};
  uint64_t seed = 900;
  for (ops::Isa level : ops::isa_available()) {
    const ops::IsaScope at(level);
    for (auto [M, N, K] : shapes)
      for (i64 pad : {0, 3})
        for (bool acc : {false, true}) {
          SCOPED_TRACE(std::string(ops::isa_name(level)) + " " + std::to_string(M) + "x" +
                       std::to_string(N) + "x" + std::to_string(K) + " pad " +
                       std::to_string(pad) + (acc ? " acc" : ""));
          const i64 ldc = N + pad, ldb = N + 1, guard = 64;
          Buf A(M * K), Bm(K * ldb), C(M * ldc + guard);
          test::fill_normal(A.data(), i64(A.size()), seed++);
          test::fill_normal(Bm.data(), i64(Bm.size()), seed++);
          test::fill_normal(C.data(), i64(C.size()), seed++);
          const Buf C0 = C;
          const float alpha = 0.5f;
          ops::tile_mm(C.data(), ldc, A.data(), K, 1, Bm.data(), ldb, M, N, K, alpha, acc);
          for (i64 i = 0; i < M; ++i) {
            for (i64 j = 0; j < N; ++j) {
              double ref = 0, mag = 0;
              for (i64 k = 0; k < K; ++k) {
                ref += double(A[i * K + k]) * Bm[k * ldb + j];
                mag += std::abs(double(A[i * K + k]) * Bm[k * ldb + j]);
              }
              const double c0 = acc ? double(C0[i * ldc + j]) : 0.0;
              EXPECT_NEAR(C[i * ldc + j], alpha * ref + c0, 1e-5 * (alpha * mag + std::abs(c0)) + 1e-6)
                  << "C[" << i << "][" << j << "]";
            }
            for (i64 j = N; j < ldc; ++j) EXPECT_EQ(C[i * ldc + j], C0[i * ldc + j]) << "padding";
          }
          for (i64 g = 0; g < guard; ++g)
            ASSERT_EQ(C[M * ldc + g], C0[M * ldc + g]) << "written past C's last row, float " << g;
        }
  }
}

// The FMA ceiling's loop does every FMA it counts, at each vector level: with b = c = 1 each
// accumulator (chain i, every lane) ends at i + n, so the sum is lanes * (chains * n + sum i),
// exact in FP32 for n < 2^23; a loop the compiler folded or shortened gives another sum, and
// the FLOP count matches the level's width. The same for the L1 loop (a micro-kernel tile fed
// from L1): its accumulators end at i + n a b. The scalar level measures nothing and says so.
TEST(Ops, FmaCeilingLoopRunsEveryFma) {
  int levels = 0;
  for (ops::Isa level : ops::isa_available()) {
    const ops::IsaScope at(level);
    SCOPED_TRACE(ops::isa_name(level));
    if (level == ops::Isa::Scalar) {
      EXPECT_THROW(ops::fma_loop(10, 1.f, 1.f, nullptr), Error);
      EXPECT_THROW(ops::fma_loop_l1(10, 1.f, 1.f, nullptr), Error);
      for (ops::FmaLoop loop : {ops::FmaLoop::Registers, ops::FmaLoop::L1Operands}) {
        const ops::FmaCeiling c = ops::fma_ceiling(0.01, 1, loop);
        EXPECT_EQ(c.gflops, 0.0);
        EXPECT_STREQ(c.unit, "");
      }
      continue;
    }
    const double lanes = level == ops::Isa::Avx512 ? 16 : 8;
    const double chains = level == ops::Isa::Avx512 ? 24 : 12;
    for (i64 n : {i64(0), i64(1), i64(1000), i64(123457)}) {
      double flops = -1;
      const double sum = ops::fma_loop(n, 1.f, 1.f, &flops);
      EXPECT_EQ(sum, lanes * (chains * double(n) + chains * (chains - 1) / 2)) << "n=" << n;
      EXPECT_EQ(flops, 2 * lanes * chains * double(n));
    }
    // b = 0.5, c = 0: chain i halves each step (exact): i / 2^n
    EXPECT_EQ(ops::fma_loop(3, 0.5f, 0.f, nullptr), lanes * (chains * (chains - 1) / 2) / 8);
    // The L1 loop: a 6 x 4 (AVX2: 6 x 2) tile of accumulators, accumulator i starting at i and
    // adding a * b per k step (k cycling over its 64 rows of operands).
    const double tiles = level == ops::Isa::Avx512 ? 24 : 12;
    for (i64 n : {i64(0), i64(1), i64(63), i64(64), i64(1000), i64(123457)}) {
      double flops = -1;
      const double sum = ops::fma_loop_l1(n, 1.f, 1.f, &flops);
      EXPECT_EQ(sum, lanes * (tiles * double(n) + tiles * (tiles - 1) / 2)) << "n=" << n;
      EXPECT_EQ(flops, 2 * lanes * tiles * double(n));
      // a * b = 1/8 per step, exact: accumulator i ends at i + n / 8
      EXPECT_EQ(ops::fma_loop_l1(n, 0.5f, 0.25f, nullptr),
                lanes * (tiles * double(n) / 8 + tiles * (tiles - 1) / 2))
          << "n=" << n;
    }
    for (ops::FmaLoop loop : {ops::FmaLoop::Registers, ops::FmaLoop::L1Operands}) {
      const ops::FmaCeiling c = ops::fma_ceiling(0.02, 1, loop);
      EXPECT_GT(c.gflops, 0.0);
      EXPECT_EQ(c.threads, 1);
      EXPECT_STREQ(c.unit, ops::isa_name(level));
    }
    ++levels;
  }
  if (levels == 0) GTEST_SKIP() << "no vector level here: " << ops::isa_summary();
}

// ops::gemm sends the FFN weight-gradient products (A^T B, K >= 1024, M N >= 2^19) to the
// blocked kernel (its exact bits) and nothing else there; DLCM_SGEMM_OWN=off turns it off.
TEST(Ops, BlockedSgemmServesTheWeightGradientProducts) {
  if (!ops::blocked_sgemm_native()) GTEST_SKIP() << "no avx512 kernels here";
  // by default on Intel CPUs only (on AMD Zen 4 oneDNN's sgemm ran these products faster)
  const char* env = std::getenv("DLCM_SGEMM_OWN");
  if (!env || !*env) {
    __builtin_cpu_init();
    EXPECT_EQ(ops::blocked_use(), __builtin_cpu_is("intel") ? ops::BlockedUse::Tn : ops::BlockedUse::Off)
        << ops::isa_summary();
  }
  ops::BlockedUseScope restore(ops::blocked_use());
  ops::PrecisionScope fp32(ops::Precision::FP32);
  SettingScope<ops::GemmPath, ops::gemm_path, ops::set_gemm_path> runtime(ops::GemmPath::Runtime);
  struct Shape {
    bool ta, tb;
    i64 M, N, K;
    bool serves;
  };
  const Shape shapes[] = {{true, false, 1024, 512, 1024, true},  {true, false, 512, 1024, 1100, true},
                          {true, false, 512, 512, 4096, false},  {true, false, 1024, 512, 1023, false},
                          {false, false, 1024, 512, 1024, false}, {false, true, 1024, 512, 1024, false},
                          {true, true, 1024, 512, 1024, false}};
  uint64_t seed = 9100;
  for (ops::BlockedUse u : {ops::BlockedUse::Tn, ops::BlockedUse::Off}) {
    ops::set_blocked_use(u);
    for (const Shape& sh : shapes) {
      const bool serves = u == ops::BlockedUse::Tn && sh.serves;
      const i64 lda = sh.ta ? sh.M : sh.K, ldb = sh.tb ? sh.K : sh.N;
      EXPECT_EQ(ops::blocked_sgemm_serves(sh.ta, sh.tb, sh.M, sh.N, sh.K), serves);
      EXPECT_EQ(ops::gemm_impl(sh.ta, sh.tb, sh.M, sh.N, sh.K, 1.f, lda, ldb, 1.f, sh.N),
                serves ? "dlcm blocked sgemm" : "sgemm")
          << sh.M << "x" << sh.N << "x" << sh.K << " ta=" << sh.ta << " tb=" << sh.tb;
      if (!serves) continue;
      Buf A(sh.K * sh.M), B(sh.K * sh.N), C(sh.M * sh.N), C2;
      test::fill_normal(A.data(), i64(A.size()), seed++);
      test::fill_normal(B.data(), i64(B.size()), seed++);
      test::fill_normal(C.data(), i64(C.size()), seed++);
      C2 = C;
      ops::gemm(sh.ta, sh.tb, sh.M, sh.N, sh.K, 1.f, A.data(), lda, B.data(), ldb, 1.f, C.data(), sh.N);
      ops::blocked_sgemm(sh.ta, sh.tb, sh.M, sh.N, sh.K, 1.f, A.data(), lda, B.data(), ldb, 1.f,
                         C2.data(), sh.N);
      EXPECT_EQ(0, std::memcmp(C.data(), C2.data(), C.size() * sizeof(float)));
    }
  }
  EXPECT_EQ(ops::parse_blocked_use("off", "X"), ops::BlockedUse::Off);
  try {
    ops::parse_blocked_use("on", "DLCM_SGEMM_OWN");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("DLCM_SGEMM_OWN"), std::string::npos) << e.what();
  }
}

// The comparisons every test leans on must see a NaN: std::max(worst, NaN) is worst, so a
// kernel writing NaN (or leaving a NaN-poisoned output unwritten) would pass a bound on it.
TEST(Ops, ComparisonHelpersSeeNaN) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = INFINITY;
  const float a[] = {1.f, nan, 3.f}, b[] = {1.f, 2.f, 3.f}, c[] = {1.f, nan, 3.5f};
  EXPECT_EQ(test::max_abs_diff(a, b, 3), INFINITY);  // NaN on one side
  EXPECT_EQ(test::max_abs_diff(b, a, 3), INFINITY);
  EXPECT_DOUBLE_EQ(test::max_abs_diff(a, c, 3), 0.5);  // NaN on both sides: no difference
  EXPECT_EQ(test::rel_err(a, b, 3), INFINITY);
  const float i1[] = {inf, -inf}, i2[] = {inf, -inf}, i3[] = {inf, 0.f};
  EXPECT_EQ(test::max_abs_diff(i1, i2, 2), 0.0);  // the same infinities
  EXPECT_EQ(test::max_abs_diff(i1, i3, 2), INFINITY);
  EXPECT_EQ(test::worse(0.1, std::nan("")), INFINITY);
  EXPECT_EQ(test::worse(test::worse(0.1, std::nan("")), 0.2), INFINITY);  // and it stays
  EXPECT_DOUBLE_EQ(test::worse(0.1, 0.3), 0.3);
  // the harness poisons outputs with NaN before a forward: a fast op that skips an element the
  // reference sets to 0 (a pad, say) fails, where a zeroed output would hide it
  Harness H;
  H.out_sizes = {4};
  H.fwd = [](Impl im, std::vector<Buf>& o) {
    for (int i = 0; i < 4; ++i)
      if (im == Ref || i != 2) o[0][i] = i == 2 ? 0.f : float(i);
  };
  EXPECT_NONFATAL_FAILURE(run_harness(H, 1), "forward output 0");
}

// Every op has at least one checked row and one perf row.
TEST(Ops, EveryOpHasTestAndPerfRows) {
  for (const auto& [name, fn] : kOps) {
    bool has_test = false, has_perf = false;
    for (const Case& c : kCases)
      if (std::string(c.op) == name) (c.perf ? has_perf : has_test) = true;
    EXPECT_TRUE(has_test) << name;
    EXPECT_TRUE(has_perf || std::string(name) == "router_prob_raw") << name;  // same kernel
  }
}

// Own main (instead of gtest_main, which this object then replaces at link time) for the perf
// mode: `test_ops --perf [op...]`.
int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--perf")
    return run_perf(std::vector<std::string>(argv + 2, argv + argc));
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
