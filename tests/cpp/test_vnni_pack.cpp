// The torch-free VNNI packing of bf16 GEMM operands (cpu/vnni_pack.h): out[k / 2][n] holds b[k, n]
// in its low and b[k + 1, n] in its high 16 bits, from row-contiguous and column-contiguous b, with
// padded leading dimensions, N past and short of the 16-column block of the column path.
#include <gtest/gtest.h>

#include <cstdint>
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

}  // namespace
