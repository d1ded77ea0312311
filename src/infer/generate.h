// Batched generation over a streaming engine (SPEC 5): prompts are prefilled in one batched pass
// each, then decoded token by token, several sequences per step; a finished sequence's slot is
// refilled with the next waiting prompt (continuous batching).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "infer/sampler.h"
#include "models/model.h"

namespace dlcm {

struct GenerateOptions {
  SamplerConfig sampler;
  uint64_t seed = 0;         // prompt i samples from Rng(counter_hash(seed, i)): reproducible,
                             // and independent of which prompts share a batch
  i64 max_new_tokens = 100;
  std::vector<std::string> stop;  // the completion ends right before the first stop string
  bool stop_at_eos = true;
  i64 max_batch = 8;              // sequences decoded together
  float tau = -1;                 // DLCM boundary threshold (< 0: the config's)
  ops::PackFormat precision = ops::PackFormat::F32;  // the stream's weights (StreamOptions)
  // Record each generated token's TokenConcept (DLCM). A token's p is known once it has been
  // fed to the model, so the last token of a completion is fed once more when room remains.
  bool concepts = false;
  std::vector<std::string> prompt_names;  // for error messages ("prompt i" when empty)
};

struct Completion {
  std::vector<i32> prompt_ids;  // BOS + the prompt's tokens
  std::vector<i32> ids;         // generated tokens (EOS excluded)
  std::string text;             // the completion (ends before a stop string)
  std::string stop_reason;      // "eos" | "stop" | "length" | "context"
  std::vector<TokenConcept> concepts;  // with GenerateOptions::concepts: one per generated
                                       // token (concept_index -1 when it could not be fed)
};

struct GenerateEvents {
  // Text of prompt i that became safe to show (whole characters, never part of a stop string).
  std::function<void(i64 i, const std::string& text)> on_text;
  // A generated token of prompt i; tc is its TokenConcept when GenerateOptions::concepts and the
  // model has concepts (nullptr otherwise, or when it could not be fed).
  std::function<void(i64 i, i32 id, const TokenConcept* tc)> on_token;
  // Prompt i is complete.
  std::function<void(i64 i, const Completion& c)> on_done;
};

// Encodes every prompt (BOS + tokens) and checks it first: an empty prompt, or one that does not
// fit the model's context, is an Error naming the prompt before anything runs.
std::vector<Completion> generate(LanguageModel& m, const Tokenizer& tok,
                                 const std::vector<std::string>& prompts,
                                 const GenerateOptions& o, const GenerateEvents& ev = {});

}  // namespace dlcm
