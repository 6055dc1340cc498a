// bf16 GEMM tiles with float32 accumulators through oneDNN's brgemm micro-kernel, the one that
// libtorch_cpu exports as at::native::cpublas::brgemm (its CPU flash attention uses it): ATen has
// no CPU bf16 x bf16 -> float32 matmul, and oneDNN's own symbols are not exported. One call
// computes C[M, N] = A[M, K] B[K, N] for a tile, single-threaded, with the kernel JIT-compiled once
// per shape and thread (20-50 us) and then looked up. The products of bf16 values are exact in
// float32 and the accumulator stays float32 (gate_linear's logits).
//
// B is read in the VNNI layout [K / 2][N][2] (pairs of consecutive k interleaved), which pack_vnni
// writes from any strided [K, N] view; K must be even. torch's own packing routine needs AMX; this
// one runs on every CPU with the micro-kernel (AVX512-BF16 or AMX).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <string>

namespace smoe::ops::brgemm {

// Rows of one micro-kernel call; a shorter last tile gets a kernel of its own shape.
constexpr int64_t kTileRows = 64;

// Whether the bf16 tiles run here: the micro-kernel was created and computed a small product
// exactly in a probe (once per process), torch.backends.mkldnn is enabled, and the environment
// variable SMOE_CPU_BRGEMM is not "0". Otherwise the callers use their ATen GEMM path.
// (Tried for grouped_mm's bf16 items too, 2026-12-05: 6 % slower than oneDNN's matmul there, whose
// epilogue rounds to bf16 in registers where this path round-trips a float32 tile; not used.)
bool bf16_enabled();

// One line for smoe.info: which path gate_linear's bf16 GEMM takes, and why.
std::string bf16_path();

// out [K / 2][N][2] <- b [K, N] with strides (ld_k, ld_n); K even.
void pack_vnni(const c10::BFloat16* b, int64_t ld_k, int64_t ld_n, int64_t K, int64_t N,
               c10::BFloat16* out);

// c [M, N] (row stride ldc) = a [M, K] (row stride lda) x packed [K, N], float32, in calls of
// kTileRows rows (accumulate: c += instead of c =). packed: pack_vnni's layout with ld_b words
// per k pair (ld_b = N for a panel of exactly N columns; a wider panel's column c starts at
// packed + 2 c).
void gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* a, int64_t lda,
          const c10::BFloat16* packed, int64_t ld_b, float* c, int64_t ldc,
          bool accumulate = false);

// Releases the calling thread's hardware context (AMX tile state) after its last gemm call.
void release();

}  // namespace smoe::ops::brgemm
