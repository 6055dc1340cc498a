// CUDA kernels of s2moe_perturb and its backward: elementwise forward and grad_x; the statistics'
// gradients by one thread per (a, c) summing over s in order, then a one-block fixed-order
// reduction for a statistic that is one value. No atomics: reproducible run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/dtype.cuh"
#include "cuda/grid.cuh"
#include "cuda/s2moe_perturb.h"

namespace smoe::cuda {
namespace {

using namespace grid;  // NOLINT: launch helpers of this file's kernels

__device__ __forceinline__ int64_t stat_index(bool scalar, int64_t a, int64_t c, int64_t C) {
  return scalar ? 0 : a * C + c;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const T* __restrict__ x, const T* __restrict__ n1, const T* __restrict__ n2,
                   const T* __restrict__ mu, const T* __restrict__ s_mul,
                   const T* __restrict__ s_add, bool scalar_mu, bool scalar_mul, bool scalar_add,
                   int64_t S, int64_t C, int64_t n, T* __restrict__ out) {
  for (int64_t i = global_thread(); i < n; i += threads_in_grid()) {
    const int64_t a = i / (S * C), c = i % C;
    const float m = to_float(mu[stat_index(scalar_mu, a, c, C)]);
    const float sm = to_float(s_mul[stat_index(scalar_mul, a, c, C)]);
    const float sa = to_float(s_add[stat_index(scalar_add, a, c, C)]);
    out[i] =
        from_float<T>((1.f + sm * to_float(n1[i])) * to_float(x[i]) + (m + sa * to_float(n2[i])));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_x_kernel(const T* __restrict__ g, const T* __restrict__ n1, const T* __restrict__ s_mul,
                  bool scalar_mul, int64_t S, int64_t C, int64_t n, T* __restrict__ grad_x) {
  for (int64_t i = global_thread(); i < n; i += threads_in_grid()) {
    const int64_t a = i / (S * C), c = i % C;
    const float sm = to_float(s_mul[stat_index(scalar_mul, a, c, C)]);
    grad_x[i] = from_float<T>(to_float(g[i]) * (1.f + sm * to_float(n1[i])));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    stat_sums_kernel(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ n1,
                     const T* __restrict__ n2, int64_t A, int64_t S, int64_t C,
                     float* __restrict__ d_mu, float* __restrict__ d_mul,
                     float* __restrict__ d_add) {
  for (int64_t j = global_thread(); j < A * C; j += threads_in_grid()) {
    const int64_t a = j / C, c = j % C;
    float sum_g = 0.f, sum_mul = 0.f, sum_add = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t i = (a * S + s) * C + c;
      const float gi = to_float(g[i]);
      sum_g += gi;
      if (d_mul) sum_mul += gi * to_float(n1[i]) * to_float(x[i]);
      if (d_add) sum_add += gi * to_float(n2[i]);
    }
    if (d_mu) d_mu[j] = sum_g;
    if (d_mul) d_mul[j] = sum_mul;
    if (d_add) d_add[j] = sum_add;
  }
}

// One block: v[0] = the sum of v[0, n) (thread-strided sums in order, then a fixed tree).
__global__ void __launch_bounds__(kThreads) sum_in_order_kernel(float* __restrict__ v, int64_t n) {
  __shared__ float part[kThreads];
  const int tid = static_cast<int>(threadIdx.x);
  float acc = 0.f;
  for (int64_t i = tid; i < n; i += kThreads) acc += v[i];
  part[tid] = acc;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (tid < half) part[tid] += part[tid + half];
    __syncthreads();
  }
  if (tid == 0) v[0] = part[0];
}

}  // namespace

template <typename T>
cudaError_t s2moe_perturb(const T* x, const T* n1, const T* n2, const T* mu, const T* s_mul,
                          const T* s_add, bool scalar_mu, bool scalar_mul, bool scalar_add,
                          int64_t A, int64_t S, int64_t C, T* out, cudaStream_t stream) {
  const int64_t n = A * S * C;
  if (n <= 0) return cudaSuccess;
  perturb_kernel<T><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, stream>>>(
      x, n1, n2, mu, s_mul, s_add, scalar_mu, scalar_mul, scalar_add, S, C, n, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t s2moe_perturb_backward(const T* g, const T* x, const T* n1, const T* n2, const T* s_mul,
                                   bool scalar_mul, bool scalar_mu, bool scalar_add, int64_t A,
                                   int64_t S, int64_t C, T* grad_x, float* d_mu, float* d_mul,
                                   float* d_add, cudaStream_t stream) {
  const int64_t n = A * S * C;
  if (n <= 0) return cudaSuccess;
  if (grad_x != nullptr) {
    grad_x_kernel<T><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, stream>>>(
        g, n1, s_mul, scalar_mul, S, C, n, grad_x);
  }
  if (d_mu != nullptr || d_mul != nullptr || d_add != nullptr) {
    stat_sums_kernel<T><<<static_cast<unsigned>(blocks_for(A * C)), kThreads, 0, stream>>>(
        g, x, n1, n2, A, S, C, d_mu, d_mul, d_add);
    const bool scalar[3] = {scalar_mu, scalar_mul, scalar_add};
    float* bufs[3] = {d_mu, d_mul, d_add};
    for (int i = 0; i < 3; ++i) {
      if (bufs[i] != nullptr && scalar[i]) {
        sum_in_order_kernel<<<1, kThreads, 0, stream>>>(bufs[i], A * C);
      }
    }
  }
  return cudaGetLastError();
}

#define SMOE_INSTANTIATE(T)                                                                        \
  template cudaError_t s2moe_perturb<T>(const T*, const T*, const T*, const T*, const T*,          \
                                        const T*, bool, bool, bool, int64_t, int64_t, int64_t, T*, \
                                        cudaStream_t);                                             \
  template cudaError_t s2moe_perturb_backward<T>(const T*, const T*, const T*, const T*, const T*, \
                                                 bool, bool, bool, int64_t, int64_t, int64_t, T*,  \
                                                 float*, float*, float*, cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
