// Torch-free CUDA launchers of the fused SwiGLU activation and its backward.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace smoe::cuda {

// out [M, f] contiguous: out[r, c] = silu(h[r, c]) * h[r, f + c]; h rows have stride ld.
template <typename T>
cudaError_t swiglu(const T* h, int64_t ld, int64_t M, int64_t f, T* out, cudaStream_t stream);

// dh [M, 2f] contiguous from grad [M, f] (row stride ld_grad) and h (row stride ld).
template <typename T>
cudaError_t swiglu_backward(const T* grad, int64_t ld_grad, const T* h, int64_t ld, int64_t M,
                            int64_t f, T* dh, cudaStream_t stream);

}  // namespace smoe::cuda
