// Help for a command line that did not parse: "did you mean" for a mistyped subcommand or flag
// (edit distance against the names the command knows).
#pragma once
#include <CLI/CLI.hpp>
#include <string>
#include <vector>

namespace dlcm {

// Levenshtein distance (insertions, deletions, substitutions).
size_t edit_distance(const std::string& a, const std::string& b);
// The name of `names` closest to `word` when close enough to be a typo of it (distance at most
// 2, and under half of the word's length), else "".
std::string closest_name(const std::string& word, const std::vector<std::string>& names);
// After a parse error: for the first subcommand or flag of argv that `app` does not know,
// "unknown subcommand 'trian' (did you mean 'train'?)" or "unknown flag '--stpes' of
// 'dlcm train' (did you mean '--steps'?)"; "" when every name is known.
std::string unknown_name_hint(const CLI::App& app, int argc, const char* const* argv);

}  // namespace dlcm
