// CUDA glue of sinkhorn and sinkhorn_backward. float32/float16/bfloat16 scores (float64 is CPU
// only), float32 math and outputs. Scores must be finite: the CPU op checks it, but checking here
// would cost a host sync, so on CUDA non-finite scores (or scores / eps overflowing) silently give
// NaN outputs. With tol == 0 neither op syncs; with tol > 0 each convergence check copies the two
// residual norms to the host (the op's one documented sync). The backward never reads iters_done
// on the host (its kernels read it on the device), so an out-of-range value is clamped to
// [0, max_iter] there instead of refused as on CPU.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks_sinkhorn.h"
#include "cuda/sinkhorn.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

using SinkhornOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor>;

struct Check {
  double tol;
  cudaStream_t stream;
};

// The tolerance check: the residual norms to the host (a sync), then both <= tol (as on CPU).
bool converged(void* ctx, const float* res) {
  const auto* check = static_cast<const Check*>(ctx);
  float host[2] = {0.f, 0.f};
  c10::cuda::memcpy_and_sync(host, res, sizeof(host), cudaMemcpyDeviceToHost, check->stream);
  return host[0] <= check->tol && host[1] <= check->tol;
}

SinkhornOut sinkhorn_cuda(const at::Tensor& scores_in, double eps, int64_t max_iter, double tol,
                          double row_mass, std::optional<double> col_mass_opt,
                          int64_t check_every) {
  const double col_mass =
      check_sinkhorn(scores_in, eps, max_iter, tol, row_mass, col_mass_opt, check_every);
  check_not_double("sinkhorn", scores_in);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  check_device_arch(scores_in.device());
  const at::Tensor scores = rows_dense(scores_in);
  const int64_t T = scores.size(0), E = scores.size(1);
  const auto f32 = scores.options().dtype(at::kFloat);
  const auto i64 = scores.options().dtype(at::kLong);
  at::Tensor f_hist = at::zeros({max_iter, T}, f32);
  at::Tensor g_hist = at::zeros({max_iter, E}, f32);
  at::Tensor log_plan = at::empty({T, E}, f32);
  if (T == 0) {
    return {log_plan,
            at::zeros({0}, f32),
            at::zeros({E}, f32),
            at::scalar_tensor(0, i64),
            at::zeros({}, f32),
            at::zeros({}, f32),
            f_hist,
            g_hist};
  }
  at::Tensor row_err = at::empty({}, f32), col_err = at::empty({}, f32);
  const auto bytes = static_cast<int64_t>(cuda::sinkhorn_workspace(T, E));
  at::Tensor workspace = at::empty({bytes}, scores.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Check check{tol, stream};
  int64_t n = 0;
  SMOE_CUDA_DISPATCH(scores.scalar_type(), "sinkhorn", [&] {
    C10_CUDA_CHECK(cuda::sinkhorn_forward(
        kptr<scalar_t>(scores), scores.stride(0), T, E, static_cast<float>(eps), max_iter,
        static_cast<float>(row_mass), static_cast<float>(col_mass), check_every,
        tol > 0 ? &converged : nullptr, &check, workspace.mutable_data_ptr(),
        f_hist.mutable_data_ptr<float>(), g_hist.mutable_data_ptr<float>(),
        log_plan.mutable_data_ptr<float>(), row_err.mutable_data_ptr<float>(),
        col_err.mutable_data_ptr<float>(), &n, stream));
  });
  // n is known on the host (max_iter, or the check that stopped): no device read.
  return {log_plan,
          f_hist[n - 1].clone(),
          g_hist[n - 1].clone(),
          at::scalar_tensor(n, i64),
          row_err,
          col_err,
          f_hist,
          g_hist};
}

at::Tensor sinkhorn_backward_cuda(const at::Tensor& grad_log_plan, const at::Tensor& grad_f,
                                  const at::Tensor& grad_g, const at::Tensor& scores_in,
                                  const at::Tensor& f_hist, const at::Tensor& g_hist,
                                  const at::Tensor& iters_done, double eps) {
  check_sinkhorn_backward(grad_log_plan, grad_f, grad_g, scores_in, f_hist, g_hist, iters_done,
                          eps);
  check_not_double("sinkhorn_backward", scores_in);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  check_device_arch(scores_in.device());
  const at::Tensor scores = rows_dense(scores_in);
  const int64_t T = scores.size(0), E = scores.size(1), max_iter = f_hist.size(0);
  at::Tensor grad = at::empty({T, E}, scores.options());
  if (T == 0) return grad;
  const at::Tensor glp = grad_log_plan.contiguous(), gf = grad_f.contiguous();
  const at::Tensor gg = grad_g.contiguous(), fh = f_hist.contiguous(), gh = g_hist.contiguous();
  // float32 scores: the float scratch dS is grad itself (finished in place).
  at::Tensor dS = scores.scalar_type() == at::kFloat
                      ? grad
                      : at::empty({T, E}, scores.options().dtype(at::kFloat));
  const auto bytes = static_cast<int64_t>(cuda::sinkhorn_backward_workspace(T, E));
  at::Tensor workspace = at::empty({bytes}, scores.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(scores.scalar_type(), "sinkhorn_backward", [&] {
    C10_CUDA_CHECK(cuda::sinkhorn_backward(
        glp.const_data_ptr<float>(), gf.const_data_ptr<float>(), gg.const_data_ptr<float>(),
        kptr<scalar_t>(scores), scores.stride(0), fh.const_data_ptr<float>(),
        gh.const_data_ptr<float>(), iters_done.const_data_ptr<int64_t>(), max_iter, T, E,
        static_cast<float>(eps), workspace.mutable_data_ptr(), dS.mutable_data_ptr<float>(),
        kmut<scalar_t>(grad), stream));
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cuda);
}

}  // namespace smoe::ops
