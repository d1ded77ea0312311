// Segments (kernels/dlcm_ops.h): built once per batch from the boundary decisions. Plain code,
// compiled once (not per instruction-set variant like the rest of dlcm_ops.cpp).
#include <algorithm>
#include <limits>

#include "kernels/dlcm_ops.h"

namespace dlcm::ops {

void Segments::build(const uint8_t* b, const i32* tokens, i32 bos_id, i64 B_, i64 L_) {
  DLCM_CHECK(B_ > 0 && L_ > 0, "Segments::build: need B > 0 and L > 0, got B=", B_, " L=", L_);
  DLCM_CHECK(L_ < std::numeric_limits<i32>::max(), "Segments::build: L too large");
  B = B_;
  L = L_;
  seg.assign(B * L, 0);
  count.assign(B, 0);
  Mmax = 0;
  for (i64 r = 0; r < B; ++r) {
    const uint8_t* br = b + r * L;
    DLCM_CHECK(br[0] == 1, "Segments::build: row ", r, " does not start a concept at t = 0 (b=",
               int(br[0]), ")");
    i32 c = -1;
    for (i64 t = 0; t < L; ++t) {
      DLCM_CHECK(br[t] <= 1, "Segments::build: b[", r, ",", t, "] = ", int(br[t]),
                 ", expected 0 or 1");
      if (tokens && tokens[r * L + t] == bos_id)
        DLCM_CHECK(br[t] == 1, "Segments::build: BOS token at row ", r, ", position ", t,
                   " does not start a concept");
      c += br[t];
      seg[r * L + t] = c;
    }
    count[r] = c + 1;
    Mmax = std::max<i64>(Mmax, c + 1);
  }
  start.assign(B * Mmax, i32(L));
  len.assign(B * Mmax, 0);
  forced.assign(B * Mmax, 0);
  for (i64 r = 0; r < B; ++r) {
    for (i64 t = 0; t < L; ++t) {
      const i64 j = seg[r * L + t];
      if (b[r * L + t]) {
        start[r * Mmax + j] = i32(t);
        forced[r * Mmax + j] = (t == 0 || (tokens && tokens[r * L + t] == bos_id)) ? 1 : 0;
      }
      len[r * Mmax + j] += 1;
    }
  }
}

i64 Segments::total() const {
  i64 s = 0;
  for (i32 c : count) s += c;
  return s;
}

}  // namespace dlcm::ops
