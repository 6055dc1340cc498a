// Torch-free CUDA launchers of graph_mix and its backward (specs/graph_routing.md §2, §5): batched
// shared-memory tiled GEMMs over contiguous arrays, math in float (double for double). x' =
// [cache; x] is never built: row j of x' is cache row j for j < C, else x row j - C.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace smoe::cuda {

// One call: x [B, S, E], cache [B, C, E] (nullptr when C = 0), A [B, S, C + S], all contiguous.
// `mix` is false when lam = 0: the graph term is dropped (A and the cache are not read).
struct GraphMixArgs {
  int64_t B, S, E, C;
  double self_coef, lam;
  bool mix;
};

// out [B, S, E] = self_coef x + lam A x'. T is float, double, __half or __nv_bfloat16.
template <typename T>
cudaError_t graph_mix(const T* x, const T* cache, const T* A, const GraphMixArgs& args, T* out,
                      cudaStream_t stream);

// grad_x [B, S, E] = self_coef g + lam A[:, :, C:]^T g (A is not read unless mix).
template <typename T>
cudaError_t graph_mix_grad_x(const T* g, const T* A, const GraphMixArgs& args, T* grad_x,
                             cudaStream_t stream);

// grad_A [B, S, C + S] = lam g x'^T (zeros, reading neither x nor the cache, unless mix).
template <typename T>
cudaError_t graph_mix_grad_a(const T* g, const T* x, const T* cache, const GraphMixArgs& args,
                             T* grad_A, cudaStream_t stream);

}  // namespace smoe::cuda
