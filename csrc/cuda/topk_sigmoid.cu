// CUDA kernels of topk_sigmoid (DeepSeek-V3 routing) and its backward: one warp per row, lanes
// strided over experts, warp-shuffle reductions in a fixed butterfly order (reproducible run to
// run). The math follows cpu::topk_sigmoid_rows; the sigmoid comes from expf, so a near-tie may
// be broken differently from the CPU's std::exp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/dtype.cuh"
#include "cuda/grid.cuh"
#include "cuda/topk_sigmoid.h"

namespace smoe::cuda {
namespace {

using namespace grid;  // NOLINT: launch helpers of this file's kernels

constexpr float kRenormEps = 1e-20f;  // as cpu::kSigmoidRenormEps

__device__ __forceinline__ bool topk_before(float va, int64_t a, float vb, int64_t b) {
  return va > vb || (va == vb && a < b);
}

__device__ __forceinline__ float sigmoid_of(float x) { return 1.f / (1.f + expf(-x)); }

// The entry strictly after (prev_v, prev_i) in top-k order with the best (value(i), i) over
// i < n, lanes strided; every lane returns the same winner (index -1 when none is left).
template <typename Value>
__device__ __forceinline__ void warp_next_best(Value value, int64_t n, float prev_v, int64_t prev_i,
                                               float* best_v_out, int64_t* best_i_out) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  float best_v = -INFINITY;
  int64_t best_i = -1;
  for (int64_t i = lane; i < n; i += kWarp) {
    const float v = value(i);
    if (topk_before(prev_v, prev_i, v, i) && (best_i < 0 || topk_before(v, i, best_v, best_i))) {
      best_v = v;
      best_i = i;
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
  *best_v_out = best_v;
  *best_i_out = best_i;
}

// Writes the row's choice values s + bias to c [E], then sets the experts of every group outside
// the topk_group best (group score: the sum of its two best values, its best when G = 1) to -inf.
template <typename T>
__device__ void mask_groups(const T* l, const float* bias, int64_t E, int64_t n_group,
                            int64_t topk_group, float* c) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t G = E / n_group;
  float* gs = c + E;
  for (int64_t e = lane; e < E; e += kWarp) {
    c[e] = sigmoid_of(to_float(l[e])) + (bias == nullptr ? 0.f : bias[e]);
  }
  __syncwarp();
  for (int64_t g = 0; g < n_group; ++g) {  // warp-uniform
    float first = -INFINITY, second = -INFINITY;
    for (int64_t i = lane; i < G; i += kWarp) {
      const float v = c[g * G + i];
      if (v > first) {
        second = first;
        first = v;
      } else if (v > second) {
        second = v;
      }
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o /= 2) {  // top-2 of the union of two top-2 lists
      const float of = __shfl_xor_sync(kFullMask, first, o);
      const float os = __shfl_xor_sync(kFullMask, second, o);
      second = fmaxf(fminf(first, of), fmaxf(second, os));
      first = fmaxf(first, of);
    }
    if (lane == 0) gs[g] = G == 1 ? first : first + second;
  }
  __syncwarp();
  float th_v = INFINITY;
  int64_t th_i = -1;
  for (int64_t p = 0; p < topk_group; ++p) {
    warp_next_best([&](int64_t g) { return gs[g]; }, n_group, th_v, th_i, &th_v, &th_i);
  }
  // (th_v, th_i) is the last kept group: a group is kept when it comes before it or is it.
  for (int64_t e = lane; e < E; e += kWarp) {
    const int64_t g = e / G;
    if (g != th_i && !topk_before(gs[g], g, th_v, th_i)) c[e] = -INFINITY;
  }
  __syncwarp();
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_sigmoid_kernel(const T* __restrict__ logits, int64_t ld, int64_t rows, int64_t E,
                        int64_t k, int64_t n_group, int64_t topk_group, bool renormalize,
                        float scale, const float* __restrict__ bias, float* __restrict__ scratch,
                        T* __restrict__ weight, int32_t* __restrict__ expert,
                        int32_t* __restrict__ invalid) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  for (int64_t t = global_warp(); t < rows; t += warps_in_grid()) {  // warp-uniform
    const T* l = logits + t * ld;
    bool bad = false;
    // (a NaN bias fails the glue's device assert; its row must not select from fewer than k)
    for (int64_t e = lane; e < E; e += kWarp) {
      bad = bad || isnan(to_float(l[e])) || (bias != nullptr && isnan(bias[e]));
    }
    if (__any_sync(kFullMask, bad)) {  // the CPU op raises for this row; write placeholders
      if (lane == 0) *invalid = 1;
      for (int64_t j = lane; j < k; j += kWarp) {
        expert[t * k + j] = -1;
        weight[t * k + j] = from_float<T>(NAN);
      }
      continue;
    }
    float* c = nullptr;
    if (scratch != nullptr) {
      c = scratch + t * (E + n_group);
      mask_groups(l, bias, E, n_group, topk_group, c);
    }
    const auto value = [&](int64_t e) {
      return c != nullptr ? c[e] : sigmoid_of(to_float(l[e])) + (bias == nullptr ? 0.f : bias[e]);
    };
    float prev_v = INFINITY, sum = 0.f;
    int64_t prev_i = -1;
    for (int64_t j = 0; j < k; ++j) {
      warp_next_best(value, E, prev_v, prev_i, &prev_v, &prev_i);
      // The lane that writes expert[j] is the one that reads it back below.
      if (lane == j % kWarp) expert[t * k + j] = static_cast<int32_t>(prev_i);
      sum += sigmoid_of(to_float(l[prev_i]));
    }
    const float denom = sum + kRenormEps;
    for (int64_t j = lane; j < k; j += kWarp) {
      const float s = sigmoid_of(to_float(l[expert[t * k + j]]));
      weight[t * k + j] = from_float<T>(renormalize ? (s / denom) * scale : s * scale);
    }
  }
}

// As cpu::topk_sigmoid_backward_rows. Expert indices outside [0, E) are skipped rather than read
// out of bounds (the CUDA glue asserts on them).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_sigmoid_backward_kernel(const T* __restrict__ grad_weight, const T* __restrict__ logits,
                                 int64_t ld, const int32_t* __restrict__ expert, int64_t rows,
                                 int64_t E, int64_t k, bool renormalize, float scale,
                                 T* __restrict__ grad_logits) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  for (int64_t t = global_warp(); t < rows; t += warps_in_grid()) {
    const T* l = logits + t * ld;
    const T* g = grad_weight + t * k;
    const int32_t* ex = expert + t * k;
    float S = 0.f;  // every lane sums in j order, as the CPU does
    if (renormalize) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = ex[j];
        if (e >= 0 && e < E) S += sigmoid_of(to_float(l[e]));
      }
      S += kRenormEps;
    }
    for (int64_t e = lane; e < E; e += kWarp) {
      float acc = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        if (ex[j] != e) continue;
        const float gj = to_float(g[j]);
        if (!renormalize) {
          acc += scale * gj;
          continue;
        }
        // (sum_{i != j} s_i (g_j - g_i) + g_j 1e-20) / S^2: no cancellation (see the CPU kernel)
        float num = gj * kRenormEps;
        for (int64_t i = 0; i < k; ++i) {
          const int64_t ei = ex[i];
          if (i != j && ei >= 0 && ei < E)
            num += sigmoid_of(to_float(l[ei])) * (gj - to_float(g[i]));
        }
        acc += scale * (num / (S * S));
      }
      const float x = to_float(l[e]);
      grad_logits[t * E + e] =
          from_float<T>(acc == 0.f ? 0.f : acc * sigmoid_of(x) * sigmoid_of(-x));
    }
  }
}

}  // namespace

template <typename T>
cudaError_t topk_sigmoid(const T* logits, int64_t ld, int64_t rows, int64_t E, int64_t k,
                         int64_t n_group, int64_t topk_group, bool renormalize, float scale,
                         const float* bias, float* scratch, T* weight, int32_t* expert,
                         int32_t* invalid, cudaStream_t stream) {
  if (rows <= 0 || k <= 0) return cudaSuccess;
  topk_sigmoid_kernel<T><<<static_cast<unsigned>(blocks_for_rows(rows)), kThreads, 0, stream>>>(
      logits, ld, rows, E, k, n_group, topk_group, renormalize, scale, bias, scratch, weight,
      expert, invalid);
  return cudaGetLastError();
}

template <typename T>
cudaError_t topk_sigmoid_backward(const T* grad_weight, const T* logits, int64_t ld,
                                  const int32_t* expert, int64_t rows, int64_t E, int64_t k,
                                  bool renormalize, float scale, T* grad_logits,
                                  cudaStream_t stream) {
  if (rows <= 0 || E <= 0) return cudaSuccess;
  topk_sigmoid_backward_kernel<T>
      <<<static_cast<unsigned>(blocks_for_rows(rows)), kThreads, 0, stream>>>(
          grad_weight, logits, ld, expert, rows, E, k, renormalize, scale, grad_logits);
  return cudaGetLastError();
}

#define SMOE_INSTANTIATE(T)                                                                      \
  template cudaError_t topk_sigmoid<T>(const T*, int64_t, int64_t, int64_t, int64_t, int64_t,    \
                                       int64_t, bool, float, const float*, float*, T*, int32_t*, \
                                       int32_t*, cudaStream_t);                                  \
  template cudaError_t topk_sigmoid_backward<T>(const T*, const T*, int64_t, const int32_t*,     \
                                                int64_t, int64_t, int64_t, bool, float, T*,      \
                                                cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
