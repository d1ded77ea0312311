// `dlcm serve` (infer/serving_engine.h, infer/http_server.h): a server started in-process on a
// free loopback port over tiny models (baseline and DLCM), talked to with cpp-httplib's client
// and raw sockets. Outputs equal generate()'s and the full forward's log-probabilities; chunked
// prefill, concurrency, n > 1 and batches change nothing; hostile requests get 4xx error
// objects and the server keeps serving; disconnects free slots; a full queue gives 503.
#include <arpa/inet.h>
#include <httplib.h>
#include <netinet/in.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <memory>
#include <cmath>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <thread>

#include "data/tokenizer.h"
#include "infer/generate.h"
#include "infer/http_server.h"
#include "infer/segment.h"
#include "model_fixtures.h"
#include "testing.h"

using namespace dlcm;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

constexpr i64 kVocab = 264;  // the byte tokenizer has 260 ids: 4 model ids are never sampled

Config small_model(const std::string& arch, i64 ctx) {
  Config c = arch == "dlcm" ? test::tiny_dlcm() : test::tiny_baseline(true, 1);
  c.model.vocab_size = kVocab;
  c.model.max_seq_len = ctx;
  return c;
}

struct Reply {
  int status = 0;
  json j;
  std::string body;
};

// A server on a free port over a model; `ref` is a second model with the same weights for the
// expected values (the served one belongs to the engine thread).
struct Served {
  Config cfg;
  std::unique_ptr<LanguageModel> m, ref;
  std::unique_ptr<Tokenizer> tok = make_byte_tokenizer();
  std::unique_ptr<ServingEngine> eng;
  std::unique_ptr<HttpServer> srv;
  std::thread th;
  int port = 0;
  bool stopped = false;

  Served(const std::string& arch, i64 ctx, EngineOptions eo = {}, ServerOptions so = {})
      : cfg(small_model(arch, ctx)) {
    m = make_initialised_model(cfg.model, 17);
    ref = make_initialised_model(cfg.model, 17);
    so.port = 0;
    so.log = false;
    so.max_queue = eo.max_queue;
    so.model_name = "tiny-" + arch;
    eng = std::make_unique<ServingEngine>(*m, *tok, eo);
    srv = std::make_unique<HttpServer>(*eng, so);
    port = srv->bind();
    th = std::thread([this] { srv->run(); });
    for (int i = 0; i < 500 && !srv->running(); ++i) std::this_thread::sleep_for(2ms);
  }
  ~Served() { stop(); }
  void stop() {
    if (stopped) return;
    stopped = true;
    srv->shutdown(2000ms);
    th.join();
  }

  Reply send(const std::string& method, const std::string& path, const std::string& body,
             httplib::Headers h = {}) {
    httplib::Client cli("127.0.0.1", port);
    cli.set_read_timeout(60, 0);
    httplib::Request rq;
    rq.method = method;
    rq.path = path;
    rq.headers = h;
    rq.body = body;
    if (!body.empty() && !rq.has_header("Content-Type")) rq.set_header("Content-Type", "application/json");
    auto res = cli.send(rq);
    Reply r;
    if (!res) return r;
    r.status = res->status;
    r.body = res->body;
    r.j = json::parse(res->body, nullptr, false);
    return r;
  }
  Reply post(const std::string& path, const json& body, httplib::Headers h = {}) {
    return send("POST", path, body.dump(), h);
  }
  Reply get(const std::string& path, httplib::Headers h = {}) { return send("GET", path, "", h); }

  // Streams a request; on_event may return false to hang up.
  struct Stream {
    int status = 0;
    std::vector<json> events;
    bool done = false;  // saw data: [DONE]
    std::map<i64, std::string> text;
    std::map<i64, std::string> finish;
  };
  Stream stream(const std::string& path, const json& body,
                std::function<bool(const json&)> on_event = {}) {
    Stream s;
    httplib::Client cli("127.0.0.1", port);
    cli.set_read_timeout(60, 0);
    httplib::Request rq;
    rq.method = "POST";
    rq.path = path;
    rq.body = body.dump();
    rq.set_header("Content-Type", "application/json");
    std::string buf;
    rq.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
      buf.append(d, n);
      size_t at;
      while ((at = buf.find("\n\n")) != std::string::npos) {
        std::string ev = buf.substr(0, at);
        buf.erase(0, at + 2);
        if (ev == "data: [DONE]") {
          s.done = true;
          continue;
        }
        EXPECT_EQ(ev.rfind("data: ", 0), 0u) << ev;
        json j = json::parse(ev.substr(6));
        s.events.push_back(j);
        if (j.contains("choices"))
          for (const auto& c : j["choices"]) {
            const i64 k = c["index"];
            if (c.contains("text")) s.text[k] += c["text"].get<std::string>();
            if (c.contains("delta") && c["delta"].contains("content"))
              s.text[k] += c["delta"]["content"].get<std::string>();
            if (!c["finish_reason"].is_null()) s.finish[k] = c["finish_reason"];
          }
        if (on_event && !on_event(j)) return false;
      }
      return true;
    };
    auto res = cli.send(rq);
    if (res) s.status = res->status;
    return s;
  }

  std::vector<Completion> generate_ref(const std::vector<std::string>& prompts, float temp,
                                       uint64_t seed, i64 max_tokens) {
    GenerateOptions o;
    o.sampler = {temp, 0, 1.0f};
    o.seed = seed;
    o.max_new_tokens = max_tokens;
    o.max_batch = 1;
    return generate(*ref, *tok, prompts, o);
  }
};

// Text as JSON carries it: bytes that are not UTF-8 (a random model's byte tokens) as U+FFFD.
std::string shown(const std::string& s) {
  return json::parse(json(s).dump(-1, ' ', false, json::error_handler_t::replace)).get<std::string>();
}

std::string api_finish(const std::string& stop_reason) {
  return stop_reason == "eos" || stop_reason == "stop" ? "stop" : "length";
}

void expect_error(const Reply& r, int status, const std::string& what) {
  EXPECT_EQ(r.status, status) << what << ": " << r.body;
  ASSERT_TRUE(r.j.is_object() && r.j.contains("error")) << what << ": " << r.body;
  const json& e = r.j["error"];
  EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty()) << what;
  EXPECT_TRUE(e["type"].is_string()) << what;
  EXPECT_TRUE(e.contains("param") && e.contains("code")) << what;
}

void expect_serves(Served& s) {
  Reply r = s.post("/v1/completions", {{"prompt", "ok"}, {"max_tokens", 3}, {"temperature", 0}});
  EXPECT_EQ(r.status, 200) << r.body;
}

// ---- outputs equal generate() and the full forward ----

class ServeArch : public ::testing::TestWithParam<std::string> {};

TEST_P(ServeArch, GreedyAndSeededEqualGenerate) {
  Served s(GetParam(), 96);
  const std::vector<std::string> prompts = {"The cat sat", "A", "zebra crossing 12"};
  auto want = s.generate_ref(prompts, 0, 0, 24);
  for (size_t i = 0; i < prompts.size(); ++i) {
    Reply r = s.post("/v1/completions",
                     {{"prompt", prompts[i]}, {"max_tokens", 24}, {"temperature", 0}});
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(r.j["choices"][0]["text"], shown(want[i].text)) << i;
    EXPECT_EQ(r.j["choices"][0]["finish_reason"], api_finish(want[i].stop_reason)) << i;
    EXPECT_EQ(r.j["usage"]["completion_tokens"], want[i].ids.size()) << i;
    EXPECT_EQ(r.j["usage"]["prompt_tokens"], prompts[i].size()) << i;  // bytes, BOS excluded
    auto st = s.stream("/v1/completions",
                       {{"prompt", prompts[i]}, {"max_tokens", 24}, {"temperature", 0}, {"stream", true}});
    EXPECT_TRUE(st.done);
    EXPECT_EQ(st.text[0], shown(want[i].text)) << i;
    EXPECT_EQ(st.finish[0], api_finish(want[i].stop_reason)) << i;
  }
  // Token-id prompts: BOS is prepended unless present.
  std::vector<i32> ids = s.tok->encode("The cat sat");
  Reply r = s.post("/v1/completions", {{"prompt", ids}, {"max_tokens", 24}, {"temperature", 0}});
  EXPECT_EQ(r.j["choices"][0]["text"], shown(want[0].text));
  ids.insert(ids.begin(), s.tok->bos_id());
  r = s.post("/v1/completions", {{"prompt", ids}, {"max_tokens", 24}, {"temperature", 0}});
  EXPECT_EQ(r.j["choices"][0]["text"], shown(want[0].text));

  // A batch of prompts with n = 2, sampled: choice i*n + j draws like generate's prompt i*n+j.
  const std::vector<std::string> batch = {"The cat", "A dog"};
  auto sampled = s.generate_ref({batch[0], batch[0], batch[1], batch[1]}, 0.9f, 5, 16);
  r = s.post("/v1/completions", {{"prompt", batch}, {"n", 2}, {"max_tokens", 16},
                                 {"temperature", 0.9}, {"seed", 5}});
  ASSERT_EQ(r.status, 200) << r.body;
  ASSERT_EQ(r.j["choices"].size(), 4u);
  bool differ = false;
  for (size_t k = 0; k < 4; ++k) {
    EXPECT_EQ(r.j["choices"][k]["index"], k);
    EXPECT_EQ(r.j["choices"][k]["text"], shown(sampled[k].text)) << k;
  }
  differ = sampled[0].text != sampled[1].text || sampled[2].text != sampled[3].text;
  EXPECT_TRUE(differ) << "n choices should sample differently";
  auto st = s.stream("/v1/completions", {{"prompt", batch}, {"n", 2}, {"max_tokens", 16},
                                         {"temperature", 0.9}, {"seed", 5}, {"stream", true}});
  for (i64 k = 0; k < 4; ++k) EXPECT_EQ(st.text[k], shown(sampled[k].text)) << k;
}

TEST_P(ServeArch, EchoLogprobsEqualLogSoftmaxOfTheForward) {
  EngineOptions eo;
  eo.prefill_chunk = 5;  // the prompt's logits come in several chunks
  Served s(GetParam(), 96, eo);
  const std::string text = "Hello, concept world! 123 Ça va? 東京";
  Reply r = s.post("/v1/completions", {{"prompt", text}, {"max_tokens", 0}, {"echo", true},
                                       {"logprobs", 3}, {"temperature", 0}});
  ASSERT_EQ(r.status, 200) << r.body;
  const json c = r.j["choices"][0];
  EXPECT_EQ(c["text"], text);
  std::vector<i32> ids = {s.tok->bos_id()};
  for (i32 t : s.tok->encode(text)) ids.push_back(t);
  const i64 L = ids.size(), V = kVocab;
  std::vector<float> lg(L * V);
  s.ref->logits(ids.data(), 1, L, lg.data());
  const json lp = c["logprobs"];
  ASSERT_EQ(lp["token_logprobs"].size(), size_t(L - 1));
  double worst = 0;
  for (i64 t = 0; t + 1 < L; ++t) {
    const float* row = lg.data() + t * V;
    double mx = -INFINITY, z = 0;
    for (i64 v = 0; v < V; ++v) mx = std::max(mx, double(row[v]));
    for (i64 v = 0; v < V; ++v) z += std::exp(double(row[v]) - mx);
    const double want = double(row[ids[t + 1]]) - mx - std::log(z);
    worst = test::worse(worst, std::abs(lp["token_logprobs"][t].get<double>() - want));
    if (ids[t + 1] < 128) {
      EXPECT_EQ(lp["tokens"][t], s.tok->decode_piece(ids[t + 1]));
    }
    EXPECT_LE(lp["top_logprobs"][t].size(), 3u);
    // the top alternative is the row's argmax
    const i64 am = std::max_element(row, row + V) - row;
    double best = -INFINITY;
    for (const auto& [piece, v] : lp["top_logprobs"][t].items()) best = std::max(best, v.get<double>());
    EXPECT_NEAR(best, double(row[am]) - mx - std::log(z), 1e-4);
  }
  EXPECT_LE(worst, 1e-4);
  // text_offset: the byte offset of each piece in the text (a byte token counts 1, whatever
  // its "bytes:\xNN" spelling)
  size_t at = 0;
  for (i64 t = 0; t + 1 < L; ++t) {
    EXPECT_EQ(lp["text_offset"][t], at) << t;
    at += s.tok->decode_piece(ids[t + 1]).size();
  }
  EXPECT_EQ(r.j["usage"]["prompt_tokens"], L - 1);
  EXPECT_EQ(r.j["usage"]["completion_tokens"], 0);
  // echo + generation: the prompt's entries come first, then the generated token's
  r = s.post("/v1/completions", {{"prompt", text}, {"max_tokens", 1}, {"echo", true},
                                 {"logprobs", 1}, {"temperature", 0}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.j["choices"][0]["logprobs"]["token_logprobs"].size(), size_t(L));
  EXPECT_NEAR(r.j["choices"][0]["logprobs"]["token_logprobs"][0].get<double>(),
              lp["token_logprobs"][0].get<double>(), 1e-9);
  // streamed with logprobs 0 (the sampled tokens' log-probabilities, no alternatives): every
  // token's chunk carries its entry, as the whole reply does
  r = s.post("/v1/completions", {{"prompt", text}, {"max_tokens", 4}, {"logprobs", 0},
                                 {"temperature", 0}, {"ignore_eos", true}});
  ASSERT_EQ(r.status, 200) << r.body;
  const json whole = r.j["choices"][0]["logprobs"]["token_logprobs"];
  ASSERT_EQ(whole.size(), 4u);
  auto st = s.stream("/v1/completions", {{"prompt", text}, {"max_tokens", 4}, {"logprobs", 0},
                                         {"temperature", 0}, {"ignore_eos", true}, {"stream", true}});
  // a stream's chunks joined: their texts, and their token log-probabilities (null as NaN)
  auto joined = [](const Served::Stream& st, std::string& text, std::vector<double>& lps) {
    for (const json& e : st.events)
      for (const json& ch : e["choices"]) {
        text += ch.value("text", "");
        if (ch.contains("logprobs") && ch["logprobs"].is_object())
          for (const json& v : ch["logprobs"]["token_logprobs"])
            lps.push_back(v.is_null() ? NAN : v.get<double>());
      }
  };
  std::string ignored;
  std::vector<double> streamed;
  joined(st, ignored, streamed);
  ASSERT_EQ(streamed.size(), 4u) << st.events.size() << " events";
  for (size_t t = 0; t < 4; ++t) EXPECT_NEAR(streamed[t], whole[t].get<double>(), 1e-9) << t;
  // echo + generation streamed, with logprobs 1, 0 and none: the chunks' texts and
  // log-probabilities joined are the whole reply's (the prompt once, before the generated tokens)
  for (const json& extra : {json{{"logprobs", 1}}, json{{"logprobs", 0}}, json::object()}) {
    json body = {{"prompt", text}, {"max_tokens", 3}, {"echo", true}, {"temperature", 0},
                 {"ignore_eos", true}};
    body.update(extra);
    r = s.post("/v1/completions", body);
    ASSERT_EQ(r.status, 200) << r.body;
    const json w = r.j["choices"][0];
    ASSERT_EQ(w["text"].get<std::string>().rfind(text, 0), 0u) << w["text"];
    body["stream"] = true;
    st = s.stream("/v1/completions", body);
    ASSERT_TRUE(st.done);
    std::string text;
    std::vector<double> lps;
    joined(st, text, lps);
    EXPECT_EQ(text, w["text"].get<std::string>()) << extra.dump();
    if (extra.empty()) {
      EXPECT_TRUE(lps.empty());
      continue;
    }
    const json wl = w["logprobs"]["token_logprobs"];
    ASSERT_EQ(lps.size(), wl.size());
    ASSERT_EQ(lps.size(), size_t(L - 1 + 3));
    for (size_t t = 0; t < lps.size(); ++t) EXPECT_NEAR(lps[t], wl[t].get<double>(), 1e-9) << t;
  }
}

INSTANTIATE_TEST_SUITE_P(Arch, ServeArch, ::testing::Values("baseline", "dlcm"));

TEST(Serve, ChunkedPrefillWhileAnotherDecodesChangesNothing) {
  EngineOptions eo;
  eo.slots = 2;
  eo.prefill_chunk = 3;
  Served s("dlcm", 96, eo);
  const std::string shortp = "ab", longp = "a long prompt that takes many chunks to prefill, 0123456789";
  auto want = s.generate_ref({shortp, longp}, 0, 0, 30);
  Served::Stream a;
  std::atomic<bool> first{false};
  std::thread ta([&] {
    a = s.stream("/v1/completions", {{"prompt", shortp}, {"max_tokens", 30}, {"temperature", 0},
                                     {"ignore_eos", false}, {"stream", true}},
                 [&](const json&) {
                   first = true;
                   return true;
                 });
  });
  while (!first) std::this_thread::sleep_for(1ms);
  Reply b = s.post("/v1/completions", {{"prompt", longp}, {"max_tokens", 30}, {"temperature", 0}});
  ta.join();
  EXPECT_EQ(a.text[0], shown(want[0].text));
  EXPECT_EQ(b.j["choices"][0]["text"], shown(want[1].text));
}

TEST(Serve, ConcurrentStreamsEachEqualTheRequestAlone) {
  EngineOptions eo;
  eo.slots = 8;  // 32 clients over 8 slots: most wait in the queue, slots are refilled
  Served s("baseline", 96, eo);
  const int N = 32;  // the contract: 32 concurrent streaming clients
  std::vector<std::string> prompts;
  for (int i = 0; i < N; ++i) prompts.push_back("prompt number " + std::to_string(i * 7919));
  auto want = s.generate_ref(prompts, 0, 0, 20);
  std::vector<Served::Stream> got(N);
  std::vector<std::thread> th;
  for (int i = 0; i < N; ++i)
    th.emplace_back([&, i] {
      got[i] = s.stream("/v1/completions", {{"prompt", prompts[i]}, {"max_tokens", 20},
                                            {"temperature", 0}, {"stream", true},
                                            {"stream_options", {{"include_usage", true}}}});
    });
  for (auto& t : th) t.join();
  for (int i = 0; i < N; ++i) {
    EXPECT_TRUE(got[i].done) << i;
    EXPECT_EQ(got[i].text[0], shown(want[i].text)) << i;
    ASSERT_FALSE(got[i].events.empty());
    EXPECT_EQ(got[i].events.back()["usage"]["completion_tokens"], want[i].ids.size()) << i;
  }
  EXPECT_EQ(s.get("/health").j["slots_busy"], 0);
}

// ---- chat, models, tokenize, concepts, metrics ----

TEST(Serve, ChatUsesTheTemplateAndEqualsGenerate) {
  Served s("baseline", 128);
  json msgs = json::array({{{"role", "system"}, {"content", "Be brief."}},
                           {{"role", "user"}, {"content", json::array({{{"type", "text"}, {"text", "Hi"}}})}}});
  const std::string rendered = "System: Be brief.\n\nUser: Hi\n\nAssistant:";
  GenerateOptions o;
  o.sampler.temperature = 0;
  o.max_new_tokens = 20;
  o.stop = {"\n\nUser:"};
  auto want = generate(*s.ref, *s.tok, {rendered}, o);
  Reply r = s.post("/v1/chat/completions", {{"messages", msgs}, {"max_tokens", 20}, {"temperature", 0},
                                            {"logprobs", true}, {"top_logprobs", 2}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.j["object"], "chat.completion");
  EXPECT_EQ(r.j["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(r.j["choices"][0]["message"]["content"], shown(want[0].text));
  EXPECT_EQ(r.j["choices"][0]["logprobs"]["content"].size(), want[0].ids.size());
  EXPECT_EQ(r.j["usage"]["prompt_tokens"], rendered.size());
  auto st = s.stream("/v1/chat/completions",
                     {{"messages", msgs}, {"max_tokens", 20}, {"temperature", 0}, {"stream", true}});
  ASSERT_FALSE(st.events.empty());
  EXPECT_EQ(st.events[0]["object"], "chat.completion.chunk");
  EXPECT_EQ(st.events[0]["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(st.text[0], shown(want[0].text));
  EXPECT_TRUE(st.done);
}

TEST(Serve, ChatTemplateFromAFile) {
  test::TempDir td;
  const std::string dir = td.path;
  {
    std::ofstream(dir + "/t.json") << R"({"user_prefix": "Q: ", "generation": "A:", "stop": ["\nQ:"]})";
    std::ofstream(dir + "/bad.json") << R"({"user_prefix": "Q: ", "bogus": 1})";
  }
  ServerOptions so;
  so.chat = load_chat_template(dir + "/t.json");
  EXPECT_NE(test::error_of([&] { load_chat_template(dir + "/bad.json"); }).find("unknown key 'bogus'"),
            std::string::npos);
  Served s("baseline", 128, {}, so);
  GenerateOptions o;
  o.sampler.temperature = 0;
  o.max_new_tokens = 20;
  o.stop = {"\nQ:"};
  auto want = generate(*s.ref, *s.tok, {"Q: Hi\n\nA:"}, o);
  Reply r = s.post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "Hi"}}}},
                                            {"max_tokens", 20}, {"temperature", 0}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.j["choices"][0]["message"]["content"], shown(want[0].text));
  EXPECT_EQ(r.j["usage"]["prompt_tokens"], 9);  // "Q: Hi\n\nA:"
}

// The log-probabilities behind `logprobs` and `echo`: a row's log-softmax reads that row only
// (a huge value just past it would otherwise become the max and make every exp underflow), and
// the top alternatives come most likely first, ties by the smaller id, at most V of them.
TEST(Serve, LogSoftmaxRowReadsItsRowOnlyAndTopLogprobsAreOrdered) {
  const i64 V = 5;
  std::vector<float> buf = {1.f, 3.f, -2.f, 3.f, 0.5f, 1e30f};  // the guard follows the row
  std::vector<double> lsm;
  log_softmax_row(buf.data(), V, lsm);
  ASSERT_EQ(lsm.size(), size_t(V));
  double z = 0;
  for (i64 v = 0; v < V; ++v) z += std::exp(double(buf[v]));
  for (i64 v = 0; v < V; ++v) EXPECT_NEAR(lsm[v], double(buf[v]) - std::log(z), 1e-12) << v;
  TokenLogprob t = token_logprob(lsm, 2, 0);
  EXPECT_EQ(t.id, 2);
  EXPECT_DOUBLE_EQ(t.logprob, lsm[2]);
  EXPECT_TRUE(t.top.empty());
  t = token_logprob(lsm, 4, 3);  // ids 1 and 3 tie: 1 first; then 0
  ASSERT_EQ(t.top.size(), 3u);
  const i32 want[] = {1, 3, 0};
  for (int k = 0; k < 3; ++k) {
    EXPECT_EQ(t.top[k].first, want[k]) << k;
    EXPECT_DOUBLE_EQ(t.top[k].second, lsm[want[k]]) << k;
  }
  EXPECT_EQ(token_logprob(lsm, 0, 99).top.size(), size_t(V));  // at most the vocabulary
  EXPECT_TRUE(token_logprob(lsm, 0, -1).top.empty());
}

TEST(Serve, ModelsHealthTokenizeMetricsConcepts) {
  Served s("dlcm", 96);
  Reply r = s.get("/v1/models");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.j["data"][0]["id"], "tiny-dlcm");
  EXPECT_EQ(r.j["data"][0]["meta"]["arch"], "dlcm");
  EXPECT_EQ(r.j["data"][0]["meta"]["n_ctx"], 96);
  r = s.get("/health");
  EXPECT_EQ(r.j["status"], "ok");
  EXPECT_EQ(r.j["slots_idle"], 4);
  const std::string text = "héllo wörld";
  r = s.post("/tokenize", {{"content", text}, {"add_bos", true}, {"with_pieces", true}});
  std::vector<i32> want = {s.tok->bos_id()};
  for (i32 t : s.tok->encode(text)) want.push_back(t);
  EXPECT_EQ(r.j["tokens"].get<std::vector<i32>>(), want);
  EXPECT_EQ(r.j["pieces"].size(), want.size());
  r = s.post("/detokenize", {{"tokens", want}});
  EXPECT_EQ(r.j["content"], text);
  // concepts: what segment_texts computes
  r = s.post("/v1/concepts", {{"text", "one two three four"}});
  ASSERT_EQ(r.status, 200) << r.body;
  auto seg = segment_texts(*s.ref, *s.tok, {"t"}, {"one two three four"}, -1);
  ASSERT_EQ(r.j["tokens"].size(), size_t(seg[0].tokens()));
  for (i64 i = 0; i < seg[0].tokens(); ++i) {
    EXPECT_NEAR(r.j["tokens"][i]["p"].get<double>(), seg[0].p[i], 1e-6);
    EXPECT_EQ(r.j["tokens"][i]["concept"], seg[0].concept_index[i]);
    EXPECT_EQ(r.j["tokens"][i]["boundary"], bool(seg[0].b[i]));
  }
  EXPECT_EQ(r.j["n_concepts"], seg[0].concepts());
  r = s.post("/v1/completions", {{"prompt", "ok"}, {"max_tokens", 3}, {"ignore_eos", true}});
  EXPECT_EQ(r.j["usage"]["completion_tokens"], 3);
  // A request is counted when its answer has been written, just after the client has it.
  const std::string counted = "dlcm_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1";
  std::string m = s.get("/metrics").body;
  for (int i = 0; i < 200 && m.find(counted) == std::string::npos; ++i) {
    std::this_thread::sleep_for(5ms);
    m = s.get("/metrics").body;
  }
  EXPECT_NE(m.find(counted), std::string::npos) << m;
  EXPECT_NE(m.find("dlcm_time_to_first_token_seconds_count 1"), std::string::npos) << m;
  EXPECT_NE(m.find("dlcm_inter_token_latency_seconds_bucket{le=\"+Inf\"} 2"), std::string::npos) << m;
  EXPECT_NE(m.find("dlcm_generated_tokens_total 3"), std::string::npos) << m;
  EXPECT_NE(m.find("dlcm_slots_total 4"), std::string::npos) << m;
}

// ---- hostile input ----

// Sends raw bytes over a socket; returns the answer: one whole response (by Content-Length), or
// what came before the server closed or wait_ms passed without data.
std::string raw_exchange(int port, const std::string& data, int wait_ms) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (sockaddr*)&a, sizeof a) != 0) {
    close(fd);
    return "connect failed";
  }
  (void)!write(fd, data.data(), data.size());
  timeval tv{wait_ms / 1000, (wait_ms % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) break;
    out.append(buf, n);
    const size_t head = out.find("\r\n\r\n"), cl = out.find("Content-Length: ");
    if (head != std::string::npos && cl != std::string::npos &&
        out.size() >= head + 4 + std::stoul(out.substr(cl + 16)))
      break;
  }
  close(fd);
  return out;
}

TEST(Serve, HostileRequestsGet4xxErrorObjectsAndTheServerKeepsServing) {
  ServerOptions so;
  so.max_body = 4096;
  so.io_timeout_s = 1;
  Served s("baseline", 64, {}, so);
  const std::string C = "/v1/completions", CH = "/v1/chat/completions";
  const json ok = {{"role", "user"}, {"content", "hi"}};
  struct Case {
    std::string what, method, path, body;
    int status;
  };
  auto with = [](json j) { return j.dump(); };
  std::vector<Case> cases = {
      {"not JSON", "POST", C, "{prompt: hi", 400},
      {"JSON array body", "POST", C, "[1, 2]", 400},
      {"deeply nested JSON", "POST", C, std::string(2000, '[') + std::string(2000, ']'), 400},
      {"nested JSON in the prompt", "POST", C, "{\"prompt\": " + std::string(1000, '[') + std::string(1000, ']') + "}", 400},
      {"empty body", "POST", C, "", 400},
      {"prompt missing", "POST", C, with({{"max_tokens", 2}}), 400},
      {"prompt a number", "POST", C, with({{"prompt", 5}}), 400},
      {"prompt empty", "POST", C, with({{"prompt", ""}}), 400},
      {"prompt empty list", "POST", C, with({{"prompt", json::array()}}), 400},
      {"prompt empty id list", "POST", C, with({{"prompt", json::array({json::array()})}}), 400},
      {"prompt mixed list", "POST", C, with({{"prompt", {1, "a"}}}), 400},
      {"prompt list of objects", "POST", C, with({{"prompt", {{{"a", 1}}}}}), 400},
      {"id out of vocab", "POST", C, with({{"prompt", {5, 100000}}}), 400},
      {"negative id", "POST", C, with({{"prompt", {-1}}}), 400},
      {"huge id", "POST", C, R"({"prompt": [18446744073709551615]})", 400},
      {"too many prompts", "POST", C, with({{"prompt", std::vector<std::string>(65, "x")}}), 400},
      {"max_tokens negative", "POST", C, with({{"prompt", "hi"}, {"max_tokens", -1}}), 400},
      {"max_tokens huge", "POST", C, with({{"prompt", "hi"}, {"max_tokens", 1000000000000LL}}), 400},
      {"max_tokens string", "POST", C, with({{"prompt", "hi"}, {"max_tokens", "5"}}), 400},
      {"max_tokens float", "POST", C, with({{"prompt", "hi"}, {"max_tokens", 1.5}}), 400},
      {"max_tokens 0 without echo", "POST", C, with({{"prompt", "hi"}, {"max_tokens", 0}}), 400},
      {"max_tokens beyond the room", "POST", C, with({{"prompt", std::string(40, 'a')}, {"max_tokens", 30}}), 400},
      {"prompt over the context", "POST", C, with({{"prompt", std::string(70, 'a')}, {"max_tokens", 1}}), 400},
      {"n 0", "POST", C, with({{"prompt", "hi"}, {"n", 0}}), 400},
      {"n 9", "POST", C, with({{"prompt", "hi"}, {"n", 9}}), 400},
      {"temperature negative", "POST", C, with({{"prompt", "hi"}, {"temperature", -1}}), 400},
      {"temperature string", "POST", C, with({{"prompt", "hi"}, {"temperature", "hot"}}), 400},
      {"temperature denormal", "POST", C, with({{"prompt", "hi"}, {"temperature", 1e-40}}), 400},
      {"top_p over 1", "POST", C, with({{"prompt", "hi"}, {"top_p", 1.5}}), 400},
      {"top_k negative", "POST", C, with({{"prompt", "hi"}, {"top_k", -3}}), 400},
      {"stop list too long", "POST", C, with({{"prompt", "hi"}, {"stop", {"a", "b", "c", "d", "e"}}}), 400},
      {"stop a number", "POST", C, with({{"prompt", "hi"}, {"stop", 5}}), 400},
      {"stop empty string", "POST", C, with({{"prompt", "hi"}, {"stop", ""}}), 400},
      {"logprobs too large", "POST", C, with({{"prompt", "hi"}, {"logprobs", 21}}), 400},
      {"logprobs a boolean", "POST", C, with({{"prompt", "hi"}, {"logprobs", true}}), 400},
      {"echo a string", "POST", C, with({{"prompt", "hi"}, {"echo", "yes"}}), 400},
      {"stream a number", "POST", C, with({{"prompt", "hi"}, {"stream", 1}}), 400},
      {"stream_options a number", "POST", C, with({{"prompt", "hi"}, {"stream_options", 3}}), 400},
      {"seed a string", "POST", C, with({{"prompt", "hi"}, {"seed", "x"}}), 400},
      {"invalid UTF-8 in the prompt", "POST", C, "{\"prompt\": \"ab\xff\xfe\"}", 400},
      {"lone surrogate escape", "POST", C, R"({"prompt": "\ud800"})", 400},
      {"invalid UTF-8 in a key", "POST", C, "{\"pr\xc3\": \"hi\"}", 400},
      {"messages missing", "POST", CH, with({{"max_tokens", 2}}), 400},
      {"messages empty", "POST", CH, with({{"messages", json::array()}}), 400},
      {"messages a string", "POST", CH, with({{"messages", "hi"}}), 400},
      {"bad role", "POST", CH, with({{"messages", {{{"role", "wizard"}, {"content", "hi"}}}}}), 400},
      {"role missing", "POST", CH, with({{"messages", {{{"content", "hi"}}}}}), 400},
      {"content a number", "POST", CH, with({{"messages", {{{"role", "user"}, {"content", 5}}}}}), 400},
      {"content bad part", "POST", CH, with({{"messages", {{{"role", "user"}, {"content", {{{"type", "image"}}}}}}}}), 400},
      {"top_logprobs without logprobs", "POST", CH, with({{"messages", {ok}}, {"top_logprobs", 2}}), 400},
      {"chat max_tokens 0", "POST", CH, with({{"messages", {ok}}, {"max_tokens", 0}}), 400},
      {"tokenize content a number", "POST", "/tokenize", with({{"content", 5}}), 400},
      {"detokenize id out of vocab", "POST", "/detokenize", with({{"tokens", {99999}}}), 400},
      {"concepts on a baseline", "POST", "/v1/concepts", with({{"text", "abc"}}), 400},
      {"body over --max-body", "POST", C, with({{"prompt", std::string(5000, 'a')}}), 413},
      {"unknown path", "GET", "/v2/nothing", "", 404},
      {"unknown POST path", "POST", "/v1/engines", "{}", 404},
      {"GET on a POST endpoint", "GET", C, "", 405},
      {"DELETE /health", "DELETE", "/health", "", 405},
      {"POST /v1/models", "POST", "/v1/models", "{}", 405},
  };
  ASSERT_GE(cases.size(), 30u);
  for (const auto& c : cases) {
    Reply r = s.send(c.method, c.path, c.body);
    expect_error(r, c.status, c.what);
    expect_serves(s);
  }
  // The field at fault and the limit are named.
  Reply r = s.post(C, {{"prompt", "hi"}, {"n", 9}});
  EXPECT_EQ(r.j["error"]["param"], "n");
  EXPECT_NE(r.j["error"]["message"].get<std::string>().find("[1, 8]"), std::string::npos);
  r = s.post(C, {{"prompt", std::string(70, 'a')}, {"max_tokens", 1}});
  EXPECT_NE(r.j["error"]["message"].get<std::string>().find("context of 64"), std::string::npos);
  // Unknown fields are ignored.
  EXPECT_EQ(s.post(C, {{"prompt", "hi"}, {"max_tokens", 2}, {"frobnicate", {1, 2}}}).status, 200);

  // Raw garbage, a truncated body, a client that stops sending mid-body.
  std::string got = raw_exchange(s.port, std::string("\x01\x02GARBAGE \xff\r\n\r\n", 15), 3000);
  EXPECT_EQ(got.rfind("HTTP/1.1 400", 0), 0u) << got;
  expect_serves(s);
  got = raw_exchange(s.port, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\"", 3000);
  expect_serves(s);
  auto t0 = std::chrono::steady_clock::now();
  std::thread slow([&] {
    got = raw_exchange(s.port, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", 5000);
  });
  std::this_thread::sleep_for(100ms);
  expect_serves(s);  // served while the slow client holds its connection
  slow.join();
  // the server dropped the silent client after its 1 s I/O timeout, well before ours
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 4.5);
  got = raw_exchange(s.port, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 3000);
  EXPECT_NE(got.find("\"status\":\"ok\""), std::string::npos) << got;
}

// Every field of every endpoint set to every kind of JSON value, one at a time, on an otherwise
// valid request: each answer is a 200 (a JSON body, or a stream ending in [DONE]) or a 400 error
// object naming the field, never a 5xx or a dropped connection, and the server keeps serving. A
// validation gap that lets a value reach code expecting another type shows up as a 500 here
// (call() turns any other exception into "internal error").
TEST(Serve, EveryFieldWithEveryKindOfValueGetsA200OrANamed400) {
  Served s("dlcm", 64);
  json deep_ok = 1, deep_over = 1;  // 40 levels pass the body's depth bound (64), 70 do not
  for (int i = 0; i < 40; ++i) deep_ok = json::array({deep_ok});
  for (int i = 0; i < 70; ++i) deep_over = json::array({deep_over});
  const json user = {{"role", "user"}, {"content", "hi"}};
  const std::vector<json> values = {
      nullptr, true, false, 0, -1, 1, 2, 3.5, -1e300, 1e300, INT64_MAX, UINT64_MAX, INT64_MIN,
      "", "x", std::string("a\0b", 3), std::string(3000, 'y'), json::array(), {1}, {-5},
      {"a"}, {1, "a"}, json::array({json::array()}), json::array({json::array({1, 2})}),
      json::array({nullptr}), json::object(), {{"a", 1}}, {{"include_usage", true}},
      {{"type", "text"}, {"text", "hi"}}, json::array({user}), deep_ok, deep_over};
  struct Endpoint {
    std::string path;
    json base;
    std::vector<std::string> fields;
  };
  const std::vector<std::string> sampling = {"temperature", "top_p", "top_k", "seed", "stop", "n",
                                             "ignore_eos", "stream", "stream_options", "model",
                                             "user", "logit_bias"};
  auto with = [&](std::vector<std::string> f) {
    f.insert(f.end(), sampling.begin(), sampling.end());
    return f;
  };
  const std::vector<Endpoint> endpoints = {
      {"/v1/completions", {{"prompt", "hi"}, {"max_tokens", 2}},
       with({"prompt", "max_tokens", "echo", "logprobs", "suffix", "best_of"})},
      {"/v1/chat/completions", {{"messages", {user}}, {"max_tokens", 2}},
       with({"messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
             "response_format", "tools"})},
      {"/tokenize", {{"content", "hi"}}, {"content", "add_bos", "with_pieces"}},
      {"/detokenize", {{"tokens", {72, 105}}}, {"tokens"}},
      {"/v1/concepts", {{"text", "hi there"}}, {"text", "tau"}},
  };
  struct Request {
    std::string path, param;  // param: the top-level field at fault, as the error should name it
    json body;
    std::string what;
  };
  std::vector<Request> requests;
  for (const auto& e : endpoints)
    for (const auto& f : e.fields)
      for (size_t v = 0; v < values.size(); ++v) {
        json b = e.base;
        b[f] = values[v];
        requests.push_back({e.path, f, b, e.path + " " + f + " = value " + std::to_string(v)});
      }
  // a chat message's own fields
  for (const char* f : {"role", "content"})
    for (size_t v = 0; v < values.size(); ++v) {
      json m = user;
      m[f] = values[v];
      requests.push_back({"/v1/chat/completions", "messages", {{"messages", {m}}, {"max_tokens", 2}},
                          std::string("/v1/chat/completions messages[0].") + f + " = value " +
                              std::to_string(v)});
    }
  ASSERT_GE(requests.size(), 1400u);
  int ok = 0, refused = 0;
  for (const auto& [path, top, body, what] : requests) {
    Reply r = s.send("POST", path, body.dump(-1, ' ', false, json::error_handler_t::replace));
    if (r.status == 200) {
      ++ok;
      const bool stream = r.body.rfind("data: ", 0) == 0;
      EXPECT_TRUE(stream ? r.body.find("data: [DONE]") != std::string::npos : r.j.is_object())
          << what << ": " << r.body.substr(0, 300);
      continue;
    }
    ++refused;
    expect_error(r, 400, what);
    if (::testing::Test::HasFailure()) break;  // one request's story is enough
    const json& param = r.j["error"]["param"];
    // the field at fault is named: as the param, or in the message where the whole body is
    // refused (its depth)
    EXPECT_TRUE((param.is_string() && param.get<std::string>() == top) ||
                r.j["error"]["message"].get<std::string>().find("request body") != std::string::npos)
        << what << ": " << r.body;
  }
  // both kinds occur: the sweep neither refuses everything nor accepts everything
  EXPECT_GT(ok, 200);
  EXPECT_GT(refused, 500);
  expect_serves(s);
  Reply h = s.get("/health");
  EXPECT_EQ(h.status, 200);
}

TEST(Serve, ApiKeyIsRequiredExceptForHealth) {
  ServerOptions so;
  so.api_key = "sekret";
  Served s("baseline", 64, {}, so);
  const json body = {{"prompt", "hi"}, {"max_tokens", 2}};
  Reply r = s.post("/v1/completions", body);
  expect_error(r, 401, "missing key");
  EXPECT_EQ(r.j["error"]["type"], "authentication_error");
  expect_error(s.post("/v1/completions", body, {{"Authorization", "Bearer wrong"}}), 401, "wrong key");
  expect_error(s.get("/v1/models"), 401, "models without key");
  EXPECT_EQ(s.post("/v1/completions", body, {{"Authorization", "Bearer sekret"}}).status, 200);
  EXPECT_EQ(s.get("/health").status, 200);
}

// ---- slots, queue, shutdown ----

TEST(Serve, AClientThatHangsUpMidStreamFreesItsSlot) {
  EngineOptions eo;
  eo.slots = 1;
  Served s("baseline", 2048, eo);
  const i64 max_tokens = 2000;
  int seen = 0;
  auto st = s.stream("/v1/completions", {{"prompt", "go"}, {"max_tokens", max_tokens},
                                         {"ignore_eos", true}, {"stream", true}},
                     [&](const json&) { return ++seen < 3; });
  EXPECT_FALSE(st.done);
  bool freed = false;
  for (int i = 0; i < 400 && !freed; ++i) {
    freed = s.get("/health").j["slots_busy"] == 0;
    if (!freed) std::this_thread::sleep_for(5ms);
  }
  EXPECT_TRUE(freed);
  // It stopped long before its max_tokens.
  const std::string m = s.get("/metrics").body;
  const size_t at = m.find("\ndlcm_generated_tokens_total ");
  ASSERT_NE(at, std::string::npos);
  EXPECT_LT(std::stoll(m.substr(at + 29)), max_tokens / 2) << m.substr(at, 60);
  expect_serves(s);
}

// The test setting that keeps a tiny model's request generating long enough for a client process
// to be killed mid-stream (tests/interop/serve_openai_check.py): range-checked, and each decode
// step then takes at least the pause (a lower bound only: sleeping never ends early).
TEST(Serve, StepPauseIsCheckedAndPausesEveryDecodeStep) {
  const Config c = small_model("baseline", 64);
  auto m = make_initialised_model(c.model, 3);
  auto tok = make_byte_tokenizer();
  for (double bad : {-1.0, 1001.0, std::nan("")}) {
    EngineOptions eo;
    eo.step_pause_ms = bad;
    EXPECT_NE(test::error_of([&] { ServingEngine e(*m, *tok, eo); })
                  .find("DLCM_SERVE_STEP_PAUSE_MS: expected 0..1000 milliseconds"),
              std::string::npos)
        << bad;
  }
  EngineOptions eo;
  eo.slots = 1;
  eo.step_pause_ms = 25;
  Served s("baseline", 64, eo);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = s.post("/v1/completions", {{"prompt", "go"}, {"max_tokens", 9}, {"ignore_eos", true}});
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.j["usage"]["completion_tokens"], 9);
  // 9 tokens: the prefill's and 8 decode steps', the last step's pause after the reply is sent
  EXPECT_GE(ms, 7 * 25.0);
}

// Holds the engine thread (nothing is admitted or decoded) from construction until release().
struct EngineHold {
  explicit EngineHold(ServingEngine& e)
      : t([this, &e] {
          e.run_exclusive([this](LanguageModel&) {
            while (!released) std::this_thread::sleep_for(1ms);
          });
        }) {}
  ~EngineHold() { release(); }
  void release() {
    released = true;
    if (t.joinable()) t.join();
  }
  std::atomic<bool> released{false};  // declared before t: set before the thread starts
  std::thread t;
};

TEST(Serve, AFullQueueAnswers503AndShutdownCancelsTheQueued) {
  EngineOptions eo;
  eo.slots = 1;
  eo.max_queue = 1;
  Served s("baseline", 64, eo);
  // Hold the engine thread so that nothing is admitted while the queue fills.
  auto hold = std::make_unique<EngineHold>(*s.eng);
  std::this_thread::sleep_for(50ms);
  const json body = {{"prompt", "hi"}, {"max_tokens", 4}};
  std::vector<Reply> queued(2);
  std::vector<std::thread> th;
  for (int i = 0; i < 2; ++i) th.emplace_back([&, i] { queued[i] = s.post("/v1/completions", body); });
  for (int i = 0; i < 2500 && s.get("/health").j["queue"] != 2; ++i) std::this_thread::sleep_for(2ms);
  EXPECT_EQ(s.get("/health").j["queue"], 2);  // one for the free slot, one waiting (--max-queue 1)
  Reply r = s.post("/v1/completions", body);
  expect_error(r, 503, "queue full");
  EXPECT_EQ(r.j["error"]["type"], "overloaded_error");
  hold->release();
  for (auto& t : th) t.join();
  for (auto& q : queued) EXPECT_EQ(q.status, 200) << q.body;
  // Shutdown: the queued request gets 503, the running one finishes; shutdown returns.
  hold = std::make_unique<EngineHold>(*s.eng);
  std::this_thread::sleep_for(50ms);
  Reply late;
  std::thread waiting([&] { late = s.post("/v1/completions", body); });
  for (int i = 0; i < 2500 && s.get("/health").j["queue"] != 1; ++i) std::this_thread::sleep_for(2ms);
  std::thread stopper([&] { s.stop(); });
  std::this_thread::sleep_for(100ms);
  hold->release();
  waiting.join();
  stopper.join();
  expect_error(late, 503, "cancelled by shutdown");
  EXPECT_FALSE(s.srv->running());
}

TEST(Serve, ARequestPastTheTimeoutIsCancelled) {
  EngineOptions eo;
  eo.timeout_s = 0.05;
  Served s("baseline", 64, eo);
  // The engine is held past the timeout: both requests time out while queued.
  EngineHold hold(*s.eng);
  std::this_thread::sleep_for(20ms);
  Reply r;
  Served::Stream st;
  std::thread a([&] { r = s.post("/v1/completions", {{"prompt", "hi"}, {"max_tokens", 4}}); });
  std::thread b([&] {
    st = s.stream("/v1/completions", {{"prompt", "hi"}, {"max_tokens", 4}, {"stream", true}});
  });
  for (int i = 0; i < 2500 && s.get("/health").j["queue"] != 2; ++i) std::this_thread::sleep_for(2ms);
  std::this_thread::sleep_for(100ms);  // both are past their 50 ms
  hold.release();
  a.join();
  b.join();
  expect_error(r, 504, "timeout");
  EXPECT_EQ(r.j["error"]["code"], "timeout");
  EXPECT_TRUE(st.done);
  ASSERT_FALSE(st.events.empty());
  EXPECT_EQ(st.events.back()["error"]["code"], "timeout");
  EXPECT_EQ(s.get("/health").j["slots_busy"], 0);
}

TEST(Serve, ShutdownLetsARunningStreamFinish) {
  Served s("baseline", 256);
  std::atomic<bool> first{false};
  Served::Stream st;
  std::thread t([&] {
    st = s.stream("/v1/completions", {{"prompt", "x"}, {"max_tokens", 200}, {"ignore_eos", true},
                                      {"stream", true}, {"stream_options", {{"include_usage", true}}}},
                  [&](const json&) {
                    first = true;
                    return true;
                  });
  });
  while (!first) std::this_thread::sleep_for(1ms);
  auto t0 = std::chrono::steady_clock::now();
  s.stop();
  t.join();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0);
  EXPECT_TRUE(st.done);
  EXPECT_EQ(st.finish[0], "length");
  ASSERT_FALSE(st.events.empty());
  EXPECT_EQ(st.events.back()["usage"]["completion_tokens"], 200);  // every token was made
}

// A request still running when shutdown's wait runs out gets an error event (503), after the
// tokens it had, and its slot is freed.
TEST(Serve, ARunningRequestPastTheShutdownWaitGetsA503) {
  const Config c = small_model("baseline", 256);
  auto m = make_initialised_model(c.model, 3);
  auto tok = make_byte_tokenizer();
  EngineOptions eo;
  eo.slots = 1;
  eo.step_pause_ms = 20;  // 200 tokens would take 4 s
  ServingEngine eng(*m, *tok, eo);
  SeqSpec spec;
  spec.prompt = {i32(c.model.bos_id), 70, 71};
  spec.max_tokens = 200;
  spec.stop_at_eos = false;
  std::vector<SeqSpec> seqs = {spec};
  auto ch = std::make_shared<SeqChannel>();
  ASSERT_EQ(eng.submit(std::move(seqs), ch), ServingEngine::Submit::kOk);
  std::vector<SeqEvent> ev;
  for (int i = 0; i < 500 && ev.empty(); ++i) ch->pop_all(ev, 10ms);
  ASSERT_FALSE(ev.empty());
  eng.shutdown(50ms);
  while (ch->pop_all(ev, 10ms)) {}
  ASSERT_GE(ev.size(), 2u);
  for (size_t i = 0; i + 1 < ev.size(); ++i) EXPECT_EQ(ev[i].kind, SeqEvent::kToken) << i;
  EXPECT_LT(i64(ev.size()), 200);
  EXPECT_EQ(ev.back().kind, SeqEvent::kError);
  EXPECT_EQ(ev.back().status, 503);
  EXPECT_NE(ev.back().text.find("shut down before the request finished"), std::string::npos)
      << ev.back().text;
  EXPECT_EQ(eng.stats().slots_busy, 0);
}

// ---- the command ----

TEST(Serve, TheCommandPrintsItsUrlServesAndExitsZeroOnSigterm) {
  test::TempDir tmp;
  Config c = small_model("baseline", 64);
  c.model.vocab_size = 260;
  auto m = make_initialised_model(c.model, 5);
  const std::string ck = tmp.path + "/run/checkpoint";
  test::save_model_only(ck, c, m->params());
  make_byte_tokenizer()->save(ck);
  int out[2];
  ASSERT_EQ(pipe(out), 0);
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], 1);
    const int null = open("/dev/null", O_WRONLY);
    dup2(null, 2);
    close(out[0]);
    execl(DLCM_BINARY, DLCM_BINARY, "serve", "--ckpt", ck.c_str(), "--port", "0", "--threads", "1",
          (char*)nullptr);
    _exit(127);
  }
  close(out[1]);
  std::string line;
  pollfd pfd{out[0], POLLIN, 0};
  char ch;
  while (line.find('\n') == std::string::npos && poll(&pfd, 1, 30000) > 0 && read(out[0], &ch, 1) == 1)
    line += ch;
  std::smatch mt;
  const bool found = std::regex_search(line, mt, std::regex("listening on http://127\\.0\\.0\\.1:(\\d+)"));
  if (found) {
    httplib::Client cli("127.0.0.1", std::stoi(mt[1]));
    auto res = cli.Get("/v1/models");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
    EXPECT_EQ(json::parse(res->body)["data"][0]["id"], "run");  // the run's name, not "checkpoint"
    res = cli.Post("/v1/completions", R"({"prompt": "ab", "max_tokens": 3})", "application/json");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200) << res->body;
  }
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  close(out[0]);
  EXPECT_TRUE(found) << line;
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

// `dlcm bench serve` runs its sweep and the interleaved 1-client pairs and prints each figure
// (a benchmark: that it runs and reports figures that hang together, not how fast): a row per
// client count, in order, the first the 1.00 of the scaling column, each with tokens, a first
// token and gaps between tokens (8 new tokens: 7 gaps per request, at least one a decode step),
// and gaps that are gaps.
TEST(Serve, BenchServePrintsTheSweepAndThePairs) {
  test::TempDir tmp;
  Config c = small_model("baseline", 64);
  c.model.vocab_size = 260;
  // wide enough that a decode step takes well over the table's 0.01 ms (a 16-wide model's
  // steps took 5-30 us: two clients' tokens then arrived as gaps of 0.00 ms)
  c.model.d_token = 256;
  c.model.n_heads = 4;
  c.model.n_kv_heads = 4;
  c.model.head_dim = 64;
  c.model.d_ff = 768;
  c.model.n_layers = 4;
  auto m = make_initialised_model(c.model, 5);
  const std::string ck = tmp.path + "/run/checkpoint";
  test::save_model_only(ck, c, m->params());
  make_byte_tokenizer()->save(ck);
  test::CommandResult r = test::run_dlcm("bench serve --ckpt " + ck +
                                         " --clients 1,2 --requests 1 --prompt-len 8 --max-tokens 8"
                                         " --pairs 3 --threads 1");
  ASSERT_EQ(r.rc, 0) << r.out;
  // "clients tokens/s x-1-client ttft-p50 ttft-p99 itl-p50 itl-p99"
  const std::regex row(R"(^ +(\d+) +([\d.]+) +([\d.]+) +([\d.]+)ms +([\d.]+)ms +([\d.]+)ms +([\d.]+)ms)");
  std::vector<std::vector<double>> rows;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) {
    std::smatch mt;
    if (!std::regex_search(line, mt, row)) continue;
    rows.emplace_back();
    for (int k = 1; k <= 7; ++k) rows.back().push_back(std::stod(mt[k]));
  }
  ASSERT_EQ(rows.size(), 2u) << r.out;
  EXPECT_EQ(rows[0][2], 1.0) << r.out;
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(rows[i][0], i + 1) << r.out;
    EXPECT_GT(rows[i][1], 0) << r.out;
    EXPECT_GT(rows[i][3], 0) << r.out;
    EXPECT_LE(rows[i][3], rows[i][4]) << r.out;
    EXPECT_GT(rows[i][6], 0) << r.out;
    EXPECT_LE(rows[i][5], rows[i][6]) << r.out;
  }
  // one request at 1 client: its largest gap is shorter than the request's time after its first
  // token (the row's 8 tokens over its tokens/s; gaps measured from the request's start instead
  // of the previous token would reach the whole request)
  EXPECT_LT(rows[0][6], 1e3 * 8 / rows[0][1] - rows[0][3]) << r.out;
  EXPECT_NE(r.out.find("generate (1 sequence):"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("server 1 client / generate:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("1 client / generate, 3 interleaved pairs: median"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("failed requests"), std::string::npos) << r.out;
  r = test::run_dlcm("bench serve --ckpt " + ck + " --pairs -1");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--pairs"), std::string::npos) << r.out;
}

}  // namespace
