// Provenance of a run or report: which code (version, git commit, dirty tree, compiler and
// flags), which command, which libraries, which CPU, which prepared data, and when. Written
// into every checkpoint (provenance.json) and every `dlcm eval --out` report.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dlcm {

// Records the command line and the start time of this process; the CLI's main calls it before
// anything else. Without it (library use, tests) the command is empty and the start time is the
// first call of provenance_json.
void set_command_line(int argc, const char* const* argv);
const std::vector<std::string>& command_line();

// UTC time, ISO 8601 to the second: "2026-11-30T17:22:48Z".
std::string utc_time_iso();

// The CPU this process runs on, from /proc/cpuinfo: {"model", "logical_cpus", "isa": [the
// extensions the kernels care about that the CPU has: "avx2", "avx512f", "avx512_bf16",
// "amx_bf16", ...]}.
nlohmann::json cpu_json();

// oneDNN, SentencePiece, OpenMP and the compiler.
nlohmann::json library_versions_json();

// A fingerprint of a prepared data folder that is cheap at any size: the FNV-1a 64 hash of
// meta.json, and the size and the hash of the 64-byte header of each shard (which holds its
// vocabulary, token and document counts). {"dir", "meta_fnv1a64", "created", "shards":
// {"train.bin": {"bytes", "header_fnv1a64"}, "val.bin": {...}}}; Error naming the file when one
// cannot be read.
nlohmann::json data_fingerprint(const std::string& data_dir);

// The provenance of this process: {"version", "git_commit", "git_dirty", "build": {"type",
// "compiler", "flags", "isa"}, "command", "libraries", "cpu", "start"} and, with a data folder,
// "data" (data_fingerprint). Checkpoints add "end" (the time of the save) and "resumes".
nlohmann::json provenance_json(const std::string& data_dir = "");

// What `dlcm --version` prints: version, commit (+ dirty), compiler, build type and flags, the
// ISA compiled for and the ISA of this CPU, library versions.
std::string version_text();

}  // namespace dlcm
