#include "eval/scorer.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "kernels/ops.h"

namespace dlcm {

Scorer::Scorer(LanguageModel& model, i32 bos_id, i32 pad_id) : m_(model), bos_(bos_id), pad_(pad_id) {}

std::vector<i32> Scorer::full_row(const ScoreRequest& r, bool* truncated) const {
  const i64 Lmax = m_.config().max_seq_len, nc = r.continuation.size();
  DLCM_CHECK(nc >= 1, "a continuation encodes to no tokens");
  // Fed tokens = BOS + context + continuation minus the last = kept context + kept cont <= Lmax.
  const i64 keep_cont = std::min(nc, Lmax);
  const i64 keep = std::min<i64>(r.context.size(), Lmax - keep_cont);
  std::vector<i32> row;
  row.reserve(1 + keep + keep_cont);
  row.push_back(bos_);
  row.insert(row.end(), r.context.end() - keep, r.context.end());
  row.insert(row.end(), r.continuation.end() - keep_cont, r.continuation.end());
  if (truncated) *truncated = keep < i64(r.context.size());
  return row;
}

namespace {
// log-softmax of x at `target`, and whether target is the argmax (first index on ties, as
// torch.argmax).
inline double log_prob(const float* x, i64 V, i32 target, bool* is_argmax) {
  float mx;
  const double lse = ops::logsumexp(x, V, &mx);
  bool top = x[target] == mx;
  for (i64 j = 0; top && j < target; ++j) top = x[j] != mx;
  *is_argmax = top;
  return double(x[target]) - lse;
}
}  // namespace

std::vector<Score> Scorer::score(const std::vector<ScoreRequest>& reqs, const ScorerOptions& o,
                                 ScoreStats* stats) {
  auto t0 = std::chrono::steady_clock::now();
  const i64 N = reqs.size(), V = m_.config().vocab_size, Lmax = m_.config().max_seq_len;
  std::vector<Score> out(N);
  std::vector<std::vector<i32>> rows(N);
  std::vector<i64> fed(N);  // tokens fed for request i (row length - 1)
  ScoreStats st;
  st.requests = N;
  for (i64 i = 0; i < N; ++i) {
    try {
      rows[i] = full_row(reqs[i], &out[i].truncated);
    } catch (const Error& e) {
      fail(o.label, ": request ", i, ": ", e.what());
    }
    for (i32 t : rows[i])
      DLCM_CHECK(t >= 0 && t < V, o.label, ": request ", i, ": token id ", t,
                 " is outside the model's vocabulary [0, ", V, ") (tokenizer and model disagree)");
    fed[i] = rows[i].size() - 1;
    out[i].scored = std::min<i64>(reqs[i].continuation.size(), fed[i]);
    st.truncated += out[i].truncated;
    st.cut_continuations += out[i].scored < i64(reqs[i].continuation.size());
  }

  // Prefix deduplication: in lexicographic order every fed row that is a prefix of another is
  // a prefix of its successor, so one backward pass assigns each request its host row.
  std::vector<i64> order(N), host(N);
  std::iota(order.begin(), order.end(), 0);
  auto fed_less = [&](i64 a, i64 b) {
    return std::lexicographical_compare(rows[a].begin(), rows[a].begin() + fed[a], rows[b].begin(),
                                        rows[b].begin() + fed[b]);
  };
  std::sort(order.begin(), order.end(), [&](i64 a, i64 b) { return fed_less(a, b) || (!fed_less(b, a) && a < b); });
  for (i64 k = N - 1; k >= 0; --k) {
    const i64 a = order[k];
    host[a] = a;
    if (k + 1 < N) {
      const i64 b = order[k + 1];
      if (o.share_prefixes && fed[a] <= fed[b] && std::equal(rows[a].begin(), rows[a].begin() + fed[a], rows[b].begin()))
        host[a] = host[b];
    }
  }
  // Host rows, longest first; members[first[h] .. first[h+1]) are the requests row h serves.
  std::vector<i64> hosts;
  for (i64 i = 0; i < N; ++i)
    if (host[i] == i) hosts.push_back(i);
  std::stable_sort(hosts.begin(), hosts.end(), [&](i64 a, i64 b) { return fed[a] > fed[b]; });
  const i64 H = hosts.size();
  std::vector<i64> slot(N, -1), first(H + 1, 0), members(N);
  for (i64 h = 0; h < H; ++h) slot[hosts[h]] = h;
  for (i64 i = 0; i < N; ++i) ++first[slot[host[i]] + 1];
  for (i64 h = 0; h < H; ++h) first[h + 1] += first[h];
  {
    std::vector<i64> fill(first.begin(), first.end() - 1);
    for (i64 i = 0; i < N; ++i) members[fill[slot[host[i]]]++] = i;
  }
  i64 total_tokens = 0;
  for (i64 h : hosts) total_tokens += fed[h];

  // The model keeps activations for (largest B) x (largest L) it has seen, so B is also capped
  // by what fits beside a max_seq_len row.
  const i64 budget = std::max<i64>(o.batch_tokens, 1);
  const i64 max_rows = std::max<i64>(1, 2 * budget / Lmax);
  const bool tty = o.progress && isatty(fileno(stderr));
  double last_print = -1;
  i64 done_tokens = 0, next_decile = 1;
  std::vector<std::pair<i64, i64>> work;  // (request, logits row of its position 0)
  for (i64 h0 = 0; h0 < H;) {
    const i64 L = fed[hosts[h0]];
    const i64 B = std::min({H - h0, max_rows, std::max<i64>(1, budget / L)});
    tok_.assign(B * L, pad_);  // padding at the end of rows only
    work.clear();
    pos_.clear();
    for (i64 b = 0; b < B; ++b) {
      const i64 h = h0 + b, r = hosts[h];
      std::copy(rows[r].begin(), rows[r].begin() + fed[r], tok_.begin() + b * L);
      // Logits are needed from the earliest continuation start among the row's requests on;
      // a request reads position p of its row at logits row offset + p.
      i64 start = fed[r];
      for (i64 m = first[h]; m < first[h + 1]; ++m)
        start = std::min<i64>(start, fed[members[m]] - out[members[m]].scored);
      for (i64 m = first[h]; m < first[h + 1]; ++m) work.push_back({members[m], i64(pos_.size()) - start});
      for (i64 p = start; p < fed[r]; ++p) pos_.push_back(b * L + p);
      done_tokens += fed[r];
    }
    const i64 n_pos = pos_.size();
    st.logit_rows += n_pos;
    if (i64(logits_.size()) < n_pos * V) logits_.resize(n_pos * V);
    m_.logits_at(tok_.data(), B, L, pos_.data(), n_pos, logits_.data());
#pragma omp parallel for schedule(dynamic, 4)
    for (i64 w = 0; w < i64(work.size()); ++w) {
      const auto [i, offset] = work[w];
      const i64 nc = out[i].scored, n = fed[i];
      double ll = 0;
      bool greedy = true;
      for (i64 p = n - nc; p < n; ++p) {
        bool top;
        ll += log_prob(logits_.data() + (offset + p) * V, V, rows[i][p + 1], &top);
        greedy = greedy && top;
      }
      out[i].loglik = ll;
      out[i].greedy = greedy;
    }
    st.batches++;
    st.padded_tokens += B * L;
    h0 += B;
    if (o.progress) {
      const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const bool end = h0 == H;
      // terminal: a live line twice a second; otherwise a plain line every 10% of the tokens
      bool show = end;
      if (tty) show = show || sec - last_print >= 0.5;
      else if (done_tokens * 10 >= next_decile * total_tokens) show = true;
      if (show) {
        last_print = sec;
        next_decile = done_tokens * 10 / std::max<i64>(total_tokens, 1) + 1;
        const double rate = done_tokens / std::max(sec, 1e-9);
        char line[256];
        std::snprintf(line, sizeof line, "[eval] %s: %lld/%lld rows | %.0f tok/s | ETA %s",
                      o.label.c_str(), (long long)h0, (long long)H, rate,
                      fmt_duration((total_tokens - done_tokens) / rate).c_str());
        if (!tty) std::fprintf(stderr, "%s\n", line);
        else if (end) std::fprintf(stderr, "\r\033[K");
        else std::fprintf(stderr, "\r%s\033[K", line);
      }
    }
  }
  st.rows = H;
  st.tokens = total_tokens;
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (stats) *stats = st;
  return out;
}

}  // namespace dlcm
