#include "infer/generate.h"

#include <cmath>

namespace dlcm {

namespace {
struct Slot {
  i64 prompt = -1;  // -1: free
  Rng rng;
  TextStreamer text;
  i32 pending = -1;         // sampled, not yet fed
  std::string closing;      // fed only for its concept info, then finished with this reason
};
}  // namespace

std::vector<Completion> generate(LanguageModel& m, const Tokenizer& tok,
                                 const std::vector<std::string>& prompts,
                                 const GenerateOptions& o, const GenerateEvents& ev) {
  const ModelConfig& mc = m.config();
  const i64 V = mc.vocab_size, n = prompts.size();
  DLCM_CHECK(n >= 1, "generate: no prompts given");
  DLCM_CHECK(o.max_new_tokens >= 1, "generate: max_new_tokens must be >= 1, got ",
             o.max_new_tokens);
  DLCM_CHECK(o.max_batch >= 1, "generate: batch size must be >= 1, got ", o.max_batch);
  DLCM_CHECK(tok.vocab_size() <= V, "the tokenizer has ", tok.vocab_size(),
             " ids but the model only ", V);
  std::vector<Completion> out(n);
  for (i64 i = 0; i < n; ++i) {
    const std::string name =
        i < i64(o.prompt_names.size()) ? o.prompt_names[i] : "prompt " + std::to_string(i + 1);
    DLCM_CHECK(!prompts[i].empty(), name, ": empty prompt; give some text to continue");
    auto& ids = out[i].prompt_ids;
    ids = {tok.bos_id()};
    auto p = tok.encode(prompts[i]);
    ids.insert(ids.end(), p.begin(), p.end());
    DLCM_CHECK(i64(ids.size()) <= mc.max_seq_len, name, ": ", ids.size(),
               " tokens (with BOS) exceed the model's context of ", mc.max_seq_len, " tokens");
  }

  const i64 S = std::min(o.max_batch, n);
  StreamOptions so;
  so.max_seqs = S;
  so.tau = o.tau;
  so.precision = o.precision;
  auto st = m.new_stream(so);
  const bool want_info = o.concepts && st->has_concepts();
  std::vector<Slot> slots(S);
  Buf logits(S * V);
  std::vector<std::pair<float, i32>> scratch;
  i64 next_prompt = 0;

  auto finish = [&](i64 s, const std::string& reason) {
    Slot& sl = slots[s];
    Completion& c = out[sl.prompt];
    std::string rest = sl.text.finish();
    if (!rest.empty() && ev.on_text) ev.on_text(sl.prompt, rest);
    c.text = sl.text.text();
    c.stop_reason = reason;
    if (ev.on_done) ev.on_done(sl.prompt, c);
    sl.prompt = -1;
    sl.pending = -1;
    sl.closing.clear();
  };
  // Samples the next token of slot s from its logits row and decides whether it continues.
  auto advance = [&](i64 s, float* lg) {
    Slot& sl = slots[s];
    Completion& c = out[sl.prompt];
    for (i64 v = tok.vocab_size(); v < V; ++v) lg[v] = -INFINITY;  // ids the tokenizer lacks
    const i32 t = sample_token(lg, V, o.sampler, sl.rng, scratch);
    if (o.stop_at_eos && t == tok.eos_id()) return finish(s, "eos");
    c.ids.push_back(t);
    std::string shown = sl.text.push(tok.decode_piece(t));
    if (!shown.empty() && ev.on_text) ev.on_text(sl.prompt, shown);
    if (!want_info && ev.on_token) ev.on_token(sl.prompt, t, nullptr);
    std::string reason = sl.text.stopped()                     ? "stop"
                         : i64(c.ids.size()) >= o.max_new_tokens ? "length"
                         : st->room(s) == 0                      ? "context"
                                                                 : "";
    if (reason.empty() || (want_info && st->room(s) > 0)) {
      sl.pending = t;  // fed at the next step (only for its concept info when closing)
      sl.closing = reason;
      return;
    }
    if (want_info) {  // no room to feed it: its p stays unknown
      c.concepts.push_back({});
      if (ev.on_token) ev.on_token(sl.prompt, t, nullptr);
    }
    finish(s, reason);
  };
  // Fills free slots with waiting prompts, prefilled together in one call.
  auto admit = [&]() {
    std::vector<PrefillItem> items;
    for (i64 s = 0; s < S && next_prompt < n; ++s)
      if (slots[s].prompt < 0) {
        st->reset(s);
        slots[s].prompt = next_prompt;
        slots[s].rng = Rng(counter_hash(o.seed, uint64_t(next_prompt)));
        slots[s].text = TextStreamer(o.stop);
        const auto& ids = out[next_prompt].prompt_ids;
        items.push_back({s, ids.data(), i64(ids.size())});
        ++next_prompt;
      }
    if (items.empty()) return false;
    st->prefill(items.data(), items.size(), logits.data());
    for (size_t k = 0; k < items.size(); ++k) advance(items[k].seq, logits.data() + k * V);
    return true;
  };

  std::vector<i64> seqs;
  std::vector<i32> toks;
  for (;;) {
    while (admit()) {
    }
    seqs.clear();
    toks.clear();
    for (i64 s = 0; s < S; ++s)
      if (slots[s].prompt >= 0 && slots[s].pending >= 0) {
        seqs.push_back(s);
        toks.push_back(slots[s].pending);
      }
    if (seqs.empty()) break;  // every slot free and no prompt waiting
    st->step(seqs.data(), toks.data(), seqs.size(), logits.data());
    for (size_t k = 0; k < seqs.size(); ++k) {
      const i64 s = seqs[k];
      Slot& sl = slots[s];
      const i32 t = sl.pending;
      sl.pending = -1;
      if (want_info) {
        TokenConcept tc = st->token_concept(s, st->length(s) - 1);
        out[sl.prompt].concepts.push_back(tc);
        if (ev.on_token) ev.on_token(sl.prompt, t, &tc);
      }
      if (!sl.closing.empty())
        finish(s, sl.closing);
      else
        advance(s, logits.data() + k * V);
    }
  }
  return out;
}

}  // namespace dlcm
