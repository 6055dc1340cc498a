// CPU glue of topk_sigmoid and topk_sigmoid_backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "checks_sigmoid.h"
#include "common/rows.h"
#include "cpu/topk_sigmoid_kernel.h"

namespace smoe::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_sigmoid_cpu(const at::Tensor& logits_in, int64_t k,
                                                    const c10::optional<at::Tensor>& selection_bias,
                                                    int64_t n_group,
                                                    std::optional<int64_t> topk_group_opt,
                                                    bool renormalize, double scale) {
  const int64_t topk_group = topk_group_opt.value_or(n_group);
  check_topk_sigmoid(logits_in, k, n_group, topk_group, scale);
  check_selection_bias(selection_bias, logits_in, "topk_sigmoid");
  const at::Tensor bias_t = finite_bias_cpu(selection_bias, "topk_sigmoid");
  const float* bias = bias_t.defined() ? bias_t.const_data_ptr<float>() : nullptr;
  const at::Tensor logits = rows_dense(logits_in);
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor weight = at::empty({T, k}, logits.options());
  at::Tensor expert = at::empty({T, k}, logits.options().dtype(at::kInt));
  if (T == 0) return {weight, expert};
  int64_t bad_row = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_sigmoid", [&] {
        using T_ = typename kernel_type<scalar_t>::type;
        const auto* l = reinterpret_cast<const T_*>(logits.const_data_ptr<scalar_t>());
        auto* w = reinterpret_cast<T_*>(weight.mutable_data_ptr<scalar_t>());
        auto* ex = expert.mutable_data_ptr<int32_t>();
        bad_row = first_bad_row(T, grain_rows(E * k), [&](int64_t b, int64_t e) {
          return cpu::topk_sigmoid(l, logits.stride(0), E, k, n_group, topk_group, renormalize,
                                   scale, bias, b, e, w, ex);
        });
      });
  TORCH_CHECK(bad_row < 0, "smoe::topk_sigmoid: logits must not be NaN, got NaN in row ", bad_row);
  return {weight, expert};
}

at::Tensor topk_sigmoid_backward_cpu(const at::Tensor& grad_weight_in, const at::Tensor& logits_in,
                                     const at::Tensor& expert_in, bool renormalize, double scale) {
  check_topk_sigmoid_backward(grad_weight_in, logits_in, expert_in, scale);
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor grad_weight = grad_weight_in.contiguous();
  const at::Tensor expert = expert_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = expert.size(1);
  const int32_t* ex_ptr = expert.const_data_ptr<int32_t>();
  const int64_t bad = cpu::first_invalid_expert(ex_ptr, T * k, E);
  TORCH_CHECK(bad < 0, "smoe::topk_sigmoid_backward: expert values must be in [0, E) = [0, ", E,
              "), got ", bad < 0 ? 0 : ex_ptr[bad], " at [", bad / k, ", ", bad % k, "]");
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0) return grad_logits;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_sigmoid_backward", [&] {
        using T_ = typename kernel_type<scalar_t>::type;
        const auto* g = reinterpret_cast<const T_*>(grad_weight.const_data_ptr<scalar_t>());
        const auto* l = reinterpret_cast<const T_*>(logits.const_data_ptr<scalar_t>());
        auto* out = reinterpret_cast<T_*>(grad_logits.mutable_data_ptr<scalar_t>());
        at::parallel_for(0, T, grain_rows(E + k), [&](int64_t b, int64_t e) {
          cpu::topk_sigmoid_backward(g, l, logits.stride(0), ex_ptr, E, k, renormalize,
                                              scale, b, e, out);
        });
      });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("topk_sigmoid", &topk_sigmoid_cpu);
  m.impl("topk_sigmoid_backward", &topk_sigmoid_backward_cpu);
}

}  // namespace smoe::ops
