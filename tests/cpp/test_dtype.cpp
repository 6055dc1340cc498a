#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "common/dtype.h"

namespace {

TEST(Dtype, HalfRoundTripsExactValues) {
  for (float v : {0.0f, 1.0f, -2.5f, 0.099975586f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f}) {
    EXPECT_EQ(smoe::to_float(smoe::to_half(v)), v) << v;
  }
}

TEST(Dtype, HalfRoundsToNearestEvenAndSaturates) {
  EXPECT_EQ(smoe::to_half(1.0f).bits, 0x3C00);
  EXPECT_EQ(smoe::to_half(1.0f + 0x1.0p-11f).bits, 0x3C00);  // tie -> even
  EXPECT_EQ(smoe::to_half(1.0f + 3 * 0x1.0p-11f).bits, 0x3C02);
  EXPECT_TRUE(std::isinf(smoe::to_float(smoe::to_half(1e6f))));
  EXPECT_TRUE(std::isnan(smoe::to_float(smoe::to_half(std::nanf("")))));
}

TEST(Dtype, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(smoe::to_bfloat16(1.0f).bits, 0x3F80);
  EXPECT_EQ(smoe::to_float(smoe::to_bfloat16(3.140625f)), 3.140625f);
  EXPECT_EQ(smoe::to_bfloat16(1.0f + 0x1.0p-8f).bits, 0x3F80);  // tie -> even
  EXPECT_EQ(smoe::to_bfloat16(1.0f + 3 * 0x1.0p-8f).bits, 0x3F82);
  EXPECT_TRUE(std::isnan(smoe::to_float(smoe::to_bfloat16(std::nanf("")))));
}

}  // namespace
