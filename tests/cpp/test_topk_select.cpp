// The keyed top-k selection of cpu/topk_select.h against the plain comparison it replaces.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/topk_select.h"
#include "cpu/topk_softmax_kernel.h"

namespace {

using smoe::cpu::select_keys;
using smoe::cpu::topk_before;
using smoe::cpu::topk_key;

// Values with ties, both zeros, -inf, subnormals and the extremes.
std::vector<float> awkward_values() {
  return {0.0f,  -0.0f, 1.0f,   -1.0f,    1.0f,   -INFINITY, 3e38f,  -3e38f, 1e-45f, -1e-45f,
          0.5f,  -INFINITY, 0.0f, -0.0f,  2.0f,   2.0f,      -2.5f,  1e-30f, 7.0f,   -7.0f,
          0.25f, 0.25f, -0.25f, 123.0f, -123.0f, 4.0f,      4.0f,   4.0f,   -1e-30f, 6.5f,
          -6.5f, 0.125f, 9.0f,  -9.0f,  1.5f,   -1.5f,     0.0f,   3.0f,   -3.0f,  8.0f};
}

TEST(TopkSelect, KeysOrderExactlyAsTopkBefore) {
  const std::vector<float> v = awkward_values();
  const int64_t n = static_cast<int64_t>(v.size());
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = 0; b < n; ++b) {
      if (a == b) continue;
      EXPECT_EQ(topk_key(v[a], a) > topk_key(v[b], b), topk_before(v[a], a, v[b], b))
          << "a=" << a << " (" << v[a] << ") b=" << b << " (" << v[b] << ")";
    }
  }
}

TEST(TopkSelect, OrderedBitsRoundTripAndSignedZeros) {
  for (float x : awkward_values()) {
    const float back = smoe::cpu::from_ordered_bits(smoe::cpu::ordered_bits(x));
    EXPECT_EQ(back, x);  // -0 comes back as +0, which compares equal
  }
  EXPECT_EQ(smoe::cpu::ordered_bits(-0.0f), smoe::cpu::ordered_bits(0.0f));
}

// The passes (k <= kKeyPasses) and the partial sort (k above) pick the same prefix, which is the
// insertion selection's.
TEST(TopkSelect, PassesSortAndInsertionAgree) {
  const std::vector<float> v = awkward_values();
  const int64_t E = static_cast<int64_t>(v.size());
  const auto rank = [&](int64_t e) { return v[e]; };
  std::vector<int32_t> want(E);
  smoe::cpu::select_topk_passes<float>(rank, E, E, want.data());
  for (int64_t k : {int64_t(1), int64_t(3), smoe::cpu::kKeyPasses, smoe::cpu::kKeyPasses + 1, E}) {
    std::vector<uint64_t> keys(E);
    for (int64_t e = 0; e < E; ++e) keys[e] = topk_key(v[e], e);
    std::vector<int32_t> got(k);
    select_keys(keys.data(), E, k, got.data());
    EXPECT_EQ(got, std::vector<int32_t>(want.begin(), want.begin() + k)) << "k=" << k;
  }
}

// A row of equal values (both zeros) picks indices in order, and the softmax weights are equal.
TEST(TopkSoftmax, SignedZerosTieByIndex) {
  const std::vector<float> logits = {-0.0f, 0.0f, -0.0f, 0.0f};
  std::vector<float> w(3);
  std::vector<int32_t> e(3);
  EXPECT_EQ(smoe::cpu::topk_softmax(logits.data(), 4, 4, 3, true, nullptr, 0, 1, w.data(),
                                    e.data()),
            -1);
  EXPECT_EQ(e, (std::vector<int32_t>{0, 1, 2}));
  for (float x : w) EXPECT_FLOAT_EQ(x, 1.0f / 3);
}

// -inf logits are valid (never chosen before a finite one); a row of only -inf is not.
TEST(TopkSoftmax, MinusInfinityRanksLastAndAnAllMinusInfRowIsReported) {
  const std::vector<float> logits = {-INFINITY, 2.0f, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
  std::vector<float> w(6);
  std::vector<int32_t> e(6);
  EXPECT_EQ(smoe::cpu::topk_softmax(logits.data(), 3, 3, 3, false, nullptr, 0, 2, w.data(),
                                    e.data()),
            1);
  EXPECT_EQ((std::vector<int32_t>(e.begin(), e.begin() + 3)), (std::vector<int32_t>{1, 0, 2}));
  EXPECT_EQ((std::vector<float>(w.begin(), w.begin() + 3)), (std::vector<float>{1.0f, 0.0f, 0.0f}));
}

}  // namespace
