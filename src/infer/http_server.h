// The HTTP side of `dlcm serve` (docs/serving.md): an OpenAI-compatible API over a
// ServingEngine, on cpp-httplib. Endpoints: POST /v1/completions, POST /v1/chat/completions
// (both streaming as server-sent events), GET /v1/models, GET /health, GET /metrics
// (Prometheus text), POST /tokenize, POST /detokenize, POST /v1/concepts. Errors are OpenAI
// error objects naming the field and the limit; bad input never stops the server.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "infer/serving_engine.h"

namespace dlcm {

// How chat messages become a prompt. Each message renders as prefix[role] + content +
// suffix[role]; then `generation` is appended (where the model continues) and `stop` strings
// are added to every chat request's own. The default is the plain-text template of
// docs/serving.md ("User: ...\n\n", ..., "Assistant:", stop "\n\nUser:").
struct ChatTemplate {
  std::string system_prefix = "System: ", user_prefix = "User: ",
              assistant_prefix = "Assistant: ";
  std::string suffix = "\n\n";
  std::string generation = "Assistant:";
  std::vector<std::string> stop = {"\n\nUser:"};
};
// Reads a template file (JSON, keys as ChatTemplate's fields; missing keys keep the default).
// Errors name the file and the key.
ChatTemplate load_chat_template(const std::string& path);

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;           // 0: the OS picks a free port (bind() returns it)
  std::string api_key;       // non-empty: every endpoint but /health needs "Bearer KEY"
  size_t max_body = 1 << 20; // bytes; a larger request body gets 413
  std::string model_name = "dlcm";
  ChatTemplate chat;
  int http_threads = 0;      // connection threads (0: slots + max_queue + 16)
  i64 max_queue = 64;        // for the default thread count
  bool log = true;           // one line per request on stderr
  int io_timeout_s = 30;     // a client silent this long while sending (or not reading) is dropped
};

class HttpServer {
 public:
  HttpServer(ServingEngine& engine, const ServerOptions& o);
  ~HttpServer();
  // Binds the listening socket; returns the port. Error when the address cannot be bound.
  int bind();
  // Serves until stop() (or shutdown()); call after bind(), typically on its own thread.
  void run();
  // Graceful stop: the engine takes no new requests and cancels queued ones, running ones get
  // up to `wait` to finish (then they are cancelled), then the listener closes and run()
  // returns once every connection has ended.
  void shutdown(std::chrono::milliseconds wait);
  std::string url() const;  // http://HOST:PORT after bind()
  bool running() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dlcm
