#include "data/gguf_tokenizer.h"

namespace dlcm {

namespace {
// llama.cpp's token types (llama_token_type).
int32_t gguf_token_type(VocabEntry::Kind k) {
  switch (k) {
    case VocabEntry::Kind::Normal: return 1;
    case VocabEntry::Kind::Unknown: return 2;
    case VocabEntry::Kind::Control: return 3;
    case VocabEntry::Kind::UserDefined: return 4;
    case VocabEntry::Kind::Byte: return 6;
  }
  return 1;
}
}  // namespace

void add_gguf_tokenizer(GgufWriter& w, const Tokenizer& tok, i64 n_vocab) {
  std::vector<VocabEntry> entries = tok.vocab_entries();
  DLCM_CHECK(!entries.empty(), "GGUF export writes dlcm's own tokenizers (bpe, bytes), not a \"",
             tok.kind(), "\" tokenizer");
  DLCM_CHECK(i64(entries.size()) == tok.vocab_size(), "internal: tokenizer lists ", entries.size(),
             " entries for a vocabulary of ", tok.vocab_size());
  DLCM_CHECK(n_vocab >= tok.vocab_size(), "the tokenizer has ", tok.vocab_size(),
             " ids but the model's vocab_size is only ", n_vocab,
             "; is this the tokenizer the model was trained with?");
  if (tok.kind() == "bytes") {
    VocabEntry& space = entries[size_t(tok.encode(" ")[0])];
    space = {"\xE2\x96\x81", 0, VocabEntry::Kind::Normal};
  }
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<int32_t> types;
  for (VocabEntry& e : entries) {
    pieces.push_back(std::move(e.piece));
    scores.push_back(e.score);
    types.push_back(gguf_token_type(e.kind));
  }
  for (i64 id = tok.vocab_size(); id < n_vocab; ++id) {
    pieces.push_back("<unused_" + std::to_string(id - tok.vocab_size()) + ">");
    scores.push_back(0);
    types.push_back(5);  // llama.cpp's UNUSED
  }
  w.set_string("tokenizer.ggml.model", "llama");
  w.set_strings("tokenizer.ggml.tokens", std::move(pieces));
  w.set_f32s("tokenizer.ggml.scores", std::move(scores));
  w.set_i32s("tokenizer.ggml.token_type", std::move(types));
  w.set_u32("tokenizer.ggml.bos_token_id", uint32_t(tok.bos_id()));
  w.set_u32("tokenizer.ggml.eos_token_id", uint32_t(tok.eos_id()));
  w.set_u32("tokenizer.ggml.unknown_token_id", uint32_t(tok.unk_id()));
  w.set_u32("tokenizer.ggml.padding_token_id", uint32_t(tok.pad_id()));
  w.set_bool("tokenizer.ggml.add_bos_token", true);
  w.set_bool("tokenizer.ggml.add_eos_token", false);
  w.set_bool("tokenizer.ggml.add_space_prefix", false);
}

}  // namespace dlcm
