// CUDA backward of sinkhorn (specs/sinkhorn_ssr.md §8): reverse mode through the unrolled
// iterations, recomputing each iteration's softmaxes from S = scores / eps and the stored
// potentials, float32 math. The reverse loop mirrors the CPU glue (cpu/sinkhorn.cpp):
//   start:  dS = grad_log_plan, fbar = rowsum(dS) + grad_f, gbar_n = colsum(dS) + grad_g;
//   step i = n..1, through f_i = log r - LSE_j(S + g_i) (P_i the row softmax):
//           dS -= fbar P_i, gbar = [i == n] gbar_n - colsum(fbar P_i);
//   then through g_i = log c - LSE_t(S + f_{i-1}) (Q_i the column softmax, f_0 = 0):
//           dS -= gbar Q_i, fbar = -rowsum(gbar Q_i) (fbar of step i - 1);
//   d scores = dS / eps.
// n = iters_done is read on the device only: the host loop runs i = max_iter..1 and every kernel
// of a step i > n returns at once, so the op never syncs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/sinkhorn.h"
#include "cuda/sinkhorn_common.cuh"

namespace smoe::cuda {
namespace {

using namespace sinkhorn_detail;  // NOLINT: the shared helpers of this op's two .cu files

// q[t, j] = fbar[t] * P[t, j], P the row softmax of S + g, with the row's logsumexp in lse[t].
struct QValue {
  const float *S, *g, *lse, *fbar;
  int64_t E;
  __device__ float operator()(int64_t t, int64_t j) const {
    return fbar[t] * expf(S[t * E + j] + g[j] - lse[t]);
  }
};

// Through f_i = log r - LSE_j(S + g_i): dS[t, j] -= fbar[t] P[t, j] (P the row softmax) and
// lse_row[t] = LSE_j(S[t, j] + g[j]), for QValue's column sums.
__global__ void __launch_bounds__(kThreads)
    back_rows_f_kernel(const float* __restrict__ S, const float* __restrict__ g,
                       const float* __restrict__ fbar, Skip skip, int64_t rows, int64_t E, int G,
                       float* __restrict__ dS, float* __restrict__ lse_row) {
  if (skip.now()) return;  // grid-uniform
  for_rows(rows, G, [&](int64_t t, bool on, int col) {
    const float* row = on ? S + t * E : S;
    const float lse = row_lse(row, g, E, on, col, G);
    if (!on) return;  // after the group's shuffles; the warp meets again at the next row
    const float fb = fbar[t];
    for (int64_t j = col; j < E; j += G) dS[t * E + j] -= fb * expf(row[j] + g[j] - lse);
    if (col == 0) lse_row[t] = lse;
  });
}

// One warp per column j: lse_col[j] = LSE_t(S[t, j] + f_{i-1}[t]) from its chunk partials (pm,
// ps), and gbar[j] = [i == n] (colsum(grad_log_plan)[j] + grad_g[j]) - colsum(q)[j] (d0, qpart:
// the chunk partials of grad_log_plan and of q).
__global__ void __launch_bounds__(kThreads)
    back_cols_kernel(const float* __restrict__ pm, const float* __restrict__ ps,
                     const float* __restrict__ qpart, const float* __restrict__ d0,
                     const float* __restrict__ grad_g, int64_t chunks, int64_t E, Skip skip,
                     float* __restrict__ lse_col, float* __restrict__ gbar) {
  if (skip.now()) return;                // grid-uniform
  const bool last = skip.i == skip.n();  // grid-uniform too: no branch below splits a warp
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  for (int64_t j = global_warp(); j < E; j += warps_in_grid()) {  // warp-uniform
    const float lse = warp_chunk_lse(pm + j * chunks, ps + j * chunks, chunks, lane);
    const float base = last ? warp_chunk_sum(d0 + j * chunks, chunks, lane) + grad_g[j] : 0.f;
    const float q = warp_chunk_sum(qpart + j * chunks, chunks, lane);
    if (lane == 0) {
      lse_col[j] = lse;
      gbar[j] = base - q;
    }
  }
}

// Through g_i = log c - LSE_t(S + f_{i-1}): with Q[t, j] = exp(S[t, j] + fprev[t] - lse_col[j])
// (the column softmax), dS[t, j] -= gbar[j] Q[t, j] and fbar[t] = -sum_j gbar[j] Q[t, j] (the
// row adjoint of step i - 1; step i's fbar was last read by the kernels before this one).
__global__ void __launch_bounds__(kThreads)
    back_rows_g_kernel(const float* __restrict__ S, const float* __restrict__ fprev,
                       const float* __restrict__ lse_col, const float* __restrict__ gbar, Skip skip,
                       int64_t rows, int64_t E, int G, float* __restrict__ dS,
                       float* __restrict__ fbar) {
  if (skip.now()) return;  // grid-uniform
  for_rows(rows, G, [&](int64_t t, bool on, int col) {
    float acc = 0.f;
    if (on) {
      const float ft = fprev ? fprev[t] : 0.f;
      for (int64_t j = col; j < E; j += G) {
        const float v = gbar[j] * expf(S[t * E + j] + ft - lse_col[j]);
        dS[t * E + j] -= v;
        acc += v;
      }
    }
    acc = group_sum(acc, G);
    if (on && col == 0) fbar[t] = -acc;
  });
}

// grad = dS / eps in T (grad may alias dS when T is float: the same thread reads, then writes).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    back_finish_kernel(const float* dS, int64_t n, float eps, T* grad) {
  for (int64_t i = global_thread(); i < n; i += threads_in_grid()) {
    grad[i] = from_float<T>(dS[i] / eps);
  }
}

// Backward scratch: S [T, E]; pm, ps, q, d0 [E, chunks]; fbar, lse_row [T]; gbar, lse_col [E].
size_t backward_buffers(void* ws, int64_t rows, int64_t E, float** out) {
  const int64_t part = E * chunks_for(rows);
  return carve(ws, {rows * E, part, part, part, part, rows, rows, E, E}, out);
}

}  // namespace

size_t sinkhorn_backward_workspace(int64_t T, int64_t E) {
  return backward_buffers(nullptr, T, E, nullptr);
}

template <typename T>
cudaError_t sinkhorn_backward(const float* grad_log_plan, const float* grad_f, const float* grad_g,
                              const T* scores, int64_t ld, const float* f_hist, const float* g_hist,
                              const int64_t* iters_done, int64_t max_iter, int64_t rows, int64_t E,
                              float eps, void* workspace, float* dS, T* grad, cudaStream_t stream) {
  if (rows <= 0 || E <= 0) return cudaSuccess;
  float* b[9];
  backward_buffers(workspace, rows, E, b);
  float *S = b[0], *pm = b[1], *ps = b[2], *q = b[3], *d0 = b[4], *fbar = b[5], *lse_row = b[6];
  float *gbar = b[7], *lse_col = b[8];
  const int64_t chunks = chunks_for(rows);
  const int G = lanes_per_row(E);
  const unsigned rb = row_blocks(rows, G), cb = chunk_blocks(chunks), jb = col_blocks(E);
  const unsigned eb = elem_blocks(rows * E);
  scale_kernel<T><<<eb, kThreads, 0, stream>>>(scores, ld, rows, E, eps, S, grad_log_plan, dS);
  // Through log_plan = f_n + S + g_n: fbar_n = rowsum(dS) + grad_f; d0 = dS's column partials.
  const ShiftValue dS0{dS, nullptr, E};
  row_sum_kernel<<<rb, kThreads, 0, stream>>>(dS0, grad_f, 0.f, rows, E, G, fbar);
  col_partial_kernel<false><<<cb, kThreads, 0, stream>>>(dS0, rows, E, chunks, kNoSkip, pm, d0);
  for (int64_t i = max_iter; i >= 1; --i) {
    const Skip skip{iters_done, i, max_iter};
    const float* g = g_hist + (i - 1) * E;
    const float* fprev = i > 1 ? f_hist + (i - 2) * rows : nullptr;  // f_0 = 0
    back_rows_f_kernel<<<rb, kThreads, 0, stream>>>(S, g, fbar, skip, rows, E, G, dS, lse_row);
    col_partial_kernel<false>
        <<<cb, kThreads, 0, stream>>>(QValue{S, g, lse_row, fbar, E}, rows, E, chunks, skip, pm, q);
    col_partial_kernel<true>
        <<<cb, kThreads, 0, stream>>>(ShiftValue{S, fprev, E}, rows, E, chunks, skip, pm, ps);
    back_cols_kernel<<<jb, kThreads, 0, stream>>>(pm, ps, q, d0, grad_g, chunks, E, skip, lse_col,
                                                  gbar);
    back_rows_g_kernel<<<rb, kThreads, 0, stream>>>(S, fprev, lse_col, gbar, skip, rows, E, G, dS,
                                                    fbar);
  }
  back_finish_kernel<T><<<eb, kThreads, 0, stream>>>(dS, rows * E, eps, grad);
  return cudaGetLastError();
}

#define SMOE_INSTANTIATE(T)                                                                    \
  template cudaError_t sinkhorn_backward<T>(                                                   \
      const float*, const float*, const float*, const T*, int64_t, const float*, const float*, \
      const int64_t*, int64_t, int64_t, int64_t, float, void*, float*, T*, cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
