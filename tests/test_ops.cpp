// One table-driven test over the kernels in ops.h, in the style of ggml's test-backend-ops.
// For every case of a differentiable op:
//   1. the fast forward equals the reference forward (ops_ref.h), every output;
//   2. the fast backward equals the reference backward, every gradient, and both ACCUMULATE
//      (gradients start from random values, and the increments are compared);
//   3. the fast gradients match central finite differences of the projected loss
//      sum(out * R), R random, computed in double (the reference forward instantiated for
//      double), so that float rounding does not drown small gradients.
// Plus per-op extras: attention causality, ignored cross-entropy targets, AdamW over three
// steps against a double-precision transcription of the formula.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "kernels/ops_ref.h"
#include "testing.h"

using namespace dlcm;

namespace {

struct Case {
  const char* op;
  i64 N = 1, d = 1, V = 1;  // rows, width, vocab/table rows (also n = N*d for elementwise ops)
  i64 B = 1, Lq = 1, Lk = 1, Hq = 1, Hkv = 1, hd = 2, q_offset = 0;  // attention; rope: N,Hq,hd
  float std = 1.0f;  // input scale
};

std::string describe(const Case& c) {
  std::string s = std::string(c.op) + " N=" + std::to_string(c.N) + " d=" + std::to_string(c.d) +
                  " V=" + std::to_string(c.V);
  if (std::string(c.op) == "attention" || std::string(c.op) == "rope")
    s += " B=" + std::to_string(c.B) + " Lq=" + std::to_string(c.Lq) +
         " Lk=" + std::to_string(c.Lk) + " Hq=" + std::to_string(c.Hq) +
         " Hkv=" + std::to_string(c.Hkv) + " hd=" + std::to_string(c.hd) +
         " q_offset=" + std::to_string(c.q_offset);
  return s + " std=" + std::to_string(c.std);
}

const Case kCases[] = {
    {.op = "embedding", .N = 37, .d = 19, .V = 11},
    {.op = "embedding", .N = 1, .d = 1, .V = 1},
    {.op = "embedding", .N = 300, .d = 80, .V = 7},  // parallel path, many repeated ids
    {.op = "rmsnorm", .N = 13, .d = 33},
    {.op = "rmsnorm", .N = 1, .d = 4},
    {.op = "rmsnorm", .N = 300, .d = 96, .std = 3.0f},  // parallel path
    {.op = "rope", .N = 9, .Hq = 3, .hd = 8},
    {.op = "rope", .N = 1, .Hq = 1, .hd = 2},
    {.op = "rope", .N = 70, .Hq = 4, .hd = 64},
    {.op = "swiglu", .N = 1, .d = 1, .std = 3.0f},
    {.op = "swiglu", .N = 37, .d = 1, .std = 3.0f},
    {.op = "swiglu", .N = 20011, .d = 1, .std = 3.0f},  // parallel path and a 16-lane tail
    // attention: self, GQA 1/2/4, odd sizes, L not a multiple of 64, L=1, decode, chunked
    // prefill (q_offset>0, Lq<Lk), queries that do not reach the end of the cache, hd > 64.
    // Lq < 16 exercises the few-queries forward path, larger Lq the transposed-tile path.
    {.op = "attention", .B = 2, .Lq = 7, .Lk = 7, .Hq = 2, .Hkv = 2, .hd = 8},
    {.op = "attention", .B = 1, .Lq = 67, .Lk = 67, .Hq = 4, .Hkv = 2, .hd = 16},
    {.op = "attention", .B = 2, .Lq = 130, .Lk = 130, .Hq = 4, .Hkv = 1, .hd = 5},
    {.op = "attention", .B = 1, .Lq = 1, .Lk = 1, .Hq = 2, .Hkv = 1, .hd = 3},
    {.op = "attention", .B = 2, .Lq = 1, .Lk = 70, .Hq = 4, .Hkv = 2, .hd = 64, .q_offset = 69},
    {.op = "attention", .B = 2, .Lq = 3, .Lk = 100, .Hq = 8, .Hkv = 2, .hd = 16, .q_offset = 97},
    {.op = "attention", .B = 1, .Lq = 20, .Lk = 90, .Hq = 2, .Hkv = 1, .hd = 24, .q_offset = 70},
    {.op = "attention", .B = 1, .Lq = 10, .Lk = 80, .Hq = 4, .Hkv = 4, .hd = 7, .q_offset = 5},
    {.op = "attention", .B = 1, .Lq = 33, .Lk = 33, .Hq = 2, .Hkv = 2, .hd = 80},
    {.op = "attention", .B = 2, .Lq = 150, .Lk = 150, .Hq = 2, .Hkv = 1, .hd = 64, .std = 2.0f},
    {.op = "cross_entropy", .N = 9, .V = 13},
    {.op = "cross_entropy", .N = 4, .V = 1000},
    {.op = "cross_entropy", .N = 1, .V = 1},
    {.op = "cross_entropy", .N = 6, .V = 50, .std = 40.0f},  // would overflow without max-sub
    {.op = "cross_entropy", .N = 40, .V = 500},              // parallel path
    {.op = "adamw", .N = 1000, .d = 1},
    {.op = "adamw", .N = 40000, .d = 1},
    {.op = "reduce", .N = 1, .d = 1},
    {.op = "reduce", .N = 100003, .d = 1},
};

enum Impl { Fast, Ref };
using Vec = std::vector<double>;

// A differentiable op: named inputs (finite differences perturb them in place), a forward
// that fills outs (outs[0] is projected by R; the rest, e.g. rstd or lse, are compared and
// passed to backward), and a backward that accumulates into grads given dout = R.
struct Harness {
  std::vector<std::string> names;
  std::vector<Buf> in;
  std::vector<i64> out_sizes;
  std::function<void(Impl, std::vector<Buf>&)> fwd;
  std::function<void(Impl, const std::vector<Buf>&, const float*, std::vector<Buf>&)> bwd;
  // Reference forward in double: inputs (converted from in), writes the projected output.
  std::function<void(const std::vector<Vec>&, Vec&)> fwd64;
  double tol = 1e-5, fd_h = 1e-2, fd_tol = 2e-2;
};

std::vector<Buf> alloc(const std::vector<i64>& sizes) {
  std::vector<Buf> v;
  for (i64 s : sizes) v.emplace_back(size_t(s), 0.0f);
  return v;
}

void run_harness(Harness& H, uint64_t seed) {
  std::vector<i64> in_sizes;
  for (auto& x : H.in) in_sizes.push_back(i64(x.size()));
  auto of = alloc(H.out_sizes), orf = alloc(H.out_sizes);
  H.fwd(Fast, of);
  H.fwd(Ref, orf);
  for (size_t i = 0; i < of.size(); ++i)
    EXPECT_LT(test::rel_err(of[i].data(), orf[i].data(), i64(of[i].size())), H.tol)
        << "forward output " << i;

  Buf R(of[0].size());
  test::fill_normal(R.data(), i64(R.size()), seed + 100);
  // Gradients start from the same random values G0, so accumulation (+=) is part of the test.
  auto g0 = alloc(in_sizes);
  for (size_t i = 0; i < g0.size(); ++i)
    test::fill_normal(g0[i].data(), i64(g0[i].size()), seed + 200 + i);
  auto gf = g0, gr = g0;
  H.bwd(Fast, of, R.data(), gf);
  H.bwd(Ref, orf, R.data(), gr);
  for (size_t i = 0; i < gf.size(); ++i) {
    for (size_t e = 0; e < gf[i].size(); ++e) {
      gf[i][e] -= g0[i][e];
      gr[i][e] -= g0[i][e];
    }
    EXPECT_LT(test::rel_err(gf[i].data(), gr[i].data(), i64(gf[i].size())), H.tol)
        << "gradient of " << H.names[i] << " vs reference";
  }

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
                     H.fd_h, H.fd_tol);
  }
}

void run_embedding(const Case& c) {
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
  run_harness(H, 11);
}

void run_rmsnorm(const Case& c) {
  const i64 N = c.N, d = c.d;
  const float eps = 1e-5f;
  Harness H;
  H.names = {"x", "w"};
  H.in = {Buf(N * d), Buf(d)};
  test::fill_normal(H.in[0].data(), N * d, 2, c.std);
  test::fill_uniform(H.in[1].data(), d, 3, 0.5f, 1.5f);
  H.out_sizes = {N * d, N};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    (im == Fast ? ops::rmsnorm_forward : ops::ref::rmsnorm_forward<float>)(
        o[0].data(), o[1].data(), H.in[0].data(), H.in[1].data(), N, d, eps);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    Vec r(N);
    ops::ref::rmsnorm_forward<double>(o.data(), r.data(), in[0].data(), in[1].data(), N, d, eps);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>& o, const float* dout, std::vector<Buf>& g) {
    (im == Fast ? ops::rmsnorm_backward : ops::ref::rmsnorm_backward)(
        g[0].data(), g[1].data(), dout, H.in[0].data(), H.in[1].data(), o[1].data(), N, d);
  };
  run_harness(H, 12);
}

void run_rope(const Case& c) {
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
    o[0] = H.in[0];
    (im == Fast ? ops::rope_apply : ops::ref::rope_apply<float>)(o[0].data(), pos.data(), N, Hh, hd,
                                                          theta, false);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    o = in[0];
    ops::ref::rope_apply<double>(o.data(), pos.data(), N, Hh, hd, theta, false);
  };
  // The transpose rotation is the backward.
  H.bwd = [&](Impl im, const std::vector<Buf>&, const float* dout, std::vector<Buf>& g) {
    Buf t(dout, dout + N * Hh * hd);
    (im == Fast ? ops::rope_apply : ops::ref::rope_apply<float>)(t.data(), pos.data(), N, Hh, hd, theta,
                                                          true);
    for (size_t i = 0; i < t.size(); ++i) g[0][i] += t[i];
  };
  run_harness(H, 13);

  // inverse(forward(x)) == x.
  Buf x = H.in[0];
  ops::rope_apply(x.data(), pos.data(), N, Hh, hd, theta, false);
  ops::rope_apply(x.data(), pos.data(), N, Hh, hd, theta, true);
  EXPECT_LT(test::rel_err(x.data(), H.in[0].data(), i64(x.size())), 1e-5);
}

void run_swiglu(const Case& c) {
  const i64 n = c.N * c.d;
  Harness H;
  H.names = {"a", "b"};
  H.in = {Buf(n), Buf(n)};
  test::fill_normal(H.in[0].data(), n, 5, c.std);
  test::fill_normal(H.in[1].data(), n, 6, 1.0f);
  H.out_sizes = {n};
  H.fwd = [&](Impl im, std::vector<Buf>& o) {
    (im == Fast ? ops::swiglu_forward : ops::ref::swiglu_forward<float>)(o[0].data(), H.in[0].data(),
                                                                  H.in[1].data(), n);
  };
  H.fwd64 = [&](const std::vector<Vec>& in, Vec& o) {
    ops::ref::swiglu_forward<double>(o.data(), in[0].data(), in[1].data(), n);
  };
  H.bwd = [&](Impl im, const std::vector<Buf>&, const float* dout, std::vector<Buf>& g) {
    (im == Fast ? ops::swiglu_backward : ops::ref::swiglu_backward)(
        g[0].data(), g[1].data(), dout, H.in[0].data(), H.in[1].data(), n);
  };
  run_harness(H, 14);
}

void run_attention(const Case& c) {
  const i64 B = c.B, Lq = c.Lq, Lk = c.Lk, Hq = c.Hq, Hkv = c.Hkv, hd = c.hd, qo = c.q_offset;
  const float scale = 1.0f / std::sqrt(float(hd));
  Harness H;
  H.names = {"q", "k", "v"};
  H.in = {Buf(B * Lq * Hq * hd), Buf(B * Lk * Hkv * hd), Buf(B * Lk * Hkv * hd)};
  for (int i = 0; i < 3; ++i) test::fill_normal(H.in[i].data(), i64(H.in[i].size()), 20 + i, c.std);
  H.out_sizes = {B * Lq * Hq * hd, B * Hq * Lq};
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
    (im == Fast ? ops::attention_backward : ops::ref::attention_backward)(
        g[0].data(), g[1].data(), g[2].data(), dout, o[0].data(), o[1].data(), H.in[0].data(),
        H.in[1].data(), H.in[2].data(), B, Lq, Lk, Hq, Hkv, hd, qo, scale, 0);
  };
  run_harness(H, 15);

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

void run_cross_entropy(const Case& c) {
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
    Buf x = H.in[0];
    (im == Fast ? ops::cross_entropy_fused : ops::ref::cross_entropy_fused)(x.data(), tg.data(),
                                                                            N, V, gs);
    for (i64 n = 0; n < N; ++n)
      for (i64 v = 0; v < V; ++v) g[0][n * V + v] += x[n * V + v] / gs * dout[n];
  };
  run_harness(H, 16);

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
}

void run_adamw(const Case& c) {
  const i64 n = c.N * c.d;
  const float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
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
      worst = std::max(worst, std::abs(w[i] - W[i]) / std::max(1.0, std::abs(W[i])));
      worst_m = std::max(worst_m, std::abs(m[i] - M[i]));
      worst_v = std::max(worst_v, std::abs(v[i] - Vv[i]));
    }
    EXPECT_LT(worst, 1e-6) << "wd=" << wd;
    EXPECT_LT(worst_m, 1e-6);
    EXPECT_LT(worst_v, 1e-6);
  }
}

void run_reduce(const Case& c) {
  const i64 n = c.N * c.d;
  Buf x(n);
  test::fill_normal(x.data(), n, 50);
  double a = ops::sum_squares(x.data(), n), r = ops::ref::sum_squares(x.data(), n);
  EXPECT_NEAR(a, r, 1e-12 * r);
  Buf y = x;
  ops::scale_inplace(y.data(), n, -0.25f);
  for (i64 i = 0; i < n; ++i) ASSERT_EQ(y[i], x[i] * -0.25f);
}

}  // namespace

TEST(Ops, TableMatchesReferenceAndFiniteDifferences) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(describe(c));
    const std::string op = c.op;
    // clang-format off
    if (op == "embedding") { run_embedding(c); }
    else if (op == "rmsnorm") { run_rmsnorm(c); }
    else if (op == "rope") { run_rope(c); }
    else if (op == "swiglu") { run_swiglu(c); }
    else if (op == "attention") { run_attention(c); }
    else if (op == "cross_entropy") { run_cross_entropy(c); }
    else if (op == "adamw") { run_adamw(c); }
    else if (op == "reduce") { run_reduce(c); }
    else { ADD_FAILURE() << "unknown op " << op; }
    // clang-format on
  }
}
