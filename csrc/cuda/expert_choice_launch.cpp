// CUDA glue of expert_choice and expert_choice_backward. NaN / +inf logits are reported with an
// asynchronous device assert (no host sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <tuple>

#include "checks.h"
#include "common/expert_choice_shape.h"
#include "cuda/expert_choice.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_choice_cuda(
    const at::Tensor& logits_in, int64_t capacity, std::optional<int64_t> group_size) {
  check_expert_choice(logits_in, capacity, group_size);
  check_not_double("expert_choice", logits_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  check_device_arch(logits_in.device());
  const at::Tensor logits = rows_dense(logits_in);
  // A group larger than T is one group; clamping keeps (T + S - 1) / S from overflowing.
  const int64_t T = logits.size(0), E = logits.size(1), S = std::min(group_size.value_or(T), T);
  const int64_t total = ExpertChoiceShape{T, E, S, capacity}.total();
  const auto idx = logits.options().dtype(at::kInt);
  at::Tensor weight = at::empty({T, E}, logits.options());
  at::Tensor token = at::empty({E * total}, idx);
  at::Tensor slot = at::empty({E * total}, idx);
  if (T == 0) {
    at::Tensor offsets = at::zeros({E + 1}, idx.dtype(at::kLong));
    return {weight, offsets, token, slot, at::empty({0, E}, idx)};
  }
  at::Tensor offsets = at::empty({E + 1}, idx.dtype(at::kLong));
  at::Tensor row = at::empty({T, E}, idx);
  at::Tensor invalid = at::zeros({1}, idx);
  size_t bytes = 0;
  C10_CUDA_CHECK(cuda::expert_choice_workspace_bytes(T, E, S, &bytes));
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, idx.dtype(at::kByte));
  SMOE_CUDA_DISPATCH(logits.scalar_type(), "expert_choice", [&] {
    C10_CUDA_CHECK(cuda::expert_choice(
        kptr<scalar_t>(logits), logits.stride(0), T, E, S, capacity, total, kmut<scalar_t>(weight),
        offsets.mutable_data_ptr<int64_t>(), token.mutable_data_ptr<int32_t>(),
        slot.mutable_data_ptr<int32_t>(), row.mutable_data_ptr<int32_t>(),
        invalid.mutable_data_ptr<int32_t>(), workspace.mutable_data_ptr(), bytes,
        c10::cuda::getCurrentCUDAStream()));
  });
  at::_assert_async(
      invalid.eq(0),
      "smoe::expert_choice: logits must be finite or -inf with a finite value in every row");
  return {weight, offsets, token, slot, row};
}

at::Tensor expert_choice_backward_cuda(const at::Tensor& grad_weight_in,
                                       const at::Tensor& logits_in, const at::Tensor& row_in) {
  check_expert_choice_backward(grad_weight_in, logits_in, row_in);
  check_not_double("expert_choice_backward", logits_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  check_device_arch(logits_in.device());
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor grad_weight = grad_weight_in.contiguous(), row = row_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0) return grad_logits;
  SMOE_CUDA_DISPATCH(logits.scalar_type(), "expert_choice_backward", [&] {
    C10_CUDA_CHECK(cuda::expert_choice_backward(kptr<scalar_t>(grad_weight), kptr<scalar_t>(logits),
                                                logits.stride(0), row.const_data_ptr<int32_t>(), T,
                                                E, kmut<scalar_t>(grad_logits),
                                                c10::cuda::getCurrentCUDAStream()));
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("expert_choice", &expert_choice_cuda);
  m.impl("expert_choice_backward", &expert_choice_backward_cuda);
}

}  // namespace smoe::ops
