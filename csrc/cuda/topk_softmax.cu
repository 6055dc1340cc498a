// CUDA kernels of topk_softmax and its backward: one warp per row, lanes strided over experts,
// warp-shuffle reductions in a fixed butterfly order, so results are reproducible run to run.
// Selection compares the float-converted logits exactly like cpu::topk_softmax_rows, so the
// expert indices equal the CPU ones bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/dtype.cuh"
#include "cuda/grid.cuh"
#include "cuda/topk_softmax.h"

namespace smoe::cuda {
namespace {

using namespace grid;  // NOLINT: launch helpers of this file's kernels

// True when (va, a) comes before (vb, b) in top-k order: larger value first, lower index on ties.
__device__ __forceinline__ bool topk_before(float va, int64_t a, float vb, int64_t b) {
  return va > vb || (va == vb && a < b);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_softmax_kernel(const T* __restrict__ logits, int64_t ld, int64_t rows, int64_t E,
                        int64_t k, bool renormalize, const float* __restrict__ bias,
                        T* __restrict__ weight, int32_t* __restrict__ expert,
                        int32_t* __restrict__ invalid) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  // The row loop is warp-uniform, so the full-mask shuffles below see all 32 lanes.
  for (int64_t t = global_warp(); t < rows; t += warps_in_grid()) {
    const T* l = logits + t * ld;
    float m = -INFINITY;
    bool bad = false;
    for (int64_t e = lane; e < E; e += kWarp) {
      const float v = to_float(l[e]);
      bad = bad || isnan(v) || v == INFINITY;
      m = fmaxf(m, v);
    }
    m = warp_max(m);  // fmaxf skips NaN; warp-uniform, so the branch below is too
    if (__any_sync(kFullMask, bad) || m == -INFINITY) {
      // The CPU op raises for this row (NaN, +inf, or only -inf: no expert has a probability);
      // flag it and write placeholders (no NaN-driven indexing).
      if (lane == 0) *invalid = 1;
      for (int64_t j = lane; j < k; j += kWarp) {
        expert[t * k + j] = -1;
        weight[t * k + j] = from_float<T>(NAN);
      }
      continue;
    }
    float total = 0.f;
    for (int64_t e = lane; e < E; e += kWarp) total += expf(to_float(l[e]) - m);
    total = warp_sum(total);
    // k passes, each taking the best entry strictly after the previous pick in top-k order. With
    // no NaN in the row the order is total, so the warp-wide winner is unique and lands in every
    // lane.
    float prev_v = INFINITY;
    int64_t prev_i = -1;
    float selected = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      float best_v = -INFINITY;
      int64_t best_i = -1;
      for (int64_t e = lane; e < E; e += kWarp) {
        const float v = bias == nullptr ? to_float(l[e]) : to_float(l[e]) + bias[e];
        if (topk_before(prev_v, prev_i, v, e) &&
            (best_i < 0 || topk_before(v, e, best_v, best_i))) {
          best_v = v;
          best_i = e;
        }
      }
#pragma unroll
      for (int o = kWarp / 2; o > 0; o /= 2) {
        const float ov = __shfl_xor_sync(kFullMask, best_v, o);
        const int64_t oi = __shfl_xor_sync(kFullMask, best_i, o);
        if (oi >= 0 && (best_i < 0 || topk_before(ov, oi, best_v, best_i))) {
          best_v = ov;
          best_i = oi;
        }
      }
      // The lane that writes expert[j] is the one that reads it back below: no cross-lane hazard.
      if (lane == j % kWarp) expert[t * k + j] = static_cast<int32_t>(best_i);
      // (with a bias best_v is the biased rank value; the weights use the logit itself)
      selected += expf((bias == nullptr ? best_v : to_float(l[best_i])) - m);
      prev_v = best_v;
      prev_i = best_i;
    }
    const float denom = renormalize ? selected : total;
    for (int64_t j = lane; j < k; j += kWarp) {
      const int64_t e = expert[t * k + j];
      weight[t * k + j] = from_float<T>(expf(to_float(l[e]) - m) / denom);
    }
  }
}

// renormalize:  w_j = softmax over the selected logits; d l[e_j] = w_j (g_j - sum_l g_l w_l)
// otherwise:    w_j = p[e_j] of the full softmax;     d l[i]   = p_i (G_i - sum_j g_j w_j)
// Each output element is written by exactly one lane; repeated experts in a row resolve as on
// the CPU (renormalize: the last j wins; otherwise the g_j are summed in j order). Expert
// indices outside [0, E) are skipped rather than read out of bounds.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_softmax_backward_kernel(const T* __restrict__ grad_weight, const T* __restrict__ logits,
                                 int64_t ld, const int32_t* __restrict__ expert, int64_t rows,
                                 int64_t E, int64_t k, bool renormalize,
                                 T* __restrict__ grad_logits) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  for (int64_t t = global_warp(); t < rows; t += warps_in_grid()) {
    const T* l = logits + t * ld;
    const T* g = grad_weight + t * k;
    const int32_t* ex = expert + t * k;
    T* out = grad_logits + t * E;
    float m = -INFINITY;
    for (int64_t e = lane; e < E; e += kWarp) m = fmaxf(m, to_float(l[e]));
    m = warp_max(m);
    float denom = 0.f, rest = 0.f;  // rest: the terms of denom other than the first choice's
    if (renormalize) {
      for (int64_t j = lane; j < k; j += kWarp) {
        const int64_t e = ex[j];
        if (e < 0 || e >= E) continue;
        const float x = expf(to_float(l[e]) - m);
        denom += x;
        if (j > 0) rest += x;
      }
    } else {
      for (int64_t e = lane; e < E; e += kWarp) {
        const float x = expf(to_float(l[e]) - m);
        denom += x;
        if (e != ex[0]) rest += x;
      }
    }
    denom = warp_sum(denom);
    rest = warp_sum(rest);
    float dot = 0.f, rest_dot = 0.f;  // rest_dot: the terms of dot after the first choice's
    for (int64_t j = lane; j < k; j += kWarp) {
      const int64_t e = ex[j];
      if (e < 0 || e >= E) continue;
      const float gw = to_float(g[j]) * (expf(to_float(l[e]) - m) / denom);
      dot += gw;
      if (j > 0) rest_dot += gw;
    }
    dot = warp_sum(dot);
    rest_dot = warp_sum(rest_dot);
    // As cpu::topk_softmax_backward_rows: g_0 - dot = g_0 (1 - w_0) - sum_{j>0} g_j w_j, with
    // 1 - w_0 summed from the other probabilities (no cancellation when w_0 ~ 1).
    const float top_diff = to_float(g[0]) * (rest / denom) - rest_dot;
    for (int64_t e = lane; e < E; e += kWarp) {
      float ge = 0.f;
      bool hit = false;
      for (int64_t j = 0; j < k; ++j) {
        if (ex[j] != e) continue;
        ge = renormalize ? to_float(g[j]) : ge + to_float(g[j]);
        hit = true;
      }
      const float p = expf(to_float(l[e]) - m) / denom;
      const float diff = e == ex[0] ? top_diff : ge - dot;
      out[e] = from_float<T>(renormalize && !hit ? 0.f : p * diff);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t topk_softmax(const T* logits, int64_t ld, int64_t rows, int64_t E, int64_t k,
                         bool renormalize, const float* bias, T* weight, int32_t* expert,
                         int32_t* invalid, cudaStream_t stream) {
  if (rows <= 0 || k <= 0) return cudaSuccess;
  const int64_t blocks = blocks_for_rows(rows);
  topk_softmax_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      logits, ld, rows, E, k, renormalize, bias, weight, expert, invalid);
  return cudaGetLastError();
}

template <typename T>
cudaError_t topk_softmax_backward(const T* grad_weight, const T* logits, int64_t ld,
                                  const int32_t* expert, int64_t rows, int64_t E, int64_t k,
                                  bool renormalize, T* grad_logits, cudaStream_t stream) {
  if (rows <= 0 || E <= 0) return cudaSuccess;
  const int64_t blocks = blocks_for_rows(rows);
  topk_softmax_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      grad_weight, logits, ld, expert, rows, E, k, renormalize, grad_logits);
  return cudaGetLastError();
}

#define SMOE_INSTANTIATE(T)                                                                  \
  template cudaError_t topk_softmax<T>(const T*, int64_t, int64_t, int64_t, int64_t, bool,   \
                                       const float*, T*, int32_t*, int32_t*, cudaStream_t);  \
  template cudaError_t topk_softmax_backward<T>(const T*, const T*, int64_t, const int32_t*, \
                                                int64_t, int64_t, int64_t, bool, T*,         \
                                                cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
