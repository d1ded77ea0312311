// The BF16 products of training on AMX tiles, without oneDNN (kernels/gemm.h routes them here).
//
// Why: on the issue-19 Xeon (Emerald Rapids, 2 cores) oneDNN 2.6's fixed-shape AMX brgemm runs
// the training shapes at 450-550 GFLOP/s, a quarter of what the tiles do from L1 (1.0-1.8
// TFLOP/s per core measured with a loop of TDPBF16PS on resident tiles). The loads, not the
// tiles, bound it: AMX has no tile renaming, so a tile load cannot run ahead of the product
// still reading that tile, and an operand that streams from L2 stalls every step.
//
// How: both operands are packed once per call into the tiles' own layouts, 1 KiB contiguous per
// tile, M and N padded with zeros to multiples of 32 (an edge block of C goes through a local
// buffer). A: strips of 32 rows, [M/32][Kp/32][2 halves of 16 rows][16 rows][32 k] bf16. B: blocks
// of 32 columns, [N/32][Kp/32][2 halves of 16 columns][16 k pairs][16 columns x 2 k] bf16 (the
// pair-interleaved rows TDPBF16PS reads). Kp = K rounded up to 32, zero-padded. Each thread
// takes a range of A strips; a strip's chunk of K stays in L2 while the B blocks stream past it,
// each block's next 2 KiB prefetched two k steps ahead (a B wider than the column budget
// passes the strips in column chunks, see set_amx_column_budget). A 32 x 32 block of C lives in
// four tiles for a chunk of K (2 A tiles, 2 B tiles: all eight; set_amx_k_block), so C is read
// (accumulate) and written once per chunk.
// A whole operand's pack of 1 MiB or more is written with non-temporal stores
// (set_amx_stream_bytes).
// Packing rounds to nearest even as VCVTNE2PS2BF16 (the same bits as the oneDNN path's
// operands); a bf16 copy of an operand in its stored layout (gemm.cpp's known copies) packs to
// the same tiles.
#pragma once
#include <cstdint>

#include "core/common.h"

namespace dlcm::ops {

// Whether amx_gemm serves this product: an AMX CPU (amx_bf16_usable()) with the kernels at the
// avx512 level, K > 0, and M, N rounded up to 32 (the tiles compute the padding and drop it)
// growing the product by at most 25% (other shapes stay on oneDNN).
bool amx_gemm_fits(i64 M, i64 N, i64 K);

// A bf16 copy of an operand in its stored layout (rows ld apart), read instead of the floats.
// version: nonzero and unique per rounding into the copy (gemm.cpp's kept and shared copies):
// the packed operand is then kept in a small per-thread cache and reused by the next products
// of the same copy (q/k/v and w1/w3 share x in the forward, their dW products x in the
// backward); 0: not cached.
struct AmxCopy {
  const uint16_t* data = nullptr;
  i64 ld = 0;
  uint64_t version = 0;
};

// C[M,N] = op(A)[M,K] op(B)[K,N] (+ C when accumulate), bf16 operands, FP32 accumulation.
// A stored [M,K] (or [K,M] when ta) with rows lda apart, B [K,N] (or [N,K] when tb) ldb apart;
// a16/b16 their bf16 copies where there are. Call outside parallel regions (it runs one
// itself).
void amx_gemm(bool ta, bool tb, i64 M, i64 N, i64 K, const float* A, i64 lda, AmxCopy a16,
              const float* B, i64 ldb, AmxCopy b16, bool accumulate, float* C, i64 ldc);

// Whether gemm() sends BF16 products that fit to amx_gemm (default: on; DLCM_AMX_GEMM=0 turns it
// off at start, logged). Off, they run on oneDNN as before: for A/B timing and tests.
void set_amx_gemm(bool on);
bool amx_gemm_on();
using AmxGemmScope = SettingScope<bool, amx_gemm_on, set_amx_gemm>;
// amx_gemm calls since the start (tests: the path ran).
i64 amx_gemm_calls();

// The packed B of one K chunk that a pass over A's strips reads, at most (default 1 MiB, about
// half an L2 of the AMX CPUs): a wider B (the LM head's: vocab x d) is taken in column chunks of
// this size, each through every strip, so that B streams from memory once instead of once per
// strip. The visiting order of the C blocks changes, not the bits. 0: no chunks. For tests and
// benchmarks.
void set_amx_column_budget(i64 bytes);
i64 amx_column_budget();
// Column blocks (of 32) per chunk for a product of N columns and K: all of them when B fits.
i64 amx_column_chunk(i64 N, i64 K);

// k per chunk of K (default 2048; a positive multiple of 32): a 32 x 32 block of C stays in the
// tiles over a chunk, so C is loaded and stored once per chunk. The bits do not depend on it
// (each C element sums its k in order either way). For tests and benchmarks.
void set_amx_k_block(i64 k);
i64 amx_k_block();

// Whether an A that is not transposed is packed per strip and chunk of K by the thread that uses
// it, into a buffer that stays in its cache (default), or whole before the products, in a buffer
// that the kept copies' packs can be reused from (A^T always is). The same bits either way. For
// tests and benchmarks.
void set_amx_strip_packing(bool on);
bool amx_strip_packing();

// Whole operands packed before the products (A^T, every B; not A's per-strip packs) of at least
// `bytes` (default 1 MiB) are written with non-temporal stores: such a pack leaves the caches
// before the tiles read it, and the stores then skip reading each line for ownership. 0: never.
// The same bits either way. For tests and benchmarks; amx_stream_packs() counts the packs
// written so since the start.
void set_amx_stream_bytes(i64 bytes);
i64 amx_stream_bytes();
i64 amx_stream_packs();

}  // namespace dlcm::ops
