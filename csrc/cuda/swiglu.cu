// CUDA kernels of the fused SwiGLU activation: one thread per output element, grid-stride, math in
// float. Deterministic (no reductions).
#include <algorithm>

#include "cuda/dtype.cuh"
#include "cuda/swiglu.h"

namespace smoe::cuda {
namespace {

// expf, not the approximate __expf (~20 ulp at |x| ~ 16, 0 below -88): as every other kernel.
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__global__ void swiglu_kernel(const T* __restrict__ h, int64_t ld, int64_t M, int64_t f,
                              T* __restrict__ out) {
  const int64_t n = M * f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / f, c = i % f;
    const float g = to_float(h[r * ld + c]), u = to_float(h[r * ld + f + c]);
    out[i] = from_float<T>(g * sigmoid(g) * u);
  }
}

template <typename T>
__global__ void swiglu_backward_kernel(const T* __restrict__ grad, int64_t ld_grad,
                                       const T* __restrict__ h, int64_t ld, int64_t M, int64_t f,
                                       T* __restrict__ dh) {
  const int64_t n = M * f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / f, c = i % f;
    const float g = to_float(h[r * ld + c]), u = to_float(h[r * ld + f + c]);
    const float d = to_float(grad[r * ld_grad + c]);
    const float s = sigmoid(g);
    dh[r * 2 * f + c] = from_float<T>(d * u * s * (1.0f + g * (1.0f - s)));
    dh[r * 2 * f + f + c] = from_float<T>(d * g * s);
  }
}

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20));
}

}  // namespace

template <typename T>
cudaError_t swiglu(const T* h, int64_t ld, int64_t M, int64_t f, T* out, cudaStream_t stream) {
  if (M * f == 0) return cudaSuccess;
  swiglu_kernel<T><<<blocks_for(M * f), kThreads, 0, stream>>>(h, ld, M, f, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t swiglu_backward(const T* grad, int64_t ld_grad, const T* h, int64_t ld, int64_t M,
                            int64_t f, T* dh, cudaStream_t stream) {
  if (M * f == 0) return cudaSuccess;
  swiglu_backward_kernel<T>
      <<<blocks_for(M * f), kThreads, 0, stream>>>(grad, ld_grad, h, ld, M, f, dh);
  return cudaGetLastError();
}

#define SMOE_INSTANTIATE(T)                                                                       \
  template cudaError_t swiglu<T>(const T*, int64_t, int64_t, int64_t, T*, cudaStream_t);          \
  template cudaError_t swiglu_backward<T>(const T*, int64_t, const T*, int64_t, int64_t, int64_t, \
                                          T*, cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
