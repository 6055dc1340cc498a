// CUDA glue of topk_sigmoid and topk_sigmoid_backward. NaN logits and a non-finite
// selection_bias are reported with an asynchronous device assert (no host sync).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "checks_sigmoid.h"
#include "cuda/topk_sigmoid.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_sigmoid_cuda(
    const at::Tensor& logits_in, int64_t k, const c10::optional<at::Tensor>& selection_bias,
    int64_t n_group, std::optional<int64_t> topk_group_opt, bool renormalize, double scale) {
  const int64_t topk_group = topk_group_opt.value_or(n_group);
  check_topk_sigmoid(logits_in, k, n_group, topk_group, scale);
  check_not_double("topk_sigmoid", logits_in);
  check_selection_bias(selection_bias, logits_in, "topk_sigmoid");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  check_device_arch(logits_in.device());
  const at::Tensor logits = rows_dense(logits_in);
  at::Tensor bias_t;
  if (selection_bias.has_value()) {
    bias_t = selection_bias->contiguous();
    at::_assert_async(at::isfinite(bias_t).all(),
                      "smoe::topk_sigmoid: selection_bias must be finite");
  }
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor weight = at::empty({T, k}, logits.options());
  at::Tensor expert = at::empty({T, k}, logits.options().dtype(at::kInt));
  if (T == 0) return {weight, expert};
  at::Tensor scratch;
  if (n_group > 1) scratch = at::empty({T, E + n_group}, logits.options().dtype(at::kFloat));
  at::Tensor invalid = at::zeros({1}, logits.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(logits.scalar_type(), "topk_sigmoid", [&] {
    C10_CUDA_CHECK(cuda::topk_sigmoid(
        kptr<scalar_t>(logits), logits.stride(0), T, E, k, n_group, topk_group, renormalize,
        static_cast<float>(scale), bias_t.defined() ? bias_t.const_data_ptr<float>() : nullptr,
        scratch.defined() ? scratch.mutable_data_ptr<float>() : nullptr, kmut<scalar_t>(weight),
        expert.mutable_data_ptr<int32_t>(), invalid.mutable_data_ptr<int32_t>(), stream));
  });
  at::_assert_async(invalid.eq(0), "smoe::topk_sigmoid: logits must not be NaN");
  return {weight, expert};
}

at::Tensor topk_sigmoid_backward_cuda(const at::Tensor& grad_weight_in, const at::Tensor& logits_in,
                                      const at::Tensor& expert_in, bool renormalize, double scale) {
  check_topk_sigmoid_backward(grad_weight_in, logits_in, expert_in, scale);
  check_not_double("topk_sigmoid_backward", logits_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  check_device_arch(logits_in.device());
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor grad_weight = grad_weight_in.contiguous();
  const at::Tensor expert = expert_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = expert.size(1);
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0) return grad_logits;
  at::_assert_async(expert.ge(0).logical_and(expert.lt(E)).all(),
                    "smoe::topk_sigmoid_backward: expert values must be in [0, E)");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(logits.scalar_type(), "topk_sigmoid_backward", [&] {
    C10_CUDA_CHECK(cuda::topk_sigmoid_backward(kptr<scalar_t>(grad_weight), kptr<scalar_t>(logits),
                                               logits.stride(0), expert.const_data_ptr<int32_t>(),
                                               T, E, k, renormalize, static_cast<float>(scale),
                                               kmut<scalar_t>(grad_logits), stream));
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("topk_sigmoid", &topk_sigmoid_cuda);
  m.impl("topk_sigmoid_backward", &topk_sigmoid_backward_cuda);
}

}  // namespace smoe::ops
