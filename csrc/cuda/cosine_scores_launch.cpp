// CUDA glue of cosine_scores and cosine_scores_backward. The temperature stays on the device (a
// double copy, so that the 1e-4 clamp compares as the CPU op's does): nothing is read on the host,
// so no sync.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/cosine_scores.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> cosine_scores_cuda(const at::Tensor& h_in,
                                                      const at::Tensor& proj_in,
                                                      const at::Tensor& expert_emb_in,
                                                      const at::Tensor& temperature, double eps,
                                                      bool normalize_tokens) {
  check_cosine_scores("cosine_scores", h_in, proj_in, expert_emb_in, temperature, eps);
  check_not_double("cosine_scores", h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  check_device_arch(h_in.device());
  const at::Tensor h = rows_dense(h_in);
  const at::Tensor proj = proj_in.contiguous(), emb = expert_emb_in.contiguous();
  const int64_t T = h.size(0), d = h.size(1), de = proj.size(0), N = emb.size(0);
  const auto f32 = h.options().dtype(at::kFloat);
  at::Tensor cos = at::empty({T, N}, f32);
  at::Tensor logits = at::empty({T, N}, f32);
  if (T == 0) return {cos, logits};
  const at::Tensor tau = temperature.to(at::kDouble).contiguous();
  at::Tensor ehat = at::empty({N, de}, f32), enorm = at::empty({N}, f32);
  at::Tensor zbuf = at::empty({T, de}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(h.scalar_type(), "cosine_scores", [&] {
    C10_CUDA_CHECK(cuda::cosine_scores(
        kptr<scalar_t>(h), h.stride(0), kptr<scalar_t>(proj), kptr<scalar_t>(emb),
        tau.const_data_ptr<double>(), T, d, de, N, static_cast<float>(eps), normalize_tokens,
        ehat.mutable_data_ptr<float>(), enorm.mutable_data_ptr<float>(),
        zbuf.mutable_data_ptr<float>(), cos.mutable_data_ptr<float>(),
        logits.mutable_data_ptr<float>(), stream));
  });
  return {cos, logits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosine_scores_backward_cuda(
    const at::Tensor& grad_cos_in, const at::Tensor& grad_logits_in, const at::Tensor& h_in,
    const at::Tensor& proj_in, const at::Tensor& expert_emb_in, const at::Tensor& temperature,
    double eps, bool normalize_tokens) {
  check_cosine_scores_backward(grad_cos_in, grad_logits_in, h_in, proj_in, expert_emb_in,
                               temperature, eps);
  check_not_double("cosine_scores_backward", h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  check_device_arch(h_in.device());
  const at::Tensor h = rows_dense(h_in);
  const at::Tensor proj = proj_in.contiguous(), emb = expert_emb_in.contiguous();
  const at::Tensor grad_cos = grad_cos_in.contiguous(), grad_logits = grad_logits_in.contiguous();
  const int64_t T = h.size(0), d = h.size(1), de = proj.size(0), N = emb.size(0);
  at::Tensor grad_h = at::empty({T, d}, h.options());
  if (T == 0) {
    return {grad_h, at::zeros_like(proj), at::zeros_like(emb), at::zeros_like(temperature)};
  }
  at::Tensor grad_proj = at::empty({de, d}, proj.options());
  at::Tensor grad_emb = at::empty({N, de}, emb.options());
  const at::Tensor tau = temperature.to(at::kDouble).contiguous();
  at::Tensor grad_tau = at::empty({}, tau.options().dtype(at::kFloat));
  const auto bytes = static_cast<int64_t>(cuda::cosine_scores_backward_workspace(T, d, de, N));
  at::Tensor workspace = at::empty({bytes}, h.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(h.scalar_type(), "cosine_scores_backward", [&] {
    C10_CUDA_CHECK(cuda::cosine_scores_backward(
        grad_cos.const_data_ptr<float>(), grad_logits.const_data_ptr<float>(), kptr<scalar_t>(h),
        h.stride(0), kptr<scalar_t>(proj), kptr<scalar_t>(emb), tau.const_data_ptr<double>(), T, d,
        de, N, static_cast<float>(eps), normalize_tokens, workspace.mutable_data_ptr(),
        kmut<scalar_t>(grad_h), kmut<scalar_t>(grad_proj), kmut<scalar_t>(grad_emb),
        grad_tau.mutable_data_ptr<float>(), stream));
  });
  return {grad_h, grad_proj, grad_emb, grad_tau.to(temperature.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("cosine_scores", &cosine_scores_cuda);
  m.impl("cosine_scores_backward", &cosine_scores_backward_cuda);
}

}  // namespace smoe::ops
