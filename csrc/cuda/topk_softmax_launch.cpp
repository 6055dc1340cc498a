// CUDA glue of topk_softmax and topk_softmax_backward. NaN / +inf logits are reported with an
// asynchronous device assert (no host sync), with the CPU op's message minus the row number.
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

#include <tuple>

#include "checks.h"
#include "cuda/topk_softmax.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_softmax_cuda(
    const at::Tensor& logits_in, int64_t k, const c10::optional<at::Tensor>& selection_bias,
    bool renormalize) {
  check_topk_softmax(logits_in, k);
  check_not_double("topk_softmax", logits_in);
  check_selection_bias(selection_bias, logits_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  check_device_arch(logits_in.device());
  const at::Tensor logits = rows_dense(logits_in);
  at::Tensor bias_t;
  if (selection_bias.has_value()) {
    bias_t = selection_bias->contiguous();
    at::_assert_async(at::isfinite(bias_t).all(),
                      "smoe::topk_softmax: selection_bias must be finite");
  }
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor weight = at::empty({T, k}, logits.options());
  at::Tensor expert = at::empty({T, k}, logits.options().dtype(at::kInt));
  if (T == 0) return {weight, expert};
  at::Tensor invalid = at::zeros({1}, logits.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(logits.scalar_type(), "topk_softmax", [&] {
    using T_ = typename cuda_type<scalar_t>::type;
    C10_CUDA_CHECK(cuda::topk_softmax<T_>(
        reinterpret_cast<const T_*>(logits.const_data_ptr<scalar_t>()), logits.stride(0), T, E, k,
        renormalize, bias_t.defined() ? bias_t.const_data_ptr<float>() : nullptr,
        reinterpret_cast<T_*>(weight.mutable_data_ptr<scalar_t>()),
        expert.mutable_data_ptr<int32_t>(), invalid.mutable_data_ptr<int32_t>(), stream));
  });
  at::_assert_async(invalid.eq(0),
                    "smoe::topk_softmax: logits must be finite or -inf with a finite value in "
                    "every row, got NaN, +inf or only -inf");
  return {weight, expert};
}

at::Tensor topk_softmax_backward_cuda(const at::Tensor& grad_weight_in, const at::Tensor& logits_in,
                                      const at::Tensor& expert_in, bool renormalize) {
  check_topk_softmax_backward(grad_weight_in, logits_in, expert_in);
  check_not_double("topk_softmax_backward", logits_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  check_device_arch(logits_in.device());
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor grad_weight = grad_weight_in.contiguous();
  const at::Tensor expert = expert_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = expert.size(1);
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0) return grad_logits;
  at::_assert_async(expert.ge(0).logical_and(expert.lt(E)).all(),
                    "smoe::topk_softmax_backward: expert values must be in [0, E)");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(logits.scalar_type(), "topk_softmax_backward", [&] {
    using T_ = typename cuda_type<scalar_t>::type;
    C10_CUDA_CHECK(cuda::topk_softmax_backward<T_>(
        reinterpret_cast<const T_*>(grad_weight.const_data_ptr<scalar_t>()),
        reinterpret_cast<const T_*>(logits.const_data_ptr<scalar_t>()), logits.stride(0),
        expert.const_data_ptr<int32_t>(), T, E, k, renormalize,
        reinterpret_cast<T_*>(grad_logits.mutable_data_ptr<scalar_t>()), stream));
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("topk_softmax", &topk_softmax_cuda);
  m.impl("topk_softmax_backward", &topk_softmax_backward_cuda);
}

}  // namespace smoe::ops
