// The concept cross-attention as a flexible masked-attention implementation computes it (the
// role Flex Attention plays in the paper's Table 6): dense score matrices with an explicit
// mask and the log-multiplicity bias, softmax row by row, products through oneDNN sgemm.
// The compact kernel (dlcm_ops.cpp) computes the same function without materialising scores;
// `dlcm bench xattn` times the two (and replicate + the causal kernel) against each other.
//
// Work is split in chunks of kMaskedChunk query rows of one head. A chunk forms the scores of
// the key columns 0..seg(last row) only (key blocks that no row of the chunk can see are
// skipped, as a block mask does); inside that rectangle every score is computed and the
// invisible ones are set to -inf. sgemm called inside a parallel region runs on the calling
// thread, so chunks (forward) and (row, kv head) tasks (backward) are the parallel units.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/dlcm_ops.h"
#include "kernels/gemm.h"

#include "kernels/isa_target.h"  // last include: the variant's target and namespace
#include "kernels/simd.h"

namespace dlcm::ops::DLCM_ISA_NS {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_masked_args(const Segments& sg, i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd,
                       const char* who) {
  DLCM_CHECK(sg.B == B && sg.L == L, who, ": Segments were built for B=", sg.B, ", L=", sg.L,
             " but the call has B=", B, ", L=", L);
  DLCM_CHECK(i64(sg.seg.size()) == B * L && i64(sg.start.size()) == B * sg.Mmax &&
                 i64(sg.len.size()) == B * sg.Mmax,
             who, ": Segments are inconsistent (call Segments::build)");
  DLCM_CHECK(Hq > 0 && Hkv > 0 && hd > 0 && Hq % Hkv == 0, who, ": bad head shape Hq=", Hq,
             " Hkv=", Hkv, " hd=", hd);
}

// Adds the bias and the mask to the score rows S [nq, nk] of queries t0..t0+nq-1 of row b:
// k < seg(t): + log len_k; k == seg(t): + log(t - start + 1); k > seg(t): -inf.
void bias_and_mask(float* S, i64 nq, i64 nk, i64 t0, const Segments& sg, i64 b,
                   const float* logm) {
  const i32* sr = sg.seg.data() + b * sg.L;
  for (i64 i = 0; i < nq; ++i) {
    float* row = S + i * nk;
    const i64 t = t0 + i, s = sr[t];
#pragma omp simd
    for (i64 kk = 0; kk < s; ++kk) row[kk] += logm[kk];
    row[s] += std::log(float(t - sg.start[b * sg.Mmax + s] + 1));
    for (i64 kk = s + 1; kk < nk; ++kk) row[kk] = kNegInf;
  }
}

void log_lengths(float* logm, const Segments& sg, i64 b) {
  for (i64 kk = 0; kk < sg.count[b]; ++kk) logm[kk] = std::log(float(sg.len[b * sg.Mmax + kk]));
}

struct Chunk {
  i64 t0, nq, nk;
};
Chunk chunk_of(const Segments& sg, i64 b, i64 c) {
  Chunk ch;
  ch.t0 = c * kMaskedChunk;
  ch.nq = std::min(kMaskedChunk, sg.L - ch.t0);
  ch.nk = i64(sg.seg[b * sg.L + ch.t0 + ch.nq - 1]) + 1;
  return ch;
}

}  // namespace

void concept_attention_masked_forward(float* out, float* lse, const float* q, const float* k,
                                      const float* v, const Segments& sg, i64 B, i64 L, i64 Hq,
                                      i64 Hkv, i64 hd, float scale) {
  check_masked_args(sg, B, L, Hq, Hkv, hd, "concept_attention_masked_forward");
  const i64 G = Hq / Hkv, K1 = sg.Mmax + 1, nc = (L + kMaskedChunk - 1) / kMaskedChunk;
  const i64 ldq = Hq * hd, ldk = Hkv * hd, tasks = B * Hq * nc;
#pragma omp parallel if(tasks >= omp_get_max_threads() && L * K1 * hd > (1 << 16))
  {
    Buf S(kMaskedChunk * K1), logm(K1);
    i64 last_b = -1;
#pragma omp for schedule(dynamic, 1)
    for (i64 task = 0; task < tasks; ++task) {
      const i64 b = task / (Hq * nc), h = (task / nc) % Hq, c = nc - 1 - task % nc;
      const i64 g = h / G;
      if (b != last_b) {
        log_lengths(logm.data(), sg, b);
        last_b = b;
      }
      const Chunk ch = chunk_of(sg, b, c);
      const float* qc = q + ((b * L + ch.t0) * Hq + h) * hd;
      const float* kb = k + (b * K1 * Hkv + g) * hd;
      const float* vb = v + (b * K1 * Hkv + g) * hd;
      // S = scale Q K^T [nq, nk], bias and mask, softmax by rows
      gemm(false, true, ch.nq, ch.nk, hd, scale, qc, ldq, kb, ldk, 0.f, S.data(), ch.nk);
      bias_and_mask(S.data(), ch.nq, ch.nk, ch.t0, sg, b, logm.data());
      for (i64 i = 0; i < ch.nq; ++i) {
        float* row = S.data() + i * ch.nk;
        const float mx = simd::hmax(row, ch.nk);
        const double sum = simd::exp_sub_sum(row, ch.nk, mx);
        const float inv = float(1.0 / sum);
#pragma omp simd
        for (i64 kk = 0; kk < ch.nk; ++kk) row[kk] *= inv;
        lse[(b * Hq + h) * L + ch.t0 + i] = mx + float(std::log(sum));
      }
      // O = P V [nq, hd]
      gemm(false, false, ch.nq, hd, ch.nk, 1.f, S.data(), ch.nk, vb, ldk, 0.f,
           out + ((b * L + ch.t0) * Hq + h) * hd, ldq);
    }
  }
}

void concept_attention_masked_backward(float* dq, float* dk, float* dv, const float* dout,
                                       const float* out, const float* lse, const float* q,
                                       const float* k, const float* v, const Segments& sg,
                                       i64 B, i64 L, i64 Hq, i64 Hkv, i64 hd, float scale) {
  check_masked_args(sg, B, L, Hq, Hkv, hd, "concept_attention_masked_backward");
  const i64 G = Hq / Hkv, K1 = sg.Mmax + 1, nc = (L + kMaskedChunk - 1) / kMaskedChunk;
  const i64 ldq = Hq * hd, ldk = Hkv * hd, tasks = B * Hkv;
  // One task per (row, kv head) owns its dk/dv entries and the dq of its query heads. With
  // fewer tasks than threads the tasks run one after another and sgemm uses the threads.
#pragma omp parallel if(tasks >= omp_get_max_threads() && L * K1 * hd > (1 << 16))
  {
    Buf P(kMaskedChunk * K1), dS(kMaskedChunk * K1), logm(K1);
    std::vector<float> D(kMaskedChunk);
#pragma omp for schedule(dynamic, 1)
    for (i64 task = 0; task < tasks; ++task) {
      const i64 b = task / Hkv, g = task % Hkv;
      log_lengths(logm.data(), sg, b);
      const float* kb = k + (b * K1 * Hkv + g) * hd;
      const float* vb = v + (b * K1 * Hkv + g) * hd;
      float* dkb = dk + (b * K1 * Hkv + g) * hd;
      float* dvb = dv + (b * K1 * Hkv + g) * hd;
      for (i64 hh = 0; hh < G; ++hh) {
        const i64 h = g * G + hh;
        for (i64 c = 0; c < nc; ++c) {
          const Chunk ch = chunk_of(sg, b, c);
          const i64 off = ((b * L + ch.t0) * Hq + h) * hd;
          // P = exp(S + bias - lse), recomputed
          gemm(false, true, ch.nq, ch.nk, hd, scale, q + off, ldq, kb, ldk, 0.f, P.data(), ch.nk);
          bias_and_mask(P.data(), ch.nq, ch.nk, ch.t0, sg, b, logm.data());
          for (i64 i = 0; i < ch.nq; ++i) {
            float* row = P.data() + i * ch.nk;
            simd::exp_sub_sum(row, ch.nk, lse[(b * Hq + h) * L + ch.t0 + i]);
            const float* o = out + off + i * ldq;
            const float* d = dout + off + i * ldq;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (i64 x = 0; x < hd; ++x) s += o[x] * d[x];
            D[i] = s;
          }
          // dP = dO V^T; dS = P (dP - D) scale
          gemm(false, true, ch.nq, ch.nk, hd, 1.f, dout + off, ldq, vb, ldk, 0.f, dS.data(),
               ch.nk);
          for (i64 i = 0; i < ch.nq; ++i) {
            float* ds = dS.data() + i * ch.nk;
            const float* p = P.data() + i * ch.nk;
            const float Di = D[i];
#pragma omp simd
            for (i64 kk = 0; kk < ch.nk; ++kk) ds[kk] = p[kk] * (ds[kk] - Di) * scale;
          }
          // dQ += dS K; dK += dS^T Q; dV += P^T dO
          gemm(false, false, ch.nq, hd, ch.nk, 1.f, dS.data(), ch.nk, kb, ldk, 1.f, dq + off,
               ldq);
          gemm(true, false, ch.nk, hd, ch.nq, 1.f, dS.data(), ch.nk, q + off, ldq, 1.f, dkb,
               ldk);
          gemm(true, false, ch.nk, hd, ch.nq, 1.f, P.data(), ch.nk, dout + off, ldq, 1.f, dvb,
               ldk);
        }
      }
    }
  }
}

}  // namespace dlcm::ops::DLCM_ISA_NS
