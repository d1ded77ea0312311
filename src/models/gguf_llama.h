// The baseline as a GGUF "llama" model for llama.cpp (docs/interop.md): llama.* hyper-parameters
// and the tensors of the plain LLaMA layout (models/llama_layout.h: logit_mult folded into the
// output matrix) under llama.cpp's names:
//   token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
//   ffn_up, ffn_down}, output_norm, output (all ".weight").
// llama.cpp's "llama" architecture rotates ADJACENT pairs (2i, 2i+1) of each head, dlcm pairs
// i with i + head_dim/2 (same frequencies); attn_q and attn_k rows are permuted within each head
// (llama_permute_qk), which makes the two the same function. Norm weights stay F32 whatever
// the type (as llama.cpp's own converter writes them); with q8_0 a matrix whose rows are not a
// multiple of 32 values is written as F16.
#pragma once
#include <string>

#include "core/gguf.h"
#include "core/params.h"
#include "models/config.h"

namespace dlcm {

// Refuses (Error naming `source` and the key) what plain LLaMA cannot express.
void add_gguf_llama_model(GgufWriter& w, const ModelConfig& m, const ParamStore& ps, GgmlType type,
                          const std::string& name, const std::string& source);

}  // namespace dlcm
