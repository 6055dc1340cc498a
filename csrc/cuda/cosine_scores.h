// Torch-free CUDA launchers of cosine_scores (X-MoE, specs/xmoe.md §6-§8) and its backward.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace smoe::cuda {

// h [rows, d] (row stride ldh), proj [de, d] and emb [N, de] contiguous; tau points to the raw
// temperature (double, on the device: never read on the host). cos and logits [rows, N] float.
// ehat [N, de], enorm [N] and zbuf [rows, de] are float scratch the caller allocates.
// T is float, __half or __nv_bfloat16.
template <typename T>
cudaError_t cosine_scores(const T* h, int64_t ldh, const T* proj, const T* emb, const double* tau,
                          int64_t rows, int64_t d, int64_t de, int64_t N, float eps, bool normalize,
                          float* ehat, float* enorm, float* zbuf, float* cos, float* logits,
                          cudaStream_t stream);

// Bytes of scratch cosine_scores_backward needs (the caller allocates them, 256-byte aligned).
size_t cosine_scores_backward_workspace(int64_t rows, int64_t d, int64_t de, int64_t N);

// grad_cos, grad_logits [rows, N] float contiguous. Writes grad_h [rows, d], grad_proj [de, d],
// grad_emb [N, de] (contiguous, T) and grad_tau (one float). Reductions over tokens run in fixed
// chunks summed in chunk order: no atomics, bitwise reproducible.
template <typename T>
cudaError_t cosine_scores_backward(const float* grad_cos, const float* grad_logits, const T* h,
                                   int64_t ldh, const T* proj, const T* emb, const double* tau,
                                   int64_t rows, int64_t d, int64_t de, int64_t N, float eps,
                                   bool normalize, void* workspace, T* grad_h, T* grad_proj,
                                   T* grad_emb, float* grad_tau, cudaStream_t stream);

}  // namespace smoe::cuda
