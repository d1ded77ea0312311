// Reading untrusted JSON (config files, --set values, safetensors headers, tokenizer files,
// server requests) without letting its shape crash the process.
//
// nlohmann's parser is iterative, but dump(), comparison and conversions recurse once per
// nesting level, so a value nested tens of thousands of levels deep overflows the stack the
// first time an error message prints it. The rules here:
//   - parse untrusted text with parse_json_bounded: it refuses text over max_bytes or nested
//     deeper than max_depth BEFORE any tree is built, with an error naming `source`;
//   - never put value.dump() of untrusted JSON into a message; use json_excerpt, which writes
//     at most max_chars characters (and so recurses at most that deep).
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace dlcm {

struct JsonLimits {
  int max_depth = 64;              // arrays/objects open at once ("[[1]]" is depth 2)
  size_t max_bytes = size_t(1) << 24;  // 16 MiB
};

// Parses `text` as one JSON value. Throws Error "<source>: ..." when the text is larger than
// limits.max_bytes, nested deeper than limits.max_depth (naming the byte offset), or not valid
// JSON (with nlohmann's position and reason).
nlohmann::json parse_json_bounded(std::string_view text, const std::string& source,
                                  JsonLimits limits = {});

// Reads the whole file and parses it as above; `source` is the path in messages.
nlohmann::json read_json_file_bounded(const std::string& path, JsonLimits limits = {});

// A one-line rendering of `v` for error messages: at most max_chars characters, cut with "..."
// (long strings, big arrays and deep values are all truncated; never a full dump).
std::string json_excerpt(const nlohmann::json& v, size_t max_chars = 80);

}  // namespace dlcm
