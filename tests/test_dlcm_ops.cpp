// Properties of the DLCM kernels (SPEC section 4) beyond agreement with their references:
// edge cases, hand-made examples, RNG determinism and distribution, gradient sparsity,
// replicate == compact, the streaming step, causality, row isolation, thread-count
// independence and the Global Parser loss's formula. Every kernel's fast-vs-reference and
// finite-difference checks are rows of the op table in test_ops.cpp.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include <omp.h>

#include "core/rng.h"
#include "kernels/dlcm_ops.h"
#include "testing.h"

using namespace dlcm;
using Vec = std::vector<float>;
using Bits = std::vector<uint8_t>;
using Toks = std::vector<i32>;
using test::kBos;
using test::make_pattern;
using test::name_of;
using test::Pattern;

namespace {

// max |a - b| / max(max |b|, 1)
double scaled_err(const Vec& a, const Vec& b) {
  double m = 1;
  for (float x : b) m = std::max(m, double(std::abs(x)));
  return test::max_abs_diff(a.data(), b.data(), a.size()) / m;
}

Vec randn(i64 n, uint64_t seed, float std = 1.f) {
  Vec v(n);
  test::fill_normal(v.data(), n, seed, std);
  return v;
}

}  // namespace

// =============================================================================================
// Router probability
// =============================================================================================

TEST(RouterProb, ForcedPositionsAndEdgeCases) {
  const i64 B = 2, L = 7, ds = 5;
  Vec q = randn(B * L * ds, 1), k = randn(B * L * ds, 2);
  Toks tok(B * L, 5);
  tok[1 * L + 4] = kBos;
  Vec p(B * L), cache(B * L * ops::kRouterCacheStride);
  ops::router_prob_forward(p.data(), cache.data(), q.data(), k.data(), tok.data(), kBos, B, L, ds);
  for (i64 row = 0; row < B; ++row)
    for (i64 t = 0; t < L; ++t) {
      const i64 n = row * L + t;
      if (t == 0 || tok[n] == kBos) {
        EXPECT_EQ(p[n], 1.f) << row << "," << t;
      } else {
        EXPECT_TRUE(p[n] >= 0.f && p[n] <= 1.f) << row << "," << t;
      }
    }
  // Identical directions -> p = 0, opposite -> p = 1, zero vector -> 1/2 (no NaN).
  Vec q2(3 * 2, 0.f), k2(3 * 2, 0.f);
  q2[0] = 1; k2[2] = 2;   // t=1: cos(q0, k1) = 1
  q2[2] = 1; k2[4] = -3;  // t=2: cos(q1, k2) = -1
  Vec p2(3), c2(9);
  ops::router_prob_forward(p2.data(), c2.data(), q2.data(), k2.data(), nullptr, kBos, 1, 3, 2);
  EXPECT_EQ(p2[0], 1.f);
  EXPECT_NEAR(p2[1], 0.f, 1e-7);
  EXPECT_NEAR(p2[2], 1.f, 1e-7);
  Vec z(3 * 2, 0.f);
  ops::router_prob_forward(p2.data(), c2.data(), z.data(), z.data(), nullptr, kBos, 1, 3, 2);
  EXPECT_EQ(p2[1], 0.5f);
  Vec dz(3 * 2, 0.f), dp2 = {1.f, 1.f, 1.f};
  ops::router_prob_backward(dz.data(), dz.data(), dp2.data(), c2.data(), z.data(), z.data(),
                            nullptr, kBos, 1, 3, 2);
  for (float x : dz) EXPECT_TRUE(std::isfinite(x));
}

// The stream's rows (q_prev given apart, DlcmStream's prefill and decode): router_prob_forward's
// rows 1..n on [q_prev; q], bit for bit, also with zero vectors (the floored norms) and with
// enough rows for the parallel loop.
TEST(RouterProb, StreamRowsEqualTheForwardOnThePrependedQ) {
  for (i64 n : {1, 9, 200}) {
    const i64 ds = 256;
    Vec q = randn((n + 1) * ds, 3), k = randn((n + 1) * ds, 4);
    std::fill_n(q.begin() + ds, ds, 0.f);  // q_1 = 0: the pair (q_1, k_2) is floored
    std::fill_n(k.begin() + ds, ds, 0.f);      // k_1 = 0
    Vec p(n + 1), cache((n + 1) * ops::kRouterCacheStride), pr(n, -1.f);
    ops::router_prob_forward(p.data(), cache.data(), q.data(), k.data(), nullptr, kBos, 1, n + 1,
                             ds);
    ops::router_prob_rows(pr.data(), q.data(), q.data() + ds, k.data() + ds, n, ds);
    EXPECT_EQ(std::memcmp(pr.data(), p.data() + 1, sizeof(float) * n), 0) << n;
    EXPECT_EQ(pr[0], 0.5f) << n;  // k_1 = 0
  }
}

// =============================================================================================
// Boundary decisions
// =============================================================================================

TEST(Boundaries, BoundaryProbEdgesAndSharpening) {
  EXPECT_EQ(ops::boundary_prob(0.f, 0.5f), 0.f);
  EXPECT_EQ(ops::boundary_prob(-0.1f, 0.5f), 0.f);
  EXPECT_EQ(ops::boundary_prob(1.f, 0.5f), 1.f);
  EXPECT_EQ(ops::boundary_prob(1.5f, 2.f), 1.f);
  EXPECT_EQ(ops::boundary_prob(std::nanf(""), 1.f), 0.f);
  EXPECT_NEAR(ops::boundary_prob(0.5f, 0.3f), 0.5f, 1e-7);
  for (float p : {1e-30f, 1e-7f, 0.2f, 0.7f, 0.9999999f}) {
    const float a1 = ops::boundary_prob(p, 1.f);
    EXPECT_NEAR(a1, p, 1e-6 * std::max(1.f, p)) << p;
    const float sharp = ops::boundary_prob(p, 0.5f), soft = ops::boundary_prob(p, 2.f);
    EXPECT_TRUE(std::isfinite(sharp) && std::isfinite(soft));
    // sigmoid(logit(p)/alpha) = p^(1/a) / (p^(1/a) + (1-p)^(1/a))
    const double pa = std::pow(double(p), 2.0), qa = std::pow(1.0 - p, 2.0);
    EXPECT_NEAR(sharp, pa / (pa + qa), 1e-6) << p;
    if (p > 0.5f) { EXPECT_GE(sharp, p); }
    if (p < 0.5f) { EXPECT_LE(sharp, p); }
    if (p > 0.5f) { EXPECT_LE(soft, p); }
  }
  Bits b(4);
  Vec p(4, 0.5f);
  EXPECT_THROW(ops::sample_boundaries(b.data(), p.data(), nullptr, kBos, 1, 4, 0.f, 1, 1, 0),
               Error);
}

TEST(Boundaries, SamplingIsDeterministicAndForced) {
  const i64 B = 4, L = 64, N = B * L;
  Vec p(N);
  test::fill_uniform(p.data(), N, 5, 0.f, 1.f);
  Toks tok(N, 7);
  tok[2 * L + 10] = kBos;
  p[2 * L + 10] = 0.f;  // forced even though p says 0
  p[0] = 0.f;
  Bits b1(N), b2(N), b3(N), b4(N);
  ops::sample_boundaries(b1.data(), p.data(), tok.data(), kBos, B, L, 0.7f, 42, 3, 10);
  ops::sample_boundaries(b2.data(), p.data(), tok.data(), kBos, B, L, 0.7f, 42, 3, 10);
  EXPECT_EQ(b1, b2);
  ops::sample_boundaries(b3.data(), p.data(), tok.data(), kBos, B, L, 0.7f, 42, 4, 10);
  EXPECT_NE(b1, b3);  // next step draws differently
  // Recomputing one row alone (global row 12 = offset 10 + row 2) gives the same samples.
  ops::sample_boundaries(b4.data(), p.data() + 2 * L, tok.data() + 2 * L, kBos, 1, L, 0.7f, 42, 3,
                         12);
  for (i64 t = 0; t < L; ++t) EXPECT_EQ(b4[t], b1[2 * L + t]);
  for (i64 r = 0; r < B; ++r) EXPECT_EQ(b1[r * L], 1);
  EXPECT_EQ(b1[2 * L + 10], 1);
}

TEST(Boundaries, SamplingDistribution) {
  // Frequencies over many rows (independent counters) match sigmoid(logit(p)/alpha) within
  // 4.5 sigma; p = 0 never fires, p = 1 always does.
  const i64 L = 8, rows = 4000;
  Vec p0 = {1.f, 0.05f, 0.3f, 0.5f, 0.62f, 0.9f, 0.f, 1.f};
  Vec p(rows * L);
  for (i64 r = 0; r < rows; ++r) std::copy(p0.begin(), p0.end(), p.begin() + r * L);
  Bits b(rows * L);
  for (float alpha : {0.5f, 1.f, 2.f}) {
    ops::sample_boundaries(b.data(), p.data(), nullptr, kBos, rows, L, alpha, 9, 1, 0);
    for (i64 t = 0; t < L; ++t) {
      double hits = 0;
      for (i64 r = 0; r < rows; ++r) hits += b[r * L + t];
      const double want = ops::boundary_prob(p0[t], alpha);
      const double sd = std::sqrt(want * (1 - want) / rows);
      const double got = hits / rows;
      if (want == 0.0 || want == 1.0) {
        EXPECT_EQ(got, want) << "alpha " << alpha << " t " << t;
      } else {
        EXPECT_LE(std::abs(got - want), 4.5 * sd) << "alpha " << alpha << " p " << p0[t];
      }
    }
  }
}

TEST(Boundaries, ThresholdSemantics) {
  const i64 L = 7;
  Vec p = {0.f, 0.5f, 0.49999997f, 0.9f, 0.1f, 0.f, 0.5f};
  Toks tok = {kBos, 3, 3, 3, 3, kBos, 3};
  Bits b(L);
  ops::threshold_boundaries(b.data(), p.data(), tok.data(), kBos, 1, L, 0.5f);
  EXPECT_EQ(b, (Bits{1, 1, 0, 1, 0, 1, 1}));
  ops::threshold_boundaries(b.data(), p.data(), tok.data(), kBos, 1, L, 0.95f);
  EXPECT_EQ(b, (Bits{1, 0, 0, 0, 0, 1, 0}));
  ops::threshold_boundaries(b.data(), p.data(), nullptr, kBos, 1, L, 0.0f);
  EXPECT_EQ(b, (Bits{1, 1, 1, 1, 1, 1, 1}));
}

// =============================================================================================
// Segments
// =============================================================================================

TEST(Segments, HandMadeExample) {
  const i64 B = 3, L = 6;
  Bits b = {1, 0, 0, 1, 1, 0,   // row 0: [0..2] [3] [4..5]
            1, 1, 1, 1, 1, 1,   // row 1: six one-token concepts, BOS at t=3
            1, 0, 0, 0, 0, 0};  // row 2: one concept
  Toks tok(B * L, 9);
  tok[0] = tok[L] = tok[2 * L] = kBos;
  tok[L + 3] = kBos;
  ops::Segments sg;
  sg.build(b.data(), tok.data(), kBos, B, L);
  EXPECT_EQ(sg.Mmax, 6);
  EXPECT_EQ(sg.count, (std::vector<i32>{3, 6, 1}));
  EXPECT_EQ(sg.total(), 10);
  EXPECT_EQ(sg.seg, (std::vector<i32>{0, 0, 0, 1, 2, 2, 0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0}));
  EXPECT_EQ(sg.start, (std::vector<i32>{0, 3, 4, 6, 6, 6, 0, 1, 2, 3, 4, 5, 0, 6, 6, 6, 6, 6}));
  EXPECT_EQ(sg.len, (std::vector<i32>{3, 1, 2, 0, 0, 0, 1, 1, 1, 1, 1, 1, 6, 0, 0, 0, 0, 0}));
  EXPECT_EQ(sg.forced, (Bits{1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0}));
  EXPECT_EQ(sg.slot(1, 2), 8);

  Bits bad = b;
  bad[L] = 0;  // row 1 does not start a concept
  EXPECT_THROW(sg.build(bad.data(), tok.data(), kBos, B, L), Error);
  bad = b;
  bad[2 * L + 3] = 2;
  EXPECT_THROW(sg.build(bad.data(), tok.data(), kBos, B, L), Error);
  Toks tok2 = tok;
  tok2[2] = kBos;  // BOS inside concept 0 of row 0
  EXPECT_THROW(sg.build(b.data(), tok2.data(), kBos, B, L), Error);
  EXPECT_THROW(sg.build(b.data(), tok.data(), kBos, B, 0), Error);
}

// =============================================================================================
// Pooling
// =============================================================================================

TEST(Pooling, HandMadeExample) {
  const i64 B = 2, L = 7, d = 5;
  Bits b = {1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0};
  ops::Segments sg;
  sg.build(b.data(), nullptr, kBos, B, L);
  Vec H = randn(B * L * d, 31), pooled(B * sg.Mmax * d, 7.f);
  ops::pool_mean_forward(pooled.data(), H.data(), sg, d);
  for (i64 i = 0; i < d; ++i) {
    EXPECT_NEAR(pooled[0 * d + i], (H[0 * d + i] + H[1 * d + i]) / 2, 1e-6);
    EXPECT_NEAR(pooled[1 * d + i], H[2 * d + i], 1e-6);
    EXPECT_NEAR(pooled[2 * d + i], (H[3 * d + i] + H[4 * d + i] + H[5 * d + i]) / 3, 1e-6);
    EXPECT_NEAR(pooled[3 * d + i], H[6 * d + i], 1e-6);
    float row1 = 0;
    for (i64 t = 0; t < L; ++t) row1 += H[(L + t) * d + i];
    EXPECT_NEAR(pooled[(4 + 0) * d + i], row1 / L, 1e-5);
    for (i64 j = 1; j < 4; ++j) EXPECT_EQ(pooled[(4 + j) * d + i], 0.f);  // pads
  }
}

// =============================================================================================
// Smoother
// =============================================================================================

TEST(Smoother, ForwardByHand) {
  const i64 L = 6, d = 2;
  Bits b = {1, 0, 1, 1, 1, 0};
  Toks tok = {kBos, 5, 5, kBos, 5, 5};
  Vec p = {1.f, 0.2f, 0.3f, 1.f, 0.f, 0.9f};  // concept starts at 0 (forced), 2, 3 (BOS), 4
  ops::Segments sg;
  sg.build(b.data(), tok.data(), kBos, 1, L);
  ASSERT_EQ(sg.count[0], 4);
  Vec z = {1, 2, 3, 4, 5, 6, 7, 8}, zs(8);
  ops::smoother_forward(zs.data(), z.data(), p.data(), sg, d);
  const float P1 = 0.3f, P3 = ops::kSmootherClamp;  // p=0 is clamped to 1e-4
  EXPECT_EQ(ops::smoother_gate(0.f, false), P3);
  EXPECT_EQ(ops::smoother_gate(1.f, false), 1.f - ops::kSmootherClamp);
  EXPECT_EQ(ops::smoother_gate(0.f, true), 1.f);
  std::vector<float> want(8);
  want[0] = 1; want[1] = 2;
  want[2] = P1 * 3 + (1 - P1) * 1; want[3] = P1 * 4 + (1 - P1) * 2;
  want[4] = 5; want[5] = 6;  // restart at the BOS concept
  want[6] = P3 * 7 + (1 - P3) * 5; want[7] = P3 * 8 + (1 - P3) * 6;
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(zs[i], want[i], 1e-6) << i;
}

TEST(Smoother, GradientProperties) {
  const i64 B = 3, L = 12, d = 4, N = B * L;
  Toks tok;
  Bits b;
  make_pattern(Pattern::MultiDoc, B, L, 77, tok, b);
  ops::Segments sg;
  sg.build(b.data(), tok.data(), kBos, B, L);
  Vec p(N);
  test::fill_uniform(p.data(), N, 78, 0.1f, 0.9f);
  for (i64 n = 0; n < N; ++n)
    if (n % L == 0 || tok[n] == kBos) p[n] = 1.f;
  const i64 S = B * sg.Mmax * d;
  Vec z = randn(S, 79), zs(S), w = randn(S, 80);
  for (i64 r = 0; r < B; ++r)  // dzs is 0 on pads (they are 0 anyway)
    for (i64 j = sg.count[r]; j < sg.Mmax; ++j)
      for (i64 i = 0; i < d; ++i) w[(r * sg.Mmax + j) * d + i] = 0.f;
  ops::smoother_forward(zs.data(), z.data(), p.data(), sg, d);
  for (i64 r = 0; r < B; ++r)
    for (i64 j = sg.count[r]; j < sg.Mmax; ++j)
      for (i64 i = 0; i < d; ++i) EXPECT_EQ(zs[(r * sg.Mmax + j) * d + i], 0.f);
  Vec dz(S, 0.f), dp(N, 0.f);
  ops::smoother_backward(dz.data(), dp.data(), w.data(), zs.data(), z.data(), p.data(), sg, d);
  // dp only at non-forced concept starts (and there it is live)
  i64 live = 0;
  for (i64 n = 0; n < N; ++n) live += dp[n] != 0.f;
  EXPECT_GT(live, 0);
  for (i64 n = 0; n < N; ++n) {
    const bool is_start = n % L == 0 || b[n];
    const bool forced = n % L == 0 || tok[n] == kBos;
    if (!is_start || forced) { EXPECT_EQ(dp[n], 0.f) << n; }
  }
  // dp == nullptr is allowed and dz is the same
  Vec dz2(S, 0.f);
  ops::smoother_backward(dz2.data(), nullptr, w.data(), zs.data(), z.data(), p.data(), sg, d);
  EXPECT_EQ(dz, dz2);
  // Outside the clamp's pass-through range, no dp.
  Vec pc = p;
  for (i64 n = 0; n < N; ++n)
    if (!(n % L == 0 || tok[n] == kBos)) pc[n] = (n % 2) ? 0.f : 1.f;
  Vec dp3(N, 0.f), dz3(S, 0.f);
  ops::smoother_forward(zs.data(), z.data(), pc.data(), sg, d);
  ops::smoother_backward(dz3.data(), dp3.data(), w.data(), zs.data(), z.data(), pc.data(), sg, d);
  for (float x : dp3) EXPECT_EQ(x, 0.f);
}

// =============================================================================================
// Concept attention: compact vs replicate, shapes, streaming step, causality
// =============================================================================================

namespace {

struct AttnCase {
  Pattern pat;
  i64 B, L, Hq, Hkv, hd;
};
void PrintTo(const AttnCase& c, std::ostream* os) {
  *os << name_of(c.pat) << " B=" << c.B << " L=" << c.L << " Hq=" << c.Hq << " Hkv=" << c.Hkv
      << " hd=" << c.hd;
}

struct AttnData {
  i64 B, L, Hq, Hkv, hd, K1;
  float scale;
  Toks tok;
  Bits b;
  ops::Segments sg;
  Vec q, k, v, dout;
  AttnData(const AttnCase& c, uint64_t seed)
      : B(c.B), L(c.L), Hq(c.Hq), Hkv(c.Hkv), hd(c.hd) {
    make_pattern(c.pat, B, L, seed, tok, b);
    sg.build(b.data(), tok.data(), kBos, B, L);
    K1 = sg.Mmax + 1;
    scale = 1.f / std::sqrt(float(hd));
    q = randn(B * L * Hq * hd, seed + 1);
    k = randn(B * K1 * Hkv * hd, seed + 2);
    v = randn(B * K1 * Hkv * hd, seed + 3);
    dout = randn(B * L * Hq * hd, seed + 4);
  }
};

void compact(const AttnData& a, Vec& out, Vec& lse, Vec& dq, Vec& dk, Vec& dv) {
  out.assign(a.q.size(), 0.f);
  lse.assign(a.B * a.Hq * a.L, 0.f);
  ops::concept_attention_forward(out.data(), lse.data(), a.q.data(), a.k.data(), a.v.data(), a.sg,
                                 a.B, a.L, a.Hq, a.Hkv, a.hd, a.scale);
  dq.assign(a.q.size(), 0.f);
  dk.assign(a.k.size(), 0.f);
  dv.assign(a.v.size(), 0.f);
  ops::concept_attention_backward(dq.data(), dk.data(), dv.data(), a.dout.data(), out.data(),
                                  lse.data(), a.q.data(), a.k.data(), a.v.data(), a.sg, a.B, a.L,
                                  a.Hq, a.Hkv, a.hd, a.scale);
}

}  // namespace

class CompactVsReplicate : public ::testing::TestWithParam<AttnCase> {};

// The two forms of the same function, replicate on the flash attention kernel, agree.
TEST_P(CompactVsReplicate, AgreesWithAttentionKernel) {
  const auto c = GetParam();
  AttnData a(c, 500 + i64(c.pat) * 3 + c.L);
  const i64 NR = a.B * a.L * a.Hkv * a.hd;
  Vec o1(a.q.size()), l1(a.B * a.Hq * a.L), krep(NR), vrep(NR), dkrep(NR), dvrep(NR);
  ops::concept_attention_replicate_forward(o1.data(), l1.data(), krep.data(), vrep.data(),
                                           a.q.data(), a.k.data(), a.v.data(), a.sg, a.B, a.L,
                                           a.Hq, a.Hkv, a.hd, a.scale);
  Vec dq1(a.q.size(), 0.f), dk1(a.k.size(), 0.f), dv1(a.v.size(), 0.f);
  ops::concept_attention_replicate_backward(dq1.data(), dk1.data(), dv1.data(), dkrep.data(),
                                            dvrep.data(), a.dout.data(), o1.data(), l1.data(),
                                            a.q.data(), krep.data(), vrep.data(), a.sg, a.B, a.L,
                                            a.Hq, a.Hkv, a.hd, a.scale);
  Vec o2, l2, dq2, dk2, dv2;
  compact(a, o2, l2, dq2, dk2, dv2);
  SCOPED_TRACE(name_of(c.pat));
  EXPECT_LT(test::rel_err(o2.data(), o1.data(), o1.size()), 1e-4);
  EXPECT_LT(test::max_abs_diff(l2.data(), l1.data(), l1.size()), 1e-4);
  EXPECT_LT(scaled_err(dq2, dq1), 2e-4);
  EXPECT_LT(scaled_err(dk2, dk1), 2e-4);
  EXPECT_LT(scaled_err(dv2, dv1), 2e-4);
}

// concept_visibility "inclusive" (SPEC 4.9): compact (inclusive) against the replicated form
// with the leading z_null slot on the attention kernel, and the forward against the explicit
// definition (z_null with multiplicity 1, closed concepts with their lengths, the own concept
// with t - start + 1) through the streaming step.
TEST_P(CompactVsReplicate, InclusiveAgrees) {
  const auto c = GetParam();
  AttnData a(c, 700 + i64(c.pat) * 5 + c.L);
  const i64 W = a.Hkv * a.hd, NR = a.B * (a.L + 1) * W;
  Vec o1(a.q.size()), l1(a.B * a.Hq * a.L), krep(NR), vrep(NR), dkrep(NR), dvrep(NR);
  ops::concept_attention_replicate_forward(o1.data(), l1.data(), krep.data(), vrep.data(),
                                           a.q.data(), a.k.data(), a.v.data(), a.sg, a.B, a.L,
                                           a.Hq, a.Hkv, a.hd, a.scale, true);
  Vec dq1(a.q.size(), 0.f), dk1(a.k.size(), 0.f), dv1(a.v.size(), 0.f);
  ops::concept_attention_replicate_backward(dq1.data(), dk1.data(), dv1.data(), dkrep.data(),
                                            dvrep.data(), a.dout.data(), o1.data(), l1.data(),
                                            a.q.data(), krep.data(), vrep.data(), a.sg, a.B, a.L,
                                            a.Hq, a.Hkv, a.hd, a.scale, true);
  Vec o2(a.q.size()), l2(a.B * a.Hq * a.L);
  ops::concept_attention_forward(o2.data(), l2.data(), a.q.data(), a.k.data(), a.v.data(), a.sg,
                                 a.B, a.L, a.Hq, a.Hkv, a.hd, a.scale, true);
  Vec dq2(a.q.size(), 0.f), dk2(a.k.size(), 0.f), dv2(a.v.size(), 0.f);
  ops::concept_attention_backward(dq2.data(), dk2.data(), dv2.data(), a.dout.data(), o2.data(),
                                  l2.data(), a.q.data(), a.k.data(), a.v.data(), a.sg, a.B, a.L,
                                  a.Hq, a.Hkv, a.hd, a.scale, true);
  SCOPED_TRACE(name_of(c.pat));
  EXPECT_LT(test::rel_err(o2.data(), o1.data(), o1.size()), 1e-4);
  EXPECT_LT(test::max_abs_diff(l2.data(), l1.data(), l1.size()), 1e-4);
  EXPECT_LT(scaled_err(dq2, dq1), 2e-4);
  EXPECT_LT(scaled_err(dk2, dk1), 2e-4);
  EXPECT_LT(scaled_err(dv2, dv1), 2e-4);
  // the definition, token by token
  Vec o(a.Hq * a.hd);
  double worst = 0;
  for (i64 b = 0; b < a.B; ++b)
    for (i64 t = 0; t < a.L; ++t) {
      const i64 s = a.sg.seg[b * a.L + t];
      Vec mult(s + 2);
      mult[0] = 1.f;
      for (i64 e = 0; e < s; ++e) mult[e + 1] = float(a.sg.len[b * a.sg.Mmax + e]);
      mult[s + 1] = float(t - a.sg.start[b * a.sg.Mmax + s] + 1);
      ops::concept_attention_step(o.data(), a.q.data() + (b * a.L + t) * a.Hq * a.hd,
                                  a.k.data() + b * a.K1 * W, a.v.data() + b * a.K1 * W, W,
                                  mult.data(), s + 2, a.Hq, a.Hkv, a.hd, a.scale);
      worst = std::max(worst, test::max_abs_diff(o.data(), o2.data() + (b * a.L + t) * a.Hq * a.hd,
                                                 a.Hq * a.hd));
    }
  EXPECT_LT(worst, 1e-5);
  // list entries past a row's last concept are never attended
  for (i64 r = 0; r < a.B; ++r)
    for (i64 kk = a.sg.count[r] + 1; kk < a.K1; ++kk)
      for (i64 i = 0; i < W; ++i) EXPECT_EQ(dk2[(r * a.K1 + kk) * W + i], 0.f);
}

INSTANTIATE_TEST_SUITE_P(
    Patterns, CompactVsReplicate,
    ::testing::Values(AttnCase{Pattern::Random, 2, 23, 4, 2, 8},
                      AttnCase{Pattern::AllOnes, 2, 17, 4, 1, 8},
                      AttnCase{Pattern::WholeRow, 2, 19, 2, 2, 8},
                      AttnCase{Pattern::MultiDoc, 3, 40, 6, 3, 8},
                      AttnCase{Pattern::Uneven, 6, 21, 4, 2, 16},
                      AttnCase{Pattern::Random, 2, 37, 1, 1, 4},
                      AttnCase{Pattern::MultiDoc, 2, 160, 8, 2, 64},  // chunking (> 16 tokens)
                      AttnCase{Pattern::WholeRow, 1, 70, 4, 2, 32},
                      AttnCase{Pattern::AllOnes, 1, 150, 2, 1, 24},   // several key tiles
                      AttnCase{Pattern::Random, 1, 260, 2, 2, 80},    // hd > 64
                      AttnCase{Pattern::Uneven, 3, 130, 3, 1, 16},
                      AttnCase{Pattern::Uneven, 3, 1, 2, 1, 8}),
    [](const auto& info) { return std::to_string(info.index); });

TEST(CompactAttention, ChecksShapes) {
  AttnData a(AttnCase{Pattern::Random, 2, 15, 4, 2, 8}, 17);
  Vec o, l, dq, dk, dv;
  compact(a, o, l, dq, dk, dv);
  EXPECT_THROW(ops::concept_attention_forward(o.data(), l.data(), a.q.data(), a.k.data(),
                                              a.v.data(), a.sg, a.B, a.L, 3, 2, a.hd, a.scale),
               Error);
  EXPECT_THROW(ops::concept_attention_forward(o.data(), l.data(), a.q.data(), a.k.data(),
                                              a.v.data(), a.sg, a.B, a.L + 1, 4, 2, a.hd, a.scale),
               Error);
}

// The streaming single-token step reproduces the full compact forward, token by token.
TEST(CompactAttention, StepMatchesFullForward) {
  AttnData a(AttnCase{Pattern::MultiDoc, 2, 90, 4, 2, 16}, 31);
  Vec out(a.q.size()), lse(a.B * a.Hq * a.L), o(a.Hq * a.hd);
  ops::concept_attention_forward(out.data(), lse.data(), a.q.data(), a.k.data(), a.v.data(), a.sg,
                                 a.B, a.L, a.Hq, a.Hkv, a.hd, a.scale);
  const i64 W = a.Hkv * a.hd;
  double worst = 0;
  for (i64 b = 0; b < a.B; ++b)
    for (i64 t = 0; t < a.L; ++t) {
      const i64 s = a.sg.seg[b * a.L + t];
      Vec mult(s + 1);
      for (i64 e = 0; e < s; ++e) mult[e] = float(a.sg.len[b * a.sg.Mmax + e]);
      mult[s] = float(t - a.sg.start[b * a.sg.Mmax + s] + 1);
      ops::concept_attention_step(o.data(), a.q.data() + (b * a.L + t) * a.Hq * a.hd,
                                  a.k.data() + b * a.K1 * W, a.v.data() + b * a.K1 * W, W,
                                  mult.data(), s + 1, a.Hq, a.Hkv, a.hd, a.scale);
      worst = std::max(worst, test::max_abs_diff(o.data(), out.data() + (b * a.L + t) * a.Hq * a.hd,
                                                 a.Hq * a.hd));
    }
  EXPECT_LT(worst, 1e-5);
}

// The streaming prefill's one-pass form equals per-token steps over the same list: a chunk that
// starts inside an open concept (own multiplicities not from 1), entries padded in the cache
// (ld > Hkv*hd), several key tiles, GQA, chunks shorter and longer than a query block; the
// open entry's count (0) and entries past the chunk's last are never read.
TEST(CompactAttention, ListForwardMatchesSteps) {
  struct Case { i64 L, K1, Hq, Hkv, hd, pad; };
  for (const Case c : {Case{1, 1, 2, 1, 8, 0}, Case{9, 4, 4, 2, 16, 8}, Case{70, 30, 4, 4, 64, 0},
                       Case{150, 100, 6, 2, 24, 16}, Case{200, 5, 2, 2, 80, 4}}) {
    SCOPED_TRACE("L " + std::to_string(c.L) + " K1 " + std::to_string(c.K1));
    const i64 ld = c.Hkv * c.hd + c.pad, Kc = c.K1 + 3;  // 3 cached entries past the last read
    const float scale = 1.f / std::sqrt(float(c.hd));
    Vec q = randn(c.L * c.Hq * c.hd, 5 + c.L), k = randn(Kc * ld, 6 + c.L),
        v = randn(Kc * ld, 7 + c.L);
    // tokens spread over the entries: the first continues an open concept (own 4 on entry
    // K1 - 1 - ...), each later entry change starts own again at 1
    std::vector<i64> last(c.L);
    Vec own(c.L), mult(Kc, 0.f);
    Rng r(11 + c.L);
    const i64 first = std::max<i64>(0, c.K1 - 1 - c.L / 3);
    for (i64 e = 0; e < Kc; ++e) mult[e] = float(1 + r.next() % 9);
    i64 e = first;
    float cnt = 4;
    for (i64 t = 0; t < c.L; ++t) {
      const i64 left = c.L - t, to_go = c.K1 - 1 - e;
      if (to_go > 0 && (to_go >= left || r.next() % 3 == 0)) {
        ++e;
        cnt = 1;
      } else if (t > 0) {
        cnt += 1;
      }
      last[t] = e;
      own[t] = cnt;
    }
    ASSERT_EQ(last[c.L - 1], c.K1 - 1);
    mult[c.K1 - 1] = 0.f;  // the open entry: never read as a closed one
    Vec out(q.size(), -1.f), o(c.Hq * c.hd);
    ops::concept_attention_list_forward(out.data(), q.data(), k.data(), v.data(), ld, mult.data(),
                                        c.K1, last.data(), own.data(), c.L, c.Hq, c.Hkv, c.hd,
                                        scale);
    double worst = 0;
    for (i64 t = 0; t < c.L; ++t) {
      Vec mt(mult.begin(), mult.begin() + last[t] + 1);
      mt[last[t]] = own[t];
      ops::concept_attention_step(o.data(), q.data() + t * c.Hq * c.hd, k.data(), v.data(), ld,
                                  mt.data(), last[t] + 1, c.Hq, c.Hkv, c.hd, scale);
      worst = std::max(worst, test::max_abs_diff(o.data(), out.data() + t * c.Hq * c.hd,
                                                 c.Hq * c.hd));
    }
    EXPECT_LT(worst, 1e-5);
  }
  // a decreasing entry index or a zero own multiplicity is a caller bug, named
  Vec q = randn(2 * 8, 1), k = randn(2 * 8, 2), mult{1.f, 1.f}, o(16), own{1.f, 1.f};
  std::vector<i64> bad{1, 0};
  EXPECT_THROW(ops::concept_attention_list_forward(o.data(), q.data(), k.data(), k.data(), 8,
                                                   mult.data(), 2, bad.data(), own.data(), 2, 1,
                                                   1, 8, 1.f),
               Error);
}

// Token t sees only concepts that closed before its own concept began: changing the list
// entry of concept j (list index j+1) must not affect tokens in segments <= j.
TEST(CompactAttention, NoFutureLeak) {
  AttnData a(AttnCase{Pattern::Random, 1, 30, 2, 1, 8}, 23);
  Vec o1(a.q.size()), l1(a.L * a.Hq), o2(a.q.size()), l2(a.L * a.Hq);
  ops::concept_attention_forward(o1.data(), l1.data(), a.q.data(), a.k.data(), a.v.data(), a.sg,
                                 a.B, a.L, a.Hq, a.Hkv, a.hd, a.scale);
  const i64 M = a.sg.count[0], W = a.Hkv * a.hd;
  ASSERT_GE(M, 3);
  const i64 j = M / 2;  // perturb concept j
  for (i64 i = 0; i < W; ++i) {
    a.k[(j + 1) * W + i] += 1.f;
    a.v[(j + 1) * W + i] += 1.f;
  }
  ops::concept_attention_forward(o2.data(), l2.data(), a.q.data(), a.k.data(), a.v.data(), a.sg,
                                 a.B, a.L, a.Hq, a.Hkv, a.hd, a.scale);
  for (i64 t = 0; t < a.L; ++t) {
    const bool affected = a.sg.seg[t] > j;
    double diff = 0;
    for (i64 i = 0; i < a.Hq * a.hd; ++i)
      diff = test::worse(diff, double(std::abs(o1[t * a.Hq * a.hd + i] - o2[t * a.Hq * a.hd + i])));
    if (affected)
      EXPECT_GT(diff, 0.0) << t;
    else
      EXPECT_EQ(diff, 0.0) << t;
  }
}

// =============================================================================================
// Rows never mix
// =============================================================================================

TEST(RowIsolation, PerturbingRowOneLeavesRowZeroUnchanged) {
  const i64 B = 2, L = 18, d = 6, Hq = 4, Hkv = 2, hd = 8, N = B * L;
  auto run = [&](uint64_t row1_seed, Vec& p_out, Bits& b_out, Vec& pooled, Vec& zs, Vec& att,
                 Vec& dH, Vec& dz, Vec& dq, Vec& dk, ops::Segments& sg) {
    Toks tok(N, 4);
    tok[0] = tok[L] = kBos;
    Vec H = randn(N * d, 1);
    Vec h1 = randn(L * d, row1_seed, 3.f);
    std::copy(h1.begin(), h1.end(), H.begin() + L * d);
    Rng r(row1_seed);
    const float bos_rate = row1_seed == 1000 ? 0.05f : 0.6f;
    for (i64 t = 1; t < L; ++t)
      if (r.uniform() < bos_rate) tok[L + t] = kBos;
    Vec cache(N * 3);
    p_out.assign(N, 0.f);
    ops::router_prob_forward(p_out.data(), cache.data(), H.data(), H.data(), tok.data(), kBos, B,
                             L, d);
    b_out.assign(N, 0);
    ops::sample_boundaries(b_out.data(), p_out.data(), tok.data(), kBos, B, L, 0.5f, 3, 1, 0);
    sg.build(b_out.data(), tok.data(), kBos, B, L);
    const i64 S = B * sg.Mmax * d, K1 = sg.Mmax + 1;
    pooled.assign(S, 0.f);
    ops::pool_mean_forward(pooled.data(), H.data(), sg, d);
    zs.assign(S, 0.f);
    ops::smoother_forward(zs.data(), pooled.data(), p_out.data(), sg, d);
    // K/V from the smoothed concepts through a fixed "projection" (d -> Hkv*hd by tiling).
    Vec zn = randn(d, 2), list(B * K1 * d), kv(B * K1 * Hkv * hd);
    ops::concept_list_forward(list.data(), zn.data(), zs.data(), B, sg.Mmax, d);
    for (i64 e = 0; e < B * K1; ++e)
      for (i64 i = 0; i < Hkv * hd; ++i) kv[e * Hkv * hd + i] = list[e * d + i % d];
    Vec q = randn(N * Hq * hd, 3);
    Vec q1 = randn(L * Hq * hd, row1_seed + 9);
    std::copy(q1.begin(), q1.end(), q.begin() + L * Hq * hd);
    att.assign(N * Hq * hd, 0.f);
    Vec lse(B * Hq * L);
    ops::concept_attention_forward(att.data(), lse.data(), q.data(), kv.data(), kv.data(), sg, B,
                                   L, Hq, Hkv, hd, 0.3f);
    Vec dout = randn(N * Hq * hd, 4);
    dq.assign(q.size(), 0.f);
    dk.assign(kv.size(), 0.f);
    Vec dv(kv.size(), 0.f);
    ops::concept_attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), att.data(),
                                    lse.data(), q.data(), kv.data(), kv.data(), sg, B, L, Hq, Hkv,
                                    hd, 0.3f);
    Vec dzs = randn(S, 5);
    dz.assign(S, 0.f);
    Vec dp(N, 0.f);
    ops::smoother_backward(dz.data(), dp.data(), dzs.data(), zs.data(), pooled.data(),
                           p_out.data(), sg, d);
    dH.assign(N * d, 0.f);
    ops::pool_mean_backward(dH.data(), dz.data(), sg, d);
  };
  Vec p1, p2, pl1, pl2, zs1, zs2, a1, a2, dH1, dH2, dz1, dz2, dq1, dq2, dk1, dk2;
  Bits b1, b2;
  ops::Segments s1, s2;
  run(1000, p1, b1, pl1, zs1, a1, dH1, dz1, dq1, dk1, s1);
  run(2000, p2, b2, pl2, zs2, a2, dH2, dz2, dq2, dk2, s2);
  ASSERT_NE(s1.count[1], s2.count[1]);  // row 1's segmentation really changed
  ASSERT_NE(s1.Mmax, s2.Mmax);           // and with it the padded layout
  for (i64 t = 0; t < L; ++t) {
    EXPECT_EQ(p1[t], p2[t]);
    EXPECT_EQ(b1[t], b2[t]);
  }
  ASSERT_EQ(s1.count[0], s2.count[0]);
  const i64 M0 = s1.count[0];
  for (i64 x = 0; x < M0 * d; ++x) {
    EXPECT_EQ(pl1[x], pl2[x]);
    EXPECT_EQ(zs1[x], zs2[x]);
    EXPECT_EQ(dz1[x], dz2[x]);
  }
  for (i64 x = 0; x < L * Hq * hd; ++x) {
    EXPECT_EQ(a1[x], a2[x]);
    EXPECT_EQ(dq1[x], dq2[x]);
  }
  for (i64 x = 0; x < (M0 + 1) * Hkv * hd; ++x) EXPECT_EQ(dk1[x], dk2[x]);
  for (i64 x = 0; x < L * d; ++x) EXPECT_EQ(dH1[x], dH2[x]);
}

// =============================================================================================
// Global Parser auxiliary loss
// =============================================================================================

TEST(AuxLoss, ValueGradientAndAccumulation) {
  struct C { double sb, sp, n, R; };
  for (const C& c : {C{25, 30, 100, 4}, C{10, 90, 100, 4}, C{50, 20, 100, 2}, C{1, 1, 3, 8}}) {
    const auto a = ops::global_parser_loss(c.sb, c.sp, c.n, c.R, 0.03);
    const double F = c.sb / c.n, G = c.sp / c.n, R = c.R;
    EXPECT_NEAR(a.value, R / (R - 1) * ((R - 1) * F * G + (1 - F) * (1 - G)) - 1, 1e-12);
    // d value / d p_t by finite differences on sum_p (F fixed)
    const double h = 1e-4;
    const double fd = (ops::global_parser_loss(c.sb, c.sp + h, c.n, R).value -
                       ops::global_parser_loss(c.sb, c.sp - h, c.n, R).value) /
                      (2 * h);
    EXPECT_NEAR(a.grad_p, 0.03 * fd, 1e-9);
    EXPECT_NEAR(a.grad_p, 0.03 * R * (R * F - 1) / ((R - 1) * c.n), 1e-12);
  }
  // At F = G = 1/R the loss is 0 and the gradient vanishes.
  const auto z = ops::global_parser_loss(25, 25, 100, 4);
  EXPECT_NEAR(z.value, 0.0, 1e-12);
  EXPECT_NEAR(z.grad_p, 0.0, 1e-15);
  // Micro-batches: summing the per-micro-batch sums gives the same loss and gradient as one
  // batch k times larger (the caller accumulates sum_b, sum_p, count over the step).
  Vec p(64);
  test::fill_uniform(p.data(), 64, 3, 0.f, 1.f);
  Bits b(64);
  ops::sample_boundaries(b.data(), p.data(), nullptr, kBos, 4, 16, 1.f, 1, 1, 0);
  double sb = 0, sp = 0;
  for (int mb = 0; mb < 4; ++mb)
    for (int i = 0; i < 16; ++i) sb += b[mb * 16 + i], sp += p[mb * 16 + i];
  double sb_all = std::accumulate(b.begin(), b.end(), 0.0);
  double sp_all = std::accumulate(p.begin(), p.end(), 0.0);
  const auto m = ops::global_parser_loss(sb, sp, 64, 4), w = ops::global_parser_loss(sb_all, sp_all, 64, 4);
  EXPECT_NEAR(m.value, w.value, 1e-12);
  EXPECT_EQ(m.grad_p, w.grad_p);
  Vec dp(64, 1.f);
  ops::aux_loss_backward(dp.data(), 64, 0.25f);
  for (float x : dp) EXPECT_EQ(x, 1.25f);
  EXPECT_THROW(ops::global_parser_loss(1, 1, 4, 1.0), Error);
  EXPECT_THROW(ops::global_parser_loss(1, 1, 0, 4.0), Error);
}

// =============================================================================================
// Parallel paths: large enough shapes to take the OpenMP branches; results must not depend on
// the thread count (each output element is produced by one thread in a fixed order).
// =============================================================================================

TEST(Parallel, ThreadCountDoesNotChangeResults) {
  const i64 B = 3, L = 300, d = 48, Hq = 4, Hkv = 2, hd = 16, N = B * L;
  Toks tok;
  Bits b0;
  make_pattern(Pattern::MultiDoc, B, L, 4242, tok, b0);
  Vec H = randn(N * d, 1), q = randn(N * Hq * hd, 2), dout = randn(N * Hq * hd, 3);
  auto run = [&](int threads) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::vector<Vec> res;
    Vec p(N), cache(N * 3);
    ops::router_prob_forward(p.data(), cache.data(), H.data(), H.data(), tok.data(), kBos, B, L, d);
    Bits bs(N);
    ops::sample_boundaries(bs.data(), p.data(), tok.data(), kBos, B, L, 0.6f, 1, 2, 0);
    ops::Segments sg;
    sg.build(bs.data(), tok.data(), kBos, B, L);
    const i64 S = B * sg.Mmax * d, K1 = sg.Mmax + 1, W = Hkv * hd;
    Vec pooled(S), zs(S), list(B * K1 * d), kv(B * K1 * W), rep(N * W);
    ops::pool_mean_forward(pooled.data(), H.data(), sg, d);
    ops::smoother_forward(zs.data(), pooled.data(), p.data(), sg, d);
    Vec zn = randn(d, 9);
    ops::concept_list_forward(list.data(), zn.data(), zs.data(), B, sg.Mmax, d);
    for (i64 e = 0; e < B * K1; ++e)
      for (i64 i = 0; i < W; ++i) kv[e * W + i] = list[e * d + i % d];
    ops::concept_gather(rep.data(), kv.data(), sg, W);
    Vec out(N * Hq * hd), lse(B * Hq * L), dq(q.size(), 0.f), dk(kv.size(), 0.f),
        dv(kv.size(), 0.f), dkl(kv.size(), 0.f);
    ops::concept_attention_forward(out.data(), lse.data(), q.data(), kv.data(), kv.data(), sg, B,
                                   L, Hq, Hkv, hd, 0.25f);
    ops::concept_attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), out.data(),
                                    lse.data(), q.data(), kv.data(), kv.data(), sg, B, L, Hq, Hkv,
                                    hd, 0.25f);
    ops::concept_scatter_add(dkl.data(), rep.data(), sg, W);
    Vec dz(S, 0.f), dp(N, 0.f), dH(N * d, 0.f), dzn(d, 0.f), dzs(S, 0.f);
    ops::concept_list_backward(dzn.data(), dzs.data(), list.data(), B, sg.Mmax, d);
    ops::smoother_backward(dz.data(), dp.data(), dzs.data(), zs.data(), pooled.data(), p.data(),
                           sg, d);
    ops::pool_mean_backward(dH.data(), dz.data(), sg, d);
    ops::aux_loss_backward(dp.data(), N, 0.01f);
    ops::router_prob_backward(dH.data(), dH.data(), dp.data(), cache.data(), H.data(), H.data(),
                              tok.data(), kBos, B, L, d);
    Vec bf(bs.begin(), bs.end());
    res = {p, bf, pooled, zs, rep, out, lse, dq, dk, dv, dkl, dz, dp, dH};
    omp_set_num_threads(saved);
    return res;
  };
  const auto r1 = run(1), r2 = run(2), r3 = run(3);
  for (size_t i = 0; i < r1.size(); ++i) {
    EXPECT_EQ(r1[i], r2[i]) << "result " << i;
    EXPECT_EQ(r1[i], r3[i]) << "result " << i;
  }
}

// =============================================================================================
// prefix_mean + inclusive: prefix pooling, the own-concept smoother, the own-entry attention
// =============================================================================================

// Own entries equal to the list's (k_own[t] = K[seg(t) + 1]) give the inclusive compact
// kernel: same multiplicities, same function; and the backward folds into the same gradients.
TEST(OwnConceptAttention, EqualsInclusiveCompactWhenOwnIsTheListEntry) {
  for (Pattern pat : {Pattern::MultiDoc, Pattern::Uneven}) {
    AttnData a({pat, 3, 70, 4, 2, 8}, 61);
    const i64 W = a.Hkv * a.hd, N = a.B * a.L;
    Vec ko(N * W), vo(N * W);
    for (i64 n = 0; n < N; ++n) {
      const i64 e = (n / a.L) * a.K1 + a.sg.seg[n] + 1;
      std::copy_n(a.k.data() + e * W, W, ko.data() + n * W);
      std::copy_n(a.v.data() + e * W, W, vo.data() + n * W);
    }
    Vec want(a.q.size()), lse(a.B * a.Hq * a.L), got(a.q.size());
    ops::concept_attention_forward(want.data(), lse.data(), a.q.data(), a.k.data(), a.v.data(),
                                   a.sg, a.B, a.L, a.Hq, a.Hkv, a.hd, a.scale, true);
    ops::concept_attention_own_forward(got.data(), a.q.data(), a.k.data(), a.v.data(), ko.data(),
                                       vo.data(), a.sg, a.B, a.L, a.Hq, a.Hkv, a.hd, a.scale);
    EXPECT_LT(scaled_err(got, want), 1e-5) << name_of(pat);
    Vec dq1(a.q.size()), dk1(a.k.size()), dv1(a.v.size());
    ops::concept_attention_backward(dq1.data(), dk1.data(), dv1.data(), a.dout.data(), want.data(),
                                    lse.data(), a.q.data(), a.k.data(), a.v.data(), a.sg, a.B,
                                    a.L, a.Hq, a.Hkv, a.hd, a.scale, true);
    Vec dq2(a.q.size()), dk2(a.k.size()), dv2(a.v.size()), dko(N * W), dvo(N * W);
    ops::concept_attention_own_backward(dq2.data(), dk2.data(), dv2.data(), dko.data(),
                                        dvo.data(), a.dout.data(), a.q.data(), a.k.data(),
                                        a.v.data(), ko.data(), vo.data(), a.sg, a.B, a.L, a.Hq,
                                        a.Hkv, a.hd, a.scale);
    for (i64 n = 0; n < N; ++n) {  // fold the own entries' gradients into their list entries
      const i64 e = (n / a.L) * a.K1 + a.sg.seg[n] + 1;
      for (i64 i = 0; i < W; ++i) {
        dk2[e * W + i] += dko[n * W + i];
        dv2[e * W + i] += dvo[n * W + i];
      }
    }
    EXPECT_LT(scaled_err(dq2, dq1), 1e-4) << name_of(pat);
    EXPECT_LT(scaled_err(dk2, dk1), 1e-4) << name_of(pat);
    EXPECT_LT(scaled_err(dv2, dv1), 1e-4) << name_of(pat);
  }
}

// Finite differences of the three kernels through L = sum R * out (R random).
TEST(OwnConceptAttention, PrefixKernelsFiniteDifferences) {
  AttnData a({Pattern::MultiDoc, 2, 23, 4, 2, 8}, 62);
  const ops::Segments& sg = a.sg;
  const i64 W = a.Hkv * a.hd, N = a.B * a.L, d = 5, S = a.B * sg.Mmax * d;
  // pool_prefix_mean
  {
    Vec H = randn(N * d, 63), R = randn(N * d, 64), out(N * d), dH(N * d, 0.f);
    auto loss = [&] {
      ops::pool_prefix_mean_forward(out.data(), H.data(), sg, d);
      double l = 0;
      for (i64 i = 0; i < N * d; ++i) l += double(R[i]) * out[i];
      return l;
    };
    ops::pool_prefix_mean_backward(dH.data(), R.data(), sg, d);
    test::check_grad("pool_prefix_mean H", H.data(), dH.data(), N * d, loss, 1e-2, 1e-2);
    // the last token of each concept holds the whole concept's mean
    Vec pooled(S);
    ops::pool_mean_forward(pooled.data(), H.data(), sg, d);
    loss();
    for (i64 r = 0; r < a.B; ++r)
      for (i64 j = 0; j < sg.count[r]; ++j) {
        const i64 sl = sg.slot(r, j), last = r * a.L + sg.start[sl] + sg.len[sl] - 1;
        EXPECT_LT(test::max_abs_diff(out.data() + last * d, pooled.data() + sl * d, d), 1e-6);
      }
  }
  // smoother_own (p in the pass-through range, 1 at forced starts)
  {
    Vec zp = randn(N * d, 65), zs = randn(S, 66), p(N), R = randn(N * d, 67), out(N * d);
    test::fill_uniform(p.data(), N, 68, 0.1f, 0.9f);
    for (i64 n = 0; n < N; ++n)
      if (n % a.L == 0 || a.tok[n] == kBos) p[n] = 1.f;
    Vec dzp(N * d, 0.f), dzs(S, 0.f), dp(N, 0.f);
    auto loss = [&] {
      ops::smoother_own_forward(out.data(), zp.data(), zs.data(), p.data(), sg, d);
      double l = 0;
      for (i64 i = 0; i < N * d; ++i) l += double(R[i]) * out[i];
      return l;
    };
    ops::smoother_own_backward(dzp.data(), dzs.data(), dp.data(), R.data(), zp.data(), zs.data(),
                               p.data(), sg, d);
    test::check_grad("smoother_own zp", zp.data(), dzp.data(), N * d, loss, 1e-2, 1e-2);
    test::check_grad("smoother_own zs", zs.data(), dzs.data(), S, loss, 1e-2, 1e-2);
    test::check_grad("smoother_own p", p.data(), dp.data(), N, loss, 1e-3, 2e-2, N);
  }
  // concept_attention_own
  {
    Vec ko = randn(N * W, 69), vo = randn(N * W, 70), out(a.q.size());
    Vec q = a.q, k = a.k, v = a.v;
    auto loss = [&] {
      ops::concept_attention_own_forward(out.data(), q.data(), k.data(), v.data(), ko.data(),
                                         vo.data(), sg, a.B, a.L, a.Hq, a.Hkv, a.hd, a.scale);
      double l = 0;
      for (size_t i = 0; i < out.size(); ++i) l += double(a.dout[i]) * out[i];
      return l;
    };
    Vec dq(q.size(), 0.f), dk(k.size(), 0.f), dv(v.size(), 0.f), dko(N * W, 0.f), dvo(N * W, 0.f);
    ops::concept_attention_own_backward(dq.data(), dk.data(), dv.data(), dko.data(), dvo.data(),
                                        a.dout.data(), q.data(), k.data(), v.data(), ko.data(),
                                        vo.data(), sg, a.B, a.L, a.Hq, a.Hkv, a.hd, a.scale);
    test::check_grad("own attention q", q.data(), dq.data(), i64(q.size()), loss, 1e-2, 2e-2);
    test::check_grad("own attention k", k.data(), dk.data(), i64(k.size()), loss, 1e-2, 2e-2);
    test::check_grad("own attention v", v.data(), dv.data(), i64(v.size()), loss, 1e-2, 2e-2);
    test::check_grad("own attention k_own", ko.data(), dko.data(), N * W, loss, 1e-2, 2e-2);
    test::check_grad("own attention v_own", vo.data(), dvo.data(), N * W, loss, 1e-2, 2e-2);
  }
}
