// dlcm_example CONFIG DATA OUT: trains a model with the library (a log line per record), loads
// the checkpoint, and shows tokenize, forward, boundaries (DLCM) and streaming generation.
#include <dlcm/dlcm.h>

#include <cstdio>
#include <exception>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s CONFIG DATA OUT\n", argv[0]);
    return 2;
  }
  try {
    std::printf("dlcm %s\n", dlcm::api::version().c_str());
    dlcm::api::TrainConfig tc;
    tc.config = argv[1];
    tc.data = argv[2];
    tc.out = argv[3];
    tc.final_eval = false;
    int records = 0;
    dlcm::api::TrainResult r =
        dlcm::api::train(tc, [&](const std::string&) { ++records; });
    std::printf("trained to step %lld (%d log records): %s\n", (long long)r.step, records,
                r.checkpoint.c_str());

    dlcm::api::Model m = dlcm::api::Model::load(r.checkpoint);
    std::vector<int32_t> ids = m.tokenize("the concept model");
    ids.insert(ids.begin(), m.bos_id());
    std::printf("%s model, %zu tokens: '%s'\n", m.arch().c_str(), ids.size(),
                m.detokenize(ids).c_str());
    std::vector<float> logits = m.forward(ids);
    std::printf("logits: %zu = %zu x %lld, first %.4f\n", logits.size(), ids.size(),
                (long long)m.vocab_size(), logits[0]);
    if (m.arch() == "dlcm") {
      dlcm::api::Boundaries b = m.boundaries(ids);
      int concepts = 0;
      for (uint8_t x : b.b) concepts += x;
      std::printf("concepts: %d over %zu tokens\n", concepts, ids.size());
    }
    dlcm::api::GenerateConfig g;
    g.max_new_tokens = 8;
    int pieces = 0;
    std::string text = m.generate("the", g, [&](const std::string& piece) {
      ++pieces;
      std::fputs(piece.c_str(), stdout);
    });
    std::printf("\ngenerated %zu bytes in %d pieces\n", text.size(), pieces);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
