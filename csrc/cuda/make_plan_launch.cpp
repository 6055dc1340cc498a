// CUDA glue of make_plan. Expert values outside [-1, E) are reported with an asynchronous device
// assert (no host sync), with the CPU op's message minus the offending value and position.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstddef>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/make_plan.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_plan_cuda(
    const at::Tensor& expert_in, int64_t num_experts, std::optional<int64_t> capacity,
    const std::optional<at::Tensor>& priority) {
  check_make_plan(expert_in, num_experts, capacity, priority);
  const c10::cuda::CUDAGuard guard(expert_in.device());
  check_device_arch(expert_in.device());
  const at::Tensor expert = expert_in.contiguous();
  const int64_t T = expert.size(0), k = expert.size(1), E = num_experts, n = T * k;
  const auto idx = expert.options();
  if (n == 0) {
    return {at::zeros({E + 1}, idx.dtype(at::kLong)), at::empty({0}, idx), at::empty({0}, idx),
            at::empty({T, k}, idx), at::empty({T, k}, idx.dtype(at::kBool))};
  }
  at::Tensor offsets = at::empty({E + 1}, idx.dtype(at::kLong));
  at::Tensor token = at::empty({n}, idx);
  at::Tensor slot = at::empty({n}, idx);
  at::Tensor row = at::empty({T, k}, idx);
  at::Tensor kept = at::empty({T, k}, idx.dtype(at::kBool));
  at::Tensor invalid = at::zeros({1}, idx);
  at::Tensor order;  // BPR: each rank's token order by priority (only matters with a capacity)
  if (priority.has_value() && capacity.has_value()) {
    const at::Tensor prio = priority_as_float(*priority);
    const int64_t ranks = prio.dim() == 1 ? 1 : k;
    order = at::empty({ranks, T}, idx);
    at::Tensor bad_priority = at::zeros({1}, idx);
    size_t order_bytes = 0;
    C10_CUDA_CHECK(cuda::priority_order_workspace_bytes(T, ranks, &order_bytes));
    at::Tensor order_ws = at::empty({static_cast<int64_t>(order_bytes)}, idx.dtype(at::kByte));
    C10_CUDA_CHECK(cuda::priority_order(
        prio.const_data_ptr<float>(), T, ranks, order.mutable_data_ptr<int32_t>(),
        bad_priority.mutable_data_ptr<int32_t>(), order_ws.mutable_data_ptr(), order_bytes,
        c10::cuda::getCurrentCUDAStream()));
    at::_assert_async(bad_priority.eq(0), "smoe::make_plan: priority must not contain NaN");
  }
  size_t bytes = 0;
  C10_CUDA_CHECK(cuda::make_plan_workspace_bytes(T, k, E, capacity.has_value(), &bytes));
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, idx.dtype(at::kByte));
  C10_CUDA_CHECK(
      cuda::make_plan(expert.const_data_ptr<int32_t>(), T, k, E, capacity.value_or(-1),
                      order.defined() ? order.const_data_ptr<int32_t>() : nullptr,
                      order.defined() ? order.size(0) : 0, offsets.mutable_data_ptr<int64_t>(),
                      token.mutable_data_ptr<int32_t>(), slot.mutable_data_ptr<int32_t>(),
                      row.mutable_data_ptr<int32_t>(), kept.mutable_data_ptr<bool>(),
                      invalid.mutable_data_ptr<int32_t>(), workspace.mutable_data_ptr(), bytes,
                      c10::cuda::getCurrentCUDAStream()));
  at::_assert_async(invalid.eq(0),
                    "smoe::make_plan: expert values must be in [0, num_experts) or -1 (no "
                    "assignment)");
  return {offsets, token, slot, row, kept};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) { m.impl("make_plan", &make_plan_cuda); }

}  // namespace smoe::ops
