// Torch-free CUDA launcher of make_plan: stable radix sorts (CUB) of the T*k slots by expert.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace smoe::cuda {

// Bytes of scratch make_plan needs for T*k slots and E experts, with or without a capacity.
cudaError_t make_plan_workspace_bytes(int64_t T, int64_t k, int64_t E, bool has_capacity,
                                      size_t* bytes);

// expert [T, k] contiguous, T*k > 0; capacity < 0 means unbounded. Outputs exactly as
// cpu::make_plan: offsets [E+1], token and slot [T*k] (-1 past offsets[E]), row [T*k] (-1 if
// dropped), kept [T*k]. Sets *invalid to 1 when an expert value lies outside [-1, E) (such
// entries are treated as -1). `workspace` holds make_plan_workspace_bytes(...) bytes.
cudaError_t make_plan(const int32_t* expert, int64_t T, int64_t k, int64_t E, int64_t capacity,
                      int64_t* offsets, int32_t* token, int32_t* slot, int32_t* row, bool* kept,
                      int32_t* invalid, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream);

}  // namespace smoe::cuda
