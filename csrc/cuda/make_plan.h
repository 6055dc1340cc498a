// Torch-free CUDA launcher of make_plan: stable radix sorts (CUB) of the T*k slots by expert.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace smoe::cuda {

// Bytes of scratch make_plan needs for T*k slots and E experts, with or without a capacity.
cudaError_t make_plan_workspace_bytes(int64_t T, int64_t k, int64_t E, bool has_capacity,
                                      size_t* bytes);

// Batch Prioritized Routing: order [ranks, T] int32, row r = the tokens by priority [T, ranks]
// (row-major float), highest first, ties to the lower index (one stable CUB radix sort on a
// (rank, priority) key). Sets *invalid to 1 on a NaN priority.
cudaError_t priority_order_workspace_bytes(int64_t T, int64_t ranks, size_t* bytes);
cudaError_t priority_order(const float* priority, int64_t T, int64_t ranks, int32_t* order,
                           int32_t* invalid, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

// expert [T, k] contiguous, T*k > 0; capacity < 0 means unbounded. With a capacity, `order`
// (nullptr: token order) gives each rank's token order, order_ranks = 1 (shared) or k rows. Outputs
// exactly as cpu::make_plan: offsets [E+1], token and slot [T*k] (-1 past offsets[E]), row [T*k]
// (-1 if dropped), kept [T*k]. Sets *invalid to 1 when an expert value lies outside [-1, E) (such
// entries are treated as -1). `workspace` holds make_plan_workspace_bytes(...) bytes.
cudaError_t make_plan(const int32_t* expert, int64_t T, int64_t k, int64_t E, int64_t capacity,
                      const int32_t* order, int64_t order_ranks, int64_t* offsets, int32_t* token,
                      int32_t* slot, int32_t* row, bool* kept, int32_t* invalid, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream);

}  // namespace smoe::cuda
