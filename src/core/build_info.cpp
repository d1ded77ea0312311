#include "core/build_info.h"

#include "build_config.h"  // generated at configure time
#include "build_git.h"     // generated at build time

namespace dlcm {

const BuildInfo& build_info() {
  static const BuildInfo b = [] {
    BuildInfo i;
    i.version = DLCM_VERSION;
    i.git_commit = DLCM_GIT_COMMIT;
    i.git_dirty = DLCM_GIT_DIRTY != 0;
    i.compiler = DLCM_COMPILER;
    i.build_type = DLCM_BUILD_TYPE;
    i.cxx_flags = DLCM_CXX_FLAGS;
    i.sentencepiece = DLCM_SENTENCEPIECE_VERSION;
#ifdef _OPENMP
    i.openmp = std::to_string(_OPENMP);
#endif
    // The extensions the kernels use, as the compiler saw them (-march).
#ifdef __AVX2__
    i.isa.push_back("avx2");
#endif
#ifdef __FMA__
    i.isa.push_back("fma");
#endif
#ifdef __AVX512F__
    i.isa.push_back("avx512f");
#endif
#ifdef __AVX512BW__
    i.isa.push_back("avx512bw");
#endif
#ifdef __AVX512VL__
    i.isa.push_back("avx512vl");
#endif
#ifdef __AVX512BF16__
    i.isa.push_back("avx512_bf16");
#endif
#ifdef __AMX_TILE__
    i.isa.push_back("amx_tile");
#endif
#ifdef __AMX_BF16__
    i.isa.push_back("amx_bf16");
#endif
    return i;
  }();
  return b;
}

}  // namespace dlcm
