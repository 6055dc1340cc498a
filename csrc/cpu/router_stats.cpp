// CPU glue of router_stats and router_stats_backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "checks_stats.h"
#include "common/rows.h"
#include "cpu/router_stats_kernel.h"

namespace smoe::ops {
namespace {

// Rows per block of prob_sum's partial sums: fixed, so that the sum's order (rows within a block,
// then the blocks in order) follows from T alone.
constexpr int64_t kStatsBlockRows = 256;

std::tuple<at::Tensor, at::Tensor> router_stats_cpu(const at::Tensor& logits_in) {
  check_router_stats(logits_in);
  const at::Tensor logits = rows_dense(logits_in);
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto opts = logits.options().dtype(stats_dtype(logits));
  at::Tensor lse = at::empty({T}, opts);
  if (T == 0) return {at::zeros({E}, opts), lse};
  const int64_t blocks = (T + kStatsBlockRows - 1) / kStatsBlockRows;
  at::Tensor partial = at::empty({blocks, E}, opts);
  at::Tensor prob_sum = blocks == 1 ? partial.view({E}) : at::empty({E}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "router_stats", [&] {
        using T_ = typename kernel_type<scalar_t>::type;
        using A = acc_t<T_>;
        const auto* l = reinterpret_cast<const T_*>(logits.const_data_ptr<scalar_t>());
        A* part = partial.mutable_data_ptr<A>();
        A* out_lse = lse.mutable_data_ptr<A>();
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
          std::vector<A> ex(static_cast<size_t>(E));
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t begin = b * kStatsBlockRows;
            const int64_t end = std::min(T, begin + kStatsBlockRows);
            cpu::router_stats(l, logits.stride(0), E, begin, end, part + b * E, out_lse,
                              ex.data());
          }
        });
        if (blocks > 1) cpu::sum_blocks(part, blocks, E, prob_sum.mutable_data_ptr<A>());
      });
  return {prob_sum, lse};
}

at::Tensor router_stats_backward_cpu(const std::optional<at::Tensor>& grad_prob_sum,
                                     const std::optional<at::Tensor>& grad_lse,
                                     const at::Tensor& logits_in) {
  check_router_stats_backward(grad_prob_sum, grad_lse, logits_in);
  const at::Tensor logits = rows_dense(logits_in);
  const at::Tensor gp = grad_prob_sum.has_value() ? grad_prob_sum->contiguous() : at::Tensor();
  const at::Tensor gl = grad_lse.has_value() ? grad_lse->contiguous() : at::Tensor();
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor grad_logits = at::empty({T, E}, logits.options());
  if (T == 0) return grad_logits;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "router_stats_backward", [&] {
        using T_ = typename kernel_type<scalar_t>::type;
        using A = acc_t<T_>;
        const auto* l = reinterpret_cast<const T_*>(logits.const_data_ptr<scalar_t>());
        auto* out = reinterpret_cast<T_*>(grad_logits.mutable_data_ptr<scalar_t>());
        const A* gp_ptr = gp.defined() ? gp.const_data_ptr<A>() : nullptr;
        const A* gl_ptr = gl.defined() ? gl.const_data_ptr<A>() : nullptr;
        at::parallel_for(0, T, grain_rows(2 * E), [&](int64_t b, int64_t e) {
          std::vector<A> p(static_cast<size_t>(E));
          cpu::router_stats_backward(gp_ptr, gl_ptr, l, logits.stride(0), E, b, e, out, p.data());
        });
      });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("router_stats", &router_stats_cpu);
  m.impl("router_stats_backward", &router_stats_backward_cpu);
}

}  // namespace smoe::ops
