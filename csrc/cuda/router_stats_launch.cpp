// CUDA glue of router_stats and router_stats_backward (float32, float16, bfloat16 logits; no host
// sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks_stats.h"
#include "cuda/router_stats.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> router_stats_cuda(const at::Tensor& logits_in) {
  check_router_stats(logits_in);
  check_not_double("router_stats", logits_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  check_device_arch(logits_in.device());
  const at::Tensor logits = rows_dense(logits_in);
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({T}, opts);
  if (T == 0) return {at::zeros({E}, opts), lse};
  at::Tensor prob_sum = at::empty({E}, opts);
  at::Tensor scratch = at::empty({cuda::router_stats_scratch(T, E)}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(logits.scalar_type(), "router_stats", [&] {
    C10_CUDA_CHECK(cuda::router_stats(kptr<scalar_t>(logits), logits.stride(0), T, E,
                                      scratch.mutable_data_ptr<float>(),
                                      prob_sum.mutable_data_ptr<float>(),
                                      lse.mutable_data_ptr<float>(), stream));
  });
  return {prob_sum, lse};
}

at::Tensor router_stats_backward_cuda(const std::optional<at::Tensor>& grad_prob_sum,
                                      const std::optional<at::Tensor>& grad_lse,
                                      const at::Tensor& logits_in) {
  check_router_stats_backward(grad_prob_sum, grad_lse, logits_in);
  check_not_double("router_stats_backward", logits_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  check_device_arch(logits_in.device());
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor gp = grad_prob_sum.has_value() ? grad_prob_sum->contiguous() : at::Tensor();
  const at::Tensor gl = grad_lse.has_value() ? grad_lse->contiguous() : at::Tensor();
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0) return grad_logits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(logits.scalar_type(), "router_stats_backward", [&] {
    C10_CUDA_CHECK(cuda::router_stats_backward(
        gp.defined() ? gp.const_data_ptr<float>() : nullptr,
        gl.defined() ? gl.const_data_ptr<float>() : nullptr, kptr<scalar_t>(logits),
        logits.stride(0), T, E, kmut<scalar_t>(grad_logits), stream));
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("router_stats", &router_stats_cuda);
  m.impl("router_stats_backward", &router_stats_backward_cuda);
}

}  // namespace smoe::ops
