// expert_mlp as its unfused chain, permute -> grouped_mm -> activation -> grouped_mm, called
// through the dispatcher (smoe's own kernels for the tensors' device) below autograd. The CUDA glue
// always runs it (no host sync: the offsets stay on the device); the CPU glue runs it where the
// hidden is at most the call's fuse_min_bytes, so that one traced op (torch.export, a dynamic
// compile) picks its path from the token count at run time. Its results are those of the same
// ops called one by one.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/relu.h>

#include <optional>

#include "checks_expert_mlp.h"

namespace smoe::ops {

// GELU (erf or tanh) or ReLU of h in place: the pointwise activations, the same calls in the CPU
// fused op's items and in the chain. SwiGLU halves the columns, so each runs its own.
inline void pointwise_activation_(MlpActivation act, at::Tensor& h) {
  switch (act) {
    case MlpActivation::kGelu:
      at::gelu_(h, "none");
      return;
    case MlpActivation::kGeluTanh:
      at::gelu_(h, "tanh");
      return;
    case MlpActivation::kRelu:
      at::relu_(h);
      return;
    case MlpActivation::kSwiglu:
      break;
  }
  TORCH_CHECK(false, "smoe::expert_mlp: internal: swiglu is not a pointwise activation");
}

inline at::Tensor expert_mlp_chain(const at::Tensor& x, const std::optional<at::Tensor>& token,
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
  if (act == MlpActivation::kSwiglu) {
    h = swiglu.call(h);
  } else {
    pointwise_activation_(act, h);
  }
  return grouped_mm.call(h, w_out, offsets, b_out);
}

}  // namespace smoe::ops
