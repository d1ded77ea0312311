// A dlcm tokenizer as GGUF tokenizer metadata (tokenizer.ggml.*), so that llama.cpp tokenizes
// text to the ids dlcm gives (docs/interop.md).
//   bpe   -> tokenizer.ggml.model "llama" (llama.cpp's SentencePiece tokenizer: pieces, scores,
//            token types normal 1 / unknown 2 / control 3 / user-defined 4 / byte 6), no dummy
//            space prefix (dlcm trains without one).
//   bytes -> the same model with the 256 byte pieces and no merges: llama.cpp falls back to
//            bytes for every character. It first writes spaces as U+2581, so byte 0x20's piece
//            is "▁" (a normal piece) instead of "<0x20>".
// Both: BOS added to prompts (dlcm's generate starts every prompt with BOS), no EOS added.
// Text containing U+2581 itself is the one difference: llama.cpp reads it as a space.
#pragma once
#include "core/gguf.h"
#include "data/tokenizer.h"

namespace dlcm {

// n_vocab: the model's vocabulary (>= the tokenizer's); ids past the tokenizer's are written as
// unused pieces "<unused_K>" (type 5), since llama.cpp wants one piece per row of the embedding.
void add_gguf_tokenizer(GgufWriter& w, const Tokenizer& tok, i64 n_vocab);

}  // namespace dlcm
