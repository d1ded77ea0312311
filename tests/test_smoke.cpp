#include "core/params.h"
#include "kernels/gemm.h"
#include "testing.h"

using namespace dlcm;

TEST(Gemm, MatchesNaive) {
  const i64 M = 37, N = 29, K = 53;
  Buf A(M * K), B(K * N), C(M * N), R(M * N, 0.f);
  test::fill_normal(A.data(), A.size(), 1);
  test::fill_normal(B.data(), B.size(), 2);
  for (i64 i = 0; i < M; ++i)
    for (i64 j = 0; j < N; ++j) {
      double s = 0;
      for (i64 k = 0; k < K; ++k) s += double(A[i * K + k]) * B[k * N + j];
      R[i * N + j] = float(s);
    }
  ops::gemm(false, false, M, N, K, 1.f, A.data(), K, B.data(), N, 0.f, C.data(), N);
  EXPECT_LT(test::rel_err(C.data(), R.data(), M * N), 1e-5);
}

TEST(ParamStore, AlignedAndInitialised) {
  ParamStore ps;
  Param* a = ps.add("a", {3, 5}, ParamGroup::Other, true);
  Param* b = ps.add("b", {7}, ParamGroup::Other, false);
  b->init_one = true;
  ps.finalize();
  ps.init(123);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a->w) % 64, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b->w) % 64, 0u);
  EXPECT_EQ(b->w[6], 1.0f);
  EXPECT_NE(a->w[0], 0.0f);
}
