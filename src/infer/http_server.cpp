#include "infer/http_server.h"

#include <httplib.h>

#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <map>
#include <optional>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/json_util.h"
#include "infer/segment.h"

namespace dlcm {

using json = nlohmann::json;

namespace {

// Invalid UTF-8 in generated text (a lone byte-fallback token) becomes U+FFFD instead of a
// dump() exception.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    const int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (int k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
    i += n;
  }
  return true;
}

double unix_now() {
  return double(std::chrono::duration_cast<std::chrono::seconds>(
                    std::chrono::system_clock::now().time_since_epoch())
                    .count());
}

// An error answered with OpenAI's error object.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // "" -> null
  std::string code;   // "" -> null
};

[[noreturn]] void bad(const std::string& param, const std::string& msg) {
  throw ApiError{400, msg, "invalid_request_error", param, ""};
}

json error_body(const ApiError& e) {
  return {{"error",
           {{"message", e.message},
            {"type", e.type},
            {"param", e.param.empty() ? json(nullptr) : json(e.param)},
            {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
}

const char* type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  return "an object";
}

// Optional fields: absent or null -> nullopt; a wrong type or a value out of range -> 400
// naming the field and the expected value.
std::optional<i64> get_int(const json& j, const std::string& k, i64 lo, i64 hi) {
  auto it = j.find(k);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer())
    bad(k, "'" + k + "' must be an integer in [" + std::to_string(lo) + ", " +
               std::to_string(hi) + "], got " + type_name(*it));
  const bool big = it->is_number_unsigned() && it->get<uint64_t>() > uint64_t(INT64_MAX);
  const i64 v = big ? INT64_MAX : it->get<i64>();
  if (big || v < lo || v > hi)
    bad(k, "'" + k + "' must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
               "], got " + it->dump());
  return v;
}

std::optional<double> get_num(const json& j, const std::string& k, double lo, double hi) {
  auto it = j.find(k);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_number())
    bad(k, "'" + k + "' must be a number in [" + json(lo).dump() + ", " + json(hi).dump() +
               "], got " + type_name(*it));
  const double v = it->get<double>();
  if (!(v >= lo && v <= hi))
    bad(k, "'" + k + "' must be in [" + json(lo).dump() + ", " + json(hi).dump() + "], got " +
               it->dump());
  return v;
}

std::optional<bool> get_bool(const json& j, const std::string& k) {
  auto it = j.find(k);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) bad(k, "'" + k + "' must be a boolean, got " + type_name(*it));
  return it->get<bool>();
}

// A required field of the kind `is` tests (e.g. &json::is_string); absent or of another type
// -> 400 naming the field and `what` it must be.
const json& require(const json& j, const std::string& k, bool (json::*is)() const noexcept,
                    const std::string& what) {
  auto it = j.find(k);
  if (it == j.end() || !((*it).*is)())
    bad(k, "'" + k + "' must be " + what + ", got " + (it == j.end() ? "nothing" : type_name(*it)));
  return *it;
}

json parse_body(const httplib::Request& req) {
  json j;
  try {
    // bounded depth before any tree is built (core/json_util.h); the size is --max-body's
    j = parse_json_bounded(req.body, "the request body", {64, req.body.size()});
  } catch (const Error& e) {
    bad("", std::string(e.what()) + " (a JSON object in UTF-8 is expected)");
  }
  if (!j.is_object()) bad("", std::string("the request body must be a JSON object, got ") +
                                  type_name(j));
  return j;
}

// Shared sampling fields of completions and chat completions.
struct Sampling {
  SamplerConfig sampler{1.0f, 0, 1.0f};
  uint64_t seed = 0;
  std::vector<std::string> stop;
  i64 n = 1;
  bool stream = false, include_usage = false;
  bool ignore_eos = false;  // extension (as llama-server's): EOS does not end the completion
};

constexpr i64 kMaxStops = 4, kMaxN = 8, kMaxTopLogprobs = 20, kMaxPrompts = 64;

Sampling parse_sampling(const json& j) {
  Sampling s;
  if (auto t = get_num(j, "temperature", 0, 100)) {
    if (*t != 0 && float(*t) < 1e-6f) bad("temperature", "'temperature' must be 0 (greedy) or in [1e-6, 100], got " + json(*t).dump());
    s.sampler.temperature = float(*t);
  }
  if (auto p = get_num(j, "top_p", 0, 1)) s.sampler.top_p = float(*p);
  if (auto k = get_int(j, "top_k", 0, 1 << 30)) s.sampler.top_k = *k;
  if (auto sd = get_int(j, "seed", INT64_MIN, INT64_MAX)) s.seed = uint64_t(*sd);
  if (auto it = j.find("stop"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      s.stop = {it->get<std::string>()};
    } else if (it->is_array()) {
      if (i64(it->size()) > kMaxStops)
        bad("stop", "'stop' holds at most " + std::to_string(kMaxStops) + " strings, got " +
                        std::to_string(it->size()));
      for (const auto& v : *it) {
        if (!v.is_string()) bad("stop", std::string("'stop' must hold strings, got ") + type_name(v));
        s.stop.push_back(v.get<std::string>());
      }
    } else {
      bad("stop", std::string("'stop' must be a string or a list of strings, got ") + type_name(*it));
    }
    for (const auto& st : s.stop)
      if (st.empty()) bad("stop", "'stop' strings must not be empty");
  }
  if (auto n = get_int(j, "n", 1, kMaxN)) s.n = *n;
  if (auto ie = get_bool(j, "ignore_eos")) s.ignore_eos = *ie;
  if (auto st = get_bool(j, "stream")) s.stream = *st;
  if (auto it = j.find("stream_options"); it != j.end() && !it->is_null()) {
    if (!it->is_object())
      bad("stream_options", std::string("'stream_options' must be an object, got ") + type_name(*it));
    if (auto u = get_bool(*it, "include_usage")) s.include_usage = *u;
  }
  try {
    validate_sampler(s.sampler);
  } catch (const Error& e) {
    bad("temperature", e.what());
  }
  return s;
}

std::string random_id(const char* prefix) {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t base = uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  char buf[40];
  std::snprintf(buf, sizeof buf, "%s%016llx", prefix,
                (unsigned long long)counter_hash(base, counter++));
  return buf;
}

// A prompt after tokenization: ids with BOS, and the text echo returns.
struct Prompt {
  std::vector<i32> ids;
  std::string text;
};

// What one request's choices collected (non-streaming answers; usage for streams).
struct Choice {
  std::string text;
  std::vector<i32> ids;
  std::vector<TokenLogprob> lps, prompt_lps;
  std::string finish;
  i64 tokens = 0;
  bool done = false;
};

// Prometheus counters kept by the HTTP side (the engine keeps the token and latency ones).
struct RequestCounters {
  std::mutex mu;
  std::map<std::pair<std::string, int>, uint64_t> by_endpoint_status;
};

// Details of a request for its log line, filled by the handler (and a stream when it ends).
struct RequestInfo {
  std::string id, endpoint;
  i64 prompt_tokens = -1, completion_tokens = -1;
  double ttft_ms = -1;
  ServeClock::time_point start = ServeClock::now();
  int status = 0;  // a stream that failed after its 200 header (timeout, shutdown)
};

// httplib 0.11 listens with a backlog of 5: a burst of clients (32 streams connecting at once)
// overflows it and the kernel makes the rest retry after a second. Listening again on the same
// socket raises the backlog (Linux).
struct Server : httplib::Server {
  void raise_backlog() {
    if (svr_sock_ != INVALID_SOCKET) ::listen(svr_sock_, SOMAXCONN);
  }
};

}  // namespace

ChatTemplate load_chat_template(const std::string& path) {
  json j;
  try {
    j = read_json_file_bounded(path);
  } catch (const Error& e) {
    throw Error(std::string("--chat-template: ") + e.what() + "; see docs/serving.md for the format");
  }
  DLCM_CHECK(j.is_object(), "--chat-template ", path, ": expected a JSON object");
  ChatTemplate t;
  auto str = [&](const char* k, std::string& out) {
    if (!j.contains(k)) return;
    DLCM_CHECK(j[k].is_string(), "--chat-template ", path, ": '", k, "' must be a string");
    out = j[k].get<std::string>();
  };
  str("system_prefix", t.system_prefix);
  str("user_prefix", t.user_prefix);
  str("assistant_prefix", t.assistant_prefix);
  str("suffix", t.suffix);
  str("generation", t.generation);
  if (j.contains("stop")) {
    DLCM_CHECK(j["stop"].is_array(), "--chat-template ", path, ": 'stop' must be a list of strings");
    t.stop.clear();
    for (const auto& s : j["stop"]) {
      DLCM_CHECK(s.is_string() && !s.get<std::string>().empty(), "--chat-template ", path,
                 ": 'stop' must hold non-empty strings");
      t.stop.push_back(s.get<std::string>());
    }
  }
  for (auto it = j.begin(); it != j.end(); ++it)
    DLCM_CHECK(it.key() == "system_prefix" || it.key() == "user_prefix" ||
                   it.key() == "assistant_prefix" || it.key() == "suffix" ||
                   it.key() == "generation" || it.key() == "stop",
               "--chat-template ", path, ": unknown key '", it.key(),
               "' (expected system_prefix, user_prefix, assistant_prefix, suffix, generation, stop)");
  return t;
}

struct HttpServer::Impl {
  ServingEngine& eng;
  const Tokenizer& tok;
  ServerOptions o;
  Server svr;
  int port = 0;
  RequestCounters counters;
  std::mutex info_mu;
  std::map<std::string, std::shared_ptr<RequestInfo>> infos;  // by X-Request-Id

  Impl(ServingEngine& e, const ServerOptions& opt) : eng(e), tok(e.tokenizer()), o(opt) {}

  // ---- tokens ----

  std::vector<i32> ids_from_json(const json& a, const char* param) const {
    std::vector<i32> ids;
    for (const auto& v : a) {
      if (!v.is_number_integer())
        bad(param, std::string("'") + param + "' token ids must be integers, got " + type_name(v));
      const bool big = v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT32_MAX);
      const i64 id = big ? INT64_MAX : v.get<i64>();
      if (id < 0 || id >= tok.vocab_size())
        bad(param, std::string("'") + param + "' token id " + v.dump() + " is out of the vocabulary [0, " +
                       std::to_string(tok.vocab_size()) + ")");
      ids.push_back(i32(id));
    }
    return ids;
  }

  Prompt prompt_from_text(const std::string& s) const {
    if (s.empty()) bad("prompt", "'prompt' is empty; give some text to continue");
    Prompt p;
    p.text = s;
    p.ids = {tok.bos_id()};
    auto e = tok.encode(s);
    p.ids.insert(p.ids.end(), e.begin(), e.end());
    return p;
  }

  Prompt prompt_from_ids(std::vector<i32> ids) const {
    if (ids.empty()) bad("prompt", "'prompt' is an empty list of token ids");
    Prompt p;
    p.text = tok.decode(ids);
    if (ids[0] != tok.bos_id()) ids.insert(ids.begin(), tok.bos_id());
    p.ids = std::move(ids);
    return p;
  }

  std::vector<Prompt> parse_prompts(const json& j) const {
    auto it = j.find("prompt");
    if (it == j.end() || it->is_null()) bad("prompt", "'prompt' is required");
    const json& p = *it;
    std::vector<Prompt> out;
    if (p.is_string()) {
      out.push_back(prompt_from_text(p.get<std::string>()));
    } else if (p.is_array()) {
      if (p.empty()) bad("prompt", "'prompt' is an empty list");
      if (i64(p.size()) > kMaxPrompts && !p[0].is_number_integer())
        bad("prompt", "'prompt' holds at most " + std::to_string(kMaxPrompts) + " prompts, got " +
                          std::to_string(p.size()));
      if (p[0].is_number_integer()) {
        out.push_back(prompt_from_ids(ids_from_json(p, "prompt")));
      } else if (p[0].is_string()) {
        for (const auto& s : p) {
          if (!s.is_string())
            bad("prompt", std::string("'prompt' must be a list of strings only, got ") + type_name(s));
          out.push_back(prompt_from_text(s.get<std::string>()));
        }
      } else if (p[0].is_array()) {
        for (const auto& s : p) {
          if (!s.is_array())
            bad("prompt", std::string("'prompt' must be a list of token-id lists only, got ") + type_name(s));
          out.push_back(prompt_from_ids(ids_from_json(s, "prompt")));
        }
      } else {
        bad("prompt", std::string("'prompt' must be a string, a list of strings, a list of token ids "
                                  "or a list of such lists; the list holds ") + type_name(p[0]));
      }
    } else {
      bad("prompt", std::string("'prompt' must be a string, a list of strings, a list of token ids "
                                "or a list of such lists, got ") + type_name(p));
    }
    return out;
  }

  // Context checks shared by both completion endpoints (messages name the limit).
  void check_room(const Prompt& p, i64 max_tokens, const char* param, const char* mt_name) const {
    const i64 P = p.ids.size(), ctx = eng.ctx();
    if (P > ctx)
      bad(param, "the prompt is " + std::to_string(P) + " tokens (with BOS), over the context of " +
                     std::to_string(ctx) + " tokens per request");
    if (P + max_tokens > ctx)
      bad(mt_name, std::string("'") + mt_name + "' = " + std::to_string(max_tokens) +
                       " does not fit: the prompt takes " + std::to_string(P) +
                       " tokens (with BOS) of the context of " + std::to_string(ctx) +
                       ", leaving room for " + std::to_string(ctx - P));
  }

  // ---- responses ----

  void send_json(httplib::Response& res, int status, const json& j) {
    res.status = status;
    res.set_content(dump(j), "application/json");
  }
  void send_error(httplib::Response& res, const ApiError& e) {
    send_json(res, e.status, error_body(e));
  }

  std::shared_ptr<RequestInfo> new_info(httplib::Response& res, const std::string& id,
                                        const std::string& endpoint) {
    auto info = std::make_shared<RequestInfo>();
    info->id = id;
    info->endpoint = endpoint;
    res.set_header("X-Request-Id", id);
    std::lock_guard<std::mutex> l(info_mu);
    infos[id] = info;
    return info;
  }

  // A token's text in logprobs. Bytes that are not whole UTF-8 characters (byte-fallback
  // tokens) are written "bytes:\\xNN..." as OpenAI does, so that distinct tokens keep distinct
  // keys in top_logprobs; ids the model has but the tokenizer lacks (never sampled, but they
  // can be among the top alternatives) are "<id N>".
  std::string piece(i32 id) const {
    if (id >= tok.vocab_size()) return "<id " + std::to_string(id) + ">";
    std::string p = tok.decode_piece(id);
    if (valid_utf8(p)) return p;
    std::string out = "bytes:";
    char hex[8];
    for (unsigned char c : p) {
      std::snprintf(hex, sizeof hex, "\\x%02x", c);
      out += hex;
    }
    return out;
  }

  json top_map(const TokenLogprob& t) const {
    json m = json::object();
    for (const auto& [id, lp] : t.top) {
      const std::string p = piece(id);
      if (!m.contains(p)) m[p] = lp;  // pieces shared by ids: the likelier one
    }
    return m;
  }

  // Completions' logprobs object for the tokens of one choice (echoed prompt tokens first).
  json completion_logprobs(const std::vector<i32>& ids, const std::vector<TokenLogprob>& lps,
                           i64 top_n, size_t offset0) const {
    json toks = json::array(), lp = json::array(), top = json::array(), off = json::array();
    size_t at = offset0;
    for (size_t i = 0; i < ids.size(); ++i) {
      const std::string p = piece(ids[i]);
      toks.push_back(p);
      lp.push_back(lps[i].logprob);
      top.push_back(top_n > 0 ? top_map(lps[i]) : json(nullptr));
      off.push_back(at);
      // offsets count the piece's bytes in the returned text, not its "bytes:\\xNN" spelling
      if (ids[i] < tok.vocab_size()) at += tok.decode_piece(ids[i]).size();
    }
    return {{"tokens", toks}, {"token_logprobs", lp}, {"top_logprobs", top}, {"text_offset", off}};
  }

  json chat_logprob_entry(i32 id, const TokenLogprob& t) const {
    auto entry = [&](i32 i, double lp) {
      const std::string p = piece(i);
      json bytes = json::array();
      for (unsigned char c : p) bytes.push_back(int(c));
      return json{{"token", p}, {"logprob", lp}, {"bytes", bytes}};
    };
    json e = entry(id, t.logprob);
    json top = json::array();
    for (const auto& [i, lp] : t.top) top.push_back(entry(i, lp));
    e["top_logprobs"] = top;
    return e;
  }

  // ---- completions (both endpoints) ----

  struct Job {
    bool chat = false;
    std::string id, object;
    std::vector<Prompt> prompts;
    i64 n = 1, logprobs = -1;  // logprobs < 0: none
    bool echo = false, stream = false, include_usage = false;
    std::vector<SeqSpec> seqs;
  };

  void run_job(const httplib::Request& req, httplib::Response& res, Job job,
               std::shared_ptr<RequestInfo> info) {
    const double created = unix_now();
    i64 prompt_tokens = 0;
    for (const auto& p : job.prompts) prompt_tokens += i64(p.ids.size()) - 1;
    info->prompt_tokens = prompt_tokens;
    auto ch = std::make_shared<SeqChannel>();
    const size_t nseq = job.seqs.size();
    switch (eng.submit(std::move(job.seqs), ch)) {
      case ServingEngine::Submit::kOk:
        break;
      case ServingEngine::Submit::kQueueFull:
        throw ApiError{503, "the server is busy: the request queue is full (--max-queue " +
                                std::to_string(o.max_queue) + "); retry later",
                       "overloaded_error", "", "queue_full"};
      case ServingEngine::Submit::kShuttingDown:
        throw ApiError{503, "the server is shutting down", "overloaded_error", "", "shutting_down"};
    }
    const std::string model = o.model_name;
    auto base = [id = job.id, object = job.object, created, model]() {
      return json{{"id", id}, {"object", object}, {"created", i64(created)}, {"model", model}};
    };
    auto usage = [prompt_tokens](const std::vector<Choice>& cs) {
      i64 c = 0;
      for (const auto& x : cs) c += x.tokens;
      return json{{"prompt_tokens", prompt_tokens}, {"completion_tokens", c},
                  {"total_tokens", prompt_tokens + c}};
    };
    const auto start = ServeClock::now();

    if (!job.stream) {
      std::vector<Choice> cs(nseq);
      std::vector<SeqEvent> evs;
      size_t done = 0;
      while (done < nseq) {
        evs.clear();
        ch->pop_all(evs, std::chrono::milliseconds(100));
        for (auto& e : evs) {
          Choice& c = cs[e.seq];
          if (e.kind == SeqEvent::kError) {
            ch->cancel();
            throw ApiError{e.status, e.text, "server_error", "", e.status == 504 ? "timeout" : "shutting_down"};
          }
          if (e.kind == SeqEvent::kPrompt) c.prompt_lps = std::move(e.prompt_lp);
          if (e.kind == SeqEvent::kToken) {
            if (info->ttft_ms < 0)
              info->ttft_ms = std::chrono::duration<double, std::milli>(ServeClock::now() - start).count();
            c.text += e.text;
            c.ids.push_back(e.id);
            c.lps.push_back(std::move(e.lp));
          }
          if (e.kind == SeqEvent::kDone) {
            c.text += e.text;
            c.finish = e.finish;
            c.tokens = e.completion_tokens;
            c.done = true;
            ++done;
          }
        }
      }
      json choices = json::array();
      for (size_t k = 0; k < nseq; ++k) {
        const Choice& c = cs[k];
        const Prompt& p = job.prompts[k / job.n];
        json ch_j;
        if (job.chat) {
          ch_j = {{"index", k},
                  {"message", {{"role", "assistant"}, {"content", c.text}}},
                  {"finish_reason", c.finish},
                  {"logprobs", nullptr}};
          if (job.logprobs >= 0) {
            json content = json::array();
            for (size_t i = 0; i < c.ids.size(); ++i) content.push_back(chat_logprob_entry(c.ids[i], c.lps[i]));
            ch_j["logprobs"] = {{"content", content}};
          }
        } else {
          ch_j = {{"index", k},
                  {"text", job.echo ? p.text + c.text : c.text},
                  {"finish_reason", c.finish},
                  {"logprobs", nullptr}};
          if (job.logprobs >= 0) {
            std::vector<i32> ids;
            std::vector<TokenLogprob> lps;
            if (job.echo) {
              ids.assign(p.ids.begin() + 1, p.ids.end());
              lps = c.prompt_lps;
            }
            ids.insert(ids.end(), c.ids.begin(), c.ids.end());
            lps.insert(lps.end(), c.lps.begin(), c.lps.end());
            ch_j["logprobs"] = completion_logprobs(ids, lps, job.logprobs, 0);
          }
        }
        choices.push_back(ch_j);
      }
      json out = base();
      out["choices"] = choices;
      out["usage"] = usage(cs);
      info->completion_tokens = out["usage"]["completion_tokens"];
      ch->cancel();
      send_json(res, 200, out);
      return;
    }

    // Streaming: one provider call writes every event as it comes; a failed write (the client
    // went away) cancels the request, which frees its slots at the engine's next iteration.
    auto state = std::make_shared<std::vector<Choice>>(nseq);
    res.set_header("Cache-Control", "no-cache");
    auto shared_job = std::make_shared<Job>(std::move(job));
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, ch, state, shared_job, base, usage, info, start, nseq](size_t, httplib::DataSink& sink) {
          const Job& jb = *shared_job;
          auto send = [&](const json& j) {
            const std::string s = "data: " + dump(j) + "\n\n";
            return sink.write(s.data(), s.size());
          };
          auto chunk = [&](json choice) {
            json j = base();
            j["choices"] = json::array({std::move(choice)});
            return send(j);
          };
          // Opening chunks: the assistant role (chat) or the echoed prompt (completions).
          for (size_t k = 0; k < nseq; ++k) {
            bool ok = true;
            if (jb.chat)
              ok = chunk({{"index", k}, {"delta", {{"role", "assistant"}, {"content", ""}}},
                          {"logprobs", nullptr}, {"finish_reason", nullptr}});
            else if (jb.echo && !(jb.logprobs >= 0))
              ok = chunk({{"index", k}, {"text", jb.prompts[k / jb.n].text},
                          {"logprobs", nullptr}, {"finish_reason", nullptr}});
            if (!ok) {
              ch->cancel();
              return false;
            }
          }
          std::vector<SeqEvent> evs;
          size_t done = 0;
          while (done < nseq) {
            evs.clear();
            if (!ch->pop_all(evs, std::chrono::milliseconds(50))) {
              if (!sink.is_writable()) {
                ch->cancel();
                return false;
              }
              continue;
            }
            for (auto& e : evs) {
              Choice& c = (*state)[e.seq];
              bool ok = true;
              if (e.kind == SeqEvent::kError) {
                ch->cancel();
                info->status = e.status;
                send(error_body(ApiError{e.status, e.text, "server_error", "",
                                         e.status == 504 ? "timeout" : "shutting_down"}));
                const std::string d = "data: [DONE]\n\n";
                sink.write(d.data(), d.size());
                sink.done();
                return true;
              }
              if (e.kind == SeqEvent::kPrompt && jb.echo) {
                // Echo with logprobs: the prompt text with its tokens' log-probabilities.
                const Prompt& p = jb.prompts[e.seq / jb.n];
                std::vector<i32> ids(p.ids.begin() + 1, p.ids.end());
                ok = chunk({{"index", e.seq}, {"text", p.text},
                            {"logprobs", completion_logprobs(ids, e.prompt_lp, jb.logprobs, 0)},
                            {"finish_reason", nullptr}});
              }
              if (e.kind == SeqEvent::kToken) {
                if (info->ttft_ms < 0)
                  info->ttft_ms = std::chrono::duration<double, std::milli>(ServeClock::now() - start).count();
                c.tokens++;
                const bool lp = jb.logprobs >= 0;
                if (!e.text.empty() || lp) {
                  if (jb.chat)
                    ok = chunk({{"index", e.seq}, {"delta", {{"content", e.text}}},
                                {"logprobs", lp ? json{{"content", json::array({chat_logprob_entry(e.id, e.lp)})}}
                                                : json(nullptr)},
                                {"finish_reason", nullptr}});
                  else
                    ok = chunk({{"index", e.seq}, {"text", e.text},
                                {"logprobs", lp ? completion_logprobs({e.id}, {e.lp}, jb.logprobs, 0) : json(nullptr)},
                                {"finish_reason", nullptr}});
                }
              }
              if (e.kind == SeqEvent::kDone) {
                c.tokens = e.completion_tokens;
                ++done;
                if (jb.chat)
                  ok = chunk({{"index", e.seq},
                              {"delta", e.text.empty() ? json::object() : json{{"content", e.text}}},
                              {"logprobs", nullptr}, {"finish_reason", e.finish}});
                else
                  ok = chunk({{"index", e.seq}, {"text", e.text}, {"logprobs", nullptr},
                              {"finish_reason", e.finish}});
              }
              if (!ok) {
                ch->cancel();
                return false;
              }
            }
          }
          json u = usage(*state);
          info->completion_tokens = u["completion_tokens"];
          if (jb.include_usage) {
            json j = base();
            j["choices"] = json::array();
            j["usage"] = u;
            if (!send(j)) return false;
          }
          const std::string d = "data: [DONE]\n\n";
          if (!sink.write(d.data(), d.size())) return false;
          sink.done();
          return true;
        },
        [ch](bool) { ch->cancel(); });  // whatever ended the response, the request ends too
  }

  void completions(const httplib::Request& req, httplib::Response& res) {
    const json j = parse_body(req);
    Job job;
    job.id = random_id("cmpl-");
    auto info = new_info(res, job.id, "/v1/completions");
    job.object = "text_completion";
    job.prompts = parse_prompts(j);
    Sampling s = parse_sampling(j);
    job.n = s.n;
    job.stream = s.stream;
    job.include_usage = s.include_usage;
    job.echo = get_bool(j, "echo").value_or(false);
    job.logprobs = get_int(j, "logprobs", 0, kMaxTopLogprobs).value_or(-1);
    const i64 max_tokens = get_int(j, "max_tokens", 0, eng.ctx()).value_or(16);
    if (max_tokens == 0 && !job.echo)
      bad("max_tokens", "'max_tokens' must be >= 1 (0 is allowed only with 'echo': true)");
    if (i64(job.prompts.size()) * job.n > kMaxPrompts)
      bad("n", "prompts x n must be at most " + std::to_string(kMaxPrompts) + ", got " +
                   std::to_string(job.prompts.size() * job.n));
    for (size_t i = 0; i < job.prompts.size(); ++i) {
      check_room(job.prompts[i], max_tokens, "prompt", "max_tokens");
      for (i64 c = 0; c < job.n; ++c) {
        SeqSpec sp;
        sp.prompt = job.prompts[i].ids;
        sp.max_tokens = max_tokens;
        sp.sampler = s.sampler;
        sp.seed = s.seed;
        sp.rng_index = i64(i) * job.n + c;
        sp.stop = s.stop;
        sp.stop_at_eos = !s.ignore_eos;
        sp.logprobs = job.logprobs;
        sp.prompt_logprobs = job.echo && job.logprobs >= 0;
        job.seqs.push_back(std::move(sp));
      }
    }
    run_job(req, res, std::move(job), info);
  }

  std::string render_chat(const json& j) const {
    auto it = j.find("messages");
    if (it == j.end() || it->is_null()) bad("messages", "'messages' is required");
    if (!it->is_array()) bad("messages", std::string("'messages' must be a list, got ") + type_name(*it));
    if (it->empty()) bad("messages", "'messages' is empty; give at least one message");
    const ChatTemplate& t = o.chat;
    std::string out;
    for (size_t i = 0; i < it->size(); ++i) {
      const json& m = (*it)[i];
      const std::string at = "messages[" + std::to_string(i) + "]";
      if (!m.is_object()) bad("messages", at + " must be an object, got " + type_name(m));
      auto role = m.find("role");
      if (role == m.end() || !role->is_string())
        bad("messages", at + ".role must be one of system, user, assistant");
      const std::string r = role->get<std::string>();
      const std::string* prefix = r == "system" || r == "developer" ? &t.system_prefix
                                  : r == "user"                     ? &t.user_prefix
                                  : r == "assistant"                ? &t.assistant_prefix
                                                                    : nullptr;
      if (!prefix) bad("messages", at + ".role must be one of system, user, assistant, got '" + r + "'");
      auto c = m.find("content");
      std::string text;
      if (c == m.end() || c->is_null()) {
        bad("messages", at + ".content is required (a string or a list of text parts)");
      } else if (c->is_string()) {
        text = c->get<std::string>();
      } else if (c->is_array()) {
        for (const auto& part : *c) {
          if (!part.is_object() || part.value("type", json()) != "text" || !part.contains("text") ||
              !part["text"].is_string())
            bad("messages", at + ".content parts must be {\"type\": \"text\", \"text\": string}");
          text += part["text"].get<std::string>();
        }
      } else {
        bad("messages", at + ".content must be a string or a list of text parts, got " + type_name(*c));
      }
      out += *prefix + text + t.suffix;
    }
    return out + t.generation;
  }

  void chat_completions(const httplib::Request& req, httplib::Response& res) {
    const json j = parse_body(req);
    Job job;
    job.chat = true;
    job.id = random_id("chatcmpl-");
    auto info = new_info(res, job.id, "/v1/chat/completions");
    job.object = "chat.completion";
    Prompt p = prompt_from_text(render_chat(j));
    job.prompts = {p};
    Sampling s = parse_sampling(j);
    job.n = s.n;
    job.stream = s.stream;
    if (job.stream) job.object = "chat.completion.chunk";
    job.include_usage = s.include_usage;
    const bool lp = get_bool(j, "logprobs").value_or(false);
    const auto top = get_int(j, "top_logprobs", 0, kMaxTopLogprobs);
    if (top && !lp) bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    job.logprobs = lp ? top.value_or(0) : -1;
    auto mt = get_int(j, "max_completion_tokens", 1, eng.ctx());
    const char* mt_name = "max_completion_tokens";
    if (!mt) {
      mt = get_int(j, "max_tokens", 1, eng.ctx());
      mt_name = "max_tokens";
    }
    const i64 max_tokens = mt.value_or(16);
    check_room(p, max_tokens, "messages", mt_name);
    std::vector<std::string> stop = s.stop;
    stop.insert(stop.end(), o.chat.stop.begin(), o.chat.stop.end());
    for (i64 c = 0; c < job.n; ++c) {
      SeqSpec sp;
      sp.prompt = p.ids;
      sp.max_tokens = max_tokens;
      sp.sampler = s.sampler;
      sp.seed = s.seed;
      sp.rng_index = c;
      sp.stop = stop;
      sp.stop_at_eos = !s.ignore_eos;
      sp.logprobs = job.logprobs;
      job.seqs.push_back(std::move(sp));
    }
    run_job(req, res, std::move(job), info);
  }

  // ---- the other endpoints ----

  void models(const httplib::Request&, httplib::Response& res) {
    const ModelConfig& mc = eng.config();
    json meta = {{"arch", mc.is_dlcm() ? "dlcm" : "baseline"},
                 {"n_ctx", eng.ctx()},
                 {"vocab_size", mc.vocab_size},
                 {"params", params_}};
    send_json(res, 200,
              {{"object", "list"},
               {"data", json::array({{{"id", o.model_name},
                                      {"object", "model"},
                                      {"created", i64(started_)},
                                      {"owned_by", "dlcm"},
                                      {"meta", meta}}})}});
  }

  void health(const httplib::Request&, httplib::Response& res) {
    EngineStats s = eng.stats();
    send_json(res, 200, {{"status", "ok"},
                         {"slots_idle", s.slots_total - s.slots_busy},
                         {"slots_busy", s.slots_busy},
                         {"queue", s.queue}});
  }

  void metrics(const httplib::Request&, httplib::Response& res) {
    EngineStats s = eng.stats();
    std::ostringstream out;
    out << "# HELP dlcm_requests_total HTTP requests by endpoint and status.\n"
           "# TYPE dlcm_requests_total counter\n";
    {
      std::lock_guard<std::mutex> l(counters.mu);
      for (const auto& [k, v] : counters.by_endpoint_status)
        out << "dlcm_requests_total{endpoint=\"" << k.first << "\",status=\"" << k.second
            << "\"} " << v << "\n";
    }
    auto gauge = [&](const char* name, const char* help, const char* type, i64 v) {
      out << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n"
          << name << " " << v << "\n";
    };
    gauge("dlcm_prompt_tokens_total", "Prompt tokens admitted (BOS excluded).", "counter", s.prompt_tokens);
    gauge("dlcm_generated_tokens_total", "Tokens generated.", "counter", s.generated_tokens);
    gauge("dlcm_queue_depth", "Requests waiting for a slot.", "gauge", s.queue);
    gauge("dlcm_slots_busy", "Slots holding a sequence.", "gauge", s.slots_busy);
    gauge("dlcm_slots_total", "Slots (--slots).", "gauge", s.slots_total);
    auto hist = [&](const char* name, const char* help, const Histogram& h) {
      out << "# HELP " << name << " " << help << "\n# TYPE " << name << " histogram\n";
      uint64_t c = 0;
      for (size_t b = 0; b < h.bounds.size(); ++b) {
        c += h.counts[b];
        out << name << "_bucket{le=\"" << h.bounds[b] << "\"} " << c << "\n";
      }
      out << name << "_bucket{le=\"+Inf\"} " << h.n << "\n"
          << name << "_sum " << h.sum << "\n"
          << name << "_count " << h.n << "\n";
    };
    hist("dlcm_time_to_first_token_seconds", "From queueing to the first generated token.", s.ttft);
    hist("dlcm_inter_token_latency_seconds", "Between consecutive tokens of a sequence.", s.itl);
    res.status = 200;
    res.set_content(out.str(), "text/plain; version=0.0.4");
  }

  void tokenize(const httplib::Request& req, httplib::Response& res) {
    const json j = parse_body(req);
    const json& content = require(j, "content", &json::is_string, "a string");
    std::vector<i32> ids;
    if (get_bool(j, "add_bos").value_or(false)) ids.push_back(tok.bos_id());
    auto e = tok.encode(content.get<std::string>());
    ids.insert(ids.end(), e.begin(), e.end());
    json out = {{"tokens", ids}};
    if (get_bool(j, "with_pieces").value_or(false)) {
      json pieces = json::array();
      for (i32 id : ids) pieces.push_back(tok.decode_piece(id));
      out["pieces"] = pieces;
    }
    send_json(res, 200, out);
  }

  void detokenize(const httplib::Request& req, httplib::Response& res) {
    const json j = parse_body(req);
    const json& ids = require(j, "tokens", &json::is_array, "a list of token ids");
    send_json(res, 200, {{"content", tok.decode(ids_from_json(ids, "tokens"))}});
  }

  void concepts(const httplib::Request& req, httplib::Response& res) {
    const json j = parse_body(req);
    if (!eng.config().is_dlcm())
      bad("", "this model (" + o.model_name + ") is a baseline: it has no concepts; /v1/concepts "
              "needs a dlcm checkpoint");
    const json& text = require(j, "text", &json::is_string, "a string");
    if (text.get<std::string>().empty()) bad("text", "'text' is empty; nothing to segment");
    const float tau = float(get_num(j, "tau", 0, 1).value_or(-1));
    if (tau == 0) bad("tau", "'tau' must be in (0, 1]");
    std::vector<SegmentedText> seg;
    eng.run_exclusive([&](LanguageModel& m) {
      seg = segment_texts(m, tok, {"text"}, {text.get<std::string>()}, tau);
    });
    const SegmentedText& t = seg[0];
    json toks = json::array();
    for (i64 i = 0; i < t.tokens(); ++i)
      toks.push_back({{"id", t.ids[i]},
                      {"piece", t.shown[i]},
                      {"p", t.p[i]},
                      {"boundary", bool(t.b[i])},
                      {"concept", t.concept_index[i]}});
    send_json(res, 200, {{"model", o.model_name},
                         {"tokens", toks},
                         {"n_concepts", t.concepts()},
                         {"compression", t.tokens_per_concept()},
                         {"tau", t.tau}});
  }

  // ---- plumbing ----

  i64 params_ = 0;
  double started_ = unix_now();

  using Handler = void (Impl::*)(const httplib::Request&, httplib::Response&);

  // Runs a handler with the API key check and turns every failure into an error object.
  void call(Handler h, bool open, const httplib::Request& req, httplib::Response& res) {
    try {
      if (!o.api_key.empty() && !open) {
        const std::string auth = req.get_header_value("Authorization");
        if (auth.empty())
          throw ApiError{401, "missing API key: send the header 'Authorization: Bearer KEY'",
                         "authentication_error", "", "invalid_api_key"};
        if (auth != "Bearer " + o.api_key)
          throw ApiError{401, "invalid API key", "authentication_error", "", "invalid_api_key"};
      }
      (this->*h)(req, res);
    } catch (const ApiError& e) {
      send_error(res, e);
    } catch (const Error& e) {
      send_error(res, ApiError{400, e.what(), "invalid_request_error", "", ""});
    } catch (const std::exception& e) {
      send_error(res, ApiError{500, std::string("internal error: ") + e.what(), "server_error", "", ""});
    }
  }

  void route(const std::string& path, const char* method, Handler h, bool open = false) {
    auto fn = [this, h, open](const httplib::Request& req, httplib::Response& res) {
      call(h, open, req, res);
    };
    auto wrong = [method](const httplib::Request& req, httplib::Response& res) {
      res.set_header("Allow", method);
      res.status = 405;
      res.set_content(dump(error_body(ApiError{405, "method " + req.method + " is not allowed on " +
                                                        req.path + "; use " + method,
                                               "invalid_request_error", "", "method_not_allowed"})),
                      "application/json");
    };
    const bool get = std::string(method) == "GET";
    svr.Get(path, get ? httplib::Server::Handler(fn) : httplib::Server::Handler(wrong));
    svr.Post(path, get ? httplib::Server::Handler(wrong) : httplib::Server::Handler(fn));
    svr.Put(path, wrong);
    svr.Patch(path, wrong);
    svr.Delete(path, wrong);
  }

  static std::string endpoint_label(const std::string& path) {
    static const char* known[] = {"/v1/completions", "/v1/chat/completions", "/v1/models",
                                  "/health", "/metrics", "/tokenize", "/detokenize", "/v1/concepts"};
    for (const char* k : known)
      if (path == k) return k;
    return "other";
  }

  void setup() {
    params_ = 0;
    eng.run_exclusive([&](LanguageModel& m) { params_ = m.params().total(); });
    route("/v1/completions", "POST", &Impl::completions);
    route("/v1/chat/completions", "POST", &Impl::chat_completions);
    route("/v1/models", "GET", &Impl::models);
    route("/health", "GET", &Impl::health, true);
    route("/metrics", "GET", &Impl::metrics);
    route("/tokenize", "POST", &Impl::tokenize);
    route("/detokenize", "POST", &Impl::detokenize);
    route("/v1/concepts", "POST", &Impl::concepts);
    svr.set_payload_max_length(o.max_body);
    // Stream events are small writes: without TCP_NODELAY, Nagle's algorithm holds each one
    // until the previous is acknowledged (delayed ACKs: tens of ms per token).
    svr.set_tcp_nodelay(true);
    // Streams hold a connection thread each: enough for every slot, the queue and spares.
    const int threads = o.http_threads > 0 ? o.http_threads : int(eng.slots() + o.max_queue + 16);
    svr.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    svr.set_read_timeout(o.io_timeout_s, 0);  // a client stuck sending its body is dropped
    svr.set_write_timeout(o.io_timeout_s, 0);
    // Answers that httplib makes itself (404, 413, a malformed request) get an error object.
    svr.set_error_handler(httplib::Server::HandlerWithResponse([this](const httplib::Request& req,
                                                                      httplib::Response& res) {
      if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
      ApiError e;
      e.status = res.status;
      if (res.status == 404) {
        e.type = "not_found_error";
        e.message = "no endpoint " + req.path + " (see docs/serving.md)";
      } else if (res.status == 413) {
        e.message = "the request body is over the server's --max-body of " +
                    std::to_string(o.max_body) + " bytes";
        e.code = "body_too_large";
      } else {
        e.message = "malformed HTTP request (" + std::to_string(res.status) + ")";
      }
      send_error(res, e);
      return httplib::Server::HandlerResponse::Handled;
    }));
    svr.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "unknown";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      send_error(res, ApiError{500, "internal error: " + what, "server_error", "", ""});
    });
    // One line per request, after its answer was written (for streams: after the last event).
    svr.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
      std::shared_ptr<RequestInfo> info;
      const std::string id = res.get_header_value("X-Request-Id");
      if (!id.empty()) {
        std::lock_guard<std::mutex> l(info_mu);
        auto it = infos.find(id);
        if (it != infos.end()) {
          info = it->second;
          infos.erase(it);
        }
      }
      const std::string ep = endpoint_label(req.path);
      const int status = info && info->status ? info->status : res.status;
      {
        std::lock_guard<std::mutex> l(counters.mu);
        ++counters.by_endpoint_status[{ep, status}];
      }
      if (!o.log) return;
      const double total = info ? std::chrono::duration<double, std::milli>(ServeClock::now() - info->start).count() : 0;
      std::fprintf(stderr, "[serve] %s %s %s prompt_tokens=%lld completion_tokens=%lld ttft_ms=%.1f total_ms=%.1f status=%d\n",
                   id.empty() ? "-" : id.c_str(), req.method.c_str(), req.path.c_str(),
                   info ? (long long)info->prompt_tokens : -1LL,
                   info ? (long long)info->completion_tokens : -1LL,
                   info ? info->ttft_ms : -1.0, total, status);
    });
  }
};

HttpServer::HttpServer(ServingEngine& engine, const ServerOptions& o)
    : impl_(std::make_unique<Impl>(engine, o)) {
  impl_->setup();
}

HttpServer::~HttpServer() {
  if (impl_->svr.is_running()) impl_->svr.stop();
}

int HttpServer::bind() {
  // A client that vanishes mid-stream must not kill the process with SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  if (impl_->o.port == 0) {
    impl_->port = impl_->svr.bind_to_any_port(impl_->o.host);
    DLCM_CHECK(impl_->port > 0, "--host ", impl_->o.host, ": cannot listen on any port there");
  } else {
    DLCM_CHECK(impl_->svr.bind_to_port(impl_->o.host, impl_->o.port), "--host ", impl_->o.host,
               " --port ", impl_->o.port, ": cannot listen there (in use, or not an address of "
               "this machine); try --port 0 for a free port");
    impl_->port = impl_->o.port;
  }
  impl_->svr.raise_backlog();
  return impl_->port;
}

void HttpServer::run() { impl_->svr.listen_after_bind(); }

void HttpServer::shutdown(std::chrono::milliseconds wait) {
  impl_->eng.shutdown(wait);
  impl_->svr.stop();
}

std::string HttpServer::url() const {
  return "http://" + impl_->o.host + ":" + std::to_string(impl_->port);
}

bool HttpServer::running() const { return impl_->svr.is_running(); }

}  // namespace dlcm
