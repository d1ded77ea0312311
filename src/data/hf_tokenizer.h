// Hugging Face tokenizers files (docs/interop.md, "Tokenizers"): reading tokenizer.json as a
// third Tokenizer kind ("hf"), and writing ours in HF's format for export.
//
// Read: model type "BPE" only, in the two shapes LLaMA-family and GPT-2-family models use:
//   - byte-level (GPT-2): pre_tokenizer ByteLevel (its regex split, add_prefix_space), decoder
//     ByteLevel; vocabulary in the bytes-to-unicode alphabet;
//   - SentencePiece-style: normalizer Replace(" " -> "▁") / Prepend("▁") (or a Metaspace
//     pre-tokenizer), byte_fallback, decoder Replace / ByteFallback / Fuse / Strip (or
//     Metaspace).
// Merges as "a b" strings or ["a", "b"] pairs; added_tokens split the text first (leftmost
// longest, lstrip/rstrip honoured) and those marked special are the tokenizer's specials.
// Special ids: bos/eos/unk/pad tokens from tokenizer_config.json (or special_tokens_map.json)
// next to tokenizer.json; without them, unk from the model, bos from a TemplateProcessing
// post-processor, and well-known names ("<s>", "</s>", "<|endoftext|>", ...). A missing bos is
// the eos (GPT-2's convention), a missing pad the eos; a file without any eos is refused.
// Anything else (WordPiece/Unigram models, other normalizers, Split pre-tokenizers, ...) is
// refused with one line naming the file and field.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer.h"

namespace dlcm {

// Reads dir/tokenizer.json (HF format) and its companions tokenizer_config.json and
// special_tokens_map.json when present. Files are bounded (64 MiB, nesting 32).
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& dir);

struct HfWriteOptions {
  int64_t model_max_length = 0;  // tokenizer_config.json's model_max_length (0: left out)
  bool add_bos = true;           // the post-processor puts BOS before each encoded text
};
// Writes the tokenizer in HF's format into dir (which must exist): tokenizer.json,
// tokenizer_config.json, special_tokens_map.json, and tokenizer.model for bpe. Encoding with
// HF tokenizers / AutoTokenizer gives the same ids as tok.encode (plus BOS when add_bos and
// the caller lets transformers add special tokens). bpe: SentencePiece-style BPE with byte
// fallback, merges derived from the pieces' scores; bytes: byte-level, 256 byte tokens at
// ids 4..259; hf: the files it was read from (a tokenizer_config.json naming the special
// tokens is added when there was none).
void write_hf_tokenizer_files(const Tokenizer& tok, const std::string& dir,
                              const HfWriteOptions& opt = {});

// The pieces of a serialized SentencePiece model (Tokenizer::sentencepiece_model()), in id
// order: piece text, score, type (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused,
// 6 byte), e.g. for writing other formats' vocabularies.
struct SpPiece {
  std::string piece;
  float score = 0;
  int type = 1;
};
std::vector<SpPiece> read_sentencepiece_pieces(std::string_view model);

// Converts GPT-2's original tokenizer files (encoder.json: token -> id; vocab.bpe: a
// "#version" line, then one merge "a b" per line) into an HF byte-level tokenizer.json (plus
// tokenizer_config.json and special_tokens_map.json naming <|endoftext|> as bos/eos/unk) in
// out_dir (which must exist).
void convert_gpt2_tokenizer(const std::string& encoder_json, const std::string& vocab_bpe,
                            const std::string& out_dir);

}  // namespace dlcm
