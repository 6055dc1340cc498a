// The torch-free VNNI packing of bf16 GEMM operands (cpu/vnni_pack.h): out[k / 2][n] holds b[k, n]
// in its low and b[k + 1, n] in its high 16 bits, from row-contiguous and column-contiguous b, with
// padded leading dimensions, N past and short of the 16-column block of the column path. And the
// pieces of gate_linear's backward: the (hi, lo) split of a float32 gradient, the duplicated-row
// panel, the rounding of a float32 tile to bf16.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/vnni_pack.h"

namespace {

// b[k, n] = 1000 k + n (distinct 16-bit words) in a buffer of leading dimension ld along `rows`.
std::vector<uint16_t> make(int64_t K, int64_t N, int64_t ld, bool column_major) {
  std::vector<uint16_t> b(column_major ? N * ld : K * ld, 0xFFFF);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) {
      b[column_major ? n * ld + k : k * ld + n] = static_cast<uint16_t>(1000 * k + n);
    }
  }
  return b;
}

void expect_packed(const std::vector<uint32_t>& out, int64_t K, int64_t N) {
  for (int64_t k = 0; k < K; k += 2) {
    for (int64_t n = 0; n < N; ++n) {
      const uint32_t want = (1000 * k + n) | ((1000 * (k + 1) + n) << 16);
      ASSERT_EQ(out[(k / 2) * N + n], want) << "k " << k << " n " << n;
    }
  }
}

TEST(VnniPack, RowContiguous) {
  for (const auto& [K, N, ld] : {std::tuple{2, 1, 1}, {6, 5, 7}, {8, 40, 40}}) {
    const auto b = make(K, N, ld, false);
    std::vector<uint32_t> out(K / 2 * N, 0);
    smoe::cpu::pack_vnni_rows(b.data(), ld, K, N, out.data());
    expect_packed(out, K, N);
  }
}

TEST(VnniPack, ColumnContiguous) {
  for (const auto& [K, N, ld] : {std::tuple{2, 1, 2}, {6, 17, 9}, {10, 33, 10}, {4, 16, 4}}) {
    const auto b = make(K, N, ld, true);
    std::vector<uint32_t> out(K / 2 * N, 0);
    smoe::cpu::pack_vnni_cols(b.data(), ld, K, N, out.data());
    expect_packed(out, K, N);
  }
}

float lo_half(uint32_t w) { return smoe::to_float(smoe::bfloat16_t{uint16_t(w >> 16)}); }
float hi_half(uint32_t w) { return smoe::to_float(smoe::bfloat16_t{uint16_t(w & 0xFFFF)}); }

TEST(SplitPair, HiIsTheRoundedValueAndLoTheRest) {
  for (float g : {1.0f, -3.0f, 0.1f, 1.0f + 0x1p-12f, -123.456f, 0x1p-100f, 3e38f, 0.0f}) {
    const uint32_t w = smoe::cpu::split_pair(g);
    const float hi = hi_half(w), lo = lo_half(w);
    EXPECT_EQ(hi, smoe::to_float(smoe::to_bfloat16(g))) << g;
    EXPECT_EQ(lo, smoe::to_float(smoe::to_bfloat16(g - hi))) << g;
    EXPECT_LE(std::fabs(g - (hi + lo)), std::fabs(g) * 0x1p-16f) << g;  // ~2^-17, 2^-16 bound
  }
  EXPECT_EQ(hi_half(smoe::cpu::split_pair(1.0f + 0x1p-12f)), 1.0f);
  EXPECT_EQ(lo_half(smoe::cpu::split_pair(1.0f + 0x1p-12f)), 0x1p-12f);  // exact in two parts
}

TEST(SplitPair, NonFiniteValuesLeaveLoZero) {
  const float inf = std::numeric_limits<float>::infinity();
  for (float g : {inf, -inf, std::numeric_limits<float>::quiet_NaN(), 3.4e38f}) {
    const uint32_t w = smoe::cpu::split_pair(g);
    EXPECT_FALSE(std::isfinite(hi_half(w))) << g;  // 3.4e38 rounds past bf16's largest value
    EXPECT_EQ(w >> 16, 0u) << g;
  }
}

TEST(SplitPairs, RowsAndTransposedRows) {
  const int64_t R = 3, C = 5;
  std::vector<float> g(R * C);
  for (int64_t i = 0; i < R * C; ++i) g[i] = 0.1f * float(i) - 0.7f;
  std::vector<uint32_t> rows(R * C), cols(C * R);
  smoe::cpu::split_pairs(g.data(), C, 1, R, C, rows.data());
  smoe::cpu::split_pairs(g.data(), 1, C, C, R, cols.data());
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      EXPECT_EQ(rows[r * C + c], smoe::cpu::split_pair(g[r * C + c]));
      EXPECT_EQ(cols[c * R + r], smoe::cpu::split_pair(g[r * C + c]));
    }
  }
}

TEST(VnniPack, DuplicatedRows) {
  for (const auto& [K, N, ld, column_major] :
       {std::tuple{1, 1, 1, false}, {3, 5, 7, false}, {4, 17, 6, true}}) {
    const auto b = make(K, N, ld, column_major);
    std::vector<uint32_t> out(K * N, 0);
    const int64_t ld_k = column_major ? 1 : ld, ld_n = column_major ? ld : 1;
    smoe::cpu::pack_vnni_dup(b.data(), ld_k, ld_n, K, N, out.data());
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t n = 0; n < N; ++n) {
        const uint32_t v = 1000 * k + n;
        ASSERT_EQ(out[k * N + n], v | (v << 16)) << "k " << k << " n " << n;
      }
    }
  }
}

TEST(RoundBf16, RoundsEachElementIntoAStridedOutput) {
  const std::vector<float> in = {1.0f, 1.0f + 0x1p-8f, 1.0f + 0x1p-7f + 0x1p-9f, -2.5f, 0.0f, 7.0f};
  std::vector<uint16_t> out(2 * 4, 0xFFFF);
  smoe::cpu::round_bf16(in.data(), 3, 2, 3, out.data(), 4);
  for (int64_t r = 0; r < 2; ++r) {
    for (int64_t c = 0; c < 3; ++c) EXPECT_EQ(out[r * 4 + c], smoe::to_bfloat16(in[r * 3 + c]).bits);
    EXPECT_EQ(out[r * 4 + 3], 0xFFFF);  // the padding column is untouched
  }
  EXPECT_EQ(smoe::to_float(smoe::bfloat16_t{out[1]}), 1.0f);  // a tie rounds to even
}

}  // namespace
