// CUDA kernels of momentum_update and its backward: one thread per element, grid-stride, math in
// float (the same formulas as cpu/momentum_kernel.h). Deterministic (no reductions).
#include "cuda/dtype.cuh"
#include "cuda/grid.cuh"
#include "cuda/momentum.h"

namespace smoe::cuda {
namespace {

// heavy ball (§3): m' = mu m + gamma u, delta = sign m'.  robust (§5): m' = -u + b m, delta = a m'.
template <typename T, bool kRobust>
__global__ void momentum_linear_kernel(const T* __restrict__ u, const float* __restrict__ m,
                                       int64_t n, MomentumParams q, T* __restrict__ delta,
                                       float* __restrict__ m_out) {
  const float cm = kRobust ? q.robust_b : q.mu;
  const float cu = kRobust ? -1.0f : q.gamma;
  const float cd = kRobust ? q.robust_a : q.sign;
  for (int64_t i = grid::global_thread(); i < n; i += grid::threads_in_grid()) {
    const float mn = cm * m[i] + cu * to_float(u[i]);
    m_out[i] = mn;
    delta[i] = from_float<T>(cd * mn);
  }
}

// Adam step (§4) and the heavy-ball buffer.
template <typename T>
__global__ void momentum_adam_kernel(const T* __restrict__ u, const float* __restrict__ m,
                                     const float* __restrict__ p, const float* __restrict__ v,
                                     int64_t n, MomentumParams q, T* __restrict__ delta,
                                     float* __restrict__ m_out, float* __restrict__ p_out,
                                     float* __restrict__ v_out) {
  for (int64_t i = grid::global_thread(); i < n; i += grid::threads_in_grid()) {
    const float x = to_float(u[i]);
    const float pn = q.beta1 * p[i] + q.one_minus_beta1 * x;
    const float vn = q.beta2 * v[i] + q.one_minus_beta2 * (x * x);
    m_out[i] = q.mu * m[i] + q.gamma * x;
    p_out[i] = pn;
    v_out[i] = vn;
    delta[i] = from_float<T>(q.sign_gamma1 * (pn / sqrtf(vn + q.eps)));
  }
}

template <typename T, bool kRobust>
__global__ void momentum_linear_backward_kernel(const T* __restrict__ grad_delta,
                                                const float* __restrict__ grad_m, int64_t n,
                                                MomentumParams q, T* __restrict__ grad_u,
                                                float* __restrict__ grad_m_in) {
  const float cm = kRobust ? q.robust_b : q.mu;
  const float cu = kRobust ? -1.0f : q.gamma;
  const float cd = kRobust ? q.robust_a : q.sign;
  for (int64_t i = grid::global_thread(); i < n; i += grid::threads_in_grid()) {
    const float g = grad_m[i] + cd * to_float(grad_delta[i]);
    grad_u[i] = from_float<T>(cu * g);
    grad_m_in[i] = cm * g;
  }
}

// §9, recomputing p', v' from u, p, v (see cpu/momentum_kernel.h for the formulas).
template <typename T>
__global__ void momentum_adam_backward_kernel(
    const T* __restrict__ grad_delta, const float* __restrict__ grad_m,
    const float* __restrict__ grad_p, const float* __restrict__ grad_v, const T* __restrict__ u,
    const float* __restrict__ p, const float* __restrict__ v, int64_t n, MomentumParams q,
    T* __restrict__ grad_u, float* __restrict__ grad_m_in, float* __restrict__ grad_p_in,
    float* __restrict__ grad_v_in) {
  for (int64_t i = grid::global_thread(); i < n; i += grid::threads_in_grid()) {
    const float x = to_float(u[i]);
    const float pn = q.beta1 * p[i] + q.one_minus_beta1 * x;
    const float vn = q.beta2 * v[i] + q.one_minus_beta2 * (x * x);
    const float inv_r = 1.0f / sqrtf(vn + q.eps);
    const float t = to_float(grad_delta[i]) * q.sign_gamma1 * inv_r;
    const float gp = grad_p[i] + t;
    const float gv = grad_v[i] - 0.5f * t * pn * (inv_r * inv_r);
    const float gm = grad_m[i];
    grad_u[i] =
        from_float<T>(q.one_minus_beta1 * gp + 2.0f * q.one_minus_beta2 * x * gv + q.gamma * gm);
    grad_m_in[i] = q.mu * gm;
    grad_p_in[i] = q.beta1 * gp;
    grad_v_in[i] = q.beta2 * gv;
  }
}

}  // namespace

template <typename T>
cudaError_t momentum_update(int kind, const T* u, const float* m, const float* p, const float* v,
                            int64_t n, const MomentumParams& q, T* delta, float* m_out,
                            float* p_out, float* v_out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = grid::blocks_for(n);
  if (kind == kMomentumAdam) {
    momentum_adam_kernel<T>
        <<<blocks, grid::kThreads, 0, stream>>>(u, m, p, v, n, q, delta, m_out, p_out, v_out);
  } else if (kind == kMomentumRobust) {
    momentum_linear_kernel<T, true>
        <<<blocks, grid::kThreads, 0, stream>>>(u, m, n, q, delta, m_out);
  } else {
    momentum_linear_kernel<T, false>
        <<<blocks, grid::kThreads, 0, stream>>>(u, m, n, q, delta, m_out);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t momentum_update_backward(int kind, const T* grad_delta, const float* grad_m,
                                     const float* grad_p, const float* grad_v, const T* u,
                                     const float* p, const float* v, int64_t n,
                                     const MomentumParams& q, T* grad_u, float* grad_m_in,
                                     float* grad_p_in, float* grad_v_in, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = grid::blocks_for(n);
  if (kind == kMomentumAdam) {
    momentum_adam_backward_kernel<T><<<blocks, grid::kThreads, 0, stream>>>(
        grad_delta, grad_m, grad_p, grad_v, u, p, v, n, q, grad_u, grad_m_in, grad_p_in, grad_v_in);
  } else if (kind == kMomentumRobust) {
    momentum_linear_backward_kernel<T, true>
        <<<blocks, grid::kThreads, 0, stream>>>(grad_delta, grad_m, n, q, grad_u, grad_m_in);
  } else {
    momentum_linear_backward_kernel<T, false>
        <<<blocks, grid::kThreads, 0, stream>>>(grad_delta, grad_m, n, q, grad_u, grad_m_in);
  }
  return cudaGetLastError();
}

#define SMOE_INSTANTIATE(T)                                                                        \
  template cudaError_t momentum_update<T>(int, const T*, const float*, const float*, const float*, \
                                          int64_t, const MomentumParams&, T*, float*, float*,      \
                                          float*, cudaStream_t);                                   \
  template cudaError_t momentum_update_backward<T>(                                                \
      int, const T*, const float*, const float*, const float*, const T*, const float*,             \
      const float*, int64_t, const MomentumParams&, T*, float*, float*, float*, cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
