// Torch-free VNNI packing of bf16 GEMM operands for oneDNN's micro-kernel (csrc/cpu/brgemm.h).
#pragma once

#include <cstdint>

#include "common/dtype.h"
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

// gate_linear's backward runs a float32 gradient g through the bf16 micro-kernel as two bf16 parts,
// hi = bf16(g) and lo = bf16(g - hi) (together g to ~2^-17 relative), adjacent along the GEMM's
// reduction: the A operand holds (hi, lo) pairs, and the B operand's VNNI pair for them is the
// same value twice, so one bf16 product pair computes hi * b + lo * b with float32 accumulation.

// The (hi, lo) pair of g as one 32-bit word: hi in the low, lo in the high 16 bits.
// A non-finite hi (g infinite or NaN, or rounded past bf16's largest value) gets lo = 0: hi alone
// then carries the inf or NaN, where hi + lo would be NaN.
SMOE_INLINE uint32_t split_pair(float g) {
  const bfloat16_t hi = to_bfloat16(g);
  const float h = to_float(hi);
  const bfloat16_t lo = to_bfloat16(h - h == 0.0f ? g - h : 0.0f);
  return uint32_t{hi.bits} | (uint32_t{lo.bits} << 16);
}

// out[r][c] = split_pair(g[r * ld_r + c * ld_c]) for r < R, c < C: an A operand [R, 2C] whose
// row r is (hi, lo) of g's row r; with (ld_r, ld_c) swapped, of g's column r (the transpose).
SMOE_INLINE void split_pairs_impl(const float* g, int64_t ld_r, int64_t ld_c, int64_t R,
                                  int64_t C, uint32_t* out) {
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = split_pair(g[r * ld_r + c * ld_c]);
  }
}

// The VNNI panel [K][N][2] of the [2K, N] operand whose rows 2k and 2k + 1 are both b's row k:
// out[k][n] = b[k, n] in both halves (b's strides ld_k, ld_n).
SMOE_INLINE void pack_vnni_dup_impl(const uint16_t* b, int64_t ld_k, int64_t ld_n, int64_t K,
                                    int64_t N, uint32_t* out) {
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) {
      const uint32_t v = b[k * ld_k + n * ld_n];
      out[k * N + n] = v | (v << 16);
    }
  }
}

// out[r * ld_o + c] = bf16(c_in[r * ld_c + c]) (round to nearest even) for r < R, c < C: a float32
// result tile of the micro-kernel into a bf16 output.
SMOE_INLINE void round_bf16_impl(const float* in, int64_t ld_in, int64_t R, int64_t C,
                                 uint16_t* out, int64_t ld_out) {
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) out[r * ld_out + c] = to_bfloat16(in[r * ld_in + c]).bits;
  }
}

// The entry points the glue calls, one clone per x86 vector ISA (SMOE_ISA_CLONES).
SMOE_ISA_CLONES inline void round_bf16(const float* in, int64_t ld_in, int64_t R, int64_t C,
                                       uint16_t* out, int64_t ld_out) {
  round_bf16_impl(in, ld_in, R, C, out, ld_out);
}
SMOE_ISA_CLONES inline void split_pairs(const float* g, int64_t ld_r, int64_t ld_c, int64_t R,
                                        int64_t C, uint32_t* out) {
  split_pairs_impl(g, ld_r, ld_c, R, C, out);
}
SMOE_ISA_CLONES inline void pack_vnni_dup(const uint16_t* b, int64_t ld_k, int64_t ld_n, int64_t K,
                                          int64_t N, uint32_t* out) {
  pack_vnni_dup_impl(b, ld_k, ld_n, K, N, out);
}
SMOE_ISA_CLONES inline void pack_vnni_rows(const uint16_t* b, int64_t ld_k, int64_t K, int64_t N,
                                           uint32_t* out) {
  pack_vnni_rows_impl(b, ld_k, K, N, out);
}
SMOE_ISA_CLONES inline void pack_vnni_cols(const uint16_t* b, int64_t ld_n, int64_t K, int64_t N,
                                           uint32_t* out) {
  pack_vnni_cols_impl(b, ld_n, K, N, out);
}

}  // namespace smoe::cpu
