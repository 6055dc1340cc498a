// CPU glue of expert_choice and expert_choice_backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "checks.h"
#include "common/rows.h"
#include "cpu/expert_choice_kernel.h"

namespace smoe::ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_choice_cpu(
    const at::Tensor& logits_in, int64_t capacity, std::optional<int64_t> group_size) {
  check_expert_choice(logits_in, capacity, group_size);
  const at::Tensor logits = rows_dense(logits_in);
  const int64_t T = logits.size(0), E = logits.size(1);
  // A group larger than T is one group; clamping keeps (T + S - 1) / S from overflowing.
  const ExpertChoiceShape shape{T, E, std::min(group_size.value_or(T), T), capacity};
  const int64_t total = shape.total(), G = shape.groups();
  const auto idx = logits.options().dtype(at::kInt);
  at::Tensor weight = at::empty({T, E}, logits.options());
  at::Tensor offsets = at::empty({E + 1}, idx.dtype(at::kLong));
  at::Tensor token = at::empty({E * total}, idx);
  at::Tensor slot = at::empty({E * total}, idx);
  at::Tensor row = at::full({T, E}, -1, idx);
  int64_t* off = offsets.mutable_data_ptr<int64_t>();
  for (int64_t e = 0; e <= E; ++e) off[e] = e * total;
  if (T == 0) return {weight, offsets, token, slot, row};
  const bool wide = logits.scalar_type() == at::kDouble;
  at::Tensor probs = at::empty({T, E}, logits.options().dtype(wide ? at::kDouble : at::kFloat));
  at::Tensor scratch = at::empty({E * T}, idx);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "expert_choice", [&] {
        using T_ = typename kernel_type<scalar_t>::type;
        using A = acc_t<T_>;
        const auto* l = reinterpret_cast<const T_*>(logits.const_data_ptr<scalar_t>());
        auto* w = reinterpret_cast<T_*>(weight.mutable_data_ptr<scalar_t>());
        A* p = probs.mutable_data_ptr<A>();
        const int64_t bad_row = first_bad_row(T, grain_rows(E), [&](int64_t b, int64_t e) {
          return cpu::expert_choice_probs(l, logits.stride(0), E, b, e, p);
        });
        TORCH_CHECK(
            bad_row < 0,
            "smoe::expert_choice: logits must be finite or -inf with a finite value in every "
            "row, got NaN, +inf or only -inf in row ",
            bad_row);
        int32_t* r = row.mutable_data_ptr<int32_t>();
        at::parallel_for(0, E * G, 1, [&](int64_t b, int64_t e) {
          cpu::expert_choice_select(p, shape, b, e, scratch.mutable_data_ptr<int32_t>(),
                                    token.mutable_data_ptr<int32_t>(),
                                    slot.mutable_data_ptr<int32_t>(), r);
        });
        at::parallel_for(0, T, grain_rows(E), [&](int64_t b, int64_t e) {
          cpu::expert_choice_weights<T_>(p, r, E, b, e, w);
        });
      });
  return {weight, offsets, token, slot, row};
}

at::Tensor expert_choice_backward_cpu(const at::Tensor& grad_weight_in, const at::Tensor& logits_in,
                                      const at::Tensor& row_in) {
  check_expert_choice_backward(grad_weight_in, logits_in, row_in);
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor grad_weight = grad_weight_in.contiguous(), row = row_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0) return grad_logits;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "expert_choice_backward", [&] {
        using T_ = typename kernel_type<scalar_t>::type;
        const auto* g = reinterpret_cast<const T_*>(grad_weight.const_data_ptr<scalar_t>());
        const auto* l = reinterpret_cast<const T_*>(logits.const_data_ptr<scalar_t>());
        auto* out = reinterpret_cast<T_*>(grad_logits.mutable_data_ptr<scalar_t>());
        const int32_t* r = row.const_data_ptr<int32_t>();
        at::parallel_for(0, T, grain_rows(E), [&](int64_t b, int64_t e) {
          cpu::expert_choice_backward(g, l, logits.stride(0), r, E, b, e, out);
        });
      });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("expert_choice", &expert_choice_cpu);
  m.impl("expert_choice_backward", &expert_choice_backward_cpu);
}

}  // namespace smoe::ops
