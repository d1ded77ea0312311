// Sliding-window causal attention (SPEC 4.9 enc_window / dec_window): the blockwise kernel
// against the reference over windows, lengths, GQA ratios and query offsets (forward, backward,
// finite differences, locality of the window, window >= L bit-identical to full causal, an
// independent PyTorch computation); the transformer stack's windowed forward against its cached
// path and its receptive field; and a DLCM with windowed encoder and decoder: gradients,
// causality, the window confining the token path (far information then arrives only through the
// concepts), streaming logits equal to the full forward, config keys and FLOPs.
#include <cstdio>
#include <cstring>
#include <fstream>

#include "kernels/dlcm_ops.h"
#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "kernels/ops.h"
#include "kernels/ops_ref.h"
#include "model_fixtures.h"
#include "models/flops.h"
#include "nn/transformer.h"
#include "testing.h"

using namespace dlcm;

namespace {

struct KCase {
  i64 B, Lq, Lk, Hq, Hkv, hd, qo, w;
};

std::ostream& operator<<(std::ostream& os, const KCase& c) {
  return os << "B=" << c.B << " Lq=" << c.Lq << " Lk=" << c.Lk << " Hq=" << c.Hq
            << " Hkv=" << c.Hkv << " hd=" << c.hd << " q_offset=" << c.qo << " w=" << c.w;
}

// Block path (Lq >= 16) and row path (decode: few queries), windows narrower than, equal to and
// wider than a 64-key block, GQA groups 1, 2 and 4, chunks after cached keys (q_offset > 0).
const KCase kCases[] = {
    {2, 150, 150, 4, 2, 16, 0, 1},   {1, 150, 150, 4, 1, 8, 0, 5},
    {2, 130, 130, 2, 2, 16, 0, 64},  {1, 257, 257, 4, 2, 16, 0, 65},
    {1, 200, 200, 2, 1, 8, 0, 130},  {1, 40, 170, 4, 2, 16, 130, 30},
    {1, 70, 200, 2, 2, 8, 130, 100}, {1, 3, 100, 4, 1, 16, 97, 7},
    {2, 1, 90, 2, 2, 16, 89, 64},    {1, 9, 9, 2, 1, 8, 0, 4},
    {1, 12, 140, 4, 4, 8, 128, 70},
};

struct Attn {
  KCase c;
  float scale;
  Buf q, k, v, dout;
  Attn(const KCase& kc, uint64_t seed) : c(kc), scale(1.0f / std::sqrt(float(kc.hd))) {
    q.resize(c.B * c.Lq * c.Hq * c.hd);
    k.resize(c.B * c.Lk * c.Hkv * c.hd);
    v.resize(k.size());
    dout.resize(q.size());
    test::fill_normal(q.data(), q.size(), seed, 1.0f);
    test::fill_normal(k.data(), k.size(), seed + 1, 1.0f);
    test::fill_normal(v.data(), v.size(), seed + 2, 1.0f);
    test::fill_normal(dout.data(), dout.size(), seed + 3, 1.0f);
  }
  i64 nq() const { return i64(q.size()); }
  i64 nk() const { return i64(k.size()); }
  void fwd(Buf& out, Buf& lse, i64 w) const {
    out.assign(q.size(), 0);
    lse.assign(c.B * c.Hq * c.Lq, 0);
    ops::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), c.B, c.Lq, c.Lk,
                           c.Hq, c.Hkv, c.hd, c.qo, scale, w);
  }
  void bwd(Buf& dq, Buf& dk, Buf& dv, const Buf& out, const Buf& lse, i64 w) const {
    dq.assign(q.size(), 0);
    dk.assign(k.size(), 0);
    dv.assign(v.size(), 0);
    ops::attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), out.data(), lse.data(),
                            q.data(), k.data(), v.data(), c.B, c.Lq, c.Lk, c.Hq, c.Hkv, c.hd, c.qo,
                            scale, w);
  }
};

// Max |a - b| relative to the reference's scale, floored at 0.1: with w = 1 each query sees
// only itself, so dq and dk are exactly 0 in the reference and rounding noise in the kernel.
double err(const Buf& a, const Buf& b) {
  double mx = 0;
  for (float x : b) mx = std::max(mx, double(std::abs(x)));
  return test::max_abs_diff(a.data(), b.data(), i64(a.size())) / std::max(mx, 0.1);
}

}  // namespace

namespace {
// The kernel's and the reference's forward and backward of one case.
struct Both {
  Buf out, lse, dq, dk, dv, rout, rlse, rdq, rdk, rdv;
  Both(const Attn& a) {
    const KCase& c = a.c;
    a.fwd(out, lse, c.w);
    a.bwd(dq, dk, dv, out, lse, c.w);
    rout.resize(a.nq());
    rlse.resize(lse.size());
    rdq.resize(a.nq());
    rdk.resize(a.nk());
    rdv.resize(a.nk());
    ops::ref::attention_forward<float>(rout.data(), rlse.data(), a.q.data(), a.k.data(),
                                       a.v.data(), c.B, c.Lq, c.Lk, c.Hq, c.Hkv, c.hd, c.qo,
                                       a.scale, c.w);
    ops::ref::attention_backward(rdq.data(), rdk.data(), rdv.data(), a.dout.data(), rout.data(),
                                 rlse.data(), a.q.data(), a.k.data(), a.v.data(), c.B, c.Lq, c.Lk,
                                 c.Hq, c.Hkv, c.hd, c.qo, a.scale, c.w);
  }
};
}  // namespace

TEST(WindowAttention, ForwardAndBackwardMatchReference) {
  for (const KCase& c : kCases) {
    SCOPED_TRACE(::testing::PrintToString(c));
    Attn a(c, 10 + c.Lq + c.w);
    Both r(a);
    EXPECT_LT(err(r.out, r.rout), 2e-5);
    EXPECT_LT(test::max_abs_diff(r.lse.data(), r.rlse.data(), i64(r.lse.size())), 1e-4);
    EXPECT_LT(err(r.dq, r.rdq), 1e-4);
    EXPECT_LT(err(r.dk, r.rdk), 1e-4);
    EXPECT_LT(err(r.dv, r.rdv), 1e-4);
    // The window matters in every case (so the comparison above can fail): full causal differs.
    Buf fout(a.nq()), flse(r.lse.size());
    ops::ref::attention_forward<float>(fout.data(), flse.data(), a.q.data(), a.k.data(),
                                       a.v.data(), c.B, c.Lq, c.Lk, c.Hq, c.Hkv, c.hd, c.qo,
                                       a.scale, 0);
    EXPECT_GT(test::max_abs_diff(r.rout.data(), fout.data(), a.nq()), 1e-3);
  }
}

// A window covering every key is full causal attention, bit for bit (same path, no mask).
TEST(WindowAttention, WindowAtLeastLengthIsFullCausalBitIdentical) {
  for (KCase c : {KCase{2, 70, 70, 2, 1, 8, 0, 70}, KCase{1, 150, 150, 4, 2, 16, 0, 500},
                  KCase{1, 5, 80, 4, 2, 8, 75, 80}, KCase{1, 20, 100, 2, 2, 8, 80, 100}}) {
    SCOPED_TRACE(::testing::PrintToString(c));
    Attn a(c, 3);
    Buf o0, l0, o1, l1, q0, k0, v0, q1, k1, v1;
    a.fwd(o0, l0, 0);
    a.fwd(o1, l1, c.w);
    EXPECT_EQ(std::memcmp(o0.data(), o1.data(), o0.size() * sizeof(float)), 0);
    EXPECT_EQ(std::memcmp(l0.data(), l1.data(), l0.size() * sizeof(float)), 0);
    a.bwd(q0, k0, v0, o0, l0, 0);
    a.bwd(q1, k1, v1, o1, l1, c.w);
    EXPECT_EQ(std::memcmp(q0.data(), q1.data(), q0.size() * sizeof(float)), 0);
    EXPECT_EQ(std::memcmp(k0.data(), k1.data(), k0.size() * sizeof(float)), 0);
    EXPECT_EQ(std::memcmp(v0.data(), v1.data(), v0.size() * sizeof(float)), 0);
  }
}

// Keys at positions <= p - w reach no query at position >= p (bit-identical rows), while the
// query at p - 1 (which sees key p - w) does change: the window really cuts.
namespace {
void expect_window_cuts(const KCase& c) {
  {
    const i64 p = c.qo + c.Lq - 1 - (c.Lq > 2 ? 1 : 0);  // a query position with one before it
    if (p - c.w < 0 || p - 1 < c.qo) return;
    SCOPED_TRACE(::testing::PrintToString(c));
    Attn a(c, 7);
    Buf o1, l1, o2, l2;
    a.fwd(o1, l1, c.w);
    for (i64 b = 0; b < c.B; ++b)
      for (i64 j = 0; j <= p - c.w; ++j)
        for (i64 x = 0; x < c.Hkv * c.hd; ++x) {
          a.k[(b * c.Lk + j) * c.Hkv * c.hd + x] += 3.0f;
          a.v[(b * c.Lk + j) * c.Hkv * c.hd + x] -= 5.0f;
        }
    a.fwd(o2, l2, c.w);
    const i64 row = c.Hq * c.hd;
    for (i64 b = 0; b < c.B; ++b) {
      for (i64 i = p - c.qo; i < c.Lq; ++i)
        EXPECT_EQ(test::max_abs_diff(o1.data() + (b * c.Lq + i) * row,
                                     o2.data() + (b * c.Lq + i) * row, row),
                  0.0)
            << "query " << c.qo + i << " saw a key at or before " << p - c.w;
      const i64 i = p - 1 - c.qo;
      EXPECT_GT(test::max_abs_diff(o1.data() + (b * c.Lq + i) * row,
                                   o2.data() + (b * c.Lq + i) * row, row),
                1e-3);
    }
  }
}
}  // namespace

TEST(WindowAttention, KeysBeforeTheWindowAreInvisible) {
  for (const KCase& c : kCases) expect_window_cuts(c);
}

// The units BF16 attention can run on here with bf16 operands (ops::attention_units()): the
// AMX tiles and, on the same CPU, the AVX512-BF16 dot products (tiles switched off); the dot
// products alone on a CPU with AVX512-BF16 and no AMX; none elsewhere. Call under BF16.
std::vector<bool> bf16_attention_tile_settings() {
  std::vector<bool> tiles;
  if (ops::attention_units() == ops::AttentionUnits::Fp32) return tiles;
  if (ops::attention_units() == ops::AttentionUnits::Tiles) tiles.push_back(true);
  tiles.push_back(false);
  return tiles;
}

struct TilesRestore {
  ~TilesRestore() { ops::set_attention_tiles(true); }
};

// BF16 precision on an AMX or AVX512-BF16 CPU: both passes run on bf16 operands in the tiles'
// own layouts, key blocks on the 64-key grid (so a tile's first block may hold keys before
// every query's window). Against the FP32 reference within bf16 rounding (2% of the largest
// entry), and the window still cuts bit-exactly.
TEST(WindowAttention, Bf16TilesMatchReferenceAndCut) {
  if (!ops::cpu_has_bf16()) GTEST_SKIP() << "no AVX512-BF16 here";
  ops::PrecisionScope bf16(ops::Precision::BF16);
  const std::vector<bool> settings = bf16_attention_tile_settings();
  if (settings.empty())
    GTEST_SKIP() << "no bf16 attention units (the avx512 kernels, the native BF16 units) here";
  TilesRestore restore;
  for (bool tiles : settings)
  for (const KCase& c : kCases) {
    ops::set_attention_tiles(tiles);
    SCOPED_TRACE(::testing::PrintToString(c) + (tiles ? " amx tiles" : " dot products"));
    Attn a(c, 10 + c.Lq + c.w);
    Both r(a);
    EXPECT_LT(err(r.out, r.rout), 2e-2);
    EXPECT_LT(test::max_abs_diff(r.lse.data(), r.rlse.data(), i64(r.lse.size())), 2e-2);
    // dq and dk relative to the gradients' scale (dv's): with w = 1 they are exactly 0 in
    // exact arithmetic, and dP - D keeps the bf16 products' rounding.
    double gmax = 0;
    for (float x : r.rdv) gmax = std::max(gmax, double(std::abs(x)));
    EXPECT_LT(test::max_abs_diff(r.dq.data(), r.rdq.data(), a.nq()) / gmax, 2e-2);
    EXPECT_LT(test::max_abs_diff(r.dk.data(), r.rdk.data(), a.nk()) / gmax, 2e-2);
    EXPECT_LT(err(r.dv, r.rdv), 2e-2);
    expect_window_cuts(c);
  }
}

// accumulate = false writes dq/dk/dv without reading them: NaN-filled outputs end up with the
// values of accumulating into zeros, including the cached keys before every query's window
// (skipped blocks: exact zeros), in FP32 and, on each bf16 attention unit there is, in BF16.
TEST(WindowAttention, OverwriteModeEqualsAccumulatingIntoZeros) {
  // FP32, then BF16 on each of the bf16 units there are
  std::vector<std::pair<ops::Precision, bool>> runs = {{ops::Precision::FP32, true}};
  if (ops::cpu_has_bf16()) {
    ops::PrecisionScope ps(ops::Precision::BF16);
    for (bool tiles : bf16_attention_tile_settings()) runs.push_back({ops::Precision::BF16, tiles});
  }
  TilesRestore restore;
  for (auto [p, tiles] : runs) {
    ops::PrecisionScope ps(p);
    ops::set_attention_tiles(tiles);
    for (const KCase& c : kCases) {
      SCOPED_TRACE(::testing::PrintToString(c) + " " + ops::precision_name(p) +
                   (p == ops::Precision::FP32 ? "" : tiles ? " amx tiles" : " dot products"));
      Attn a(c, 30 + c.Lq + c.w);
      Buf out, lse, dq, dk, dv;
      a.fwd(out, lse, c.w);
      a.bwd(dq, dk, dv, out, lse, c.w);
      Buf sq(dq.size(), NAN), sk(dk.size(), NAN), sv(dv.size(), NAN);
      ops::attention_backward(sq.data(), sk.data(), sv.data(), a.dout.data(), out.data(),
                              lse.data(), a.q.data(), a.k.data(), a.v.data(), c.B, c.Lq, c.Lk,
                              c.Hq, c.Hkv, c.hd, c.qo, a.scale, c.w, false);
      for (auto [x, y, name] : {std::tuple{&dq, &sq, "dq"}, std::tuple{&dk, &sk, "dk"},
                                std::tuple{&dv, &sv, "dv"}}) {
        i64 bad = 0;
        for (size_t e = 0; e < x->size(); ++e) bad += !((*x)[e] == (*y)[e]);
        EXPECT_EQ(bad, 0) << name;
      }
    }
  }
}

// The fast backward against central finite differences of the windowed attention function
// (evaluated in double by the reference): loss = sum(out * dout).
TEST(WindowAttention, FiniteDifferenceGradients) {
  for (KCase c : {KCase{1, 70, 70, 4, 2, 8, 0, 9}, KCase{1, 5, 40, 2, 1, 8, 35, 6},
                  KCase{1, 30, 90, 2, 2, 8, 60, 40}}) {
    SCOPED_TRACE(::testing::PrintToString(c));
    Attn a(c, 21);
    Buf out, lse, dq, dk, dv;
    a.fwd(out, lse, c.w);
    a.bwd(dq, dk, dv, out, lse, c.w);
    std::vector<double> qd, kd, vd, od(a.nq()), ld(lse.size());
    auto loss = [&] {
      qd.assign(a.q.begin(), a.q.end());
      kd.assign(a.k.begin(), a.k.end());
      vd.assign(a.v.begin(), a.v.end());
      ops::ref::attention_forward<double>(od.data(), ld.data(), qd.data(), kd.data(), vd.data(),
                                          c.B, c.Lq, c.Lk, c.Hq, c.Hkv, c.hd, c.qo, a.scale, c.w);
      double s = 0;
      for (i64 i = 0; i < a.nq(); ++i) s += od[i] * a.dout[i];
      return s;
    };
    test::check_grad("dq", a.q.data(), dq.data(), a.nq(), loss);
    test::check_grad("dk", a.k.data(), dk.data(), a.nk(), loss);
    test::check_grad("dv", a.v.data(), dv.data(), a.nk(), loss);
  }
}

TEST(WindowAttention, BadWindowIsAnError) {
  Attn a({1, 8, 8, 2, 1, 8, 0, 2}, 1);
  Buf out, lse;
  EXPECT_THROW(a.fwd(out, lse, -1), Error);
  // A query past the last key would see no key inside its window.
  Buf o(a.nq()), l(16);
  EXPECT_THROW(ops::attention_forward(o.data(), l.data(), a.q.data(), a.k.data(), a.v.data(), 1, 8,
                                      8, 2, 1, 8, 3, a.scale, 2),
               Error);
}

// An independent computation in PyTorch (dense scores, boolean band mask, repeat_interleave for
// the kv heads), when /usr/bin/python3 has torch.
TEST(WindowAttention, MatchesPyTorch) {
  if (!test::torch_available()) GTEST_SKIP() << "/usr/bin/python3 with torch not found";
  const KCase c{2, 100, 100, 4, 2, 16, 0, 23};
  Attn a(c, 5);
  Buf out, lse;
  a.fwd(out, lse, c.w);
  test::TempDir tmp;
  auto dump = [&](const std::string& name, const Buf& b) {
    std::ofstream f(tmp.path + "/" + name, std::ios::binary);
    f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size() * sizeof(float)));
  };
  dump("q", a.q);
  dump("k", a.k);
  dump("v", a.v);
  char script[1024];
  std::snprintf(script, sizeof script,
                "import numpy as np, torch\n"
                "B, L, H, G, hd, w, d = %lld, %lld, %lld, %lld, %lld, %lld, '%s'\n"
                "f = lambda n, h: torch.from_numpy(np.fromfile(d + '/' + n, dtype=np.float32))"
                ".double().view(B, L, h, hd).transpose(1, 2)\n"
                "q, k, v = f('q', H), f('k', G).repeat_interleave(H // G, 1), "
                "f('v', G).repeat_interleave(H // G, 1)\n"
                "i = torch.arange(L)\n"
                "keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)\n"
                "s = (q @ k.transpose(-1, -2)) / hd ** 0.5\n"
                "o = torch.softmax(s.masked_fill(~keep, float('-inf')), -1) @ v\n"
                "o.transpose(1, 2).float().numpy().tofile(d + '/out')\n",
                (long long)c.B, (long long)c.Lq, (long long)c.Hq, (long long)c.Hkv,
                (long long)c.hd, (long long)c.w, tmp.path.c_str());
  {
    std::ofstream f(tmp.path + "/ref.py");
    f << script;
  }
  auto r = test::run_command("/usr/bin/python3 " + tmp.path + "/ref.py 2>&1");
  ASSERT_EQ(r.rc, 0) << r.out;
  Buf ref(a.nq());
  std::ifstream f(tmp.path + "/out", std::ios::binary);
  f.read(reinterpret_cast<char*>(ref.data()), std::streamsize(ref.size() * sizeof(float)));
  ASSERT_TRUE(f) << "PyTorch output missing";
  EXPECT_LT(test::rel_err(out.data(), ref.data(), a.nq()), 2e-5);
}

namespace {

struct Stack {
  ParamStore ps;
  TransformerStack st;
  Stack(i64 layers, i64 window) {
    BlockDims d{16, 4, 2, 8, 24, true, 1e-5f, 10000.f};
    d.window = window;
    st.init(ps, "layers.", layers, d, ParamGroup::TokenHidden);
    ps.finalize();
    ps.init(3);
    // Larger matrices than the default init, so every path carries visible signal.
    for (Param& p : ps.params())
      if (!p.init_one)
        for (i64 i = 0; i < p.numel; ++i) p.w[i] *= 10.0f;
  }
};

}  // namespace

// A stack of n layers with window w: output row t depends on input rows (t - n(w-1) - 1, t]
// only; with full attention, on all rows <= t.
TEST(WindowStack, ReceptiveFieldIsLayersTimesWindow) {
  const i64 L = 100, d = 16, n = 2, w = 6, s = 30, reach = n * (w - 1);
  for (i64 window : {w, i64(0)}) {
    Stack S(n, window);
    S.st.reserve(1, L);
    std::vector<float> x(L * d);
    test::fill_normal(x.data(), L * d, 4, 1.0f);
    std::vector<i32> pos(L);
    for (i64 t = 0; t < L; ++t) pos[t] = i32(t);
    const float* y = S.st.forward(x.data(), pos.data(), 1, L);
    const std::vector<float> y1(y, y + L * d);
    for (i64 c = 0; c < d; ++c) x[s * d + c] += 1.0f;
    const float* y2 = S.st.forward(x.data(), pos.data(), 1, L);
    for (i64 t = 0; t < L; ++t) {
      const double diff = test::max_abs_diff(y1.data() + t * d, y2 + t * d, d);
      if (t < s)
        EXPECT_EQ(diff, 0.0) << "t=" << t;
      else if (t <= s + reach)
        EXPECT_GT(diff, 0.0) << "t=" << t;
      else if (window > 0)
        EXPECT_EQ(diff, 0.0) << "row " << t << " saw input row " << s << " through window " << w;
      else
        EXPECT_GT(diff, 0.0) << "t=" << t;
    }
  }
}

// The cached inference path (prefill chunks after cached positions, single-position steps)
// equals the windowed full forward.
TEST(WindowStack, CachedPathEqualsForward) {
  const i64 L = 150, d = 16;
  for (i64 window : {1, 7, 64, 90}) {
    SCOPED_TRACE(window);
    Stack S(2, window);
    S.st.reserve(1, L);
    S.st.reserve_infer(L);
    std::vector<float> x(L * d);
    test::fill_normal(x.data(), L * d, 8, 1.0f);
    std::vector<i32> pos(L);
    for (i64 t = 0; t < L; ++t) pos[t] = i32(t);
    const float* y = S.st.forward(x.data(), pos.data(), 1, L);
    const std::vector<float> want(y, y + L * d);
    KVCache cache = S.st.make_cache(1, L);
    double worst = 0;
    i64 t = 0;
    for (i64 n : {70, 1, 1, 40, 3, 1, 20, 1}) {
      CacheChunk ch{0, n};
      const float* yc = S.st.forward_cached(x.data() + t * d, &ch, 1, cache);
      worst = std::max(worst, test::max_abs_diff(yc, want.data() + t * d, n * d));
      t += n;
    }
    while (t < L) {
      CacheChunk ch{0, 1};
      worst = std::max(worst, test::max_abs_diff(S.st.forward_cached(x.data() + t * d, &ch, 1, cache),
                                                 want.data() + t * d, d));
      ++t;
    }
    EXPECT_LT(worst, 1e-4);
  }
}

namespace {

Config windowed_dlcm(i64 enc_w, i64 dec_w) {
  Config c = test::tiny_dlcm("projected", "compact");
  c.model.enc_window = enc_w;
  c.model.dec_window = dec_w;
  c.model.max_seq_len = 160;
  return c;
}

std::vector<float> logits_of(LanguageModel& m, const std::vector<i32>& tok, i64 B) {
  const i64 L = i64(tok.size()) / B;
  std::vector<float> out(tok.size() * m.config().vocab_size);
  m.logits(tok.data(), B, L, out.data());
  return out;
}

// tok[s] replaced by another non-BOS token.
std::vector<i32> perturbed(std::vector<i32> tok, i64 s, const ModelConfig& m) {
  i32 v = i32((tok[s] + 5) % m.vocab_size);
  if (v == m.bos_id) v = i32((v + 1) % m.vocab_size);
  tok[s] = v;
  return tok;
}

}  // namespace

// Gradients of a windowed DLCM (encoder and decoder windows, a concept path, given boundaries)
// against finite differences: the stacks' backward applies the same window as their forward.
TEST(WindowDlcm, FiniteDifferenceGradients) {
  Config c = test::tiny_dlcm("projected", "replicate", true);
  c.model.enc_window = 3;
  c.model.dec_window = 5;
  c.model.aux_weight = 0;
  c.train.seq_len = 70;
  c.train.batch_size = 2;
  auto m = make_initialised_model(c.model, 17);
  const i64 B = c.train.batch_size, L = c.train.seq_len, V = c.model.vocab_size;
  auto tok = test::random_tokens(B * L, V, 9, c.model.bos_id, 0.03);
  tok[0] = c.model.bos_id;
  std::vector<i32> tgt(B * L);
  std::vector<uint8_t> bnd(B * L);
  for (i64 n = 0; n < B * L; ++n) {
    tgt[n] = n % L + 1 < L ? tok[n + 1] : -1;
    bnd[n] = (n % L == 0 || n % 4 == 1 || tok[n] == c.model.bos_id) ? 1 : 0;
  }
  Batch bt{tok.data(), tgt.data(), B, L, 0, bnd.data()};
  StepContext ctx;
  ctx.seed = 1;
  for (i32 t : tgt) ctx.total_targets += t >= 0;
  ctx.total_positions = B * L;
  m->params().zero_grad();
  ctx.sum_b = m->prepare_step({bt}, ctx);
  m->train_micro(bt, 0, ctx);
  std::vector<float> an(m->params().grad(), m->params().grad() + m->params().total());
  auto loss = [&] {
    MicroStats s = m->eval_micro(bt);
    return s.ce_sum / double(s.n_targets);
  };
  for (auto& p : m->params().params())
    if (p.name.find(".attn.w") != std::string::npos &&
        (p.name.rfind("encoder.", 0) == 0 || p.name.rfind("decoder.", 0) == 0))
      test::check_grad(p.name, p.w, an.data() + p.offset, p.numel, loss, 5e-3, 3e-2, 10);
}

// With windows, logits and boundaries at positions <= t still ignore every token after t.
TEST(WindowDlcm, CausalityFutureTokensChangeNoPastLogit) {
  for (auto [ew, dw] : {std::pair<i64, i64>{5, 7}, {1, 70}, {64, 2}}) {
    Config c = windowed_dlcm(ew, dw);
    auto m = make_initialised_model(c.model, 2);
    const i64 L = 100, V = c.model.vocab_size, B = 2;
    auto tok = test::random_tokens(B * L, V, 33, c.model.bos_id, 0.03);
    tok[0] = tok[L] = c.model.bos_id;
    auto base = logits_of(*m, tok, B);
    Buf p0(B * L), p1(B * L);
    std::vector<uint8_t> b0(B * L), b1(B * L);
    m->boundaries(tok.data(), B, L, p0.data(), b0.data(), -1);
    for (i64 t : {0, 10, 63, 64, 98}) {
      auto tok2 = tok;
      for (i64 row = 0; row < B; ++row)
        for (i64 j = t + 1; j < L; ++j) tok2[row * L + j] = i32((tok2[row * L + j] + 3 + j) % V);
      auto pert = logits_of(*m, tok2, B);
      m->boundaries(tok2.data(), B, L, p1.data(), b1.data(), -1);
      for (i64 row = 0; row < B; ++row) {
        const i64 o = row * L;
        EXPECT_EQ(test::max_abs_diff(base.data() + o * V, pert.data() + o * V, (t + 1) * V), 0.0)
            << "windows " << ew << "/" << dw << " row " << row << " t=" << t;
        EXPECT_EQ(test::max_abs_diff(p0.data() + o, p1.data() + o, t + 1), 0.0);
        EXPECT_EQ(std::memcmp(b0.data() + o, b1.data() + o, t + 1), 0);
        EXPECT_GT(test::max_abs_diff(base.data() + (o + t + 1) * V, pert.data() + (o + t + 1) * V,
                                     (L - t - 1) * V),
                  1e-4);
      }
    }
  }
}

// With enc_window = dec_window = w (one encoder and one decoder layer), the token path carries
// token s to logits t <= s + 2(w - 1) only. Cutting the concept path (xattn.wo = 0, so
// Psi = H) leaves every later logit bit-identical; with the concept path on, a perturbation far
// back still changes far logits (it arrives through the concepts); with full attention and the
// concept path cut it does too (the window, not the cut, confines the token path).
TEST(WindowDlcm, FarTokensReachOnlyThroughConcepts) {
  const i64 w = 3, L = 90, s = 20, reach = 2 * (w - 1);
  struct Run {
    i64 window;
    bool concept_path;
    bool far_changes;  // expected: logits t > s + reach change
  };
  for (Run r : {Run{w, false, false}, Run{w, true, true}, Run{0, false, true}}) {
    SCOPED_TRACE(::testing::Message() << "window " << r.window << " concept path "
                                      << r.concept_path);
    Config c = windowed_dlcm(r.window, r.window);
    auto m = make_initialised_model(c.model, 6);
    if (!r.concept_path) {
      Param* wo = m->params().find("xattn.wo.weight");
      ASSERT_NE(wo, nullptr);
      std::fill_n(wo->w, wo->numel, 0.0f);
    }
    const i64 V = c.model.vocab_size;
    auto tok = test::random_tokens(L, V, 12, c.model.bos_id, 0.0);
    tok[0] = c.model.bos_id;
    auto base = logits_of(*m, tok, 1);
    auto pert = logits_of(*m, perturbed(tok, s, c.model), 1);
    Buf p(L);
    std::vector<uint8_t> b(L);
    m->boundaries(tok.data(), 1, L, p.data(), b.data(), -1);
    i64 closed_after = 0;  // concepts starting after s + reach (they can carry s onwards)
    for (i64 t = s + reach + 1; t < L; ++t) closed_after += b[t];
    ASSERT_GT(closed_after, 2) << "the test needs concepts after the token path's reach";
    EXPECT_GT(test::max_abs_diff(base.data() + s * V, pert.data() + s * V, V), 1e-4);
    const double far = test::max_abs_diff(base.data() + (s + reach + 1) * V,
                                          pert.data() + (s + reach + 1) * V,
                                          (L - s - reach - 1) * V);
    if (r.far_changes)
      EXPECT_GT(far, 1e-4);
    else
      EXPECT_EQ(far, 0.0);
  }
}

// Streaming a windowed DLCM (prefill chunks, batched steps, cache spanning several 64-key
// blocks) gives the full forward's logits and boundaries.
TEST(WindowDlcm, StreamingEqualsFullForward) {
  struct Case {
    i64 ew, dw;
    bool rope;  // xattn_rope (the copy-task control's setting: windows 4/4)
  };
  for (auto [ew, dw, rope] : {Case{4, 9, false}, Case{70, 1, false}, Case{4, 4, true}}) {
    SCOPED_TRACE(::testing::Message() << "windows " << ew << "/" << dw << (rope ? " rope" : ""));
    Config c = windowed_dlcm(ew, dw);
    c.model.xattn_rope = rope;
    auto m = make_initialised_model(c.model, 8);
    const i64 V = c.model.vocab_size;
    std::vector<std::vector<i32>> seqs;
    for (i64 L : {150, 110}) {
      auto t = test::random_tokens(L, V, 40 + L, c.model.bos_id, 0.03);
      t[0] = c.model.bos_id;
      seqs.push_back(t);
    }
    std::vector<std::vector<float>> want;
    for (auto& sq : seqs) want.push_back(logits_of(*m, sq, 1));
    StreamOptions so;
    so.max_seqs = 2;
    auto st = m->new_stream(so);
    double worst = 0;
    // Slot 0: prefill 70 then steps; slot 1: prefill 5, steps, a 50-token prefill, steps.
    std::vector<float> lg(70 * V);
    st->prefill(0, seqs[0].data(), 70, lg.data(), true);
    for (i64 i = 0; i < 70; ++i)
      worst = std::max(worst, test::max_abs_diff(lg.data() + i * V, want[0].data() + i * V, V));
    st->prefill(1, seqs[1].data(), 5, lg.data(), true);
    for (i64 i = 0; i < 5; ++i)
      worst = std::max(worst, test::max_abs_diff(lg.data() + i * V, want[1].data() + i * V, V));
    std::vector<i64> fed = {70, 5};
    std::vector<float> out(2 * V);
    bool mid = false;
    for (;;) {
      if (!mid && fed[1] == 20) {
        st->prefill(1, seqs[1].data() + 20, 50, out.data());
        fed[1] += 50;
        worst = std::max(worst, test::max_abs_diff(out.data(), want[1].data() + (fed[1] - 1) * V, V));
        mid = true;
      }
      std::vector<i64> active;
      std::vector<i32> tk;
      for (i64 sl = 0; sl < 2; ++sl)
        if (fed[sl] < i64(seqs[sl].size())) {
          active.push_back(sl);
          tk.push_back(seqs[sl][fed[sl]]);
        }
      if (active.empty()) break;
      st->step(active.data(), tk.data(), i64(active.size()), out.data());
      for (size_t k = 0; k < active.size(); ++k) {
        const i64 sl = active[k];
        worst = std::max(worst, test::max_abs_diff(out.data() + k * V,
                                                   want[sl].data() + fed[sl] * V, V));
        ++fed[sl];
      }
    }
    EXPECT_TRUE(mid);
    EXPECT_LT(worst, 1e-4) << "max abs logit difference, incremental vs full";
    for (i64 sl = 0; sl < 2; ++sl) {
      const i64 L = i64(seqs[sl].size());
      Buf p(L);
      std::vector<uint8_t> b(L);
      m->boundaries(seqs[sl].data(), 1, L, p.data(), b.data(), -1);
      for (i64 t = 0; t < L; ++t) EXPECT_EQ(st->token_concept(sl, t).boundary, b[t] != 0);
    }
  }
}

// The windows change the model: a windowed DLCM's logits differ from the full one's.
TEST(WindowDlcm, WindowChangesTheFunction) {
  auto full = make_initialised_model(windowed_dlcm(0, 0).model, 4);
  auto win = make_initialised_model(windowed_dlcm(4, 4).model, 4);
  const i64 L = 40;
  auto tok = test::random_tokens(L, 23, 2, 1, 0.0);
  tok[0] = 1;
  auto a = logits_of(*full, tok, 1), b = logits_of(*win, tok, 1);
  const i64 V = 23;
  // Positions < 4 see the same tokens through one encoder and one decoder layer.
  EXPECT_LT(test::max_abs_diff(a.data(), b.data(), 4 * V), 1e-5);
  EXPECT_GT(test::max_abs_diff(a.data() + 10 * V, b.data() + 10 * V, (L - 10) * V), 1e-3);
}

TEST(WindowConfig, KeysRoundTripAndAreValidated) {
  Config c = windowed_dlcm(16, 32);
  Config back = config_from_json(config_to_json(c), "test");
  EXPECT_EQ(back.model.enc_window, 16);
  EXPECT_EQ(back.model.dec_window, 32);
  EXPECT_EQ(Config{}.model.enc_window, 0);
  EXPECT_EQ(Config{}.model.dec_window, 0);
  nlohmann::json j = config_to_json(c);
  j["enc_window"] = -1;
  EXPECT_THROW(config_from_json(j, "test"), Error);
  j["enc_window"] = c.model.max_seq_len + 1;
  EXPECT_THROW(config_from_json(j, "test"), Error);
  j["enc_window"] = c.model.max_seq_len;
  EXPECT_NO_THROW(config_from_json(j, "test"));
  j["dec_window"] = 2.5;
  EXPECT_THROW(config_from_json(j, "test"), Error);
  std::vector<std::string> sets = {"dec_window=8"};
  nlohmann::json o = config_to_json(c);
  apply_overrides(o, sets);
  EXPECT_EQ(config_from_json(o, "test").model.dec_window, 8);
}

// FLOPs count the keys a windowed query really admits.
TEST(WindowFlops, CountsAdmittedKeys) {
  for (double L : {1.0, 7.0, 512.0, 2048.0})
    for (i64 w : {0, 1, 3, 64, 256, 2048, 4096}) {
      double keys = 0;
      for (i64 t = 0; t < i64(L); ++t) keys += w > 0 ? std::min<i64>(t + 1, w) : t + 1;
      EXPECT_NEAR(causal_keys_per_query(L, w), keys / L, 1e-9 * keys) << L << " " << w;
    }
  Config full = windowed_dlcm(0, 0), win = windowed_dlcm(16, 16);
  const i64 L = 160;
  FlopsReport a = flops_report(full.model, L), b = flops_report(win.model, L);
  const ModelConfig& m = full.model;
  const double per_key = 4.0 * m.head_dim * m.n_heads;
  EXPECT_NEAR(a.flops("encoder") - b.flops("encoder"),
              m.enc_layers * per_key * (causal_keys_per_query(L) - causal_keys_per_query(L, 16)),
              1e-6 * a.flops("encoder"));
  EXPECT_NEAR(a.flops("decoder") - b.flops("decoder"),
              m.dec_layers * per_key * (causal_keys_per_query(L) - causal_keys_per_query(L, 16)),
              1e-6 * a.flops("decoder"));
  EXPECT_EQ(a.flops("backbone"), b.flops("backbone"));
}
