// Corpus preparation: text files -> tokenizer + train/val token shards + meta.json.
//
// Inputs: files or folders (a folder means every *.txt and *.jsonl under it, recursively, in
// sorted order).
//   *.jsonl  one document per line: a JSON object with a string "text" (and optional "source");
//            this is what scripts/build_corpus.sh writes.
//   other    plain UTF-8 text; form feeds ('\f') separate documents; a document longer than
//            64 KiB is cut at blank lines into ~16 KiB documents so the split has units to work
//            with. A single plain-text input without form feeds is split into documents at
//            blank lines (its paragraphs).
// Source names (meta.json "sources", val_sources.json): the .jsonl "source" field, else the
// file's path under its input folder ("web/part-1.txt"), or the path as given for a file input.
// Cleaning: CRLF -> LF, malformed UTF-8 bytes -> U+FFFD, control characters other than \n and
// \t removed, ends trimmed. Dropped: empty documents, junk (mostly replacement characters or
// fewer than 25% letters among non-space characters) and exact duplicates.
// Split: a document is validation when a 64-bit hash of its text falls below val_fraction
// (deterministic by document, independent of order and of the tokenizer); at least one
// document goes to each side.
// Outputs in out_dir: dlcm_tokenizer.json (+ tokenizer.model), train.bin, val.bin (see shards.h;
// every document starts with BOS), meta.json, and val_sources.json: {"sources": [names],
// "documents": [source index of each validation document, in val.bin order]}.
#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/shards.h"
#include "data/tokenizer.h"

namespace dlcm {

struct PrepareOptions {
  std::string tokenizer = "bpe";  // "bpe" | "bytes"
  // A folder whose tokenizer to use instead of training one (a checkpoint, another prepared
  // folder, an HF tokenizer folder): data for fine-tuning an imported or earlier model.
  std::string tokenizer_from;
  int32_t vocab_size = 8192;      // bpe only (the bytes tokenizer has 260)
  double val_fraction = 0.01;
  int64_t bpe_sample_bytes = 40'000'000;  // text sampled for BPE training
  uint64_t seed = 1234;                   // BPE sample
  int threads = 0;                        // 0: OpenMP default
  bool quiet = false;                     // no progress lines on stdout
};

// Runs the whole preparation; returns the meta.json content. Throws Error with a clear message
// for missing inputs, unreadable/malformed files, or no usable text.
nlohmann::json prepare(const std::vector<std::string>& inputs, const std::string& out_dir,
                       const PrepareOptions& opt = {});

// A prepared data directory, opened and cross-checked (tokenizer vocab == shard vocab).
struct DataDir {
  std::string dir;
  nlohmann::json meta;
  std::unique_ptr<Tokenizer> tokenizer;
  std::shared_ptr<const ShardReader> train, val;
  int64_t val_bytes = 0;  // UTF-8 bytes of the validation text (bits per byte denominator)
};
DataDir open_data_dir(const std::string& dir);

inline const char* kValSourcesFile = "val_sources.json";

// The corpus source of each validation document, in val.bin order.
struct ValSources {
  std::vector<std::string> names;  // source names (the "source" field of .jsonl, else the file stem)
  std::vector<int32_t> doc;        // per validation document: index into names
  std::string origin;              // where they came from (the file, or re-derived)
};
// Reads DIR/val_sources.json. A folder prepared before that file existed gets its sources
// re-derived: the corpus files listed in meta.json (a relative path from the working directory
// or from a folder above DIR) are read, cleaned and split again exactly as prepare does, and the
// result must match val.bin (document count, token counts of the first
// and last documents). Returns false with the reason in *why when neither is possible; throws
// Error for a malformed val_sources.json.
bool load_val_sources(const DataDir& d, ValSources& out, std::string* why = nullptr);

}  // namespace dlcm
