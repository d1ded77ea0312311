#include "infer/serving_engine.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

namespace dlcm {

void SeqChannel::push(SeqEvent e) {
  {
    std::lock_guard<std::mutex> l(mu_);
    q_.push_back(std::move(e));
  }
  cv_.notify_one();
}

bool SeqChannel::pop_all(std::vector<SeqEvent>& out, std::chrono::milliseconds wait) {
  std::unique_lock<std::mutex> l(mu_);
  if (q_.empty()) cv_.wait_for(l, wait, [&] { return !q_.empty(); });
  if (q_.empty()) return false;
  for (auto& e : q_) out.push_back(std::move(e));
  q_.clear();
  return true;
}

void Histogram::add(double v) {
  size_t b = std::lower_bound(bounds.begin(), bounds.end(), v) - bounds.begin();
  ++counts[b];
  sum += v;
  ++n;
}

void log_softmax_row(const float* logits, i64 V, std::vector<double>& out) {
  out.resize(V);
  double mx = -INFINITY;
  for (i64 v = 0; v < V; ++v) mx = std::max(mx, double(logits[v]));
  double s = 0;
  for (i64 v = 0; v < V; ++v) s += std::exp(double(logits[v]) - mx);
  const double lse = mx + std::log(s);
  for (i64 v = 0; v < V; ++v) out[v] = double(logits[v]) - lse;
}

TokenLogprob token_logprob(const std::vector<double>& lsm, i32 id, i64 top_n) {
  TokenLogprob t;
  t.id = id;
  t.logprob = lsm[id];
  const i64 V = lsm.size(), n = std::min<i64>(std::max<i64>(top_n, 0), V);
  if (n == 0) return t;
  std::vector<i32> ids(V);
  for (i64 v = 0; v < V; ++v) ids[v] = i32(v);
  auto more_likely = [&](i32 a, i32 b) { return lsm[a] > lsm[b] || (lsm[a] == lsm[b] && a < b); };
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), more_likely);
  for (i64 k = 0; k < n; ++k) t.top.push_back({ids[k], lsm[ids[k]]});
  return t;
}

struct ServingEngine::Request {
  std::vector<SeqSpec> seqs;
  std::shared_ptr<SeqChannel> ch;
  size_t next = 0;  // the next sequence to admit
  ServeClock::time_point submitted;
  bool ended = false;  // an error event was sent: no further events
};

struct ServingEngine::Slot {
  std::shared_ptr<Request> req;  // null: free
  i64 k = 0;                     // sequence index within req
  i64 order = 0;                 // admission order (prefill goes first come, first served)
  i64 fed = 0;                   // prompt tokens fed so far
  Rng rng;
  TextStreamer text;
  i32 pending = -1;  // sampled, not yet fed
  i64 generated = 0;
  std::vector<TokenLogprob> prompt_lp;
  ServeClock::time_point last_token;
  const SeqSpec& spec() const { return req->seqs[k]; }
};

ServingEngine::ServingEngine(LanguageModel& m, const Tokenizer& tok, const EngineOptions& o)
    : m_(m), tok_(tok), opt_(o) {
  const ModelConfig& mc = m.config();
  DLCM_CHECK(o.slots >= 1 && o.slots <= 256, "--slots: expected 1..256, got ", o.slots);
  DLCM_CHECK(o.ctx >= 0 && o.ctx <= mc.max_seq_len, "--ctx: expected 1..", mc.max_seq_len,
             " (the model's max_seq_len), got ", o.ctx);
  DLCM_CHECK(o.max_queue >= 0, "--max-queue: expected >= 0, got ", o.max_queue);
  DLCM_CHECK(o.prefill_chunk >= 1, "--prefill-chunk: expected >= 1, got ", o.prefill_chunk);
  DLCM_CHECK(o.timeout_s > 0, "--timeout: expected > 0 seconds, got ", o.timeout_s);
  DLCM_CHECK(o.step_pause_ms >= 0 && o.step_pause_ms <= 1000,
             "DLCM_SERVE_STEP_PAUSE_MS: expected 0..1000 milliseconds, got ", o.step_pause_ms);
  DLCM_CHECK(tok.vocab_size() <= mc.vocab_size, "the tokenizer has ", tok.vocab_size(),
             " ids but the model only ", mc.vocab_size);
  ctx_ = o.ctx > 0 ? o.ctx : mc.max_seq_len;
  V_ = mc.vocab_size;
  StreamOptions so;
  so.max_seqs = o.slots;
  so.max_len = ctx_;
  so.tau = o.tau;
  st_ = m.new_stream(so);
  slots_.resize(o.slots);
  logits_.resize(o.slots * V_);
  prefill_out_.resize(o.slots * V_);
  all_logits_.resize(std::min(o.prefill_chunk, ctx_) * V_);
  stats_.slots_total = o.slots;
  thread_ = std::thread([this] { loop(); });
}

ServingEngine::~ServingEngine() { shutdown(std::chrono::milliseconds(0)); }

ServingEngine::Submit ServingEngine::submit(std::vector<SeqSpec> seqs,
                                            std::shared_ptr<SeqChannel> ch) {
  DLCM_CHECK(!seqs.empty(), "submit: no sequences");
  for (const auto& s : seqs) {
    DLCM_CHECK(!s.prompt.empty() && i64(s.prompt.size()) <= ctx_, "submit: a prompt of ",
               s.prompt.size(), " tokens does not fit the context of ", ctx_);
    DLCM_CHECK(s.max_tokens >= 0, "submit: max_tokens must be >= 0");
  }
  auto r = std::make_shared<Request>();
  r->seqs = std::move(seqs);
  r->ch = std::move(ch);
  r->submitted = ServeClock::now();
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!accepting_) return Submit::kShuttingDown;
    // Queued requests that free slots will take at once are not waiting.
    if (i64(queue_.size()) >= opt_.max_queue + (opt_.slots - busy_)) return Submit::kQueueFull;
    queue_.push_back(std::move(r));
    stats_.queue = queue_.size();
  }
  cv_.notify_all();
  return Submit::kOk;
}

void ServingEngine::run_exclusive(const std::function<void(LanguageModel&)>& fn) {
  Task task;
  task.fn = &fn;
  {
    std::unique_lock<std::mutex> l(mu_);
    DLCM_CHECK(!stopping_, "the server is shutting down");
    tasks_.push_back(&task);
    cv_.notify_all();
    task_done_.wait(l, [&] { return task.done; });
  }
  if (task.err) std::rethrow_exception(task.err);
}

void ServingEngine::begin_shutdown() {
  std::lock_guard<std::mutex> l(mu_);
  accepting_ = false;
  for (auto& r : queue_) {
    SeqEvent e;
    e.kind = SeqEvent::kError;
    e.status = 503;
    e.text = "the server is shutting down";
    r->ch->push(std::move(e));
    r->ch->cancel();  // sequences of it already running are freed too
  }
  queue_.clear();
  stats_.queue = 0;
}

void ServingEngine::shutdown(std::chrono::milliseconds wait) {
  begin_shutdown();
  const auto deadline = ServeClock::now() + wait;
  for (;;) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (busy_ == 0 || ServeClock::now() >= deadline) {
        stopping_ = true;
        break;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

EngineStats ServingEngine::stats() const {
  std::lock_guard<std::mutex> l(mu_);
  EngineStats s = stats_;
  s.slots_busy = busy_;
  return s;
}

void ServingEngine::loop() {
  if (opt_.threads > 0) omp_set_num_threads(opt_.threads);
  for (;;) {
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stopping_ || !tasks_.empty() || !queue_.empty() || busy_ > 0; });
      // Tasks queued before stopping_ was set still run (their callers wait for them).
      while (!tasks_.empty()) {
        Task* t = tasks_.front();
        tasks_.pop_front();
        l.unlock();
        try {
          (*t->fn)(m_);
        } catch (...) {
          t->err = std::current_exception();
        }
        l.lock();
        t->done = true;
        task_done_.notify_all();
      }
      if (stopping_) break;
    }
    iterate();
  }
  // Whatever still runs is cancelled (shutdown's wait ran out).
  for (auto& s : slots_)
    if (s.req) {
      SeqEvent e;
      e.kind = SeqEvent::kError;
      e.seq = s.k;
      e.status = 503;
      e.text = "the server shut down before the request finished";
      s.req->ch->push(std::move(e));
      free_slot(s);
    }
}

void ServingEngine::iterate() {
  drop_cancelled();
  admit();
  prefill_chunks();
  decode_step();
}

void ServingEngine::free_slot(Slot& s) {
  s.req.reset();
  s.pending = -1;
  s.prompt_lp.clear();
  std::lock_guard<std::mutex> l(mu_);
  --busy_;
}

void ServingEngine::drop_cancelled() {
  const auto now = ServeClock::now();
  const auto limit = std::chrono::duration<double>(opt_.timeout_s);
  auto timed_out = [&](Request& r) {
    if (r.ended || now - r.submitted < limit) return false;
    SeqEvent e;
    e.kind = SeqEvent::kError;
    e.status = 504;
    e.text = "the request ran longer than the server's --timeout of " +
             std::to_string(opt_.timeout_s) + " s";
    r.ch->push(std::move(e));
    r.ended = true;
    r.ch->cancel();
    return true;
  };
  for (auto& s : slots_)
    if (s.req && (s.req->ch->cancelled() || timed_out(*s.req))) free_slot(s);
  std::lock_guard<std::mutex> l(mu_);
  std::erase_if(queue_, [&](const std::shared_ptr<Request>& r) {
    return r->ch->cancelled() || timed_out(*r);
  });
  stats_.queue = queue_.size();
}

void ServingEngine::admit() {
  std::lock_guard<std::mutex> l(mu_);
  for (auto& s : slots_) {
    if (queue_.empty()) break;
    if (s.req) continue;
    auto& r = queue_.front();
    const i64 i = s.k = i64(r->next++);
    s.req = r;
    const SeqSpec& sp = r->seqs[i];
    st_->reset(&s - slots_.data());
    s.order = admitted_++;
    s.fed = 0;
    s.rng = Rng(counter_hash(sp.seed, uint64_t(sp.rng_index)));
    s.text = TextStreamer(sp.stop);
    s.pending = -1;
    s.generated = 0;
    s.prompt_lp.clear();
    ++busy_;
    stats_.prompt_tokens += i64(sp.prompt.size()) - 1;
    if (r->next == r->seqs.size()) queue_.pop_front();
  }
  stats_.queue = queue_.size();
}

void ServingEngine::prefill_chunks() {
  std::vector<Slot*> order;
  for (auto& s : slots_)
    if (s.req && s.fed < i64(s.spec().prompt.size())) order.push_back(&s);
  if (order.empty()) return;
  std::sort(order.begin(), order.end(), [](Slot* a, Slot* b) { return a->order < b->order; });
  i64 budget = opt_.prefill_chunk;
  std::vector<PrefillItem> items;  // slots prefilled together (last logits only)
  std::vector<Slot*> item_slot;
  std::vector<Slot*> completed;    // whose prompt is fully fed after this iteration
  std::vector<const float*> completed_row;
  for (Slot* s : order) {
    if (budget == 0) break;
    const auto& p = s->spec().prompt;
    const i64 seq = s - slots_.data(), P = p.size();
    const i64 n = std::min(P - s->fed, budget);
    budget -= n;
    if (!s->spec().prompt_logprobs) {
      items.push_back({seq, p.data() + s->fed, n});
      item_slot.push_back(s);
      continue;
    }
    // The prompt's log-probabilities need every position's logits: a call of its own.
    st_->prefill(seq, p.data() + s->fed, n, all_logits_.data(), true);
    const i64 top = std::max<i64>(s->spec().logprobs, 0);
    for (i64 r = 0; r < n; ++r) {
      const i64 target = s->fed + r + 1;  // the token this row predicts
      if (target >= P) break;
      log_softmax_row(all_logits_.data() + r * V_, V_, lsm_);
      s->prompt_lp.push_back(token_logprob(lsm_, p[target], top));
    }
    s->fed += n;
    if (s->fed == P) {
      // The last row predicts the first generated token; keep it past the next prefill call.
      std::copy_n(all_logits_.data() + (n - 1) * V_, V_, logits_.data() + seq * V_);
      completed.push_back(s);
      completed_row.push_back(logits_.data() + seq * V_);
    }
  }
  if (!items.empty()) {
    Buf& out = prefill_out_;  // [n_items, V]
    st_->prefill(items.data(), items.size(), out.data());
    for (size_t k = 0; k < items.size(); ++k) {
      Slot* s = item_slot[k];
      s->fed += items[k].n;
      if (s->fed == i64(s->spec().prompt.size())) {
        completed.push_back(s);
        completed_row.push_back(out.data() + k * V_);
      }
    }
  }
  for (size_t c = 0; c < completed.size(); ++c) {
    Slot* s = completed[c];
    const SeqSpec& sp = s->spec();
    if (sp.prompt_logprobs) {
      SeqEvent e;
      e.kind = SeqEvent::kPrompt;
      e.seq = s->k;
      e.prompt_lp = std::move(s->prompt_lp);
      s->req->ch->push(std::move(e));
    }
    s->last_token = ServeClock::now();
    if (sp.max_tokens == 0)
      finish(*s, "length");
    else
      sample_next(*s, const_cast<float*>(completed_row[c]));
  }
}

void ServingEngine::decode_step() {
  std::vector<i64> seqs;
  std::vector<i32> toks;
  for (auto& s : slots_)
    if (s.req && s.pending >= 0) {
      seqs.push_back(&s - slots_.data());
      toks.push_back(s.pending);
    }
  if (seqs.empty()) return;
  st_->step(seqs.data(), toks.data(), seqs.size(), logits_.data());
  {
    std::lock_guard<std::mutex> l(mu_);
    ++stats_.steps;
  }
  for (size_t k = 0; k < seqs.size(); ++k) {
    Slot& s = slots_[seqs[k]];
    s.pending = -1;
    sample_next(s, logits_.data() + k * V_);
  }
  if (opt_.step_pause_ms > 0)
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(opt_.step_pause_ms));
}

void ServingEngine::sample_next(Slot& s, float* lg) {
  const SeqSpec& sp = s.spec();
  if (sp.logprobs >= 0) log_softmax_row(lg, V_, lsm_);  // the model's distribution, unmasked
  for (i64 v = tok_.vocab_size(); v < V_; ++v) lg[v] = -INFINITY;  // ids the tokenizer lacks
  const i32 t = sample_token(lg, V_, sp.sampler, s.rng, scratch_);
  const auto now = ServeClock::now();
  if (sp.stop_at_eos && t == tok_.eos_id()) return finish(s, "stop");
  ++s.generated;
  SeqEvent e;
  e.kind = SeqEvent::kToken;
  e.seq = s.k;
  e.id = t;
  e.text = s.text.push(tok_.decode_piece(t));
  if (sp.logprobs >= 0) e.lp = token_logprob(lsm_, t, sp.logprobs);
  {
    std::lock_guard<std::mutex> l(mu_);
    ++stats_.generated_tokens;
    if (s.generated == 1)
      stats_.ttft.add(std::chrono::duration<double>(now - s.req->submitted).count());
    else
      stats_.itl.add(std::chrono::duration<double>(now - s.last_token).count());
  }
  s.last_token = now;
  s.req->ch->push(std::move(e));
  const i64 seq = &s - slots_.data();
  const bool stop = s.text.stopped();
  if (stop || s.generated >= sp.max_tokens || st_->room(seq) == 0)
    return finish(s, stop ? "stop" : "length");  // a full context also reads "length"
  s.pending = t;
}

void ServingEngine::finish(Slot& s, const std::string& reason) {
  SeqEvent e;
  e.kind = SeqEvent::kDone;
  e.seq = s.k;
  e.text = s.text.finish();
  e.finish = reason;
  e.completion_tokens = s.generated;
  // The slot is free before the client hears of the end (a /health right after sees it idle).
  auto ch = s.req->ch;
  free_slot(s);
  ch->push(std::move(e));
}

}  // namespace dlcm
