// CPU glue of gather_mm and its backward: grouped_mm whose rows are read through a plan's token
// (csrc/cpu/grouped_mm.h, gather mode), so that the grouped input x_sorted [M, d_in] of
// permute -> grouped_mm is never materialised, in the forward or in the weight gradient, and the
// autograd graph keeps x [T, d_in] instead of it. The input gradient is the unfused one: the
// grouped rows' gradient [M, d_in] from the GEMM, then permute_backward's per-token sums in a
// fixed order (a scatter from the GEMM's epilogue would need atomics or an order across experts).
// Where the grouped rows are at most the call's gather_min_bytes (default 0: never), the forward
// permutes them and runs grouped_mm instead (bitwise the same rows): the size rule is then decided
// at run time, from the real token count; the backward is the same either way.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks_grouped_mm.h"
#include "checks_size_rule.h"
#include "cpu/gemm_glue.h"
#include "cpu/grouped_mm.h"
#include "cpu/index_check.h"

namespace smoe::ops {
namespace {

// The checked, dense-row inputs both directions read on the CPU.
struct Inputs {
  at::Tensor x, token, offsets;
};

Inputs prepare(const char* op, const at::Tensor& x_in, const at::Tensor& token_in,
               const at::Tensor& offsets_in) {
  Inputs in{rows_dense(x_in), token_in.contiguous(), offsets_in.contiguous()};
  const int64_t M = in.token.size(0);
  check_offsets_cpu(in.offsets, M, op, "token");
  check_index_range(op, "token", in.token, in.x.size(0), "T");
  return in;
}

at::Tensor gather_mm_cpu(const at::Tensor& x, const at::Tensor& token, const at::Tensor& row,
                         const at::Tensor& w, const at::Tensor& offsets,
                         const std::optional<at::Tensor>& bias, int64_t gather_min_bytes) {
  check_gather_mm("gather_mm", x, token, row, w, offsets);
  if (bias.has_value()) check_expert_bias("gather_mm", "bias", *bias, "w", w, "d_out");
  check_min_bytes("gather_mm", "gather_min_bytes", gather_min_bytes, "gathering");
  const Inputs in = prepare("gather_mm", x, token, offsets);
  const int64_t M = in.token.size(0);
  if (gather_min_bytes > 0 && M * in.x.size(1) * in.x.element_size() <= gather_min_bytes) {
    // small grouped rows: permute them (cheap), then grouped_mm's (expert, row block, column
    // block) items, which keep more threads busy than one gathering task per row block
    static auto permute = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("smoe::permute", "")
                              .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // a part of this op, not recorded
    return grouped_mm_impl(permute.call(x, token, row), w, in.offsets, bias);
  }
  return grouped_mm_impl(in.x, w, in.offsets, bias, &in.token);
}

std::tuple<at::Tensor, at::Tensor> gather_mm_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& token_in,
    const at::Tensor& row, const at::Tensor& w, const at::Tensor& offsets_in, bool need_x,
    bool need_w) {
  check_gather_mm_backward(grad_in, x_in, token_in, row, w, offsets_in);
  const Inputs in = prepare("gather_mm_backward", x_in, token_in, offsets_in);
  const at::Tensor grad = rows_dense(grad_in);
  at::Tensor gx = at::empty({0}, in.x.options()), gw = at::empty({0}, w.options());
  if (need_x) {
    static auto permute_backward = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("smoe::permute_backward", "")
                                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // a part of this op, not recorded
    gx = permute_backward.call(grouped_mm_impl(grad, w.transpose(1, 2), in.offsets), row);
  }
  if (need_w) gw = grouped_mm_weight_grad(grad, in.x, w, in.offsets, &in.token);
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("gather_mm", &gather_mm_cpu);
  m.impl("gather_mm_backward", &gather_mm_backward_cpu);
}

}  // namespace smoe::ops
