// Torch-free CUDA launchers of sinkhorn (entropic optimal transport in the log domain,
// specs/sinkhorn_ssr.md §3, §7, §8) and its backward through the unrolled iterations.
//
// Everything runs in float32 on S = scores / eps [T, E] (contiguous float scratch). Column
// reductions go over fixed chunks of rows, each chunk writing its own partial, joined in chunk
// order by a second kernel; row reductions are fixed-order shuffles. No atomics anywhere: every
// result is bitwise reproducible run to run. Nothing here allocates or syncs (the forward's
// optional tolerance check calls back into the glue, which syncs). Kernels: sinkhorn.cu (forward),
// sinkhorn_backward.cu, and sinkhorn_common.cuh (what both share).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace smoe::cuda {

// Convergence test of sinkhorn_forward's tolerance checks: called (on the host) with the device
// pointer res [2] = (row, column) residual norms, computed on `stream`; returns true to stop.
// The glue copies res to the host, a sync: the op's only one.
using SinkhornConverged = bool (*)(void* ctx, const float* res);

// Bytes of scratch sinkhorn_forward needs (the caller allocates them, 256-byte aligned).
size_t sinkhorn_workspace(int64_t T, int64_t E);

// scores [T, E] with row stride ld; T (the element type) is float, __half or __nv_bfloat16.
// Runs i = 1..max_iter: g_i = log col_mass - LSE_t(S + f_{i-1}) (f_0 = 0), then f_i = log
// row_mass - LSE_j(S + g_i), into f_hist [max_iter, T] and g_hist [max_iter, E] (contiguous
// float; rows past the last iteration are left untouched). converged = nullptr: exactly max_iter
// iterations, no sync. Otherwise every check_every iterations (and i < max_iter) the residual
// norms are computed and converged(ctx, res) decides whether to stop. *iters_done (host) gets the
// iteration count n; *row_err and *col_err (device) the residual norms of iteration n; log_plan
// [T, E] (contiguous float, also S's scratch) = f_n + S + g_n.
template <typename T>
cudaError_t sinkhorn_forward(const T* scores, int64_t ld, int64_t rows, int64_t E, float eps,
                             int64_t max_iter, float row_mass, float col_mass, int64_t check_every,
                             SinkhornConverged converged, void* ctx, void* workspace, float* f_hist,
                             float* g_hist, float* log_plan, float* row_err, float* col_err,
                             int64_t* iters_done, cudaStream_t stream);

// Bytes of scratch sinkhorn_backward needs (S included).
size_t sinkhorn_backward_workspace(int64_t T, int64_t E);

// Reverse mode through the n = *iters_done iterations (read on the device only: the host loop
// runs i = max_iter..1 and the kernels of steps i > n return at once). An n outside [1, max_iter],
// which the CPU op refuses, cannot be refused here without a sync: it is clamped to [0, max_iter]
// (n = 0: grad = grad_log_plan / eps). grad_log_plan [T, E], grad_f [T], grad_g [E], the
// histories f_hist [max_iter, T] and g_hist [max_iter, E] are contiguous float. dS [T, E] is
// float scratch that may alias grad when T is float (each element is read and then written by the
// same thread). grad [T, E] is contiguous, in the scores' type: d scores = dS / eps.
template <typename T>
cudaError_t sinkhorn_backward(const float* grad_log_plan, const float* grad_f, const float* grad_g,
                              const T* scores, int64_t ld, const float* f_hist, const float* g_hist,
                              const int64_t* iters_done, int64_t max_iter, int64_t rows, int64_t E,
                              float eps, void* workspace, float* dS, T* grad, cudaStream_t stream);

}  // namespace smoe::cuda
