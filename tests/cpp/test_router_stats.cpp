// The torch-free kernels of router_stats (cpu/router_stats_kernel.h): lse and the probabilities'
// column sums against double math, rows with -inf entries and only -inf, a range split anywhere
// giving the same per-row lse, the blocks added in order, and the backward against its formula
// with either gradient absent.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/router_stats_kernel.h"

namespace {

constexpr float kInf = INFINITY;

// Distinct, deterministic logits in [-4, 4).
std::vector<float> logits_of(int64_t T, int64_t E) {
  std::vector<float> l(static_cast<size_t>(T * E));
  for (int64_t i = 0; i < T * E; ++i) l[i] = static_cast<float>((i * 7919) % 800) / 100.f - 4.f;
  return l;
}

void softmax_row(const float* l, int64_t E, std::vector<double>* p, double* lse) {
  double m = -INFINITY, s = 0;
  for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<double>(l[e]));
  for (int64_t e = 0; e < E; ++e) s += std::exp(l[e] - m);
  p->resize(E);
  for (int64_t e = 0; e < E; ++e) (*p)[e] = std::exp(l[e] - m) / s;
  *lse = m + std::log(s);
}

TEST(RouterStats, MatchesDoubleMath) {
  for (const int64_t E : {1, 8, 17, 64}) {
    const int64_t T = 40;
    auto l = logits_of(T, E);
    if (E > 1) l[3 * E] = -kInf;  // a -inf entry: probability 0
    std::vector<float> prob_sum(E), lse(T), ex(E);
    smoe::cpu::router_stats(l.data(), E, E, 0, T, prob_sum.data(), lse.data(), ex.data());
    std::vector<double> want_sum(E, 0.0), p;
    for (int64_t t = 0; t < T; ++t) {
      double want_lse;
      softmax_row(l.data() + t * E, E, &p, &want_lse);
      EXPECT_NEAR(lse[t], want_lse, 1e-5 * (1 + std::abs(want_lse))) << "E " << E << " t " << t;
      for (int64_t e = 0; e < E; ++e) want_sum[e] += p[e];
    }
    for (int64_t e = 0; e < E; ++e) EXPECT_NEAR(prob_sum[e], want_sum[e], 1e-5 * T) << e;
  }
}

TEST(RouterStats, RowOfOnlyMinusInfHasLseMinusInf) {
  const float l[3] = {-kInf, -kInf, -kInf};
  float prob_sum[3], lse[1], ex[3];
  smoe::cpu::router_stats(l, 3, 3, 0, 1, prob_sum, lse, ex);
  EXPECT_EQ(lse[0], -kInf);
  for (const float p : prob_sum) EXPECT_TRUE(std::isnan(p));
}

TEST(RouterStats, SplitRangesGiveTheSameRowsAndOrderedBlocksTheSameSum) {
  const int64_t T = 70, E = 19, block = 16;
  const auto l = logits_of(T, E);
  std::vector<float> ex(E), lse_a(T), lse_b(T);
  const int64_t blocks = (T + block - 1) / block;
  std::vector<float> part(blocks * E), sum_a(E), sum_b(E);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t end = std::min(T, (b + 1) * block);
    smoe::cpu::router_stats(l.data(), E, E, b * block, end, part.data() + b * E, lse_a.data(),
                            ex.data());
  }
  smoe::cpu::sum_blocks(part.data(), blocks, E, sum_a.data());
  // the same blocks computed in reverse order: the same bits
  for (int64_t b = blocks - 1; b >= 0; --b) {
    const int64_t end = std::min(T, (b + 1) * block);
    smoe::cpu::router_stats(l.data(), E, E, b * block, end, part.data() + b * E, lse_b.data(),
                            ex.data());
  }
  smoe::cpu::sum_blocks(part.data(), blocks, E, sum_b.data());
  EXPECT_EQ(sum_a, sum_b);
  EXPECT_EQ(lse_a, lse_b);
}

TEST(RouterStats, BackwardMatchesItsFormula) {
  const int64_t T = 9, E = 21;
  const auto l = logits_of(T, E);
  std::vector<float> gp(E), gl(T), p(E), out(T * E);
  for (int64_t e = 0; e < E; ++e) gp[e] = std::sin(static_cast<float>(e));
  for (int64_t t = 0; t < T; ++t) gl[t] = std::cos(static_cast<float>(t));
  for (const bool with_gp : {true, false}) {
    for (const bool with_gl : {true, false}) {
      smoe::cpu::router_stats_backward(with_gp ? gp.data() : nullptr,
                                       with_gl ? gl.data() : nullptr, l.data(), E, E, 0, T,
                                       out.data(), p.data());
      std::vector<double> q;
      for (int64_t t = 0; t < T; ++t) {
        double lse, dot = 0;
        softmax_row(l.data() + t * E, E, &q, &lse);
        for (int64_t e = 0; e < E; ++e) dot += with_gp ? q[e] * gp[e] : 0.0;
        for (int64_t e = 0; e < E; ++e) {
          const double want = q[e] * ((with_gp ? gp[e] : 0.0) - dot + (with_gl ? gl[t] : 0.0));
          EXPECT_NEAR(out[t * E + e], want, 1e-6) << with_gp << with_gl << " " << t << "," << e;
        }
      }
    }
  }
}

}  // namespace
