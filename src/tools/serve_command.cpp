// `dlcm serve` (an OpenAI-compatible HTTP server, docs/serving.md) and `dlcm bench serve` (its
// throughput and latency at 1..32 concurrent streaming clients against generate()'s speed).
#include <CLI/CLI.hpp>
#include <httplib.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <thread>

#include "data/model_loader.h"
#include "infer/generate.h"
#include "infer/http_server.h"
#include "tools/commands.h"

namespace dlcm {

namespace {

struct ServeArgs {
  std::string ckpt, host = "127.0.0.1", api_key, chat_template, model_name;
  int port = 8080;
  i64 slots = 4, ctx = 0, max_queue = 64, prefill_chunk = 256, threads = 0;
  size_t max_body = 1 << 20;
  double timeout = 600, tau = -1;
};

struct BenchServeArgs {
  std::string ckpt;
  std::vector<i64> clients = {1, 4, 16, 32};
  i64 prompt_len = 32, max_tokens = 64, requests = 2, threads = 0;
  i64 slots = 0;  // 0: the most clients
  i64 pairs = 7;  // interleaved (generate, 1 streaming request) pairs for the 1-client ratio
};

std::atomic<bool> g_stop{false};
extern "C" void on_stop_signal(int) { g_stop = true; }

// Sends one streaming completion request and calls on_event for each `data: {...}` event.
// Returns whether the server answered 200.
bool stream_completion(httplib::Client& cli, const nlohmann::json& body,
                       const std::function<void(const nlohmann::json&)>& on_event) {
  std::string buf;
  httplib::Request rq;
  rq.method = "POST";
  rq.path = "/v1/completions";
  rq.body = body.dump();
  rq.set_header("Content-Type", "application/json");
  rq.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
    buf.append(d, n);
    size_t at;
    while ((at = buf.find("\n\n")) != std::string::npos) {
      const std::string ev = buf.substr(0, at);
      buf.erase(0, at + 2);
      if (ev.rfind("data: {", 0) == 0) on_event(nlohmann::json::parse(ev.substr(6)));
    }
    return true;
  };
  auto res = cli.send(rq);
  return res && res->status == 200;
}

std::string folder_name(const std::string& path) {
  std::filesystem::path p(path);
  if (!p.has_filename()) p = p.parent_path();  // "runs/x/" -> "x"
  // A run's checkpoint folder is named "checkpoint": the run's name says more.
  if (p.filename() == "checkpoint" && p.has_parent_path()) p = p.parent_path();
  return p.filename().string();
}

int cmd_serve(const ServeArgs& a) {
  DLCM_CHECK(a.tau < 0 || (a.tau > 0 && a.tau <= 1), "--tau: expected a value in (0, 1], got ", a.tau);
  std::string dir;
  auto m = load_model_with_tokenizer(a.ckpt, &dir);
  auto tok = load_tokenizer(dir);
  EngineOptions eo;
  eo.slots = a.slots;
  eo.ctx = a.ctx;
  eo.max_queue = a.max_queue;
  eo.prefill_chunk = a.prefill_chunk;
  eo.timeout_s = a.timeout;
  eo.tau = float(a.tau);
  eo.threads = int(a.threads);
  if (const char* e = std::getenv("DLCM_SERVE_STEP_PAUSE_MS"); e && *e) {
    char* end = nullptr;
    eo.step_pause_ms = std::strtod(e, &end);
    DLCM_CHECK(end && *end == 0,
               "DLCM_SERVE_STEP_PAUSE_MS: expected a number of milliseconds, got '", e, "'");
  }
  ServerOptions so;
  so.host = a.host;
  so.port = a.port;
  so.api_key = a.api_key;
  so.max_body = a.max_body;
  so.max_queue = a.max_queue;
  so.model_name = a.model_name.empty() ? folder_name(a.ckpt) : a.model_name;
  if (!a.chat_template.empty()) so.chat = load_chat_template(a.chat_template);
  ServingEngine engine(*m, *tok, eo);
  HttpServer server(engine, so);
  server.bind();
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  std::fprintf(stderr, "[serve] %s (%s), %lld slots of %lld tokens, queue %lld, OpenMP threads %s\n",
               so.model_name.c_str(), m->config().arch.c_str(), (long long)a.slots,
               (long long)engine.ctx(), (long long)a.max_queue,
               a.threads > 0 ? std::to_string(a.threads).c_str() : "default");
  if (eo.step_pause_ms > 0)
    std::fprintf(stderr,
                 "[serve] DLCM_SERVE_STEP_PAUSE_MS=%g: every decode step pauses %g ms (a test "
                 "setting: unset it to serve at full speed)\n",
                 eo.step_pause_ms, eo.step_pause_ms);
  std::printf("dlcm serve: listening on %s\n", server.url().c_str());
  std::fflush(stdout);
  // A signal only sets a flag; this thread does the graceful stop, run() then returns.
  std::thread watcher([&] {
    while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::fprintf(stderr, "[serve] stopping: no new requests; running ones get up to --timeout %g s\n",
                 a.timeout);
    server.shutdown(std::chrono::milliseconds(i64(a.timeout * 1000)));
  });
  server.run();
  g_stop = true;
  watcher.join();
  std::fprintf(stderr, "[serve] stopped\n");
  return 0;
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(q * double(v.size() - 1) + 0.5))];
}

int cmd_bench_serve(const BenchServeArgs& a) {
  using json = nlohmann::json;
  std::string dir;
  auto m = load_model_with_tokenizer(a.ckpt, &dir);
  auto tok = load_tokenizer(dir);
  const ModelConfig& mc = m->config();
  DLCM_CHECK(a.prompt_len + 8 + a.max_tokens <= mc.max_seq_len, "--prompt-len + --max-tokens + 8 "
             "(BOS, a word's slack) = ", a.prompt_len + 8 + a.max_tokens, " exceeds the model's context of ",
             mc.max_seq_len);
  const i64 max_clients = *std::max_element(a.clients.begin(), a.clients.end());
  // Fixed text prompts of about --prompt-len tokens, a different stretch of one passage per
  // client (text, so that generate() gets exactly the same prompt).
  static const char* kPassage =
      "The old lighthouse stood at the edge of the cliff, and every night its keeper climbed the "
      "narrow stairs to light the lamp. Ships passing in the dark would see the beam sweep across "
      "the water and know that the rocks were near. In the morning the keeper wrote the weather in "
      "a worn notebook, fed the gulls that waited on the railing, and walked down to the village "
      "for bread. Children asked him about storms, and he told them about the winter when the sea "
      "froze along the shore and the lamp burned for three days without rest. ";
  auto prompt_text = [&](i64 c) {
    std::string words, text;
    for (int rep = 0; rep < 8; ++rep) words += kPassage;
    size_t at = 0;
    for (i64 k = 0; k < c % 40; ++k) at = words.find(' ', at) + 1;  // start c words in
    for (size_t end = at; end != std::string::npos; end = words.find(' ', end + 1)) {
      text = words.substr(at, end - at);
      if (i64(tok->encode(text).size()) >= a.prompt_len) break;
    }
    return text;
  };
  std::printf("dlcm bench serve: %s (%s), prompt ~%lld tokens, %lld new tokens per request, "
              "%lld requests per client, OpenMP threads %d\n",
              a.ckpt.c_str(), mc.arch.c_str(), (long long)a.prompt_len, (long long)a.max_tokens,
              (long long)a.requests, a.threads > 0 ? int(a.threads) : omp_get_max_threads());

  EngineOptions eo;
  eo.slots = a.slots > 0 ? a.slots : max_clients;
  eo.max_queue = max_clients;
  eo.threads = int(a.threads);
  ServingEngine engine(*m, *tok, eo);
  // generate() on one sequence, run on the engine's own thread (same OpenMP team as the
  // server's decoding): the reference decode speed.
  // One greedy generate() of prompt 0 on the engine's thread: tokens/s (prompt included, as the
  // server's figure).
  auto generate_tps = [&] {
    double tps = 0;
    engine.run_exclusive([&](LanguageModel& model) {
      GenerateOptions go;
      go.sampler.temperature = 0;
      go.max_new_tokens = a.max_tokens;
      go.stop_at_eos = false;
      go.max_batch = 1;
      auto t0 = ServeClock::now();
      auto out = generate(model, *tok, {prompt_text(0)}, go);
      tps = double(out[0].ids.size()) / std::chrono::duration<double>(ServeClock::now() - t0).count();
    });
    return tps;
  };
  generate_tps();  // warm-up
  std::vector<double> gen_runs;
  for (int r = 0; r < 3; ++r) gen_runs.push_back(generate_tps());
  const double gen_tps = percentile(gen_runs, 0.5);
  ServerOptions so;
  so.host = "127.0.0.1";
  so.port = 0;
  so.log = false;
  so.max_queue = max_clients;
  HttpServer server(engine, so);
  const int port = server.bind();
  std::thread srv([&] { server.run(); });
  while (!server.running()) std::this_thread::sleep_for(std::chrono::milliseconds(5));

  {  // warm-up: first-touch of the engine's buffers, the first connection
    httplib::Client cli("127.0.0.1", port);
    json body = {{"prompt", prompt_text(0)}, {"max_tokens", a.max_tokens}, {"temperature", 0},
                 {"ignore_eos", true}};
    auto res = cli.Post("/v1/completions", body.dump(), "application/json");
    DLCM_CHECK(res && res->status == 200, "bench serve: the warm-up request failed");
  }
  std::printf("generate (1 sequence): %.1f tokens/s\n", gen_tps);
  std::printf("%8s %12s %10s %10s %10s %10s %10s\n", "clients", "tokens/s", "x 1-client",
              "ttft p50", "ttft p99", "itl p50", "itl p99");
  double one = 0;
  for (i64 nc : a.clients) {
    std::vector<std::vector<double>> ttft(nc), itl(nc);
    std::vector<i64> tokens(nc, 0);
    std::atomic<int> failures{0};
    auto t0 = ServeClock::now();
    std::vector<std::thread> th;
    for (i64 c = 0; c < nc; ++c)
      th.emplace_back([&, c] {
        httplib::Client cli("127.0.0.1", port);
        cli.set_read_timeout(600, 0);
        cli.set_tcp_nodelay(true);
        json body = {{"prompt", prompt_text(c)}, {"max_tokens", a.max_tokens}, {"temperature", 0},
                     {"ignore_eos", true}, {"stream", true},
                     {"stream_options", {{"include_usage", true}}}};
        for (i64 r = 0; r < a.requests; ++r) {
          auto start = ServeClock::now(), last = start;
          bool first = true;
          const bool ok = stream_completion(cli, body, [&](const json& j) {
            if (j.contains("usage") && j["usage"].is_object())
              tokens[c] += j["usage"]["completion_tokens"].get<i64>();
            if (j["choices"].empty() || !j["choices"][0]["finish_reason"].is_null()) return;
            const auto now = ServeClock::now();
            if (first)
              ttft[c].push_back(std::chrono::duration<double>(now - start).count());
            else
              itl[c].push_back(std::chrono::duration<double>(now - last).count());
            first = false;
            last = now;
          });
          if (!ok) ++failures;
        }
      });
    for (auto& t : th) t.join();
    const double wall = std::chrono::duration<double>(ServeClock::now() - t0).count();
    std::vector<double> all_ttft, all_itl;
    i64 total = 0;
    for (i64 c = 0; c < nc; ++c) {
      all_ttft.insert(all_ttft.end(), ttft[c].begin(), ttft[c].end());
      all_itl.insert(all_itl.end(), itl[c].begin(), itl[c].end());
      total += tokens[c];
    }
    const double tps = double(total) / wall;
    if (nc == a.clients.front()) one = tps;
    std::printf("%8lld %12.1f %10.2f %8.1fms %8.1fms %8.2fms %8.2fms%s\n", (long long)nc, tps,
                one > 0 ? tps / one : 0.0, 1e3 * percentile(all_ttft, 0.5),
                1e3 * percentile(all_ttft, 0.99), 1e3 * percentile(all_itl, 0.5),
                1e3 * percentile(all_itl, 0.99),
                failures ? ("  (" + std::to_string(failures.load()) + " failed requests)").c_str() : "");
    std::fflush(stdout);
    if (nc == a.clients.front() && a.clients.front() == 1)
      std::printf("%8s server 1 client / generate: %.2f\n", "", tps / gen_tps);
  }
  // The 1-client ratio on a noisy machine: generate and one streaming request of the same prompt,
  // alternated, so both see the same load; the median of the per-pair ratios.
  if (a.pairs > 0) {
    std::vector<double> ratios;
    httplib::Client cli("127.0.0.1", port);
    cli.set_read_timeout(600, 0);
    cli.set_tcp_nodelay(true);
    const json body = {{"prompt", prompt_text(0)}, {"max_tokens", a.max_tokens}, {"temperature", 0},
                       {"ignore_eos", true}, {"stream", true},
                       {"stream_options", {{"include_usage", true}}}};
    for (i64 r = 0; r < a.pairs; ++r) {
      const double g = generate_tps();
      i64 n = 0;
      auto t0 = ServeClock::now();
      const bool ok = stream_completion(cli, body, [&](const json& j) {
        if (j.contains("usage") && j["usage"].is_object())
          n += j["usage"]["completion_tokens"].get<i64>();
      });
      DLCM_CHECK(ok, "bench serve: a 1-client request failed");
      const double srv_tps = double(n) / std::chrono::duration<double>(ServeClock::now() - t0).count();
      ratios.push_back(srv_tps / g);
    }
    std::vector<double> sorted = ratios;
    std::sort(sorted.begin(), sorted.end());
    std::printf("1 client / generate, %lld interleaved pairs: median %.2f (range %.2f-%.2f)\n",
                (long long)a.pairs, percentile(ratios, 0.5), sorted.front(), sorted.back());
  }
  server.shutdown(std::chrono::milliseconds(1000));
  srv.join();
  return 0;
}

}  // namespace

std::function<int()> add_serve_commands(CLI::App& app, CLI::App& bench) {
  auto a = std::make_shared<ServeArgs>();
  auto* s = app.add_subcommand("serve", "OpenAI-compatible HTTP server with continuous batching (docs/serving.md)");
  s->add_option("--ckpt", a->ckpt, "checkpoint or run folder")->required();
  s->add_option("--host", a->host, "address to listen on (loopback by default)");
  s->add_option("--port", a->port, "TCP port (0: a free one, printed)")->check(CLI::Range(0, 65535));
  s->add_option("--slots", a->slots, "sequences decoded together (one batched step)")->check(CLI::Range(1, 256));
  s->add_option("--ctx", a->ctx, "tokens per slot (0: the model's max_seq_len)")->check(CLI::Range(0, 1 << 20));
  s->add_option("--api-key", a->api_key, "require 'Authorization: Bearer KEY' (all but /health)");
  s->add_option("--max-queue", a->max_queue, "requests waiting for a slot before 503")->check(CLI::Range(0, 1 << 16));
  s->add_option("--max-body", a->max_body, "largest request body in bytes (413 beyond)")->check(CLI::Range(size_t(64), size_t(1) << 30));
  s->add_option("--timeout", a->timeout, "seconds a request may run before it is cancelled")->check(CLI::Range(0.001, 1e7));
  s->add_option("--threads", a->threads, "OpenMP threads of the model (0: the default)")->check(CLI::Range(0, 4096));
  s->add_option("--chat-template", a->chat_template, "chat template JSON file (docs/serving.md)");
  s->add_option("--model-name", a->model_name, "model id in responses (default: the checkpoint folder's name)");
  s->add_option("--prefill-chunk", a->prefill_chunk, "prompt tokens prefilled per engine iteration")->check(CLI::Range(1, 1 << 20));
  s->add_option("--tau", a->tau, "dlcm boundary threshold (default: the checkpoint's)");

  auto b = std::make_shared<BenchServeArgs>();
  auto* bs = bench.add_subcommand("serve", "dlcm serve: tokens/s and latency at 1..32 concurrent streaming clients vs generate");
  bs->add_option("--ckpt", b->ckpt, "checkpoint or run folder")->required();
  bs->add_option("--clients", b->clients, "concurrent streaming clients (a list; the first is the ratio's base)")
      ->delimiter(',')->check(CLI::Range(1, 256));
  bs->add_option("--prompt-len", b->prompt_len, "prompt tokens (BOS excluded)")->check(CLI::Range(1, 1 << 20));
  bs->add_option("--max-tokens", b->max_tokens, "tokens generated per request (EOS ignored)")->check(CLI::Range(1, 1 << 20));
  bs->add_option("--pairs", b->pairs, "interleaved (generate, one 1-client request) pairs for the 1-client ratio (0: none)")
      ->check(CLI::Range(0, 1000));
  bs->add_option("--requests", b->requests, "requests per client, one after another")->check(CLI::Range(1, 1000));
  bs->add_option("--slots", b->slots, "server slots (0: the most clients)")->check(CLI::Range(0, 256));
  bs->add_option("--threads", b->threads, "OpenMP threads (0: the default)")->check(CLI::Range(0, 4096));
  return [s, bs, a, b]() -> int {
    if (*s) return cmd_serve(*a);
    if (*bs) {
      if (b->threads > 0) omp_set_num_threads(int(b->threads));
      return cmd_bench_serve(*b);
    }
    return -1;
  };
}

}  // namespace dlcm
