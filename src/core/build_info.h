// What the running binary was built from: version, git commit (and whether the tree had
// uncommitted changes to tracked files), compiler, build type and flags, and the instruction
// sets it was compiled for. The commit is read at build time (cmake/build_git.cmake), the rest
// at configure time (cmake/build_config.h.in).
#pragma once
#include <string>
#include <vector>

namespace dlcm {

struct BuildInfo {
  std::string version;     // "0.1"
  std::string git_commit;  // 40 hex digits, or "unknown" outside a git checkout
  bool git_dirty = false;  // tracked files differed from git_commit when it was built
  std::string compiler;    // "GNU 12.2.0"
  std::string build_type;  // "Release"
  std::string cxx_flags;   // compile flags of every object, "-O3 -DNDEBUG ... -march=native"
  std::string openmp;      // OpenMP specification date of the compiler (_OPENMP), "201511"
  std::string sentencepiece;      // version of the SentencePiece library built against
  std::vector<std::string> isa;   // extensions the compiler targeted: "avx2", "avx512f", ...
};
const BuildInfo& build_info();

}  // namespace dlcm
