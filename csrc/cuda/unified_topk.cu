// CUDA kernel of unified_topk: one block per group.
// 1. Radix select, most significant byte first, on order-preserving 32-bit keys of the scores
//    (zeros of both signs share a key, as they compare equal on the CPU): four 256-bin histogram
//    passes find the count-th largest key t and how many of the keys equal to t to take.
// 2. An ordered compaction in tiles of the block: every key > t, and the first of the keys == t in
//    index order (a block scan ranks them), written at block-scan positions, so the output is
//    in ascending index order and equals the CPU's exactly. No float atomics; reproducible.
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "cuda/dtype.cuh"
#include "cuda/grid.cuh"
#include "cuda/unified_topk.h"

namespace smoe::cuda {
namespace {

using namespace grid;  // NOLINT: launch helpers of this file's kernels

constexpr int kBins = 256;
static_assert(kThreads == kBins, "one histogram bin per thread");

// Larger floats give larger keys; -0 and +0 give the same key.
__device__ __forceinline__ uint32_t ordered_key(float v) {
  const uint32_t b = __float_as_uint(v == 0.f ? 0.f : v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    unified_topk_kernel(const T* __restrict__ scores, int64_t ld, int64_t G, int64_t L, int64_t n,
                        const int64_t* __restrict__ counts, int64_t* __restrict__ out,
                        int32_t* __restrict__ invalid) {
  using BlockScan = CUB_NS_QUALIFIER::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ unsigned hist[kBins];
  __shared__ unsigned chosen_digit, chosen_remaining;
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t g = blockIdx.x; g < G; g += gridDim.x) {  // block-uniform
    const T* row = scores + g * ld;
    int64_t* o = out + g * n;
    int bad = 0;
    for (int64_t i = tid; i < L; i += kThreads) bad |= isnan(to_float(row[i])) ? 1 : 0;
    // (a count outside [0, n] fails the glue's device assert; clamped so nothing is written past n)
    const int64_t c = counts == nullptr ? n : min(max(counts[g], int64_t(0)), n);
    const int any_bad = __syncthreads_or(bad);
    if (any_bad || c <= 0) {
      if (any_bad && tid == 0) *invalid = 1;
      for (int64_t j = tid; j < n; j += kThreads) o[j] = -1;
      continue;
    }
    uint32_t prefix = 0, mask = 0;
    unsigned remaining = static_cast<unsigned>(c);
    for (int shift = 24; shift >= 0; shift -= 8) {
      hist[tid] = 0;
      __syncthreads();
      for (int64_t i = tid; i < L; i += kThreads) {
        const uint32_t key = ordered_key(to_float(row[i]));
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
      }
      __syncthreads();
      if (tid == 0) {  // the bin, from the top, where the remaining count is reached
        unsigned above = 0;
        for (int b = kBins - 1; b >= 0; --b) {
          if (above + hist[b] >= remaining || b == 0) {
            chosen_digit = static_cast<unsigned>(b);
            chosen_remaining = remaining - above;
            break;
          }
          above += hist[b];
        }
      }
      __syncthreads();
      prefix |= chosen_digit << shift;
      mask |= 0xffu << shift;
      remaining = chosen_remaining;
      __syncthreads();  // every thread has read the shared values before the next reset
    }
    // prefix is the threshold key t; take every key > t and the first `remaining` keys == t.
    int64_t written = 0, equal_seen = 0;
    for (int64_t tile = 0; tile < L; tile += kThreads) {
      const int64_t i = tile + tid;
      const uint32_t key = i < L ? ordered_key(to_float(row[i])) : 0u;
      const int greater = (i < L && key > prefix) ? 1 : 0;
      const int equal = (i < L && key == prefix) ? 1 : 0;
      int equal_rank = 0, equal_total = 0;
      BlockScan(scan_storage).ExclusiveSum(equal, equal_rank, equal_total);
      __syncthreads();
      const int take = greater || (equal && equal_seen + equal_rank < remaining) ? 1 : 0;
      int pos = 0, taken = 0;
      BlockScan(scan_storage).ExclusiveSum(take, pos, taken);
      __syncthreads();
      if (take) o[written + pos] = i;
      written += taken;
      equal_seen += equal_total;
    }
    for (int64_t j = c + tid; j < n; j += kThreads) o[j] = -1;
  }
}

}  // namespace

template <typename T>
cudaError_t unified_topk(const T* scores, int64_t ld, int64_t G, int64_t L, int64_t n,
                         const int64_t* counts, int64_t* out, int32_t* invalid,
                         cudaStream_t stream) {
  if (G <= 0 || L <= 0) return cudaSuccess;
  const int64_t blocks = G < kMaxBlocks ? G : kMaxBlocks;
  unified_topk_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      scores, ld, G, L, n, counts, out, invalid);
  return cudaGetLastError();
}

#define SMOE_INSTANTIATE(T)                                                          \
  template cudaError_t unified_topk<T>(const T*, int64_t, int64_t, int64_t, int64_t, \
                                       const int64_t*, int64_t*, int32_t*, cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
