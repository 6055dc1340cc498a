// CUDA kernels of make_plan, built on CUB's stable radix sort; reproduces cpu::make_plan exactly.
//
// No capacity: one stable sort of (key = expert, -1 -> E; value = flat slot s = t*k + j) in slot
// order, so each expert's slots stay in token-major order and the dropped ones (key E) go last.
//
// Capacity C: experts accept slots rank-major (every token's first choice, then every second
// choice, ...). A first stable sort of the slots *listed in rank-major order* by expert puts the
// p-th rank-major occurrence of expert e at sorted position start(e) + p, and it is kept iff
// p < C, i.e. iff i < C or keys[i - C] != keys[i] (O(1), no search). A second sort of the unique
// composite keys (kept ? e : E) * n + s then lists the kept slots by expert in token-major order,
// dropped ones last; it needs no values (s = key % n) and so no stability.
//
// In both cases sorted position i < offsets[E] is a kept slot s: token[i] = s / k, slot[i] = s,
// row[s] = i; past offsets[E] token = slot = -1 and row[s] = -1. Every s appears exactly once in
// the sorted order, so each output element has exactly one writer. offsets[e] is a binary search
// (lower bound) of expert e in the sorted keys.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>

#include "cuda/grid.cuh"
#include "cuda/make_plan.h"

namespace smoe::cuda {
namespace {

using namespace grid;  // NOLINT: launch helpers of this file's kernels

// Number of bits needed to represent v (0 for v == 0).
int bit_width(uint64_t v) {
  int bits = 0;
  while (v != 0) {
    ++bits;
    v >>= 1;
  }
  return bits;
}

// Byte offsets into the workspace. Computed identically by make_plan_workspace_bytes and
// make_plan, so the two always agree.
struct Layout {
  size_t cub_bytes = 0;
  size_t keys_a = 0, keys_b = 0, vals_a = 0, vals_b = 0, keys2_a = 0, keys2_b = 0;
  size_t total = 0;
  int end_bit1 = 0, end_bit2 = 0;
  bool wide = false;  // the second sort's composite keys need 64 bits
};

cudaError_t plan_layout(int64_t n, int64_t E, bool has_capacity, Layout* layout) {
  Layout l;
  const int items = static_cast<int>(n);
  l.end_bit1 = std::max(1, bit_width(static_cast<uint64_t>(E)));  // keys lie in [0, E]
  cudaError_t err = CUB_NS_QUALIFIER::DeviceRadixSort::SortPairs(
      nullptr, l.cub_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), items, 0, l.end_bit1);
  if (err != cudaSuccess) return err;
  size_t key2_size = 0;
  if (has_capacity) {
    // Composite keys lie in [0, (E + 1) * n); E < 2^31 and n < 2^31, so this fits in 64 bits.
    const uint64_t max_key = static_cast<uint64_t>(E + 1) * static_cast<uint64_t>(n) - 1;
    l.end_bit2 = std::max(1, bit_width(max_key));
    l.wide = max_key > UINT32_MAX;
    size_t bytes2 = 0;
    if (l.wide) {
      key2_size = sizeof(uint64_t);
      err = CUB_NS_QUALIFIER::DeviceRadixSort::SortKeys(
          nullptr, bytes2, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
          items, 0, l.end_bit2);
    } else {
      key2_size = sizeof(uint32_t);
      err = CUB_NS_QUALIFIER::DeviceRadixSort::SortKeys(
          nullptr, bytes2, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
          items, 0, l.end_bit2);
    }
    if (err != cudaSuccess) return err;
    l.cub_bytes = std::max(l.cub_bytes, bytes2);
  }
  const size_t n_bytes = static_cast<size_t>(n);
  Carver c{align_up(l.cub_bytes)};
  l.keys_a = c.take(n_bytes * sizeof(uint32_t));
  l.keys_b = c.take(n_bytes * sizeof(uint32_t));
  l.vals_a = c.take(n_bytes * sizeof(int32_t));
  l.vals_b = c.take(n_bytes * sizeof(int32_t));
  if (has_capacity) {
    l.keys2_a = c.take(n_bytes * key2_size);
    l.keys2_b = c.take(n_bytes * key2_size);
  }
  l.total = c.at;
  *layout = l;
  return cudaSuccess;
}

// Sort input: entry q is slot s = q (slot order) or, rank-major, q = j * T + p with s = t * k + j,
// t = p (token order) or order[(order_ranks == 1 ? 0 : j) * T + p] (Batch Prioritized Routing).
// Keys: the expert, with -1 and invalid values mapped to E (sorted last, never kept).
__global__ void __launch_bounds__(kThreads)
    build_keys_kernel(const int32_t* __restrict__ expert, int64_t T, int64_t k, int64_t E,
                      bool rank_major, const int32_t* __restrict__ order, int64_t order_ranks,
                      uint32_t* __restrict__ keys, int32_t* __restrict__ vals,
                      int32_t* __restrict__ invalid) {
  const int64_t n = T * k;
  for (int64_t q = global_thread(); q < n; q += threads_in_grid()) {
    const int64_t j = q / T, p = q % T;
    const int64_t t = order ? order[(order_ranks == 1 ? 0 : j) * T + p] : p;
    const int64_t s = rank_major ? t * k + j : q;
    const int32_t e = expert[s];
    const bool bad = e < -1 || e >= E;
    if (bad) *invalid = 1;  // every writer stores the same value
    keys[q] = (e < 0 || bad) ? static_cast<uint32_t>(E) : static_cast<uint32_t>(e);
    vals[q] = static_cast<int32_t>(s);
  }
}

__device__ __forceinline__ void write_entry(int64_t i, int64_t s, bool keep, int64_t k,
                                            int32_t* token, int32_t* slot, int32_t* row,
                                            bool* kept) {
  token[i] = keep ? static_cast<int32_t>(s / k) : -1;
  slot[i] = keep ? static_cast<int32_t>(s) : -1;
  row[s] = keep ? static_cast<int32_t>(i) : -1;
  kept[s] = keep;
}

// No capacity: sorted (expert key, slot) pairs -> plan.
__global__ void __launch_bounds__(kThreads)
    write_plan_pairs_kernel(const uint32_t* __restrict__ keys, const int32_t* __restrict__ vals,
                            int64_t n, int64_t k, int64_t E, int32_t* __restrict__ token,
                            int32_t* __restrict__ slot, int32_t* __restrict__ row,
                            bool* __restrict__ kept) {
  for (int64_t i = global_thread(); i < n; i += threads_in_grid()) {
    write_entry(i, vals[i], static_cast<int64_t>(keys[i]) < E, k, token, slot, row, kept);
  }
}

// Capacity: keys/vals sorted stably by expert from rank-major input -> composite keys.
template <typename K>
__global__ void __launch_bounds__(kThreads)
    capacity_keys_kernel(const uint32_t* __restrict__ keys, const int32_t* __restrict__ vals,
                         int64_t n, int64_t E, int64_t capacity, K* __restrict__ keys2) {
  for (int64_t i = global_thread(); i < n; i += threads_in_grid()) {
    const uint32_t key = keys[i];
    const bool keep = static_cast<int64_t>(key) < E && (i < capacity || keys[i - capacity] != key);
    const uint64_t group = keep ? key : static_cast<uint64_t>(E);
    keys2[i] = static_cast<K>(group * static_cast<uint64_t>(n) + static_cast<uint64_t>(vals[i]));
  }
}

// Capacity: sorted composite keys (group * n + s) -> plan.
template <typename K>
__global__ void __launch_bounds__(kThreads)
    write_plan_composite_kernel(const K* __restrict__ keys2, int64_t n, int64_t k, int64_t E,
                                int32_t* __restrict__ token, int32_t* __restrict__ slot,
                                int32_t* __restrict__ row, bool* __restrict__ kept) {
  const uint64_t un = static_cast<uint64_t>(n);
  for (int64_t i = global_thread(); i < n; i += threads_in_grid()) {
    const uint64_t key = keys2[i];
    const bool keep = key / un < static_cast<uint64_t>(E);
    write_entry(i, static_cast<int64_t>(key % un), keep, k, token, slot, row, kept);
  }
}

// offsets[e] = number of sorted keys below e * scale, for e in [0, E].
template <typename K>
__global__ void __launch_bounds__(kThreads)
    offsets_kernel(const K* __restrict__ keys, int64_t n, int64_t E, uint64_t scale,
                   int64_t* __restrict__ offsets) {
  for (int64_t e = global_thread(); e <= E; e += threads_in_grid()) {
    const K target = static_cast<K>(static_cast<uint64_t>(e) * scale);
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (keys[mid] < target) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    offsets[e] = lo;
  }
}

template <typename K>
cudaError_t run_capacity(const Layout& l, char* ws, int64_t n, int64_t k, int64_t E,
                         int64_t capacity, int64_t* offsets, int32_t* token, int32_t* slot,
                         int32_t* row, bool* kept, cudaStream_t stream) {
  const auto* keys = reinterpret_cast<const uint32_t*>(ws + l.keys_b);
  const auto* vals = reinterpret_cast<const int32_t*>(ws + l.vals_b);
  auto* keys2_in = reinterpret_cast<K*>(ws + l.keys2_a);
  auto* keys2_out = reinterpret_cast<K*>(ws + l.keys2_b);
  const unsigned blocks = static_cast<unsigned>(blocks_for(n));
  capacity_keys_kernel<K><<<blocks, kThreads, 0, stream>>>(keys, vals, n, E, capacity, keys2_in);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  size_t cub_bytes = l.cub_bytes;
  err = CUB_NS_QUALIFIER::DeviceRadixSort::SortKeys(ws, cub_bytes, keys2_in, keys2_out,
                                                    static_cast<int>(n), 0, l.end_bit2, stream);
  if (err != cudaSuccess) return err;
  write_plan_composite_kernel<K>
      <<<blocks, kThreads, 0, stream>>>(keys2_out, n, k, E, token, slot, row, kept);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  offsets_kernel<K><<<static_cast<unsigned>(blocks_for(E + 1)), kThreads, 0, stream>>>(
      keys2_out, n, E, static_cast<uint64_t>(n), offsets);
  return cudaGetLastError();
}

// Priority sort keys: rank in the high 32 bits, then the priority mapped to an unsigned key
// whose ascending order is descending priority; the stable sort keeps lower tokens first on ties.
__global__ void __launch_bounds__(kThreads)
    priority_keys_kernel(const float* __restrict__ priority, int64_t T, int64_t ranks,
                         uint64_t* __restrict__ keys, int32_t* __restrict__ vals,
                         int32_t* __restrict__ invalid) {
  for (int64_t q = global_thread(); q < T * ranks; q += threads_in_grid()) {
    const int64_t r = q / T, t = q % T;
    const float p = priority[t * ranks + r];
    if (p != p) *invalid = 1;
    // -0.0 and +0.0 are equal priorities (ties to the lower token, as on the CPU): key them alike.
    const uint32_t u = __float_as_uint(p == 0.0f ? 0.0f : p);
    const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // order-preserving
    keys[q] = (static_cast<uint64_t>(r) << 32) | static_cast<uint64_t>(~ascending);
    vals[q] = static_cast<int32_t>(t);
  }
}

struct OrderLayout {
  size_t cub_bytes = 0, keys_a = 0, keys_b = 0, vals_a = 0, total = 0;
  int end_bit = 0;
};

cudaError_t order_layout(int64_t T, int64_t ranks, OrderLayout* layout) {
  OrderLayout l;
  const int items = static_cast<int>(T * ranks);
  l.end_bit = 32 + std::max(1, bit_width(static_cast<uint64_t>(ranks - 1)));
  cudaError_t err = CUB_NS_QUALIFIER::DeviceRadixSort::SortPairs(
      nullptr, l.cub_bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), items, 0, l.end_bit);
  if (err != cudaSuccess) return err;
  const size_t n_bytes = static_cast<size_t>(T * ranks);
  Carver c{align_up(l.cub_bytes)};
  l.keys_a = c.take(n_bytes * sizeof(uint64_t));
  l.keys_b = c.take(n_bytes * sizeof(uint64_t));
  l.vals_a = c.take(n_bytes * sizeof(int32_t));
  l.total = c.at;
  *layout = l;
  return cudaSuccess;
}

}  // namespace

cudaError_t priority_order_workspace_bytes(int64_t T, int64_t ranks, size_t* bytes) {
  OrderLayout l;
  const cudaError_t err = order_layout(T, ranks, &l);
  if (err != cudaSuccess) return err;
  *bytes = l.total;
  return cudaSuccess;
}

cudaError_t priority_order(const float* priority, int64_t T, int64_t ranks, int32_t* order,
                           int32_t* invalid, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  if (T <= 0 || ranks <= 0) return cudaErrorInvalidValue;  // the glue skips empty inputs
  OrderLayout l;
  cudaError_t err = order_layout(T, ranks, &l);
  if (err != cudaSuccess) return err;
  if (workspace_bytes < l.total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  auto* keys_in = reinterpret_cast<uint64_t*>(ws + l.keys_a);
  auto* keys_out = reinterpret_cast<uint64_t*>(ws + l.keys_b);
  auto* vals_in = reinterpret_cast<int32_t*>(ws + l.vals_a);
  const int64_t n = T * ranks;
  priority_keys_kernel<<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, stream>>>(
      priority, T, ranks, keys_in, vals_in, invalid);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  size_t cub_bytes = l.cub_bytes;
  return CUB_NS_QUALIFIER::DeviceRadixSort::SortPairs(
      ws, cub_bytes, keys_in, keys_out, vals_in, order, static_cast<int>(n), 0, l.end_bit, stream);
}

cudaError_t make_plan_workspace_bytes(int64_t T, int64_t k, int64_t E, bool has_capacity,
                                      size_t* bytes) {
  Layout l;
  const cudaError_t err = plan_layout(T * k, E, has_capacity, &l);
  if (err != cudaSuccess) return err;
  *bytes = l.total;
  return cudaSuccess;
}

cudaError_t make_plan(const int32_t* expert, int64_t T, int64_t k, int64_t E, int64_t capacity,
                      const int32_t* order, int64_t order_ranks, int64_t* offsets, int32_t* token,
                      int32_t* slot, int32_t* row, bool* kept, int32_t* invalid, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream) {
  const int64_t n = T * k;
  if (n <= 0 || E <= 0) return cudaErrorInvalidValue;  // the glue handles the empty plan
  const bool has_capacity = capacity >= 0;
  Layout l;
  cudaError_t err = plan_layout(n, E, has_capacity, &l);
  if (err != cudaSuccess) return err;
  if (workspace_bytes < l.total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  auto* keys_in = reinterpret_cast<uint32_t*>(ws + l.keys_a);
  auto* keys_out = reinterpret_cast<uint32_t*>(ws + l.keys_b);
  auto* vals_in = reinterpret_cast<int32_t*>(ws + l.vals_a);
  auto* vals_out = reinterpret_cast<int32_t*>(ws + l.vals_b);
  const unsigned blocks = static_cast<unsigned>(blocks_for(n));

  build_keys_kernel<<<blocks, kThreads, 0, stream>>>(expert, T, k, E, has_capacity,
                                                     has_capacity ? order : nullptr, order_ranks,
                                                     keys_in, vals_in, invalid);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  size_t cub_bytes = l.cub_bytes;
  err = CUB_NS_QUALIFIER::DeviceRadixSort::SortPairs(ws, cub_bytes, keys_in, keys_out, vals_in,
                                                     vals_out, static_cast<int>(n), 0, l.end_bit1,
                                                     stream);
  if (err != cudaSuccess) return err;

  if (has_capacity) {
    return l.wide ? run_capacity<uint64_t>(l, ws, n, k, E, capacity, offsets, token, slot, row,
                                           kept, stream)
                  : run_capacity<uint32_t>(l, ws, n, k, E, capacity, offsets, token, slot, row,
                                           kept, stream);
  }
  write_plan_pairs_kernel<<<blocks, kThreads, 0, stream>>>(keys_out, vals_out, n, k, E, token, slot,
                                                           row, kept);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  offsets_kernel<uint32_t><<<static_cast<unsigned>(blocks_for(E + 1)), kThreads, 0, stream>>>(
      keys_out, n, E, 1, offsets);
  return cudaGetLastError();
}

}  // namespace smoe::cuda
