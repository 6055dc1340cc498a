// CUDA kernels of router_stats and its backward. lse: one warp per row, lanes strided over the
// experts, butterfly reductions in a fixed order. prob_sum: each thread owns an expert and sums a
// fixed block of kStatsBlockRows rows in order, then one thread per expert adds the blocks in
// order. No atomics: the same bits run to run. The math follows cpu::router_stats_rows, with
// expf and logf, so results differ from the CPU's in the last bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/dtype.cuh"
#include "cuda/grid.cuh"
#include "cuda/router_stats.h"

namespace smoe::cuda {
namespace {

using namespace grid;  // NOLINT: launch helpers of this file's kernels

// One row's max (0 when infinite, as torch.logsumexp) into *shift and its sum of exp(l - shift),
// the whole warp calling; every lane gets both.
template <typename T>
__device__ __forceinline__ float row_exp_sum(const T* l, int64_t E, int lane, float* shift) {
  float m = -INFINITY;
  for (int64_t e = lane; e < E; e += kWarp) m = fmaxf(m, to_float(l[e]));  // skips NaN
  m = warp_max(m);
  const float c = isinf(m) ? 0.f : m;
  float s = 0.f;
  for (int64_t e = lane; e < E; e += kWarp) s += expf(to_float(l[e]) - c);
  *shift = c;
  return warp_sum(s);
}

// lse [rows], and each row's shift and 1 / s into shift, inv [rows] (what the probabilities are
// computed from: exp(l - lse) would lose them where lse rounds to the max).
template <typename T>
__global__ void lse_kernel(const T* __restrict__ logits, int64_t ld, int64_t rows, int64_t E,
                           float* __restrict__ lse, float* __restrict__ shift_out,
                           float* __restrict__ inv_out) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  for (int64_t t = global_warp(); t < rows; t += warps_in_grid()) {
    float shift;
    const float s = row_exp_sum(logits + t * ld, E, lane, &shift);
    if (lane == 0) {
      lse[t] = logf(s) + shift;
      shift_out[t] = shift;
      inv_out[t] = 1.f / s;
    }
  }
}

// out[b * E + e] = sum over the rows t of block b of exp(l[t, e] - shift[t]) * inv[t];
// blockIdx.y strides over the blocks of rows, threads over the experts.
template <typename T>
__global__ void block_sums_kernel(const T* __restrict__ logits, int64_t ld, int64_t rows,
                                  int64_t E, int64_t blocks, const float* __restrict__ shift,
                                  const float* __restrict__ inv, float* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  for (int64_t b = blockIdx.y; b < blocks; b += gridDim.y) {
    const int64_t begin = b * kStatsBlockRows;
    const int64_t end = begin + kStatsBlockRows < rows ? begin + kStatsBlockRows : rows;
    float acc = 0.f;
#pragma unroll 8
    for (int64_t t = begin; t < end; ++t) {
      acc += expf(to_float(logits[t * ld + e]) - shift[t]) * inv[t];
    }
    out[b * E + e] = acc;
  }
}

__global__ void sum_blocks_kernel(const float* __restrict__ partial, int64_t blocks, int64_t E,
                                  float* __restrict__ out) {
  for (int64_t e = global_thread(); e < E; e += threads_in_grid()) {
    float acc = 0.f;
#pragma unroll 16  // the loads issue ahead of the (ordered) chain of adds
    for (int64_t b = 0; b < blocks; ++b) acc += partial[b * E + e];
    out[e] = acc;
  }
}

template <typename T>
__global__ void router_stats_backward_kernel(const float* __restrict__ gp,
                                             const float* __restrict__ gl,
                                             const T* __restrict__ logits, int64_t ld,
                                             int64_t rows, int64_t E,
                                             T* __restrict__ grad_logits) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  for (int64_t t = global_warp(); t < rows; t += warps_in_grid()) {
    const T* l = logits + t * ld;
    float shift;
    const float inv = 1.f / row_exp_sum(l, E, lane, &shift);
    float dot = 0.f;
    if (gp != nullptr) {
      for (int64_t e = lane; e < E; e += kWarp) dot += expf(to_float(l[e]) - shift) * inv * gp[e];
      dot = warp_sum(dot);
    }
    const float base = (gl != nullptr ? gl[t] : 0.f) - dot;
    for (int64_t e = lane; e < E; e += kWarp) {
      const float p = expf(to_float(l[e]) - shift) * inv;
      grad_logits[t * E + e] = from_float<T>(gp != nullptr ? p * (gp[e] + base) : p * base);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t router_stats(const T* logits, int64_t ld, int64_t rows, int64_t E, float* scratch,
                         float* prob_sum, float* lse, cudaStream_t stream) {
  if (rows <= 0 || E <= 0) return cudaSuccess;
  float* shift = scratch;
  float* inv = scratch + rows;
  float* partial = scratch + 2 * rows;
  lse_kernel<T><<<static_cast<unsigned>(blocks_for_rows(rows)), kThreads, 0, stream>>>(
      logits, ld, rows, E, lse, shift, inv);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t blocks = router_stats_blocks(rows);
  const int64_t threads = E < kThreads ? (E + kWarp - 1) / kWarp * kWarp : kThreads;
  const dim3 grid(static_cast<unsigned>((E + threads - 1) / threads),
                  static_cast<unsigned>(blocks < 65535 ? blocks : 65535));
  block_sums_kernel<T><<<grid, static_cast<unsigned>(threads), 0, stream>>>(
      logits, ld, rows, E, blocks, shift, inv, blocks == 1 ? prob_sum : partial);
  err = cudaGetLastError();
  if (err != cudaSuccess || blocks == 1) return err;
  sum_blocks_kernel<<<static_cast<unsigned>(blocks_for(E)), kThreads, 0, stream>>>(partial, blocks,
                                                                                  E, prob_sum);
  return cudaGetLastError();
}

template <typename T>
cudaError_t router_stats_backward(const float* gp, const float* gl, const T* logits, int64_t ld,
                                  int64_t rows, int64_t E, T* grad_logits, cudaStream_t stream) {
  if (rows <= 0 || E <= 0) return cudaSuccess;
  router_stats_backward_kernel<T>
      <<<static_cast<unsigned>(blocks_for_rows(rows)), kThreads, 0, stream>>>(
          gp, gl, logits, ld, rows, E, grad_logits);
  return cudaGetLastError();
}

#define SMOE_INSTANTIATE(T)                                                                      \
  template cudaError_t router_stats<T>(const T*, int64_t, int64_t, int64_t, float*, float*,      \
                                       float*, cudaStream_t);                                    \
  template cudaError_t router_stats_backward<T>(const float*, const float*, const T*, int64_t,   \
                                                int64_t, int64_t, T*, cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
