// Torch-free VNNI packing of bf16 GEMM operands for oneDNN's micro-kernel (csrc/cpu/brgemm.h).
#pragma once

#include <cstdint>

#include "common/inline.h"

namespace smoe::cpu {

// VNNI packing of a bf16 [K, N] operand (K even) for the micro-kernel: out[k / 2][n] holds the
// 16-bit words of b[k, n] (low) and b[k + 1, n] (high). Rows of b contiguous (ld_n = 1):
SMOE_INLINE void pack_vnni_rows_impl(const uint16_t* b, int64_t ld_k, int64_t K, int64_t N,
                                     uint32_t* out) {
  for (int64_t k = 0; k < K; k += 2) {
    const uint16_t* __restrict__ r0 = b + k * ld_k;
    const uint16_t* __restrict__ r1 = r0 + ld_k;
    uint32_t* __restrict__ o = out + (k / 2) * N;
    for (int64_t n = 0; n < N; ++n) o[n] = uint32_t{r0[n]} | (uint32_t{r1[n]} << 16);
  }
}

// Columns of b contiguous (ld_k = 1, a transposed weight): each (k, k + 1) pair is one 32-bit
// word; 16 columns at a time, so that the reads stay in 16 sequential streams.
SMOE_INLINE void pack_vnni_cols_impl(const uint16_t* b, int64_t ld_n, int64_t K, int64_t N,
                                     uint32_t* out) {
  constexpr int64_t kCols = 16;
  for (int64_t n0 = 0; n0 < N; n0 += kCols) {
    const int64_t nc = N - n0 < kCols ? N - n0 : kCols;
    for (int64_t p = 0; p < K / 2; ++p) {
      uint32_t* __restrict__ o = out + p * N + n0;
      for (int64_t n = 0; n < nc; ++n) {
        uint32_t word;
        __builtin_memcpy(&word, b + (n0 + n) * ld_n + 2 * p, sizeof word);
        o[n] = word;
      }
    }
  }
}

// The entry points the glue calls, one clone per x86 vector ISA (SMOE_ISA_CLONES).
SMOE_ISA_CLONES inline void pack_vnni_rows(const uint16_t* b, int64_t ld_k, int64_t K, int64_t N,
                                           uint32_t* out) {
  pack_vnni_rows_impl(b, ld_k, K, N, out);
}
SMOE_ISA_CLONES inline void pack_vnni_cols(const uint16_t* b, int64_t ld_n, int64_t K, int64_t N,
                                           uint32_t* out) {
  pack_vnni_cols_impl(b, ld_n, K, N, out);
}

}  // namespace smoe::cpu
