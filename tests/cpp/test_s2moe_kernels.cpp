// The torch-free CPU kernels of s2moe_perturb and its backward (cpu/s2moe_perturb_kernel.h) on x
// seen as [A, S, C]: statistics as [A, C] blocks or one value, a work range [begin, end) of a,
// the statistics' sums over s in order, the outputs not asked for left alone.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "cpu/s2moe_perturb_kernel.h"

namespace {

using smoe::cpu::Stat;

template <typename T>
Stat<T> block(const std::vector<T>& v, int64_t C) {
  return {v.data(), C, 1};
}

template <typename T>
Stat<T> one(const std::vector<T>& v) {
  return {v.data(), 0, 0};
}

// x [A = 2, S = 3, C = 2], small integers and halves: every result is exact in float.
const std::vector<double> kX = {1, 2, 3, 4, 5, 6, -1, -2, -3, -4, -5, -6};
const std::vector<double> kN1 = {0, 1, -1, 2, 0.5, 0, 1, 1, 0, -2, 1, 0.5};
const std::vector<double> kN2 = {1, 0, 2, -1, 0, 1, -1, 1, 0.5, 0, 2, 1};
const std::vector<double> kMu = {0.5, -1, 2, 0};  // [A, C]
const std::vector<double> kMul = {1, 2, 0.5, 0};
const std::vector<double> kAdd = {2, 0.5, 1, 3};

template <typename T>
std::vector<T> as(const std::vector<double>& v) {
  std::vector<T> out;
  for (double d : v) out.push_back(static_cast<T>(d));
  return out;
}

// (1 + s_mul n1) x + (mu + s_add n2) in double, statistics [A, C] or (one) their first value.
std::vector<double> expected(bool one_value) {
  std::vector<double> out(12);
  for (int64_t a = 0; a < 2; ++a) {
    for (int64_t s = 0; s < 3; ++s) {
      for (int64_t c = 0; c < 2; ++c) {
        const int64_t i = (a * 3 + s) * 2 + c, j = one_value ? 0 : a * 2 + c;
        out[i] = (1 + kMul[j] * kN1[i]) * kX[i] + (kMu[j] + kAdd[j] * kN2[i]);
      }
    }
  }
  return out;
}

TEST(S2moePerturb, BlockAndOneValueStatistics) {
  const auto x = as<float>(kX), n1 = as<float>(kN1), n2 = as<float>(kN2);
  const auto mu = as<float>(kMu), sm = as<float>(kMul), sa = as<float>(kAdd);
  std::vector<float> out(12, NAN);
  smoe::cpu::s2moe_perturb<float>(x.data(), n1.data(), n2.data(), block(mu, 2), block(sm, 2),
                                  block(sa, 2), 3, 2, 0, 2, out.data());
  EXPECT_EQ(out, as<float>(expected(false)));
  smoe::cpu::s2moe_perturb<float>(x.data(), n1.data(), n2.data(), one(mu), one(sm), one(sa), 3, 2,
                                  0, 2, out.data());
  EXPECT_EQ(out, as<float>(expected(true)));
}

TEST(S2moePerturb, WritesOnlyItsRangeOfA) {
  const auto x = as<double>(kX), n1 = as<double>(kN1), n2 = as<double>(kN2);
  std::vector<double> out(12, -7.0);
  smoe::cpu::s2moe_perturb<double>(x.data(), n1.data(), n2.data(), block(kMu, 2), block(kMul, 2),
                                   block(kAdd, 2), 3, 2, 1, 2, out.data());
  const std::vector<double> want = expected(false);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(out[i], -7.0) << i;
  for (int i = 6; i < 12; ++i) EXPECT_EQ(out[i], want[i]) << i;
}

TEST(S2moePerturb, ZeroNoiseAndZeroMeanGiveXExactlyInBfloat16) {
  std::vector<smoe::bfloat16_t> x, zero, out(12);
  for (double v : kX) x.push_back(smoe::to_bfloat16(static_cast<float>(v) * 1.1f));
  for (int i = 0; i < 12; ++i) zero.push_back(smoe::to_bfloat16(0.f));
  std::vector<smoe::bfloat16_t> stat = {smoe::to_bfloat16(3.f)};
  smoe::cpu::s2moe_perturb<smoe::bfloat16_t>(x.data(), zero.data(), zero.data(), one(zero),
                                             one(stat), one(stat), 3, 2, 0, 2, out.data());
  for (int i = 0; i < 12; ++i) EXPECT_EQ(out[i].bits, x[i].bits) << i;
}

TEST(S2moePerturbBackward, GradXAndStatisticSumsOverS) {
  const auto g = as<double>({1, -1, 2, 0.5, -3, 1, 0.5, 2, -1, 1, 4, -2});
  std::vector<double> grad_x(12, NAN), d_mu(4, NAN), d_mul(4, NAN), d_add(4, NAN);
  smoe::cpu::s2moe_perturb_backward<double>(g.data(), kX.data(), kN1.data(), kN2.data(),
                                            block(kMul, 2), 3, 2, 0, 2, grad_x.data(), d_mu.data(),
                                            d_mul.data(), d_add.data());
  for (int64_t a = 0; a < 2; ++a) {
    for (int64_t c = 0; c < 2; ++c) {
      double mu = 0, mul = 0, add = 0;
      for (int64_t s = 0; s < 3; ++s) {
        const int64_t i = (a * 3 + s) * 2 + c;
        EXPECT_EQ(grad_x[i], g[i] * (1 + kMul[a * 2 + c] * kN1[i])) << i;
        mu += g[i];
        mul += g[i] * kN1[i] * kX[i];
        add += g[i] * kN2[i];
      }
      EXPECT_EQ(d_mu[a * 2 + c], mu);
      EXPECT_EQ(d_mul[a * 2 + c], mul);
      EXPECT_EQ(d_add[a * 2 + c], add);
    }
  }
}

TEST(S2moePerturbBackward, OutputsNotAskedForAreLeftAlone) {
  // grad_x and d_mul null; float32 storage accumulates in float.
  const auto x = as<float>(kX), n1 = as<float>(kN1), n2 = as<float>(kN2), sm = as<float>(kMul);
  const std::vector<float> g(12, 1.f);
  std::vector<float> d_mu(4, NAN), d_add(4, NAN);
  smoe::cpu::s2moe_perturb_backward<float>(g.data(), x.data(), n1.data(), n2.data(), one(sm), 3, 2,
                                           0, 2, nullptr, d_mu.data(), nullptr, d_add.data());
  EXPECT_EQ(d_mu, (std::vector<float>{3, 3, 3, 3}));
  EXPECT_EQ(d_add, (std::vector<float>{3, 0, 1.5, 2}));  // columns of n2 summed over s
}

TEST(S2moePerturbBackward, SumsInSOrderAndOnlyItsRange) {
  // One column (A = 1 per call, C = 1): 1e8 + 1 - 1e8 in float is 0 in s order (never 1).
  const std::vector<float> g = {1e8f, 1.f, -1e8f}, x(3, 1.f), n(3, 1.f), s = {0.f};
  std::vector<float> d_mu = {NAN, -5.f};
  smoe::cpu::s2moe_perturb_backward<float>(g.data(), x.data(), n.data(), n.data(), one(s), 3, 1, 0,
                                           1, nullptr, d_mu.data(), nullptr, nullptr);
  EXPECT_EQ(d_mu[0], 0.f);
  EXPECT_EQ(d_mu[1], -5.f);  // a = 1 is outside the range [0, 1)
}

TEST(S2moePerturbBackward, HalfStorageAccumulatesInFloat) {
  // 2048 + 1 + 1 is 2048 in fp16 step by step, 2050 in the float accumulator.
  std::vector<smoe::half_t> g, x, n;
  for (float v : {2048.f, 1.f, 1.f}) g.push_back(smoe::to_half(v));
  for (int i = 0; i < 3; ++i) x.push_back(smoe::to_half(1.f)), n.push_back(smoe::to_half(1.f));
  const std::vector<smoe::half_t> s = {smoe::to_half(0.f)};
  float d_mu = NAN, d_mul = NAN;
  smoe::cpu::s2moe_perturb_backward<smoe::half_t>(g.data(), x.data(), n.data(), n.data(), one(s), 3,
                                                  1, 0, 1, nullptr, &d_mu, &d_mul, nullptr);
  EXPECT_EQ(d_mu, 2050.f);
  EXPECT_EQ(d_mul, 2050.f);
}

}  // namespace
