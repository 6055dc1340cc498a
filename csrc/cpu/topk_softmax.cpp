// CPU glue of topk_softmax and topk_softmax_backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "checks.h"
#include "common/rows.h"
#include "cpu/topk_softmax_kernel.h"

namespace smoe::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_softmax_cpu(const at::Tensor& logits_in, int64_t k,
                                                    const c10::optional<at::Tensor>& selection_bias,
                                                    bool renormalize) {
  check_topk_softmax(logits_in, k);
  check_selection_bias(selection_bias, logits_in);
  const at::Tensor bias_t = finite_bias_cpu(selection_bias, "topk_softmax");
  const float* bias = bias_t.defined() ? bias_t.const_data_ptr<float>() : nullptr;
  const at::Tensor logits = rows_dense(logits_in);
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor weight = at::empty({T, k}, logits.options());
  at::Tensor expert = at::empty({T, k}, logits.options().dtype(at::kInt));
  if (T == 0) return {weight, expert};
  int64_t bad_row = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_softmax", [&] {
        using T_ = typename kernel_type<scalar_t>::type;
        const auto* l = reinterpret_cast<const T_*>(logits.const_data_ptr<scalar_t>());
        auto* w = reinterpret_cast<T_*>(weight.mutable_data_ptr<scalar_t>());
        auto* ex = expert.mutable_data_ptr<int32_t>();
        bad_row = first_bad_row(T, grain_rows(E * k), [&](int64_t b, int64_t e) {
          return cpu::topk_softmax(l, logits.stride(0), E, k, renormalize, bias, b, e, w, ex);
        });
      });
  TORCH_CHECK(bad_row < 0,
              "smoe::topk_softmax: logits must be finite or -inf with a finite value in every "
              "row, got NaN, +inf or only -inf in row ",
              bad_row);
  return {weight, expert};
}

at::Tensor topk_softmax_backward_cpu(const at::Tensor& grad_weight_in, const at::Tensor& logits_in,
                                     const at::Tensor& expert_in, bool renormalize) {
  check_topk_softmax_backward(grad_weight_in, logits_in, expert_in);
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor grad_weight = grad_weight_in.contiguous();
  const at::Tensor expert = expert_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = expert.size(1);
  const int32_t* ex_ptr = expert.const_data_ptr<int32_t>();
  const int64_t bad = cpu::first_invalid_expert(ex_ptr, T * k, E);
  TORCH_CHECK(bad < 0, "smoe::topk_softmax_backward: expert values must be in [0, E) = [0, ", E,
              "), got ", bad < 0 ? 0 : ex_ptr[bad], " at [", bad / k, ", ", bad % k, "]");
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0) return grad_logits;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_softmax_backward", [&] {
        using T_ = typename kernel_type<scalar_t>::type;
        const auto* g = reinterpret_cast<const T_*>(grad_weight.const_data_ptr<scalar_t>());
        const auto* l = reinterpret_cast<const T_*>(logits.const_data_ptr<scalar_t>());
        auto* out = reinterpret_cast<T_*>(grad_logits.mutable_data_ptr<scalar_t>());
        const int32_t* ex = expert.const_data_ptr<int32_t>();
        at::parallel_for(0, T, grain_rows(E * k), [&](int64_t b, int64_t e) {
          cpu::topk_softmax_backward(g, l, logits.stride(0), ex, E, k, renormalize, b, e, out);
        });
      });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("topk_softmax", &topk_softmax_cpu);
  m.impl("topk_softmax_backward", &topk_softmax_backward_cpu);
}

}  // namespace smoe::ops
