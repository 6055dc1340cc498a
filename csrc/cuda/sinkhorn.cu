// CUDA forward of sinkhorn (specs/sinkhorn_ssr.md §3, §7, §8): the log-domain iterations, the
// optional tolerance checks and the plan, float32 math on S = scores / eps. The loop mirrors the
// CPU glue (cpu/sinkhorn.cpp) step for step; the shared kernels are in sinkhorn_common.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/sinkhorn.h"
#include "cuda/sinkhorn_common.cuh"

namespace smoe::cuda {
namespace {

using namespace sinkhorn_detail;  // NOLINT: the shared helpers of this op's two .cu files

// exp(f[t] + S[t, j] + g[j]): the plan's entries (its column sums are the column masses).
struct PlanValue {
  const float *S, *f, *g;
  int64_t E;
  __device__ float operator()(int64_t t, int64_t j) const {
    return expf(f[t] + S[t * E + j] + g[j]);
  }
};

// One warp per column j: g[j] = log_c - LSE_t(S[t, j] + f_prev[t]), from the chunk partials.
__global__ void __launch_bounds__(kThreads)
    col_update_kernel(const float* __restrict__ pm, const float* __restrict__ ps, float log_c,
                      int64_t chunks, int64_t E, float* __restrict__ g) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  for (int64_t j = global_warp(); j < E; j += warps_in_grid()) {  // warp-uniform
    const float lse = warp_chunk_lse(pm + j * chunks, ps + j * chunks, chunks, lane);
    if (lane == 0) g[j] = log_c - lse;
  }
}

// f[t] = log_r - LSE_j(S[t, j] + g[j]).
__global__ void __launch_bounds__(kThreads)
    row_update_kernel(const float* __restrict__ S, const float* __restrict__ g, float log_r,
                      int64_t rows, int64_t E, int G, float* __restrict__ f) {
  for_rows(rows, G, [&](int64_t t, bool on, int col) {
    const float lse = row_lse(on ? S + t * E : S, g, E, on, col, G);
    if (on && col == 0) f[t] = log_r - lse;
  });
}

// One block: *row_err = |rr|_2 and *col_err = |column sums - col_mass|_2 (column sums joined from
// their chunk partials part [E, chunks]), both in a fixed order.
__global__ void __launch_bounds__(kThreads)
    residual_join_kernel(const float* __restrict__ rr, const float* __restrict__ part, int64_t rows,
                         int64_t chunks, int64_t E, float col_mass, float* __restrict__ row_err,
                         float* __restrict__ col_err) {
  __shared__ float red[kThreads];
  __shared__ float wacc[kWarpsPerBlock];
  const int tid = static_cast<int>(threadIdx.x), lane = tid % kWarp, warp = tid / kWarp;
  float acc = 0.f;
  for (int64_t t = tid; t < rows; t += kThreads) acc += rr[t] * rr[t];
  red[tid] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  float cacc = 0.f;
  for (int64_t j = warp; j < E; j += kWarpsPerBlock) {  // warp-uniform
    const float d = warp_chunk_sum(part + j * chunks, chunks, lane) - col_mass;
    cacc += d * d;
  }
  if (lane == 0) wacc[warp] = cacc;
  __syncthreads();
  if (tid == 0) {
    float c = 0.f;
    for (int w = 0; w < kWarpsPerBlock; ++w) c += wacc[w];
    *row_err = sqrtf(red[0]);
    *col_err = sqrtf(c);
  }
}

// In place: S_plan[t, j] = f[t] + S[t, j] + g[j].
__global__ void __launch_bounds__(kThreads)
    log_plan_kernel(const float* __restrict__ f, const float* __restrict__ g, int64_t rows,
                    int64_t E, float* __restrict__ S_plan) {
  for (int64_t i = global_thread(); i < rows * E; i += threads_in_grid()) {
    const int64_t t = i / E, j = i % E;
    S_plan[i] = f[t] + S_plan[i] + g[j];
  }
}

// Forward scratch: pm, ps [E, chunks] (ps also holds the column-mass partials), rr [T], res [2].
size_t forward_buffers(void* ws, int64_t rows, int64_t E, float** out) {
  const int64_t part = E * chunks_for(rows);
  return carve(ws, {part, part, rows, 2}, out);
}

}  // namespace

size_t sinkhorn_workspace(int64_t T, int64_t E) { return forward_buffers(nullptr, T, E, nullptr); }

template <typename T>
cudaError_t sinkhorn_forward(const T* scores, int64_t ld, int64_t rows, int64_t E, float eps,
                             int64_t max_iter, float row_mass, float col_mass, int64_t check_every,
                             SinkhornConverged converged, void* ctx, void* workspace, float* f_hist,
                             float* g_hist, float* log_plan, float* row_err, float* col_err,
                             int64_t* iters_done, cudaStream_t stream) {
  *iters_done = 0;
  if (rows <= 0 || E <= 0 || max_iter < 1) return cudaSuccess;
  float* b[4];  // pm, ps, rr, res
  forward_buffers(workspace, rows, E, b);
  float *pm = b[0], *ps = b[1], *rr = b[2], *res = b[3];
  const int64_t chunks = chunks_for(rows);
  const int G = lanes_per_row(E);
  const unsigned rb = row_blocks(rows, G), cb = chunk_blocks(chunks), jb = col_blocks(E);
  const unsigned eb = elem_blocks(rows * E);
  const float log_r = std::log(row_mass), log_c = std::log(col_mass);
  float* S = log_plan;  // S lives in log_plan until the last kernel turns it into the plan
  scale_kernel<T><<<eb, kThreads, 0, stream>>>(scores, ld, rows, E, eps, S, nullptr, nullptr);
  auto residuals = [&](const float* f, const float* g, float* row_out, float* col_out) {
    const PlanValue plan{S, f, g, E};
    row_sum_kernel<<<rb, kThreads, 0, stream>>>(plan, nullptr, -row_mass, rows, E, G, rr);
    col_partial_kernel<false><<<cb, kThreads, 0, stream>>>(plan, rows, E, chunks, kNoSkip, pm, ps);
    residual_join_kernel<<<1, kThreads, 0, stream>>>(rr, ps, rows, chunks, E, col_mass, row_out,
                                                     col_out);
  };
  int64_t n = 0;
  for (int64_t i = 1; i <= max_iter; ++i) {
    const float* fprev = i > 1 ? f_hist + (i - 2) * rows : nullptr;  // f_0 = 0
    float* g = g_hist + (i - 1) * E;
    float* f = f_hist + (i - 1) * rows;
    col_partial_kernel<true>
        <<<cb, kThreads, 0, stream>>>(ShiftValue{S, fprev, E}, rows, E, chunks, kNoSkip, pm, ps);
    col_update_kernel<<<jb, kThreads, 0, stream>>>(pm, ps, log_c, chunks, E, g);
    row_update_kernel<<<rb, kThreads, 0, stream>>>(S, g, log_r, rows, E, G, f);
    n = i;
    if (converged != nullptr && i % check_every == 0 && i < max_iter) {
      residuals(f, g, res, res + 1);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      if (converged(ctx, res)) break;  // the glue's sync
    }
  }
  *iters_done = n;
  const float* f = f_hist + (n - 1) * rows;
  const float* g = g_hist + (n - 1) * E;
  residuals(f, g, row_err, col_err);
  log_plan_kernel<<<eb, kThreads, 0, stream>>>(f, g, rows, E, log_plan);
  return cudaGetLastError();
}

#define SMOE_INSTANTIATE(T)                                                                        \
  template cudaError_t sinkhorn_forward<T>(const T*, int64_t, int64_t, int64_t, float, int64_t,    \
                                           float, float, int64_t, SinkhornConverged, void*, void*, \
                                           float*, float*, float*, float*, float*, int64_t*,       \
                                           cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
