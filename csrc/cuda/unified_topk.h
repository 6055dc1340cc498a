// Torch-free CUDA launcher of unified_topk (one block per group, radix select).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace smoe::cuda {

// scores [G, L] with row stride ld (columns dense); counts [G] int64 or nullptr (n for every
// group); out [G, n] int64: each group's counts[g] largest scores' indices (ties to the lower
// index) in ascending order, -1 after them. Sets *invalid to 1 when a group holds a NaN (its
// row is all -1). T is float, __half or __nv_bfloat16.
template <typename T>
cudaError_t unified_topk(const T* scores, int64_t ld, int64_t G, int64_t L, int64_t n,
                         const int64_t* counts, int64_t* out, int32_t* invalid,
                         cudaStream_t stream);

}  // namespace smoe::cuda
