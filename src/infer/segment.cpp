#include "infer/segment.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "data/tokenizer.h"
#include "infer/sampler.h"
#include "models/model.h"

namespace dlcm {

i64 SegmentedText::concepts() const {
  i64 c = 0;
  for (uint8_t x : b) c += x;
  return c;
}

void apply_tau(SegmentedText& t, float tau) {
  const i64 n = t.tokens();
  t.tau = tau;
  t.b.assign(n, 0);
  t.concept_index.assign(n, 0);
  i32 c = -1;
  for (i64 i = 0; i < n; ++i) {
    t.b[i] = t.forced[i] || t.p[i] >= tau;
    c += t.b[i];
    t.concept_index[i] = std::max(c, 0);
  }
}

std::vector<std::string> display_pieces(const std::vector<std::string>& raw) {
  std::vector<std::string> out(raw.size());
  std::string carry;
  for (size_t i = 0; i < raw.size(); ++i) {
    carry += raw[i];
    const size_t n = utf8_complete_prefix(carry.data(), carry.size());
    out[i] = carry.substr(0, n);
    repair_utf8(out[i]);
    carry.erase(0, n);
  }
  if (!carry.empty() && !out.empty()) {  // a character cut off at the end
    repair_utf8(carry);
    out.back() += carry;
  }
  return out;
}

namespace {
// Concepts over all texts at tau (forced boundaries always count).
i64 count_concepts(const std::vector<SegmentedText>& texts, float tau) {
  i64 c = 0;
  for (const auto& t : texts)
    for (i64 i = 0; i < t.tokens(); ++i) c += t.forced[i] || t.p[i] >= tau;
  return c;
}
}  // namespace

TauSearch find_tau_for_R(const std::vector<SegmentedText>& texts, double target) {
  DLCM_CHECK(target > 0 && std::isfinite(target), "--target-R: expected a positive number, got ",
             target);
  i64 N = 0;
  for (const auto& t : texts) N += t.tokens();
  DLCM_CHECK(N > 0, "--target-R: no tokens to segment");
  auto R_at = [&](float tau) { return double(N) / double(std::max<i64>(count_concepts(texts, tau), 1)); };
  // p lies in [0, 1]: tau = 0 makes every token a boundary, tau just above 1 only forced ones.
  const float lo0 = 0.0f, hi0 = std::nextafter(1.0f, 2.0f);
  TauSearch s;
  s.target = target;
  s.R_min = R_at(lo0);
  s.R_max = R_at(hi0);
  float lo = lo0, hi = hi0;
  if (target <= s.R_min) {
    s.tau = lo0;
  } else if (target >= s.R_max) {
    s.tau = hi0;
  } else {
    // Invariant: R(lo) < target <= R(hi). Stop when the interval is one float wide.
    while (std::nextafter(lo, 2.0f) < hi) {
      const float mid = lo + (hi - lo) / 2;
      if (mid <= lo || mid >= hi) break;
      (R_at(mid) >= target ? hi : lo) = mid;
      ++s.iterations;
    }
    s.tau = std::abs(R_at(lo) - target) < std::abs(R_at(hi) - target) ? lo : hi;
  }
  s.R = R_at(s.tau);
  return s;
}

std::vector<SegmentedText> segment_texts(LanguageModel& m, const Tokenizer& tok,
                                         const std::vector<std::string>& names,
                                         const std::vector<std::string>& texts, float tau) {
  const ModelConfig& mc = m.config();
  const i64 W = mc.max_seq_len;
  if (tau < 0) tau = mc.router.tau;
  std::vector<SegmentedText> out(texts.size());
  for (size_t k = 0; k < texts.size(); ++k) {
    SegmentedText& t = out[k];
    t.name = names[k];
    t.bos_id = tok.bos_id();
    DLCM_CHECK(!texts[k].empty(), t.name, ": empty text; nothing to segment");
    t.ids = {tok.bos_id()};
    auto enc = tok.encode(texts[k]);
    t.ids.insert(t.ids.end(), enc.begin(), enc.end());
    const i64 n = t.tokens();
    t.p.assign(n, 0);
    t.forced.assign(n, 0);
    std::vector<uint8_t> b(std::min(n, W));
    t.windows = 0;
    for (i64 w0 = 0; w0 < n; w0 += W, ++t.windows) {
      const i64 L = std::min(W, n - w0);
      const bool ok = m.boundaries(t.ids.data() + w0, 1, L, t.p.data() + w0, b.data(), tau);
      DLCM_CHECK(ok, "this checkpoint is a ", mc.arch,
                 " model without concepts; segment needs a dlcm checkpoint");
      t.forced[w0] = 1;
    }
    for (i64 i = 0; i < n; ++i)
      if (t.ids[i] == tok.bos_id()) t.forced[i] = 1;
    std::vector<std::string> raw(n);
    for (i64 i = 0; i < n; ++i) raw[i] = tok.decode_piece(t.ids[i]);
    t.shown = display_pieces(raw);
    apply_tau(t, tau);
  }
  return out;
}

std::string stats_line(const SegmentedText& t) {
  char buf[256];
  std::snprintf(buf, sizeof buf, ": %lld tokens (with BOS), %lld concepts, %.2f tokens/concept, tau %.4f",
                (long long)t.tokens(), (long long)t.concepts(), t.tokens_per_concept(), t.tau);
  std::string s = t.name + buf;
  if (t.windows > 1)
    s += ", " + std::to_string(t.windows) + " windows (each window start is a forced boundary)";
  return s;
}

std::string render_terminal(const std::vector<SegmentedText>& texts, bool color) {
  // Light backgrounds with black text, readable on dark and light terminals.
  static const int palette[4] = {153, 194, 223, 225};
  std::string o;
  for (const auto& t : texts) {
    if (texts.size() > 1) o += "== " + t.name + " ==\n";
    auto open = [&](i64 c) {
      if (color) o += "\x1b[38;5;16;48;5;" + std::to_string(palette[c % 4]) + "m";
    };
    const char* reset = color ? "\x1b[0m" : "";
    for (i64 i = 0; i < t.tokens(); ++i) {
      if (t.b[i]) {
        if (color) {
          if (i > 0) o += reset;
          open(t.concept_index[i]);
        } else if (i > 0) {
          o += "|";
        }
      }
      // A newline inside a coloured run would paint the rest of the line: close, break, reopen.
      for (char ch : t.shown[i]) {
        if (ch == '\n' && color) {
          o += reset;
          o += '\n';
          open(t.concept_index[i]);
        } else {
          o += ch;
        }
      }
    }
    o += reset;
    o += '\n';  // (separate appends: GCC 12 warns falsely on "\n" + string)
    o += stats_line(t);
    o += '\n';
  }
  return o;
}

namespace {
std::string html_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      case '\'': o += "&#39;"; break;
      default: o += c;
    }
  }
  return o;
}
// Token text for the hover label: control characters made visible.
std::string label(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '\n') o += "\\n";
    else if (c == '\t') o += "\\t";
    else if (c == '\r') o += "\\r";
    else o += c;
  }
  return o;
}
std::string fmt(const char* f, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

const char* kCss = R"CSS(
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1100px;padding:0 16px;color:#1d1d1f;background:#f7f7f8}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px}
.sub{color:#555;font-size:13px;margin-bottom:14px}
.controls{position:sticky;top:0;background:#f7f7f8;padding:8px 0;border-bottom:1px solid #ddd;font-size:13px;display:flex;gap:18px;align-items:center;flex-wrap:wrap;z-index:2}
.legend{display:inline-flex;align-items:center;gap:6px}
.legend .bar{display:inline-block;width:140px;height:12px;border:1px solid #bbb;background:linear-gradient(to right,rgba(214,48,39,0),rgba(214,48,39,.85))}
.legend .bmark{display:inline-block;width:3px;height:14px;background:#1a3d8f;vertical-align:middle}
#info{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;color:#333;min-width:360px}
table.stats{border-collapse:collapse;font-size:13px;margin-bottom:8px}
table.stats td,table.stats th{border:1px solid #ddd;padding:3px 10px;text-align:right;background:#fff}
table.stats th{background:#eee;font-weight:600}
.text{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:15px;line-height:1.95;white-space:pre-wrap;word-break:break-word;background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 14px}
.t{background:rgba(214,48,39,calc(var(--p)*.85));border-radius:2px}
.t.b{box-shadow:inset 3px 0 0 #1a3d8f;padding-left:2px}
body.concepts .t{background:#d6e6fb} body.concepts .t.o{background:#fbe3c4}
.t:hover,.t.hl{outline:1px solid #000}
.bos{color:#888;font-size:11px}
)CSS";

// In <head>, before anything else runs, so that any later script error is recorded.
const char* kErrorHook = R"JS(
window.addEventListener('error',function(e){document.body.setAttribute('data-error',String(e.message));});
)JS";

const char* kJs = R"JS(
(function(){
  var info=document.getElementById('info');
  var radios=document.querySelectorAll('input[name=mode]');
  for(var i=0;i<radios.length;i++){
    radios[i].addEventListener('change',function(e){
      document.body.classList.toggle('concepts',e.target.value==='concepts');
    });
  }
  function show(el){
    var tok=el.getAttribute('data-s');
    info.textContent='token '+el.getAttribute('data-i')+'  '+JSON.stringify(tok)+
      '  p='+Number(el.getAttribute('data-p')).toFixed(3)+'  concept '+el.getAttribute('data-c')+
      (el.classList.contains('b')?'  (starts a concept)':'');
  }
  var texts=document.querySelectorAll('.text');
  for(var k=0;k<texts.length;k++){
    texts[k].addEventListener('mouseover',function(e){
      if(e.target.classList&&e.target.classList.contains('t'))show(e.target);
    });
  }
  document.body.setAttribute('data-tokens',String(document.querySelectorAll('.t').length));
  document.body.setAttribute('data-ok','1');
})();
)JS";
}  // namespace

std::string render_html(const std::vector<SegmentedText>& texts, const std::string& title,
                        const std::string& subtitle) {
  std::string o;
  o += "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n";
  o += "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\n";
  o += "<title>" + html_escape(title) + "</title>\n<style>" + kCss + "</style>\n<script>" + kErrorHook +
       "</script></head>\n";
  o += "<body data-ok=\"0\">\n<h1>" + html_escape(title) + "</h1>\n";
  o += "<div class=\"sub\">" + html_escape(subtitle) + "</div>\n";
  o += "<div class=\"controls\">"
       "<label><input type=\"radio\" name=\"mode\" value=\"heat\" checked> heat map of p</label>"
       "<label><input type=\"radio\" name=\"mode\" value=\"concepts\"> concepts (alternating)</label>"
       "<span class=\"legend\">p = 0 <span class=\"bar\"></span> 1</span>"
       "<span class=\"legend\"><span class=\"bmark\"></span> concept boundary</span>"
       "<span id=\"info\">hover a token</span></div>\n";
  i64 N = 0, M = 0;
  for (const auto& t : texts) {
    N += t.tokens();
    M += t.concepts();
  }
  if (texts.size() > 1)
    o += "<div class=\"sub\">all texts: " + std::to_string(N) + " tokens, " + std::to_string(M) +
         " concepts, " + fmt("%.2f", double(N) / double(std::max<i64>(M, 1))) +
         " tokens/concept</div>\n";
  for (const auto& t : texts) {
    double sum_p = 0;
    for (float x : t.p) sum_p += x;
    o += "<section><h2>" + html_escape(t.name) + "</h2>\n<table class=\"stats\"><tr>"
         "<th>tokens (with BOS)</th><th>concepts</th><th>tokens / concept</th><th>mean p</th>"
         "<th>tau</th><th>windows</th></tr><tr>";
    o += "<td>" + std::to_string(t.tokens()) + "</td><td>" + std::to_string(t.concepts()) +
         "</td><td>" + fmt("%.2f", t.tokens_per_concept()) + "</td><td>" +
         fmt("%.3f", sum_p / double(std::max<i64>(t.tokens(), 1))) + "</td><td>" +
         fmt("%.4f", t.tau) + "</td><td>" + std::to_string(t.windows) + "</td></tr></table>\n";
    o += "<div class=\"text\">";
    for (i64 i = 0; i < t.tokens(); ++i) {
      const bool bos = t.ids[i] == t.bos_id;
      const std::string p3 = fmt("%.3f", t.p[i]);
      const std::string s = bos ? "<bos>" : t.shown[i];
      o += "<span class=\"t";
      if (t.b[i]) o += " b";
      if (t.concept_index[i] % 2) o += " o";
      o += "\" style=\"--p:" + p3 + "\" data-i=\"" + std::to_string(i) + "\" data-p=\"" + p3 +
           "\" data-c=\"" + std::to_string(t.concept_index[i]) + "\" data-s=\"" +
           html_escape(s) + "\" title=\"" + html_escape("token " + std::to_string(i) + " '" +
           label(s) + "' p=" + p3 + " concept " + std::to_string(t.concept_index[i])) + "\">";
      o += bos ? "<span class=\"bos\">&#9670;</span>" : html_escape(t.shown[i]);
      o += "</span>";
    }
    o += "</div></section>\n";
  }
  o += "<script>";
  o += kJs;
  o += "</script>\n</body></html>\n";
  return o;
}

}  // namespace dlcm
