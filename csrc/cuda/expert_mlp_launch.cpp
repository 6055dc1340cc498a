// CUDA glue of expert_mlp: the unfused chain on the device, permute -> grouped_mm -> activation ->
// grouped_mm through the dispatcher, that is through smoe's own CUDA kernels, with no host sync
// (the offsets stay on the device). The CPU op's win, no page faults on a large hidden, does not
// apply on the GPU; a gather-GEMM with the activation in the tile epilogue belongs to issue 25's
// tensor-core work.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/relu.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string_view>

#include "checks_expert_mlp.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

at::Tensor expert_mlp_chain(const at::Tensor& x, const std::optional<at::Tensor>& token,
                            const std::optional<at::Tensor>& row, const at::Tensor& offsets,
                            const at::Tensor& w_in, const std::optional<at::Tensor>& b_in,
                            const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
                            MlpActivation act) {
  static auto permute = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("smoe::permute", "")
                            .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&)>();
  static auto grouped_mm = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("smoe::grouped_mm", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&,
                                                 const std::optional<at::Tensor>&)>();
  static auto swiglu = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("smoe::swiglu", "")
                           .typed<at::Tensor(const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the parts are called, not recorded
  const at::Tensor xs = token.has_value() ? permute.call(x, *token, *row) : x;
  at::Tensor h = grouped_mm.call(xs, w_in, offsets, b_in);
  switch (act) {
    case MlpActivation::kSwiglu:
      h = swiglu.call(h);
      break;
    case MlpActivation::kGelu:
      at::gelu_(h, "none");
      break;
    case MlpActivation::kGeluTanh:
      at::gelu_(h, "tanh");
      break;
    case MlpActivation::kRelu:
      at::relu_(h);
      break;
  }
  return grouped_mm.call(h, w_out, offsets, b_out);
}

at::Tensor expert_mlp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& token,
                           const std::optional<at::Tensor>& row, const at::Tensor& offsets,
                           const at::Tensor& w_in, const std::optional<at::Tensor>& b_in,
                           const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
                           c10::string_view activation) {
  const auto checked = check_expert_mlp(x, token, row, offsets, w_in, b_in, w_out, b_out,
                                        std::string_view(activation.data(), activation.size()));
  check_not_double("expert_mlp", x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_device_arch(x.device());
  return expert_mlp_chain(x, token, row, offsets, w_in, b_in, w_out, b_out, checked.first);
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) { m.impl("expert_mlp", &expert_mlp_cuda); }

}  // namespace smoe::ops
