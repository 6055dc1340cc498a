// Torch-free CUDA launchers of momentum_update and its backward (specs/momentum_smoe.md §3-§5,
// §9): elementwise over n contiguous elements, one thread per element, math in float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace smoe::cuda {

// The kind codes (smoe::ops::MomentumKind).
constexpr int kMomentumHeavyBall = 0;
constexpr int kMomentumAdam = 1;
constexpr int kMomentumRobust = 2;

// The scalar options in float; the derived constants are rounded once from double by the caller.
struct MomentumParams {
  float mu, gamma, sign;
  float beta1, beta2, one_minus_beta1, one_minus_beta2, sign_gamma1, eps;
  float robust_a, robust_b;
};

// u, delta: T (float, __half or __nv_bfloat16); m, p, v and the outputs m_out, p_out, v_out float.
// p, v, p_out, v_out are used only for kMomentumAdam (nullptr otherwise).
template <typename T>
cudaError_t momentum_update(int kind, const T* u, const float* m, const float* p, const float* v,
                            int64_t n, const MomentumParams& q, T* delta, float* m_out,
                            float* p_out, float* v_out, cudaStream_t stream);

// grad_delta, grad_u: T; the rest float. grad_p, grad_v, u, p, v, grad_p_in and grad_v_in are
// used only for kMomentumAdam (nullptr otherwise).
template <typename T>
cudaError_t momentum_update_backward(int kind, const T* grad_delta, const float* grad_m,
                                     const float* grad_p, const float* grad_v, const T* u,
                                     const float* p, const float* v, int64_t n,
                                     const MomentumParams& q, T* grad_u, float* grad_m_in,
                                     float* grad_p_in, float* grad_v_in, cudaStream_t stream);

}  // namespace smoe::cuda
