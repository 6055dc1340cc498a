// CPU glue of make_plan.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/make_plan_kernel.h"

namespace smoe::ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_plan_cpu(
    const at::Tensor& expert_in, int64_t num_experts, std::optional<int64_t> capacity,
    const std::optional<at::Tensor>& priority) {
  check_make_plan(expert_in, num_experts, capacity, priority);
  const at::Tensor expert = expert_in.contiguous();
  const int64_t T = expert.size(0), k = expert.size(1), E = num_experts;
  const int32_t* ex = expert.const_data_ptr<int32_t>();
  const int64_t bad = cpu::find_invalid_expert(ex, T * k, E);
  TORCH_CHECK(bad < 0, "smoe::make_plan: expert values must be in [0, num_experts) = [0, ", E,
              ") or -1 (no assignment), got ", bad < 0 ? 0 : ex[bad], " at [",
              bad / std::max<int64_t>(k, 1), ", ", bad % std::max<int64_t>(k, 1), "]");
  auto idx = expert.options();
  at::Tensor offsets = at::empty({E + 1}, idx.dtype(at::kLong));
  at::Tensor token = at::empty({T * k}, idx);
  at::Tensor slot = at::empty({T * k}, idx);
  at::Tensor row = at::empty({T, k}, idx);
  at::Tensor kept = at::empty({T, k}, idx.dtype(at::kBool));
  std::vector<int64_t> fill(E);
  at::Tensor order;  // BPR: each rank's token order by priority (only matters with a capacity)
  if (priority.has_value() && capacity.has_value() && T > 0) {
    const at::Tensor prio = priority_as_float(*priority);
    const int64_t ranks = prio.dim() == 1 ? 1 : k;
    order = at::empty({ranks, T}, idx);
    const int64_t nan_at = cpu::priority_order(prio.const_data_ptr<float>(), T, ranks,
                                               order.mutable_data_ptr<int32_t>());
    TORCH_CHECK(nan_at < 0,
                "smoe::make_plan: priority must not contain NaN, got NaN at flat index ", nan_at);
  }
  const int32_t* ord = order.defined() ? order.const_data_ptr<int32_t>() : nullptr;
  const int64_t ord_ranks = order.defined() ? order.size(0) : 0;
  cpu::make_plan(ex, T, k, E, capacity.value_or(-1), ord, ord_ranks,
                 offsets.mutable_data_ptr<int64_t>(), token.mutable_data_ptr<int32_t>(),
                 slot.mutable_data_ptr<int32_t>(), row.mutable_data_ptr<int32_t>(),
                 kept.mutable_data_ptr<bool>(), fill.data());
  return {offsets, token, slot, row, kept};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) { m.impl("make_plan", &make_plan_cpu); }

}  // namespace smoe::ops
