// Torch-free device helpers and kernels shared by sinkhorn.cu (forward) and sinkhorn_backward.cu
// (specs/sinkhorn_ssr.md §3, §7, §8). Float32 math on S = scores / eps [T, E] (contiguous).
//
// Row work: a group of G lanes per row (G = the power of two >= min(E, 32), so a warp holds 32 / G
// rows), max then sum of exp with fixed-order shuffles inside the group. Column work: one block per
// chunk of kChunk rows writes a per-column partial into [j * chunks + c], then one warp per column
// joins the partials in chunk order. No atomics anywhere: bitwise reproducible run to run, and
// independent of the GPU (grid sizes depend on the shape only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "cuda/dtype.cuh"
#include "cuda/grid.cuh"

namespace smoe::cuda::sinkhorn_detail {

using grid::Carver;
using grid::global_thread;
using grid::global_warp;
using grid::kFullMask;
using grid::kMaxBlocks;
using grid::kThreads;
using grid::kWarp;
using grid::kWarpsPerBlock;
using grid::threads_in_grid;
using grid::warp_max;
using grid::warp_sum;
using grid::warps_in_grid;

// The kernels below have internal linkage on purpose: each .cu is compiled whole (no -rdc) and
// gets its own copy of the ones it launches, so the two files never clash on a kernel's host stub.
namespace {  // NOLINT(google-build-namespaces, cert-dcl59-cpp)

constexpr int64_t kChunk = 256;  // rows per column partial (as cpu::kSinkhornChunk)

inline int64_t chunks_for(int64_t rows) { return (rows + kChunk - 1) / kChunk; }

// Lanes per row: the smallest power of two >= min(E, 32).
inline int lanes_per_row(int64_t E) {
  int g = 1;
  while (g < E && g < kWarp) g *= 2;
  return g;
}

// Blocks of a row-group kernel (32 / G rows per warp), capped: the row loop is grid-stride.
inline unsigned row_blocks(int64_t rows, int G) {
  const int64_t per_block = static_cast<int64_t>(kWarpsPerBlock) * (kWarp / G);
  return static_cast<unsigned>(std::min<int64_t>((rows + per_block - 1) / per_block, kMaxBlocks));
}

// Blocks of a column-partial kernel (one chunk per block, grid-stride over chunks).
inline unsigned chunk_blocks(int64_t chunks) {
  return static_cast<unsigned>(std::min<int64_t>(chunks, kMaxBlocks));
}

// Blocks of a grid-stride loop over n elements, one per thread (n >= 1).
inline unsigned elem_blocks(int64_t n) { return static_cast<unsigned>(grid::blocks_for(n)); }

// Blocks of a one-warp-per-column kernel (E >= 1).
inline unsigned col_blocks(int64_t E) { return static_cast<unsigned>(grid::blocks_for_rows(E)); }

// The backward's steps i > n do nothing, with n = *iters (read on the device, clamped to [0,
// max_iter]); iters = nullptr: never skip (the forward). Every thread of a launch loads the same
// word, which no kernel writes, so a whole grid returns or none of it does (no thread is left
// waiting at a __syncthreads or a shuffle).
struct Skip {
  const int64_t* iters;
  int64_t i, max_iter;
  __device__ int64_t n() const {
    const int64_t v = *iters;
    return v < 0 ? 0 : v > max_iter ? max_iter : v;
  }
  __device__ bool now() const { return iters != nullptr && i > n(); }
};
constexpr Skip kNoSkip{nullptr, 0, 0};

// Reductions over the G lanes of a row group (G a power of two <= 32: xor offsets < G stay in the
// group). The whole warp calls them (full mask).
__device__ __forceinline__ float group_max(float v, int G) {
  for (int o = G / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
__device__ __forceinline__ float group_sum(float v, int G) {
  for (int o = G / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// logsumexp_j(row[j] + g[j]) of a row held by a group (lane col owns j = col, col + G, ...); every
// lane of the group gets it. on = false: a lane of a group past the last row (it only joins the
// shuffles; row is not read).
__device__ __forceinline__ float row_lse(const float* row, const float* g, int64_t E, bool on,
                                         int col, int G) {
  float m = -INFINITY;
  if (on) {
    for (int64_t j = col; j < E; j += G) m = fmaxf(m, row[j] + g[j]);
  }
  m = group_max(m, G);
  float s = 0.f;
  if (on && m > -INFINITY) {
    for (int64_t j = col; j < E; j += G) s += expf(row[j] + g[j] - m);
  }
  s = group_sum(s, G);
  return m > -INFINITY ? m + logf(s) : m;
}

// Row loop of a row-group kernel: body(t, on, col) for every row t. The loop bound is
// warp-uniform (base is the warp's first row), so all 32 lanes run every iteration and the
// group shuffles inside body see a full warp; lanes of a group past the last row get on = false.
template <typename Body>
__device__ __forceinline__ void for_rows(int64_t rows, int G, Body body) {
  const int lane = static_cast<int>(threadIdx.x % kWarp), per = kWarp / G;
  const int64_t stride = warps_in_grid() * per;
  for (int64_t base = global_warp() * per; base < rows; base += stride) {
    const int64_t t = base + lane / G;
    body(t, t < rows, lane % G);
  }
}

// x[t, j] + a[t] (a = nullptr: x[t, j]).
struct ShiftValue {
  const float *x, *a;
  int64_t E;
  __device__ float operator()(int64_t t, int64_t j) const {
    return x[t * E + j] + (a ? a[t] : 0.f);
  }
};

// Per-chunk column partials of v = value(t, j) into [j * chunks + c]. kLse: the chunk's column max
// into pm and sum_t exp(v - max) into ps; otherwise sum_t v into ps (pm untouched). Columns go W
// at a time with R row lanes each: thread tid works on column j0 + tid % W and rows b + tid / W,
// b + tid / W + R, ... (coalesced: consecutive threads read consecutive elements of a row);
// thread tid < W then joins the R lanes of its column in lane order.
template <bool kLse, typename V>
__global__ void __launch_bounds__(kThreads)
    col_partial_kernel(V value, int64_t rows, int64_t E, int64_t chunks, Skip skip,
                       float* __restrict__ pm, float* __restrict__ ps) {
  if (skip.now()) return;  // grid-uniform, before any barrier
  __shared__ float red[kThreads];
  __shared__ float colmax[kThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const int W = static_cast<int>(std::min<int64_t>(E, kThreads)), R = kThreads / W;
  const int jj = tid % W, r = tid / W;  // r == R: a spare thread when W does not divide kThreads
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {  // block-uniform
    const int64_t b = c * kChunk, e = std::min(rows, b + kChunk);
    for (int64_t j0 = 0; j0 < E; j0 += W) {  // block-uniform
      const int64_t j = j0 + jj;
      const bool on = r < R && j < E;
      if (kLse) {
        float m = -INFINITY;
        if (on) {
          for (int64_t t = b + r; t < e; t += R) m = fmaxf(m, value(t, j));
        }
        red[tid] = m;
        __syncthreads();
        if (tid < W) {
          float M = -INFINITY;
          for (int k = 0; k < R; ++k) M = fmaxf(M, red[k * W + tid]);
          colmax[tid] = M;
        }
        __syncthreads();  // colmax ready; every read of red above is done
      }
      float s = 0.f;
      if (on) {
        const float M = kLse ? colmax[jj] : 0.f;
        for (int64_t t = b + r; t < e; t += R) s += kLse ? expf(value(t, j) - M) : value(t, j);
      }
      red[tid] = s;
      __syncthreads();
      if (tid < W && j < E) {
        float sum = 0.f;
        for (int k = 0; k < R; ++k) sum += red[k * W + tid];
        if (kLse) pm[j * chunks + c] = colmax[tid];
        ps[j * chunks + c] = sum;
      }
      __syncthreads();  // red and colmax are rewritten by the next tile
    }
  }
}

// Join of one column's chunk partials by one warp, in a fixed order (every lane gets it).
__device__ __forceinline__ float warp_chunk_sum(const float* p, int64_t chunks, int lane) {
  float s = 0.f;
  for (int64_t c = lane; c < chunks; c += kWarp) s += p[c];
  return warp_sum(s);
}
// The column's logsumexp from its (max, sum of exp) chunk partials.
__device__ __forceinline__ float warp_chunk_lse(const float* pm, const float* ps, int64_t chunks,
                                                int lane) {
  float M = -INFINITY;
  for (int64_t c = lane; c < chunks; c += kWarp) M = fmaxf(M, pm[c]);
  M = warp_max(M);  // warp-uniform, so is the early return
  if (!(M > -INFINITY)) return M;
  float s = 0.f;
  for (int64_t c = lane; c < chunks; c += kWarp) s += ps[c] * expf(pm[c] - M);
  return M + logf(warp_sum(s));
}

// out[t] = sum_j value(t, j) + (add ? add[t] : shift). Forward residual: the plan's row sums with
// shift = -row_mass. Backward start: fbar_n = row sums of grad_log_plan + grad_f.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    row_sum_kernel(V value, const float* __restrict__ add, float shift, int64_t rows, int64_t E,
                   int G, float* __restrict__ out) {
  for_rows(rows, G, [&](int64_t t, bool on, int col) {
    float s = 0.f;
    if (on) {
      for (int64_t j = col; j < E; j += G) s += value(t, j);
    }
    s = group_sum(s, G);
    if (on && col == 0) out[t] = s + (add ? add[t] : shift);
  });
}

// S = scores / eps (contiguous float; scores has row stride ld); with copy_src, also copy_dst =
// copy_src (both contiguous [T, E]).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(const T* __restrict__ x, int64_t ld, int64_t rows, int64_t E, float eps,
                 float* __restrict__ S, const float* __restrict__ copy_src,
                 float* __restrict__ copy_dst) {
  for (int64_t i = global_thread(); i < rows * E; i += threads_in_grid()) {
    const int64_t t = i / E, j = i % E;
    S[i] = to_float(x[t * ld + j]) / eps;
    if (copy_src) copy_dst[i] = copy_src[i];
  }
}

// Carves float buffers of the given sizes (in floats) out of a workspace, each 256-byte aligned,
// into out[0..N); returns the workspace bytes (ws = nullptr: only the size).
template <int N>
size_t carve(void* ws, const int64_t (&floats)[N], float** out) {
  Carver c{0};
  for (int k = 0; k < N; ++k) {
    const size_t offset = c.take(sizeof(float) * static_cast<size_t>(floats[k]));
    if (ws) out[k] = reinterpret_cast<float*>(static_cast<char*>(ws) + offset);
  }
  return c.at;
}

}  // namespace
}  // namespace smoe::cuda::sinkhorn_detail
