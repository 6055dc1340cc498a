// Torch-free CUDA launchers of expert_choice (Zhou et al. 2022) and its backward.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace smoe::cuda {

// Bytes of scratch expert_choice needs for T tokens, E experts and groups of S tokens.
cudaError_t expert_choice_workspace_bytes(int64_t T, int64_t E, int64_t S, size_t* bytes);

// logits [T, E] (row stride ld), T > 0, T * E < 2^31. Groups of S consecutive tokens (the last
// possibly shorter), capacity C per group clamped to the group's size, total = the plan rows per
// expert (sum of the clamped capacities). Outputs exactly as cpu::expert_choice_*: weight [T, E]
// contiguous, offsets [E+1], token and slot [E * total], row [T, E]. Sets *invalid to 1 on a NaN
// or +inf logit or a row of -inf only. T is float, __half or __nv_bfloat16.
template <typename T>
cudaError_t expert_choice(const T* logits, int64_t ld, int64_t n_tokens, int64_t E, int64_t S,
                          int64_t C, int64_t total, T* weight, int64_t* offsets, int32_t* token,
                          int32_t* slot, int32_t* row, int32_t* invalid, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream);

// grad_logits [T, E] contiguous = p * (m * g - sum_j m_j g_j p_j), p = softmax(logits) in fp32,
// m = (row >= 0); grad_weight and row [T, E] contiguous.
template <typename T>
cudaError_t expert_choice_backward(const T* grad_weight, const T* logits, int64_t ld,
                                   const int32_t* row, int64_t n_tokens, int64_t E, T* grad_logits,
                                   cudaStream_t stream);

}  // namespace smoe::cuda
