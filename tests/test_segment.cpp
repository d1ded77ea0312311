// `dlcm segment` pieces on synthetic p (no model needed): thresholds and concept indices, the
// tau bisection for a target compression, display text of split UTF-8, the terminal rendering,
// and the HTML page, which must be self-contained and open in headless Chromium without errors.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>

#include "core/rng.h"
#include "data/tokenizer.h"
#include "infer/segment.h"
#include "model_fixtures.h"
#include "testing.h"

using namespace dlcm;

namespace {

// A text of n tokens with p drawn uniformly, BOS first (and optionally inside).
SegmentedText synthetic(const std::string& name, i64 n, uint64_t seed, i64 bos_at = -1) {
  SegmentedText t;
  t.name = name;
  Rng r(seed);
  for (i64 i = 0; i < n; ++i) {
    const bool bos = i == 0 || i == bos_at;
    t.ids.push_back(bos ? 1 : i32(4 + r.next() % 200));
    t.shown.push_back(bos ? "" : std::string(1, char('a' + i % 26)) + (i % 7 == 0 ? " " : ""));
    t.p.push_back(bos ? 1.0f : r.uniform());
    t.forced.push_back(bos);
  }
  apply_tau(t, 0.5f);
  return t;
}

TEST(Segment, ThresholdGivesBoundariesAndConceptIndices) {
  SegmentedText t;
  t.ids = {1, 10, 11, 12, 1, 13, 14};
  t.shown.assign(7, "x");
  t.p = {1.0f, 0.2f, 0.7f, 0.5f, 0.1f, 0.49f, 0.9f};
  t.forced = {1, 0, 0, 0, 1, 0, 0};
  apply_tau(t, 0.5f);
  EXPECT_EQ(t.b, (std::vector<uint8_t>{1, 0, 1, 1, 1, 0, 1}));
  EXPECT_EQ(t.concept_index, (std::vector<i32>{0, 0, 1, 2, 3, 3, 4}));
  EXPECT_EQ(t.concepts(), 5);
  apply_tau(t, 0.95f);  // forced boundaries stay whatever tau says
  EXPECT_EQ(t.b, (std::vector<uint8_t>{1, 0, 0, 0, 1, 0, 0}));
  EXPECT_DOUBLE_EQ(t.tokens_per_concept(), 3.5);
}

TEST(Segment, BisectionFindsTheClosestReachableCompression) {
  std::vector<SegmentedText> texts = {synthetic("a", 300, 1, 120), synthetic("b", 157, 2)};
  // Every compression reachable: R at each distinct p value (the step function's corners).
  std::set<float> cuts;
  for (auto& t : texts) cuts.insert(t.p.begin(), t.p.end());
  cuts.insert(std::nextafter(1.0f, 2.0f));
  auto R_at = [&](float tau) {
    i64 N = 0, C = 0;
    for (auto t : texts) {
      apply_tau(t, tau);
      N += t.tokens();
      C += t.concepts();
    }
    return double(N) / C;
  };
  for (double target : {1.5, 2.0, 4.0, 7.3, 20.0}) {
    TauSearch s = find_tau_for_R(texts, target);
    EXPECT_NEAR(s.R, R_at(s.tau), 1e-12);
    double best = 1e9;
    for (float c : cuts) best = std::min(best, std::abs(R_at(c) - target));
    EXPECT_LE(std::abs(s.R - target), best + 1e-12) << "target " << target;
    EXPECT_LT(std::abs(s.R - target) / target, 0.05) << "target " << target;  // fine-grained p
    EXPECT_GT(s.iterations, 10);
  }
  // Outside the reachable range: the nearest end.
  TauSearch lo = find_tau_for_R(texts, 0.5);
  EXPECT_DOUBLE_EQ(lo.R, 1.0);
  TauSearch hi = find_tau_for_R(texts, 1e6);
  EXPECT_DOUBLE_EQ(hi.R, 457.0 / 3.0);  // only the 3 forced boundaries (two BOS + one BOS inside)
  EXPECT_DOUBLE_EQ(hi.R_max, hi.R);
  EXPECT_THROW(find_tau_for_R(texts, -1), Error);
}

TEST(Segment, DisplayPiecesKeepWholeCharacters) {
  // "é" split over two byte tokens, then a stray continuation byte, then "€" in three.
  auto d = display_pieces({"a", "\xC3", "\xA9", "\xA9", "\xE2\x82", "\xAC", "b"});
  EXPECT_EQ(d, (std::vector<std::string>{"a", "", "\xC3\xA9", "\xEF\xBF\xBD", "", "\xE2\x82\xAC", "b"}));
  auto cut = display_pieces({"x", "\xE2\x82"});  // cut off at the end: repaired on the last token
  EXPECT_EQ(cut[1], "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(Segment, TerminalRendering) {
  SegmentedText t;
  t.name = "demo";
  t.ids = {1, 10, 11, 12, 13};
  t.shown = {"", "ab", "c\n", "d", "e"};
  t.p = {1, 0.1f, 0.9f, 0.2f, 0.8f};
  t.forced = {1, 0, 0, 0, 0};
  apply_tau(t, 0.5f);
  std::string plain = render_terminal({t}, false);
  EXPECT_EQ(plain.substr(0, plain.find("\ndemo")), "ab|c\nd|e");
  EXPECT_NE(plain.find("demo: 5 tokens (with BOS), 3 concepts, 1.67 tokens/concept, tau 0.5000"),
            std::string::npos) << plain;
  EXPECT_EQ(plain.find('\x1b'), std::string::npos);
  EXPECT_EQ(plain.back(), '\n');  // the stats line ends its line
  const std::string two = render_terminal({t, t}, false);
  EXPECT_NE(two.find("tau 0.5000\n== demo ==\nab|c"), std::string::npos) << two;
  std::string col = render_terminal({t}, true);
  EXPECT_NE(col.find("\x1b[38;5;16;48;5;153m"), std::string::npos);  // concept 0
  EXPECT_NE(col.find("\x1b[38;5;16;48;5;194m"), std::string::npos);  // concept 1
  EXPECT_NE(col.find("\x1b[0m\n\x1b[38;5;16;48;5;194m"), std::string::npos);  // newline closes
}

// The page for texts with characters HTML must escape, and a split character.
std::string tricky_page(i64* n_tokens) {
  SegmentedText t = synthetic("tricky <name> & \"quotes\"", 40, 3);
  t.shown[5] = "<script>alert(1)</script>";
  t.shown[6] = "a & b \" ' \n";
  t.shown[7] = "\xC3\xA9t\xC3\xA9";
  std::vector<SegmentedText> texts = {t, synthetic("second", 90, 4, 50)};
  *n_tokens = 130;
  return render_html(texts, "dlcm concepts", "synthetic p, tau 0.5");
}

TEST(Segment, HtmlIsSelfContainedAndEscaped) {
  i64 n = 0;
  std::string page = tricky_page(&n);
  for (const char* bad : {"http://", "https://", "src=", "href=", "@import", "url("})
    EXPECT_EQ(page.find(bad), std::string::npos) << bad;
  EXPECT_EQ(page.find("<script>alert"), std::string::npos);
  EXPECT_NE(page.find("&lt;script&gt;alert(1)&lt;/script&gt;"), std::string::npos);
  EXPECT_NE(page.find("tricky &lt;name&gt; &amp; &quot;quotes&quot;"), std::string::npos);
  // one span per token, each with its p and concept index
  i64 spans = 0;
  for (size_t pos = 0; (pos = page.find("<span class=\"t", pos)) != std::string::npos; ++pos) ++spans;
  EXPECT_EQ(spans, n);
  EXPECT_NE(page.find("data-i=\"39\" data-p=\""), std::string::npos);
  EXPECT_NE(page.find("<th>tokens / concept</th>"), std::string::npos);
}

// Headless Chromium (Debian's chromium, installed by scripts/setup.sh) loads the page, runs
// its script and dumps the DOM: the script marks <body data-ok="1"> and counts the tokens; a
// script error would set data-error.
TEST(Segment, HtmlOpensInHeadlessChromium) {
  // CMake's DLCM_BROWSER_CHECK: the chromium found at configure time, "" when left out.
  const char* chromium = DLCM_CHROMIUM;
  if (!*chromium || !std::filesystem::exists(chromium))
    GTEST_SKIP() << "browser check left out: no chromium at configure time or DLCM_BROWSER_CHECK=OFF "
                    "(scripts/setup.sh installs chromium; then reconfigure)";
  test::TempDir tmp;
  i64 n = 0;
  const std::string html = tmp.path + "/page.html";
  // After the page's own script: choose each display mode, then point at the first token.
  std::string page = tricky_page(&n);
  const char* drive =
      "<script>(function(){var b=document.body;"
      "document.querySelector('input[value=concepts]').click();"
      "var on=b.classList.contains('concepts');"
      "document.querySelector('input[value=heat]').click();"
      "var off=b.classList.contains('concepts');"
      "document.querySelector('.t').dispatchEvent(new MouseEvent('mouseover',{bubbles:true}));"
      "var info=document.getElementById('info').textContent;"
      "b.setAttribute('data-drive',on+','+off+','+(info.indexOf('token 0')===0));})();</script>";
  const size_t body_end = page.rfind("</body>");
  ASSERT_NE(body_end, std::string::npos);
  page.insert(body_end, drive);
  std::ofstream(html) << page;
  std::string cmd = std::string("timeout 120 ") + chromium +
                    " --headless --no-sandbox --disable-gpu --disable-background-networking"
                    " --disable-component-update --disable-sync --no-first-run"
                    " --user-data-dir=" + tmp.path + "/profile --dump-dom file://" + html +
                    " 2>" + tmp.path + "/stderr.txt";
  const test::CommandResult r = test::run_command(cmd);
  const std::string& dom = r.out;
  const int rc = r.rc;
  std::ifstream es(tmp.path + "/stderr.txt");
  std::string err((std::istreambuf_iterator<char>(es)), std::istreambuf_iterator<char>());
  ASSERT_EQ(rc, 0) << err;
  EXPECT_NE(dom.find("data-ok=\"1\""), std::string::npos) << "the page's script did not run\n" << err;
  EXPECT_NE(dom.find("data-tokens=\"" + std::to_string(n) + "\""), std::string::npos);
  EXPECT_EQ(dom.find("data-error=\""), std::string::npos) << dom.substr(0, 2000);
  // The concepts mode toggles the body's class on and off; hovering a token fills the info line.
  EXPECT_NE(dom.find("data-drive=\"true,false,true\""), std::string::npos) << dom.substr(0, 2000);
}

// segment_texts on a model: p per window as the model's boundaries() gives it, the forced
// boundaries exactly at each window's start (and BOS), b = forced | p >= tau.
TEST(Segment, TextsFollowTheModelWindowByWindow) {
  Config c = test::tiny_dlcm();
  c.model.vocab_size = 260;
  c.model.max_seq_len = 16;
  auto m = make_initialised_model(c.model, 3);
  auto tok = make_byte_tokenizer();
  const std::string text = "a text of about forty bytes, three windows";
  const float tau = 0.5f;
  const auto seg = segment_texts(*m, *tok, {"t"}, {text}, tau);
  ASSERT_EQ(seg.size(), 1u);
  const SegmentedText& t = seg[0];
  const i64 n = 1 + i64(text.size()), W = c.model.max_seq_len;
  ASSERT_EQ(t.tokens(), n);
  EXPECT_EQ(t.windows, (n + W - 1) / W);
  ASSERT_GT(t.windows, 2);
  i64 above = 0;
  for (i64 w0 = 0; w0 < n; w0 += W) {
    const i64 L = std::min(W, n - w0);
    std::vector<float> p(L);
    std::vector<uint8_t> b(L);
    ASSERT_TRUE(m->boundaries(t.ids.data() + w0, 1, L, p.data(), b.data(), tau));
    for (i64 i = 0; i < L; ++i) {
      EXPECT_EQ(t.p[w0 + i], p[i]) << w0 + i;
      EXPECT_EQ(t.forced[w0 + i], i == 0 ? 1 : 0) << w0 + i;
      EXPECT_EQ(t.b[w0 + i], (i == 0 || p[i] >= tau) ? 1 : 0) << w0 + i;
      above += i > 0 && p[i] >= tau;
    }
  }
  EXPECT_GT(above, 0) << "no unforced boundary: the check of b above says little";
  EXPECT_LT(above, n - t.windows) << "every token a boundary: the check of b above says little";
}

}  // namespace
