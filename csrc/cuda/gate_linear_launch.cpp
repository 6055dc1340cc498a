// CUDA glue of gate_linear and its backward: the float32 (float64) GEMMs on upcast inputs, as
// torch.linear runs them (ATen ops only: no kernel of ours, hence no device or architecture guard).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks_gate.h"

namespace smoe::ops {
namespace {

at::Tensor gate_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  check_gate_linear(x, weight, bias);
  return gate_linear_upcast(x, weight, bias);
}

std::tuple<at::Tensor, at::Tensor> gate_linear_backward_cuda(const at::Tensor& grad,
                                                             const at::Tensor& x,
                                                             const at::Tensor& weight, bool need_x,
                                                             bool need_w) {
  check_gate_linear_backward(grad, x, weight);
  return gate_linear_backward_upcast(grad, x, weight, need_x, need_w);
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("gate_linear", &gate_linear_cuda);
  m.impl("gate_linear_backward", &gate_linear_backward_cuda);
}

}  // namespace smoe::ops
