// The serving engine behind `dlcm serve` (docs/serving.md): one thread owns the model and one
// InferenceStream with `slots` slots and runs continuous batching over queued requests.
//
// Each loop iteration: drops cancelled or timed-out sequences (their slots are free at once),
// admits queued sequences into free slots, prefills at most `prefill_chunk` prompt tokens in
// total (a long prompt takes several iterations, so running sequences keep producing tokens in
// between; the stream's results do not depend on the split), then runs ONE batched step for
// every decoding slot. Every sequence follows generate()'s rules (infer/generate.h): the prompt
// is given with BOS, ids the tokenizer lacks are masked before sampling, EOS ends it unreturned,
// stop strings cut the text, a full context ends it; sequence k of a request samples from
// Rng(counter_hash(seed, k)), so greedy and seeded outputs equal `dlcm generate`'s.
//
// Results go to a per-request Channel as events; the HTTP side reads them and may cancel.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "data/tokenizer.h"
#include "infer/sampler.h"
#include "models/model.h"

namespace dlcm {

using ServeClock = std::chrono::steady_clock;

// One sequence to complete (a choice of a request).
struct SeqSpec {
  std::vector<i32> prompt;  // BOS + tokens, 1 <= size <= the slot context
  i64 max_tokens = 16;      // 0: prompt only (its log-probabilities with prompt_logprobs)
  SamplerConfig sampler;
  uint64_t seed = 0;
  i64 rng_index = 0;        // samples from Rng(counter_hash(seed, rng_index))
  std::vector<std::string> stop;
  bool stop_at_eos = true;  // false: EOS is an ordinary token (benchmarks)
  i64 logprobs = -1;        // < 0: none; else each generated token's log-probability and the
                            // top `logprobs` alternatives
  bool prompt_logprobs = false;  // also the prompt's (tokens after BOS), with top `logprobs`
};

struct TokenLogprob {
  i32 id = 0;
  double logprob = 0;
  std::vector<std::pair<i32, double>> top;  // most likely first
};

struct SeqEvent {
  enum Kind { kPrompt, kToken, kDone, kError };
  Kind kind = kToken;
  i64 seq = 0;              // index within the request
  // kPrompt: log-probabilities of prompt tokens 1.. (those after BOS), when asked for.
  std::vector<TokenLogprob> prompt_lp;
  // kToken: the generated token, the text that became safe to show, its log-probability.
  i32 id = -1;
  std::string text;
  TokenLogprob lp;          // with SeqSpec::logprobs >= 0
  // kDone: "stop" (EOS or a stop string) | "length" (max_tokens or the context end);
  // text holds what the streamer held back. kError: text holds the message, status the HTTP
  // status (503 shutting down, 504 timeout).
  std::string finish;
  int status = 0;
  i64 completion_tokens = 0;
};

// Events of one request; written by the engine, read by the HTTP thread.
class SeqChannel {
 public:
  void push(SeqEvent e);
  // Waits up to `wait` for events and moves them into out; false when none came.
  bool pop_all(std::vector<SeqEvent>& out, std::chrono::milliseconds wait);
  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<SeqEvent> q_;
  std::atomic<bool> cancelled_{false};
};

// A fixed-bucket histogram (Prometheus style: cumulative counts per upper bound).
struct Histogram {
  std::vector<double> bounds;
  std::vector<uint64_t> counts;  // per bucket, not cumulative; the last is +Inf
  double sum = 0;
  uint64_t n = 0;
  explicit Histogram(std::vector<double> b) : bounds(std::move(b)), counts(bounds.size() + 1) {}
  void add(double v);
};

struct EngineStats {
  i64 slots_total = 0, slots_busy = 0, queue = 0;
  i64 prompt_tokens = 0, generated_tokens = 0;
  i64 steps = 0;  // batched decode steps run
  Histogram ttft{{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}};
  Histogram itl{{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}};
};

struct EngineOptions {
  i64 slots = 4;
  i64 ctx = 0;             // tokens per slot (0: the model's max_seq_len)
  i64 max_queue = 64;      // requests waiting beyond it are refused
  i64 prefill_chunk = 256; // prompt tokens prefilled per iteration, over all slots
  double timeout_s = 600;  // a request running longer is cancelled (error event, 504)
  float tau = -1;          // DLCM boundary threshold (< 0: the config's)
  int threads = 0;         // OpenMP threads of the engine thread (0: the default)
  // A pause after each decode step, for tests that must act while a request still generates
  // (a tiny model writes hundreds of tokens before a client process can be killed); `dlcm
  // serve` sets it from DLCM_SERVE_STEP_PAUSE_MS and says so.
  double step_pause_ms = 0;
};

class ServingEngine {
 public:
  // The model and tokenizer must outlive the engine; the engine thread starts here.
  ServingEngine(LanguageModel& m, const Tokenizer& tok, const EngineOptions& o);
  ~ServingEngine();
  ServingEngine(const ServingEngine&) = delete;
  ServingEngine& operator=(const ServingEngine&) = delete;

  enum class Submit { kOk, kQueueFull, kShuttingDown };
  // Queues a request's sequences (all admitted or none). Its events go to ch.
  Submit submit(std::vector<SeqSpec> seqs, std::shared_ptr<SeqChannel> ch);
  // Runs fn on the engine thread between iterations (the model is not thread-safe) and waits.
  void run_exclusive(const std::function<void(LanguageModel&)>& fn);

  // Stop taking requests; queued ones get an error event (503). Running ones continue.
  void begin_shutdown();
  // Waits until no request runs or is queued, at most `wait`; then cancels what is left and
  // stops the thread.
  void shutdown(std::chrono::milliseconds wait);

  EngineStats stats() const;
  i64 ctx() const { return ctx_; }
  i64 slots() const { return opt_.slots; }
  const Tokenizer& tokenizer() const { return tok_; }
  const ModelConfig& config() const { return m_.config(); }

 private:
  struct Request;
  struct Slot;
  void loop();
  void iterate();
  void admit();
  void prefill_chunks();
  void decode_step();
  void sample_next(Slot& s, float* logits);
  void finish(Slot& s, const std::string& reason);
  void free_slot(Slot& s);
  void drop_cancelled();

  LanguageModel& m_;
  const Tokenizer& tok_;
  EngineOptions opt_;
  i64 ctx_ = 0, V_ = 0;
  std::unique_ptr<InferenceStream> st_;
  std::vector<Slot> slots_;

  mutable std::mutex mu_;  // queue_, tasks_, stats_, flags
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Request>> queue_;
  struct Task {
    const std::function<void(LanguageModel&)>* fn = nullptr;
    bool done = false;
    std::exception_ptr err;
  };
  std::deque<Task*> tasks_;
  std::condition_variable task_done_;
  EngineStats stats_;
  bool stopping_ = false, accepting_ = true;
  i64 busy_ = 0;
  i64 admitted_ = 0;  // sequences admitted so far (admission order)

  // Engine-thread scratch.
  Buf logits_;       // [slots, V]: step rows, and kept last rows of echo prefills (row = slot)
  Buf prefill_out_;  // [slots, V]: last rows of a batched prefill
  Buf all_logits_;   // [min(prefill_chunk, ctx), V]: every row of an echo prefill
  std::vector<std::pair<float, i32>> scratch_;
  std::vector<double> lsm_;
  std::thread thread_;
};

// log-softmax of one logits row (in double): out[v] = logits[v] - logsumexp(logits).
void log_softmax_row(const float* logits, i64 V, std::vector<double>& out);
// The chosen id's log-probability and the top n ids of a log-softmax row (ties: lower id).
TokenLogprob token_logprob(const std::vector<double>& lsm, i32 id, i64 top_n);

}  // namespace dlcm
