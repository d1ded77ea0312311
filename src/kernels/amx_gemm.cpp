// BF16 products on AMX tiles (see amx_gemm.h). The code that issues AVX-512 and tile
// instructions carries its own target attribute and sits in a namespace named like the kernel
// variants' (tests/isa_baseline_check.sh allows such instructions only there); the parallel
// regions are in plain code and call it per thread.
#include "kernels/amx_gemm.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "core/parallel.h"
#include "core/profiler.h"
#include "kernels/isa.h"

#define DLCM_AMX_GEMM_TARGET                                                                   \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,"      \
                        "amx-tile,amx-bf16")))

namespace dlcm::ops {

namespace {

constexpr i64 kStrip = 32;      // rows of A (and of C) per strip; columns of B per block
constexpr i64 kKc = 32;         // k per tile step
constexpr i64 kTile = 512;      // bf16 values per tile (16 x 64 bytes)
constexpr i64 kPrefetchAhead = 2;  // k steps between a B chunk's prefetch and its load

inline i64 round_up(i64 x, i64 m) { return (x + m - 1) / m * m; }

// Offsets into the packed layouts (amx_gemm.h): A row i's 32 k of step kc; B's 16 columns from
// n (a multiple of 16) for k pair kp of step kc.
inline i64 a_off(i64 i, i64 kc, i64 Kp) {
  return (i / kStrip) * kStrip * Kp + kc * 2 * kTile + ((i % kStrip) / 16) * kTile + (i % 16) * 32;
}
inline i64 b_off(i64 n, i64 kc, i64 kp, i64 Kp) {
  return (n / kStrip) * kStrip * Kp + kc * 2 * kTile + ((n % kStrip) / 16) * kTile + kp * 32;
}

// Packed B (one K chunk) a pass over the strips reads, at most: a wider B goes in column chunks,
// each through every strip, so that it streams from memory once rather than once per strip.
std::atomic<i64> g_column_budget{i64(1) << 20};

// k per chunk of K (a multiple of kKc): C goes through the tiles once per chunk. 2048: the
// weight-gradient products (K = tokens) 1.04-1.36x faster than with chunks of 512 (which kept
// a strip's chunk of A in L1, at the price of loading and storing C every 512 k) on the
// Emerald Rapids host, the forms with K <= 512 unchanged (docs/performance.md, session 40)
std::atomic<i64> g_k_block{2048};

// A whole operand packed before the products (A^T, every B) of at least this many bytes is
// written with non-temporal stores. Such a pack (the weight-gradient products' dy^T and x,
// 4-12 MiB) is larger than a core's L2 and leaves the caches before the tiles read it, so an
// ordinary store's read for ownership of each line only adds memory traffic (a third more) to
// a pass that memory bounds: the BF16 training step 0.99-1.08x, median 1.04x over nine runs
// (the 12 MiB packs' products alone 1.05-1.07x, those of 1.5-4 MiB packs 0.96-0.98x; Emerald
// Rapids host, docs/performance.md, session 43). Packs per strip (into a buffer that stays in
// L2) always store normally.
std::atomic<i64> g_stream_bytes{i64(1) << 20};
std::atomic<i64> g_stream_packs{0};

// A (not transposed) packed per strip and chunk of K by the thread that uses it, into a buffer
// that stays in its L2, instead of whole before the products into a buffer that goes out to
// memory and comes back
std::atomic<bool> g_strip_packing{true};

std::atomic<bool> g_amx_gemm{env_switch("DLCM_AMX_GEMM", "BF16 products on AMX tiles where they fit",
                                         "BF16 products on oneDNN only")};

}  // namespace

namespace isa_avx512 {
namespace {

alignas(64) const uint16_t kPairIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                           21, 6, 22, 7, 23, 8, 24, 9,  25, 10, 26,
                                           11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// The first n of 16 lanes (n clamped to 0..16).
DLCM_AMX_GEMM_TARGET inline __mmask16 mask16(i64 n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
// 16 floats from p[0..n) (the rest 0).
DLCM_AMX_GEMM_TARGET inline __m512 load16(const float* p, i64 n) {
  return _mm512_maskz_loadu_ps(mask16(n), p);
}

// 32 bf16: words 0-15 = lo, 16-31 = hi (nearest even).
DLCM_AMX_GEMM_TARGET inline __m512i round32(__m512 lo, __m512 hi) {
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}
// Dword j = (lo[j], hi[j]) as bf16: a k pair of 16 columns, the layout of a B tile row.
DLCM_AMX_GEMM_TARGET inline __m512i pair32(__m512 lo, __m512 hi) {
  return _mm512_permutexvar_epi16(_mm512_load_si512(kPairIdx), round32(lo, hi));
}

// One tile row's 32 values from s[0..n) (the rest 0): floats rounded, or a bf16 copy's words
// as they are (already rounded the same way).
DLCM_AMX_GEMM_TARGET inline __m512i row32(const float* s, i64 n) {
  return round32(load16(s, n), load16(s + 16, n - 16));
}
DLCM_AMX_GEMM_TARGET inline __m512i row32(const uint16_t* s, i64 n) {
  const __mmask32 m = n >= 32 ? __mmask32(0xFFFFFFFFu) : n <= 0 ? 0 : __mmask32((1u << n) - 1);
  return _mm512_maskz_loadu_epi16(m, s);
}
// Dword j = (a[j], b[j]) for j < 16 (entries past na / nb are 0).
DLCM_AMX_GEMM_TARGET inline __m512i pairs16(const float* a, i64 na, const float* b, i64 nb) {
  return pair32(load16(a, na), load16(b, nb));
}
alignas(64) const uint16_t kInterleave[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,
                                              37, 6, 38, 7, 39, 8, 40, 9,  41, 10, 42,
                                              11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
DLCM_AMX_GEMM_TARGET inline __m512i pairs16(const uint16_t* a, i64 na, const uint16_t* b,
                                            i64 nb) {
  const __m512i lo = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(mask16(na), a));
  const __m512i hi = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(mask16(nb), b));
  return _mm512_permutex2var_epi16(lo, _mm512_load_si512(kInterleave), hi);
}

// r[j] <- dword j of every r[i] (16 x 16 transpose of 32-bit elements).
DLCM_GCC105593_BEGIN
DLCM_AMX_GEMM_TARGET inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // b[4i+q], 128-bit lane L: column 4L+q of rows 4i..4i+3
  for (int i = 0; i < 4; ++i) {
    b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0x44);
    const __m512i c1 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0xEE);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0x44);
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0xEE);
    r[q] = _mm512_shuffle_i32x4(c0, c2, 0x88);
    r[4 + q] = _mm512_shuffle_i32x4(c0, c2, 0xDD);
    r[8 + q] = _mm512_shuffle_i32x4(c1, c3, 0x88);
    r[12 + q] = _mm512_shuffle_i32x4(c1, c3, 0xDD);
  }
}
DLCM_GCC105593_END

// One 64-byte row of a packed tile: a non-temporal store for a whole operand's pack (see
// g_stream_bytes), else an ordinary one.
DLCM_AMX_GEMM_TARGET inline void store_tile_row(uint16_t* d, __m512i v, bool nt) {
  if (nt)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), v);
  else
    _mm512_store_si512(d, v);
}

// The four packers, each for a range of 16-row (A) or 16-column (B) groups [g0, g1).
// "rows": the stored rows run along k (A not transposed, B transposed): a tile row is 32
// consecutive k of one stored row. "pairs": the stored rows are k (A transposed, B not): two of
// them give a k pair for 16 columns. A wants [row][k pair] dwords, B [k pair][column]: A from
// rows and B from pairs are direct, the other two a 16 x 16 transpose of dwords.
// R: the stored rows (A) or columns (B) that exist; the padding up to a multiple of 32 is zero.
template <class T>
DLCM_AMX_GEMM_TARGET void pack_from_rows(uint16_t* dst, const T* S, i64 ld, i64 K, i64 Kp,
                                         bool is_a, i64 R, i64 g0, i64 g1, bool nt = false) {
  __m512i r[16];
  for (i64 g = g0; g < g1; ++g)
    for (i64 kc = 0; kc < Kp / kKc; ++kc) {
      const i64 k0 = kc * kKc;
      for (int j = 0; j < 16; ++j) {
        if (g * 16 + j >= R) {
          r[j] = _mm512_setzero_si512();
          continue;
        }
        const T* s = S + (g * 16 + j) * ld + k0;
        r[j] = row32(s, K - k0);
      }
      if (is_a) {
        for (int j = 0; j < 16; ++j)
          store_tile_row(dst + a_off(g * 16 + j, kc, Kp), r[j], nt);
      } else {
        transpose16(r);
        for (int p = 0; p < 16; ++p) store_tile_row(dst + b_off(g * 16, kc, p, Kp), r[p], nt);
      }
    }
}

template <class T>
DLCM_AMX_GEMM_TARGET void pack_from_pairs(uint16_t* dst, const T* S, i64 ld, i64 K, i64 Kp,
                                          bool is_a, i64 R, i64 g0, i64 g1, bool nt = false) {
  __m512i r[16];
  // a band of 32 stored rows at a time across this thread's groups: the band's lines are read
  // while in L1, not once per group
  for (i64 kc = 0; kc < Kp / kKc; ++kc)
    for (i64 g = g0; g < g1; ++g) {
      const i64 n = std::clamp<i64>(R - g * 16, 0, 16);  // columns of this group that exist
      for (int p = 0; p < 16; ++p) {
        const i64 k = kc * kKc + 2 * p;
        const T* s = S + k * ld + g * 16;
        r[p] = pairs16(s, k < K ? n : 0, s + ld, k + 1 < K ? n : 0);
      }
      if (is_a) {
        transpose16(r);
        for (int j = 0; j < 16; ++j)
          store_tile_row(dst + a_off(g * 16 + j, kc, Kp), r[j], nt);
      } else {
        for (int p = 0; p < 16; ++p) store_tile_row(dst + b_off(g * 16, kc, p, Kp), r[p], nt);
      }
    }
}

// A not transposed (stored [M][K], rows ld apart), floats or a bf16 copy, for packing one strip's
// chunk of K at a time (amx_strip_packing).
struct StripSource {
  const float* f = nullptr;
  const uint16_t* h = nullptr;
  i64 ld = 0, M = 0, K = 0;
};

// Strip s of A for k steps [kb0, kb1) into dst, laid out as the strip's part of a whole packed A
// with Kp = (kb1 - kb0) * 32: the same bits (rounding, zero padding) as pack() gives there.
DLCM_AMX_GEMM_TARGET void pack_strip(uint16_t* dst, const StripSource& a, i64 s, i64 kb0,
                                     i64 kb1) {
  const i64 r0 = s * kStrip, R = std::min(kStrip, a.M - r0), k0 = kb0 * kKc;
  const i64 Kc = std::min(a.K - k0, (kb1 - kb0) * kKc), Kpc = (kb1 - kb0) * kKc;
  const i64 at = r0 * a.ld + k0;  // the strip's first row, at the chunk's first k
  if (a.h)
    pack_from_rows(dst, a.h + at, a.ld, Kc, Kpc, true, R, 0, 2);
  else
    pack_from_rows(dst, a.f + at, a.ld, Kc, Kpc, true, R, 0, 2);
}

// A as tile_blocks reads it: packed whole before the products (packed), or, without that, each
// strip's chunk of K packed from its stored rows (strips) into this thread's buffer (buf, 32 x
// kblock x 32 bf16) when the thread comes to it.
struct TileA {
  const uint16_t* packed = nullptr;
  StripSource strips;
  uint16_t* buf = nullptr;
};

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Block blk of the visiting order -> its strip s and column block nb: column chunks of ncb
// blocks (the last one may be narrower), strip-major within a chunk. ncb = nbs: strip-major.
inline void block_at(i64 blk, i64 strips, i64 nbs, i64 ncb, i64& s, i64& nb) {
  const i64 c = blk / (strips * ncb);
  const i64 w = std::min(ncb, nbs - c * ncb);
  const i64 r = blk - c * strips * ncb;
  s = r / w;
  nb = c * ncb + r % w;
}

// C blocks [b0, b1) of this thread in the order of block_at: each 32 x 32 block in tiles 0-3
// over a chunk of kblock k steps; A in tiles 4-5, B in 6-7. C is M x N: a block that reaches
// past it goes through a local 32 x 32 buffer (rows and columns past C are computed from the
// zero padding and dropped). A: see TileA.
DLCM_AMX_GEMM_TARGET void tile_blocks(const TileA& A, const uint16_t* Bp, float* C, i64 ldc,
                                      i64 M, i64 N, i64 Kp, bool acc, i64 ncb, i64 kblock, i64 b0,
                                      i64 b1) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) float edge[kStrip * kStrip];
  const i64 nbs = (N + kStrip - 1) / kStrip, strips = (M + kStrip - 1) / kStrip;
  const i64 steps = Kp / kKc;
  // K in chunks of kblock steps (amx_k_block()): the B blocks of a chunk pass each strip's
  // chunk of A; C goes through the tiles once per chunk
  for (i64 kb0 = 0; kb0 < steps; kb0 += kblock) {
    const i64 kb1 = std::min(steps, kb0 + kblock);
    const bool load_c = acc || kb0 > 0;
    i64 in_abuf = -1;  // the strip whose chunk A.buf holds
    for (i64 blk = b0; blk < b1; ++blk) {
      i64 s, nb;
      block_at(blk, strips, nbs, ncb, s, nb);
      // a + kc * 2 * kTile: A's tiles of k step ka0 + kc
      const uint16_t* a = A.packed ? A.packed + s * kStrip * Kp : A.buf;
      const i64 ka0 = A.packed ? 0 : kb0;
      if (!A.packed && s != in_abuf) {
        pack_strip(A.buf, A.strips, s, kb0, kb1);
        in_abuf = s;
      }
      const uint16_t* b = Bp + nb * kStrip * Kp;
      const i64 mr = std::min(kStrip, M - s * kStrip), nc = std::min(kStrip, N - nb * kStrip);
      const bool whole = mr == kStrip && nc == kStrip;
      float* cc = C + s * kStrip * ldc + nb * kStrip;
      float* c = whole ? cc : edge;
      const i64 ld = whole ? ldc : kStrip, ldcb = ld * i64(sizeof(float));
      if (!whole && load_c) {
        std::fill(edge, edge + kStrip * kStrip, 0.f);
        for (i64 i = 0; i < mr; ++i) std::copy(cc + i * ldc, cc + i * ldc + nc, edge + i * kStrip);
      }
      // the next block's C, prefetched over this block's k steps (2 of its 32 rows per step;
      // a tile load or store of C waits on each line it misses, and C streams from memory):
      // 1.0-1.3x on the reference's products (docs/performance.md, session 19)
      const float* cn = nullptr;
      i64 cn_rows = 0, cn_row = 0;
      bool cn_two = false;  // the next block's rows reach their second line (columns 16-31)
      if (blk + 1 < b1) {
        i64 s2, nb2;
        block_at(blk + 1, strips, nbs, ncb, s2, nb2);
        cn = C + s2 * kStrip * ldc + nb2 * kStrip;
        cn_rows = std::min(kStrip, M - s2 * kStrip);
        cn_two = N - nb2 * kStrip > 16;
      }
      if (load_c) {
        _tile_loadd(0, c, ldcb);
        _tile_loadd(1, c + 16, ldcb);
        _tile_loadd(2, c + 16 * ld, ldcb);
        _tile_loadd(3, c + 16 * ld + 16, ldcb);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (i64 kc = kb0; kc < kb1; ++kc) {
        const uint16_t* ak = a + (kc - ka0) * 2 * kTile;
        const uint16_t* bk = b + kc * 2 * kTile;
        if (kc + kPrefetchAhead < kb1) {
          const char* pf = reinterpret_cast<const char*>(bk + kPrefetchAhead * 2 * kTile);
          for (int l = 0; l < 32; ++l) _mm_prefetch(pf + 64 * l, _MM_HINT_T0);
        }
        for (int q = 0; q < 2 && cn_row < cn_rows; ++q, ++cn_row) {
          const char* p = reinterpret_cast<const char*>(cn + cn_row * ldc);
          _mm_prefetch(p, _MM_HINT_T0);
          if (cn_two) _mm_prefetch(p + 64, _MM_HINT_T0);
        }
        _tile_loadd(4, ak, 64);
        _tile_loadd(6, bk, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, bk + kTile, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, ak + kTile, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, ldcb);
      _tile_stored(1, c + 16, ldcb);
      _tile_stored(2, c + 16 * ld, ldcb);
      _tile_stored(3, c + 16 * ld + 16, ldcb);
      if (!whole)
        for (i64 i = 0; i < mr; ++i) std::copy(edge + i * kStrip, edge + i * kStrip + nc, cc + i * ldc);
    }
  }
  _tile_release();
}

}  // namespace
}  // namespace isa_avx512

namespace {

using U16Buf = std::vector<uint16_t, AlignedAlloc<uint16_t>>;

// The packer for one operand over 16-row/column groups, parallel when worth it.
// R rows (A) or columns (B) exist, packed with zeros up to a multiple of 32.
template <class T>
void pack(uint16_t* dst, bool from_rows, bool is_a, const T* S, i64 ld, i64 R, i64 K, i64 Kp) {
  const i64 groups = round_up(R, kStrip) / 16;
  const i64 stream = g_stream_bytes.load(std::memory_order_relaxed);
  const bool st = stream > 0 && groups * 16 * Kp * i64(sizeof(uint16_t)) >= stream;
  if (st) g_stream_packs.fetch_add(1, std::memory_order_relaxed);
#pragma omp parallel if (parallel_worth(groups * Kp))
  {
    const i64 nt = omp_get_num_threads(), id = omp_get_thread_num();
    const i64 g0 = groups * id / nt, g1 = groups * (id + 1) / nt;
    if (from_rows)
      isa_avx512::pack_from_rows(dst, S, ld, K, Kp, is_a, R, g0, g1, st);
    else
      isa_avx512::pack_from_pairs(dst, S, ld, K, Kp, is_a, R, g0, g1, st);
    if (st) _mm_sfence();  // the streamed lines are globally visible before the region's barrier
  }
}
// Packed operands of this thread: the two of the current call (slots 0 and 1, scratch) and a few
// of kept copies (by version), the least recently used replaced.
struct PackKey {
  uint64_t version;  // 0: a scratch packing, never matched
  bool is_a, from_rows;
  i64 R, K;
  bool operator==(const PackKey& o) const {
    return version == o.version && is_a == o.is_a && from_rows == o.from_rows && R == o.R &&
           K == o.K;
  }
};
struct PackSlot {
  PackKey key{0, false, false, 0, 0};
  U16Buf buf;
  uint64_t used = 0;
};
constexpr int kCachedPacks = 4;
struct PackCache {
  PackSlot scratch[2];
  PackSlot kept[kCachedPacks];
  uint64_t clock = 0;
};

// op(X) packed (amx_gemm.h's layouts), from the cache when this copy was packed this way before.
// which: 0 for A, 1 for B (the scratch slot when the operand is not a versioned copy).
const uint16_t* packed(int which, const PackKey& k, const float* X, AmxCopy x16, i64 ld,
                       i64 Kp) {
  thread_local PackCache c;
  PackSlot* slot = &c.scratch[which];
  if (k.version != 0) {
    PackSlot* lru = &c.kept[0];
    for (PackSlot& s : c.kept) {
      if (s.key == k) {
        s.used = ++c.clock;
        return s.buf.data();
      }
      if (s.used < lru->used) lru = &s;
    }
    slot = lru;
  }
  const size_t n = size_t(round_up(k.R, kStrip) * Kp);
  if (slot->buf.size() < n) slot->buf.resize(n);
  if (x16.data)
    pack(slot->buf.data(), k.from_rows, k.is_a, x16.data, x16.ld, k.R, k.K, Kp);
  else
    pack(slot->buf.data(), k.from_rows, k.is_a, X, ld, k.R, k.K, Kp);
  slot->key = k;
  slot->used = ++c.clock;
  return slot->buf.data();
}

}  // namespace

bool amx_gemm_fits(i64 M, i64 N, i64 K) {
  // the tiles compute M and N rounded up to 32: at most a quarter more than asked for
  return M > 0 && N > 0 && K > 0 &&
         double(round_up(M, kStrip)) * double(round_up(N, kStrip)) <= 1.25 * double(M) * double(N) &&
         amx_bf16_usable() &&
         isa() == Isa::Avx512;  // a lower kernel level asked for (DLCM_ISA) keeps AVX-512 off
}

static std::atomic<i64> g_amx_calls{0};

void set_amx_gemm(bool on) { g_amx_gemm = on; }
i64 amx_gemm_calls() { return g_amx_calls.load(); }
bool amx_gemm_on() { return g_amx_gemm.load(); }
void set_amx_column_budget(i64 bytes) { g_column_budget = std::max<i64>(0, bytes); }
void set_amx_k_block(i64 k) {
  DLCM_CHECK(k >= kKc && k % kKc == 0, "set_amx_k_block: k per chunk must be a positive ",
             "multiple of ", kKc, ", got ", k);
  g_k_block = k;
}
i64 amx_k_block() { return g_k_block.load(); }
void set_amx_strip_packing(bool on) { g_strip_packing = on; }
void set_amx_stream_bytes(i64 bytes) { g_stream_bytes = std::max<i64>(0, bytes); }
i64 amx_stream_bytes() { return g_stream_bytes.load(); }
i64 amx_stream_packs() { return g_stream_packs.load(); }
bool amx_strip_packing() { return g_strip_packing.load(); }
i64 amx_column_budget() { return g_column_budget.load(); }

i64 amx_column_chunk(i64 N, i64 K) {
  const i64 nbs = round_up(N, kStrip) / kStrip;
  const i64 budget = g_column_budget.load();
  if (budget <= 0) return nbs;
  // a column block's packed B for one K chunk: 32 columns x 32 k x 2 bytes per k step
  const i64 block_bytes =
      std::min(round_up(K, kKc), g_k_block.load()) / kKc * kStrip * kKc * 2;
  return std::clamp<i64>(budget / block_bytes, 1, nbs);
}

void amx_gemm(bool ta, bool tb, i64 M, i64 N, i64 K, const float* A, i64 lda, AmxCopy a16,
              const float* B, i64 ldb, AmxCopy b16, bool accumulate, float* C, i64 ldc) {
  DLCM_CHECK(amx_gemm_fits(M, N, K), "internal: amx_gemm called for M=", M, " N=", N, " K=", K);
  g_amx_calls.fetch_add(1, std::memory_order_relaxed);
  const i64 Kp = round_up(K, kKc);
  const i64 kblock = g_k_block.load();
  // per strip for A not transposed (x W^T, dy W): 1.05-1.21x for an A used once, 0.97-1.02x
  // for one that three products share (q/k/v), which the whole packing packs once; A^T (the
  // weight gradients' dy^T) whole: its strips would be transposed again for every column chunk
  // (0.86-1.00x) (docs/performance.md, session 40)
  const bool strips = g_strip_packing.load() && !ta;
  isa_avx512::TileA a_op;
  const uint16_t* Bp;
  {
    prof::DetailScope ps("  GEMM: bf16 operand rounding", 0);  // packing rounds the operands
    // A not transposed: its stored rows are op(A)'s, along k; B transposed: its stored rows are
    // op(B)'s columns, along k
    if (!strips) a_op.packed = packed(0, PackKey{a16.version, true, !ta, M, K}, A, a16, lda, Kp);
    Bp = packed(1, PackKey{b16.version, false, tb, N, K}, B, b16, ldb, Kp);
  }
  if (strips) {
    isa_avx512::StripSource& as = a_op.strips;
    as.f = a16.data ? nullptr : A;
    as.h = a16.data;
    as.ld = a16.data ? a16.ld : lda;
    as.M = M;
    as.K = K;
  }
  const i64 blocks = (round_up(M, kStrip) / kStrip) * (round_up(N, kStrip) / kStrip);
  const i64 ncb = amx_column_chunk(N, K);
  // a strip's chunk of K, 32 rows x min(Kp, kblock) k, in each thread's buffer (strips only)
  const size_t abuf_len = strips ? size_t(kStrip * std::min(Kp, kblock)) : 0;
#pragma omp parallel if (blocks > 1)
  {
    const i64 nt = omp_get_num_threads(), id = omp_get_thread_num();
    thread_local U16Buf abuf;
    if (abuf.size() < abuf_len) abuf.resize(abuf_len);
    isa_avx512::TileA mine = a_op;  // this thread's strip buffer
    mine.buf = abuf.data();
    isa_avx512::tile_blocks(mine, Bp, C, ldc, M, N, Kp, accumulate, ncb, kblock / kKc,
                            blocks * id / nt, blocks * (id + 1) / nt);
  }
}

}  // namespace dlcm::ops
