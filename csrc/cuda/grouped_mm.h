// Torch-free CUDA launchers of grouped_mm and its weight gradient (tiled shared-memory GEMMs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace smoe::cuda {

// out [M, N] contiguous: out[r] = a[r] @ b[e] for offsets[e] <= r < offsets[e+1], zero rows from
// offsets[E] on. a [M, K] has dense rows with row stride lda; b[e][kk][n] lies at
// e * sb_e + kk * sb_k + n * sb_n (any strides, e.g. a transposed view). offsets [E+1] stays in
// device memory (never read on the host). bias (nullptr for none) holds bias[e][n] at
// e * sbias_e + n * sbias_n and is added in float before the output's rounding. Invalid offsets
// (the caller asserts on them) are clamped so that every access stays in bounds. T is float,
// __half or __nv_bfloat16.
template <typename T>
cudaError_t grouped_mm(const T* a, int64_t lda, const T* b, int64_t sb_e, int64_t sb_k,
                       int64_t sb_n, const T* bias, int64_t sbias_e, int64_t sbias_n,
                       const int64_t* offsets, int64_t E, int64_t M, int64_t K, int64_t N, T* out,
                       cudaStream_t stream);

// out [E, N] contiguous: out[e] = the sum of grad's rows of group e (row stride ldg), in row
// order, accumulated in float; zeros for an empty group.
template <typename T>
cudaError_t grouped_mm_bias_grad(const T* grad, int64_t ldg, const int64_t* offsets, int64_t E,
                                 int64_t M, int64_t N, T* out, cudaStream_t stream);

// grad_w[e] = x[g]^T @ grad[g] over the rows g of group e (zeros for an empty group), written at
// e * so_e + i * so_in + n * so_out for i < d_in, n < d_out. x [M, d_in] and grad [M, d_out] have
// dense rows with row strides ldx and ldg.
template <typename T>
cudaError_t grouped_mm_weight_grad(const T* x, int64_t ldx, const T* grad, int64_t ldg,
                                   const int64_t* offsets, int64_t E, int64_t M, int64_t d_in,
                                   int64_t d_out, T* grad_w, int64_t so_e, int64_t so_in,
                                   int64_t so_out, cudaStream_t stream);

}  // namespace smoe::cuda
