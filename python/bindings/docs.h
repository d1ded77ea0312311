// Docstrings of dlcm._core; python/dlcm/_core.pyi carries the same text (python/tests checks
// that they agree), so edit both together.
#pragma once

namespace dlcm::py_bind::doc {

inline constexpr const char* Error =
    R"doc(An error of the engine: its one-line message names the file, key or argument at fault and what was expected.)doc";
inline constexpr const char* ArgumentError =
    R"doc(An argument with a wrong value or shape (also a ValueError).)doc";
inline constexpr const char* ArgumentTypeError =
    R"doc(An argument of the wrong type or dtype (also a TypeError).)doc";
inline constexpr const char* ClosedError =
    R"doc(The model was closed.)doc";
inline constexpr const char* Tokenizer =
    R"doc(A checkpoint's tokenizer (model.tokenizer).)doc";
inline constexpr const char* Tokenizer_encode =
    R"doc(Text -> token ids (no BOS/EOS).)doc";
inline constexpr const char* Tokenizer_decode =
    R"doc(Token ids -> text; special ids are skipped, bytes that are no valid UTF-8 become U+FFFD.)doc";
inline constexpr const char* Tokenizer_decode_piece =
    R"doc(The raw bytes of one token (b'' for special ids).)doc";
inline constexpr const char* GenerateStream =
    R"doc(Iterator over generated text pieces (Model.generate(stream=True)): str for one prompt, (prompt index, str) for a list.)doc";
inline constexpr const char* GenerateStream_close =
    R"doc(Stops generation (also when the iterator is dropped).)doc";
inline constexpr const char* Model =
    R"doc(A checkpoint's model (dlcm.load). Calls release the GIL while they compute; calls from several threads on one model run one after the other. Use as a context manager, or close(), to free it early.)doc";
inline constexpr const char* Model_path =
    R"doc(The checkpoint folder.)doc";
inline constexpr const char* Model_config =
    R"doc(The model's config, as `dlcm config` prints it (a new dict each time).)doc";
inline constexpr const char* Model_close =
    R"doc(Frees the model; later calls raise dlcm.ClosedError (state_dict views stay valid).)doc";
inline constexpr const char* Model_forward =
    R"doc(Logits float32 [B, L, V] of token ids [B, L] ([L, V] for one row [L]), row by row as `dlcm forward` computes them (bit-identical). DLCM: boundaries thresholded at router.tau. out: a C-contiguous float32 array of that shape to write into (and return) instead of a new one.)doc";
inline constexpr const char* Model_logits_at =
    R"doc(Logits float32 [n, V] at flat positions b * L + t of one forward pass over tokens [B, L] (the LM head runs on those rows only).)doc";
inline constexpr const char* Model_boundaries =
    R"doc(DLCM: router probabilities p float32 [B, L] and boundaries b bool [B, L] (b = p >= tau, forced at row start and BOS; tau None: the checkpoint's router.tau).)doc";
inline constexpr const char* Model_concepts =
    R"doc(DLCM: the text (after BOS) cut into concepts, one dict per concept: index, start and end (token positions, BOS is 0), text, p (of its first token), forced, ids, token_p.)doc";
inline constexpr const char* Model_score =
    R"doc((log p(continuation | BOS + context), whether every continuation token is the argmax), as the zero-shot evaluation scores; text is split as its tasks split it.)doc";
inline constexpr const char* Model_score_batch =
    R"doc(score() of many (context, continuation) pairs, batched and with shared prefixes computed once.)doc";
inline constexpr const char* Model_generate =
    R"doc(Continues a prompt (str -> str) or prompts (list -> list), as `dlcm generate` does: temperature 0 is greedy; prompt i samples from seed and i alone; the text ends before the first stop string or at EOS (unless ignore_eos). stream=True returns an iterator of text pieces as they are decoded; details=True returns dicts with text, ids, prompt_ids and stop_reason.)doc";
inline constexpr const char* Model_state_dict =
    R"doc(Parameter name -> read-only float32 view of the model's weights (no copy; it sees later load_state_dict calls).)doc";
inline constexpr const char* Model_load_state_dict =
    R"doc(Copies float arrays into the parameters of the same names and shapes; strict: every parameter and no other key. Checks everything before changing anything.)doc";
inline constexpr const char* Model__time_forward =
    R"doc(Seconds of each of `repeats` forward() computations timed inside C++ (the overhead benchmark's reference).)doc";
inline constexpr const char* load =
    R"doc(The model, tokenizer and config of a checkpoint folder or a run folder (its checkpoint/), baseline or DLCM.)doc";
inline constexpr const char* prepare =
    R"doc(`dlcm prepare`: tokenizes .txt/.jsonl files (or folders of them) into a data folder; returns its meta.json.)doc";
inline constexpr const char* train =
    R"doc(`dlcm train` in this process: config as a dict or a JSON file, overrides as {key: value} or ["key=value"]. on_log gets each train_log.jsonl record as a dict; returning False stops the run. A stop, an exception in on_log, or Ctrl-C ends the run after the current step with a checkpoint (the exception is then raised). Returns step, checkpoint, stopped and, after a full run with final_eval, val_loss, val_ppl, val_bpb, val_tokens (val_compression for DLCM).)doc";
inline constexpr const char* eval =
    R"doc(`dlcm eval`: validation loss, perplexity and bits per byte on data's validation split and/or zero-shot tasks; returns the report as a dict.)doc";
inline constexpr const char* resolve_config =
    R"doc(`dlcm config`: the resolved, validated config (defaults filled in); errors name the key.)doc";

}  // namespace dlcm::py_bind::doc
