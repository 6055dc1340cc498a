// Torch-free CUDA launchers of s2moe_perturb and its backward, on x seen as [A, S, C] with
// statistics [A, C] or one value each (scalar: stride 0).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace smoe::cuda {

// out = (1 + s_mul n1) x + (mu + s_add n2); all contiguous; T is float, __half or __nv_bfloat16.
// The scalar_* flags say which statistic is one value.
template <typename T>
cudaError_t s2moe_perturb(const T* x, const T* n1, const T* n2, const T* mu, const T* s_mul,
                          const T* s_add, bool scalar_mu, bool scalar_mul, bool scalar_add,
                          int64_t A, int64_t S, int64_t C, T* out, cudaStream_t stream);

// grad_x = g (1 + s_mul n1) (skipped when grad_x is null); sums over S per (a, c) in s order into
// float buffers [A, C] (each null when not asked for): d mu = sum g, d s_mul = sum g n1 x, d s_add
// = sum g n2; then for a scalar statistic, the sum of its buffer in a fixed order into its first
// element.
template <typename T>
cudaError_t s2moe_perturb_backward(const T* g, const T* x, const T* n1, const T* n2, const T* s_mul,
                                   bool scalar_mul, bool scalar_mu, bool scalar_add, int64_t A,
                                   int64_t S, int64_t C, T* grad_x, float* d_mu, float* d_mul,
                                   float* d_add, cudaStream_t stream);

}  // namespace smoe::cuda
