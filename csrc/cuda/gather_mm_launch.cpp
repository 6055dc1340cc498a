// CUDA glue of gather_mm and its backward: the unfused chain on the device through the dispatcher,
// permute -> grouped_mm forward, and grouped_mm_backward -> permute_backward for the gradients,
// that is smoe's own CUDA kernels (the tensor-core path included), with no host sync. The CPU op's
// win, no materialised x_sorted, would come on the GPU from a gather in the GEMM's tile loads; that
// belongs to issue 25's tensor-core work and needs a GPU to measure.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks_grouped_mm.h"
#include "checks_size_rule.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

using TensorRef = const at::Tensor&;

at::Tensor call_permute(TensorRef x, TensorRef token, TensorRef row) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("smoe::permute", "")
                       .typed<at::Tensor(TensorRef, TensorRef, TensorRef)>();
  return op.call(x, token, row);
}

at::Tensor gather_mm_cuda(TensorRef x, TensorRef token, TensorRef row, TensorRef w,
                          TensorRef offsets, const std::optional<at::Tensor>& bias,
                          int64_t gather_min_bytes) {
  static auto grouped_mm =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("smoe::grouped_mm", "")
          .typed<at::Tensor(TensorRef, TensorRef, TensorRef, const std::optional<at::Tensor>&)>();
  check_gather_mm("gather_mm", x, token, row, w, offsets);
  if (bias.has_value()) check_expert_bias("gather_mm", "bias", *bias, "w", w, "d_out");
  check_min_bytes("gather_mm", "gather_min_bytes", gather_min_bytes, "gathering");
  check_not_double("gather_mm", x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_device_arch(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the parts are called, not recorded
  return grouped_mm.call(call_permute(x, token, row), w, offsets, bias);
}

std::tuple<at::Tensor, at::Tensor> gather_mm_backward_cuda(TensorRef grad, TensorRef x,
                                                           TensorRef token, TensorRef row,
                                                           TensorRef w, TensorRef offsets,
                                                           bool need_x, bool need_w) {
  static auto mm_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("smoe::grouped_mm_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(TensorRef, TensorRef, TensorRef, TensorRef,
                                                    bool, bool)>();
  static auto permute_backward = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("smoe::permute_backward", "")
                                     .typed<at::Tensor(TensorRef, TensorRef)>();
  check_gather_mm_backward(grad, x, token, row, w, offsets);
  check_not_double("gather_mm_backward", x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_device_arch(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // the grouped rows only where the weight gradient reads them; else a shape for the checks
  // (grouped_mm_backward reads no x without need_w), one row's storage broadcast
  const at::Tensor xs =
      need_w ? call_permute(x, token, row)
             : at::empty_strided({token.size(0), x.size(1)}, {0, 1}, x.options());
  auto [gxs, gw] = mm_backward.call(grad, xs, w, offsets, need_x, need_w);
  at::Tensor gx = need_x ? permute_backward.call(gxs, row) : at::empty({0}, x.options());
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("gather_mm", &gather_mm_cuda);
  m.impl("gather_mm_backward", &gather_mm_backward_cuda);
}

}  // namespace smoe::ops
