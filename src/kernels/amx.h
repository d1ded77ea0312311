// AMX-BF16 helpers shared by the kernels that drive the tiles themselves (tile_gemm.cpp's
// generic tile product, attention.cpp's tile-layout attention). Included after
// kernels/isa_target.h, inside the avx512 variant only (DLCM_AVX512).
#pragma once
#ifdef DLCM_AVX512
#include <cstdint>
#include <vector>

#include "core/common.h"
#include "kernels/gemm.h"  // AttentionUnits

// The AMX target goes on each function that issues tile instructions (not on the whole file:
// the variant's other code must run on AVX-512 CPUs without AMX).
#define DLCM_AMX_TARGET                                                                        \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,"      \
                        "amx-tile,amx-bf16")))

namespace dlcm::ops::DLCM_ISA_NS::amx {

template <typename T>
using AVec = std::vector<T, AlignedAlloc<T>>;  // 64-byte aligned: tile rows and zmm stores

// ldtilecfg's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All eight tiles 16 rows x 64 bytes: C tiles of 16 x 16 FP32, A tiles of 16 rows x 32 bf16,
// B tiles of 16 pairs x 16 columns.
inline TileConfig full_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  return cfg;
}

// Word order that turns _mm512_cvtne2ps_pbh(row k+1, row k) (words 0-15 row k, 16-31 row k+1)
// into the pair-interleaved layout of a B tile: k0 n0, k1 n0, k0 n1, k1 n1, ...
alignas(64) inline const uint16_t kPairIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                  21, 6, 22, 7, 23, 8, 24, 9,  25, 10, 26,
                                                  11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

}  // namespace dlcm::ops::DLCM_ISA_NS::amx

namespace dlcm::ops::DLCM_ISA_NS {
// The compact concept attention (dlcm_ops.h) in BF16, by attention.cpp's tile-layout kernels
// with the concept mask and bias, on the units u (Tiles: AMX tiles, Dot: AVX512-BF16 dot
// products; the caller's ops::attention_units()): the shapes, lse and accumulation (dq, dk, dv +=) of
// concept_attention_forward/backward (k, v: [B, K1, Hkv, hd]); bf16 operands, FP32 softmax and
// accumulation. Per token, sf = the last list entry it sees (as float) and logd = log of its
// own entry's multiplicity [B*L]; logm = the entries' log lengths [B*K1]. scale > 0.
void concept_attention_forward_bf16(AttentionUnits u, float* out, float* lse, const float* q,
                                    const float* k, const float* v, i64 B, i64 L, i64 K1, i64 Hq,
                                    i64 Hkv, i64 hd, float scale, const float* sf,
                                    const float* logd, const float* logm, bool par);
void concept_attention_backward_bf16(AttentionUnits u, float* dq, float* dk, float* dv,
                                     const float* dout, const float* out, const float* lse,
                                     const float* q, const float* k, const float* v, i64 B, i64 L,
                                     i64 K1, i64 Hq, i64 Hkv, i64 hd, float scale, const float* sf,
                                     const float* logd, const float* logm, bool par);
}  // namespace dlcm::ops::DLCM_ISA_NS
#endif
