// CUDA kernels of expert_choice and its backward; the forward reproduces the CPU plan exactly
// (given equal probabilities).
//
// 1. probs_kernel (one warp per token): p = softmax(l) in fp32; writes the sort key of (e, t) at
//    e * T + t: the bits of p (non-negative, so ordered like unsigned ints) in the high word and
//    ~t in the low word, so that a descending sort puts larger p first and, on ties, lower t.
// 2. One CUB segmented radix sort (descending) of the keys, a segment per (expert, group).
// 3. mark_kernel: the first c_g keys of every segment are the chosen (t, e); flag[e * T + t] = 1.
// 4. An exclusive scan of the flags: for a chosen (t, e) it is the number of chosen pairs before
//    it in (expert, token) order, i.e. its plan row, with token order within each expert.
// 5. write_kernel over (t, e): row, weight, token and slot; every output has one writer.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "cuda/dtype.cuh"
#include "cuda/expert_choice.h"
#include "cuda/grid.cuh"

namespace smoe::cuda {
namespace {

using namespace grid;  // NOLINT: launch helpers of this file's kernels

__device__ __forceinline__ uint64_t make_key(float p, int64_t t) {
  return (static_cast<uint64_t>(__float_as_uint(p)) << 32) |
         static_cast<uint64_t>(~static_cast<uint32_t>(t));
}
__device__ __forceinline__ int64_t key_token(uint64_t key) {
  return static_cast<int64_t>(~static_cast<uint32_t>(key & 0xffffffffu));
}
__device__ __forceinline__ float key_prob(uint64_t key) {
  return __uint_as_float(static_cast<uint32_t>(key >> 32));
}

// Workspace byte offsets, computed identically by expert_choice_workspace_bytes and the launcher.
struct Layout {
  size_t cub_bytes = 0, keys_in = 0, keys_out = 0, seg_begin = 0, seg_end = 0, flag = 0, pos = 0;
  size_t total = 0;
};

cudaError_t choice_layout(int64_t T, int64_t E, int64_t S, Layout* layout) {
  Layout l;
  const int64_t G = (T + S - 1) / S, n = T * E, segs = E * G;
  size_t sort_bytes = 0, scan_bytes = 0;
  cudaError_t err = CUB_NS_QUALIFIER::DeviceSegmentedRadixSort::SortKeysDescending(
      nullptr, sort_bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
      static_cast<int>(n), static_cast<int>(segs), static_cast<const int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr));
  if (err != cudaSuccess) return err;
  err = CUB_NS_QUALIFIER::DeviceScan::ExclusiveSum(
      nullptr, scan_bytes, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<int>(n));
  if (err != cudaSuccess) return err;
  l.cub_bytes = std::max(sort_bytes, scan_bytes);
  const size_t nb = static_cast<size_t>(n), sb = static_cast<size_t>(segs);
  Carver c{align_up(l.cub_bytes)};
  l.keys_in = c.take(nb * sizeof(uint64_t));
  l.keys_out = c.take(nb * sizeof(uint64_t));
  l.seg_begin = c.take(sb * sizeof(int32_t));
  l.seg_end = c.take(sb * sizeof(int32_t));
  l.flag = c.take(nb * sizeof(int32_t));
  l.pos = c.take(nb * sizeof(int32_t));
  l.total = c.at;
  *layout = l;
  return cudaSuccess;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    probs_kernel(const T* __restrict__ logits, int64_t ld, int64_t rows, int64_t E,
                 uint64_t* __restrict__ keys, int32_t* __restrict__ flag,
                 int32_t* __restrict__ invalid) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  for (int64_t t = global_warp(); t < rows; t += warps_in_grid()) {  // warp-uniform loop
    const T* l = logits + t * ld;
    float m = -INFINITY;
    bool bad = false;
    for (int64_t e = lane; e < E; e += kWarp) {
      const float v = to_float(l[e]);
      bad = bad || isnan(v) || v == INFINITY;
      m = fmaxf(m, v);
    }
    m = warp_max(m);
    if (__any_sync(kFullMask, bad) || m == -INFINITY) {  // NaN, +inf, or a row of -inf only
      // The CPU op raises; flag it and rank the row last (probability 0).
      if (lane == 0) *invalid = 1;
      for (int64_t e = lane; e < E; e += kWarp) {
        keys[e * rows + t] = make_key(0.f, t);
        flag[e * rows + t] = 0;
      }
      continue;
    }
    float total = 0.f;
    for (int64_t e = lane; e < E; e += kWarp) total += expf(to_float(l[e]) - m);
    total = warp_sum(total);
    for (int64_t e = lane; e < E; e += kWarp) {
      keys[e * rows + t] = make_key(expf(to_float(l[e]) - m) / total, t);
      flag[e * rows + t] = 0;
    }
  }
}

// Segment q = e * G + g covers keys [e * T + g * S, e * T + min((g + 1) * S, T)).
__global__ void __launch_bounds__(kThreads)
    segments_kernel(int64_t T, int64_t S, int64_t G, int64_t segs, int32_t* __restrict__ begin,
                    int32_t* __restrict__ end) {
  for (int64_t q = global_thread(); q < segs; q += threads_in_grid()) {
    const int64_t e = q / G, g = q % G;
    begin[q] = static_cast<int32_t>(e * T + g * S);
    const int64_t stop = (g + 1) * S < T ? (g + 1) * S : T;
    end[q] = static_cast<int32_t>(e * T + stop);
  }
}

// Plan row r of expert e: group g = r / full, j = r % full (the last group may hold fewer).
__global__ void __launch_bounds__(kThreads)
    mark_kernel(const uint64_t* __restrict__ sorted, int64_t T, int64_t E, int64_t S, int64_t full,
                int64_t total, int32_t* __restrict__ flag) {
  for (int64_t i = global_thread(); i < E * total; i += threads_in_grid()) {
    const int64_t e = i / total, r = i % total, g = r / full, j = r % full;
    const int64_t t = key_token(sorted[e * T + g * S + j]);
    flag[e * T + t] = 1;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    write_kernel(const uint64_t* __restrict__ keys, const int32_t* __restrict__ flag,
                 const int32_t* __restrict__ pos, int64_t rows, int64_t E, int64_t total,
                 T* __restrict__ weight, int64_t* __restrict__ offsets, int32_t* __restrict__ token,
                 int32_t* __restrict__ slot, int32_t* __restrict__ row) {
  const int64_t n = rows * E, count = n > E + 1 ? n : E + 1;
  for (int64_t i = global_thread(); i < count; i += threads_in_grid()) {
    if (i <= E) offsets[i] = i * total;
    if (i >= n) continue;
    const int64_t t = i / E, e = i % E, q = e * rows + t;
    if (flag[q]) {
      const int32_t r = pos[q];
      row[i] = r;
      token[r] = static_cast<int32_t>(t);
      slot[r] = static_cast<int32_t>(i);
      weight[i] = from_float<T>(key_prob(keys[q]));
    } else {
      row[i] = -1;
      weight[i] = from_float<T>(0.f);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ grad_weight, const T* __restrict__ logits, int64_t ld,
                    const int32_t* __restrict__ row, int64_t rows, int64_t E,
                    T* __restrict__ grad_logits) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  for (int64_t t = global_warp(); t < rows; t += warps_in_grid()) {  // warp-uniform loop
    const T* l = logits + t * ld;
    const T* g = grad_weight + t * E;
    const int32_t* r = row + t * E;
    float m = -INFINITY;
    for (int64_t e = lane; e < E; e += kWarp) m = fmaxf(m, to_float(l[e]));
    m = warp_max(m);
    float denom = 0.f;
    for (int64_t e = lane; e < E; e += kWarp) denom += expf(to_float(l[e]) - m);
    denom = warp_sum(denom);
    float dot = 0.f;
    for (int64_t e = lane; e < E; e += kWarp) {
      if (r[e] >= 0) dot += to_float(g[e]) * (expf(to_float(l[e]) - m) / denom);
    }
    dot = warp_sum(dot);
    for (int64_t e = lane; e < E; e += kWarp) {
      const float p = expf(to_float(l[e]) - m) / denom;
      const float ge = r[e] >= 0 ? to_float(g[e]) : 0.f;
      grad_logits[t * E + e] = from_float<T>(p * (ge - dot));
    }
  }
}

}  // namespace

cudaError_t expert_choice_workspace_bytes(int64_t T, int64_t E, int64_t S, size_t* bytes) {
  if (T <= 0 || E <= 0 || S <= 0) return cudaErrorInvalidValue;
  Layout l;
  const cudaError_t err = choice_layout(T, E, S, &l);
  if (err != cudaSuccess) return err;
  *bytes = l.total;
  return cudaSuccess;
}

template <typename T>
cudaError_t expert_choice(const T* logits, int64_t ld, int64_t n_tokens, int64_t E, int64_t S,
                          int64_t C, int64_t total, T* weight, int64_t* offsets, int32_t* token,
                          int32_t* slot, int32_t* row, int32_t* invalid, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream) {
  if (n_tokens <= 0 || E <= 0 || S <= 0) return cudaErrorInvalidValue;  // glue skips T = 0
  Layout l;
  cudaError_t err = choice_layout(n_tokens, E, S, &l);
  if (err != cudaSuccess) return err;
  if (workspace_bytes < l.total) return cudaErrorInvalidValue;
  auto* base = static_cast<char*>(workspace);
  auto* keys_in = reinterpret_cast<uint64_t*>(base + l.keys_in);
  auto* keys_out = reinterpret_cast<uint64_t*>(base + l.keys_out);
  auto* seg_begin = reinterpret_cast<int32_t*>(base + l.seg_begin);
  auto* seg_end = reinterpret_cast<int32_t*>(base + l.seg_end);
  auto* flag = reinterpret_cast<int32_t*>(base + l.flag);
  auto* pos = reinterpret_cast<int32_t*>(base + l.pos);
  const int64_t rows = n_tokens, G = (rows + S - 1) / S, n = rows * E, segs = E * G;
  const int64_t full = std::min(C, S);

  probs_kernel<T><<<static_cast<unsigned>(blocks_for_rows(rows)), kThreads, 0, stream>>>(
      logits, ld, rows, E, keys_in, flag, invalid);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  segments_kernel<<<static_cast<unsigned>(blocks_for(segs)), kThreads, 0, stream>>>(
      rows, S, G, segs, seg_begin, seg_end);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  size_t cub_bytes = l.cub_bytes;
  err = CUB_NS_QUALIFIER::DeviceSegmentedRadixSort::SortKeysDescending(
      base, cub_bytes, keys_in, keys_out, static_cast<int>(n), static_cast<int>(segs), seg_begin,
      seg_end, 0, 64, stream);
  if (err != cudaSuccess) return err;
  if (total > 0) {
    mark_kernel<<<static_cast<unsigned>(blocks_for(E * total)), kThreads, 0, stream>>>(
        keys_out, rows, E, S, full, total, flag);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  cub_bytes = l.cub_bytes;
  err = CUB_NS_QUALIFIER::DeviceScan::ExclusiveSum(base, cub_bytes, flag, pos, static_cast<int>(n),
                                                   stream);
  if (err != cudaSuccess) return err;
  write_kernel<T><<<static_cast<unsigned>(blocks_for(std::max(n, E + 1))), kThreads, 0, stream>>>(
      keys_in, flag, pos, rows, E, total, weight, offsets, token, slot, row);
  return cudaGetLastError();
}

template <typename T>
cudaError_t expert_choice_backward(const T* grad_weight, const T* logits, int64_t ld,
                                   const int32_t* row, int64_t n_tokens, int64_t E, T* grad_logits,
                                   cudaStream_t stream) {
  if (n_tokens <= 0) return cudaSuccess;
  backward_kernel<T><<<static_cast<unsigned>(blocks_for_rows(n_tokens)), kThreads, 0, stream>>>(
      grad_weight, logits, ld, row, n_tokens, E, grad_logits);
  return cudaGetLastError();
}

#define SMOE_INSTANTIATE(T)                                                                    \
  template cudaError_t expert_choice<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                        int64_t, T*, int64_t*, int32_t*, int32_t*, int32_t*,   \
                                        int32_t*, void*, size_t, cudaStream_t);                \
  template cudaError_t expert_choice_backward<T>(const T*, const T*, int64_t, const int32_t*,  \
                                                 int64_t, int64_t, T*, cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
