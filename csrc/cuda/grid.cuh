// Torch-free launch geometry and warp reductions shared by the .cu files: grid-stride loops over
// threads or warps, 256-thread blocks, at most 65536 blocks, 256-byte workspace alignment.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace smoe::cuda::grid {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int64_t kMaxBlocks = 65536;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kAlign = 256;

inline size_t align_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

// Carves aligned buffers out of one workspace: take(bytes) returns the next buffer's byte offset;
// `at` is then the workspace size so far. Start it past the CUB temp storage.
struct Carver {
  size_t at;
  size_t take(size_t bytes) {
    const size_t offset = at;
    at = align_up(at + bytes);
    return offset;
  }
};
// Blocks for a grid-stride loop over n items, one per thread.
inline int64_t blocks_for(int64_t n) {
  return std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
}
// Blocks for a grid-stride loop over rows, one warp per row.
inline int64_t blocks_for_rows(int64_t rows) {
  return std::min<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks);
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t threads_in_grid() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}
__device__ __forceinline__ int64_t global_warp() { return global_thread() / kWarp; }
__device__ __forceinline__ int64_t warps_in_grid() { return threads_in_grid() / kWarp; }

// Butterfly reductions: every lane ends with the same value, in a fixed order (reproducible).
// The whole warp must call them (full mask).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

}  // namespace smoe::cuda::grid
