// CUDA glue of gate_linear: the float32 (float64) GEMM on upcast inputs, as torch.linear runs it
// (ATen ops only: no kernel of ours, hence no device or architecture guard).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "checks_gate.h"

namespace smoe::ops {
namespace {

at::Tensor gate_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
  check_gate_linear(x, weight, bias);
  return gate_linear_upcast(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) { m.impl("gate_linear", &gate_linear_cuda); }

}  // namespace smoe::ops
