// What the CPU and CUDA glue of gate_linear (the routers' gate GEMM) and its backward share: their
// argument checks and the GEMMs on upcast inputs (CUDA's path, the CPU's outside the bf16
// micro-kernel).
// The fakes run the same checks from a Python mirror, smoe/ops/_checks_routing.py, which
// tests/bad_inputs/test_fakes.py holds to these messages: change both.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

#include "checks.h"

namespace smoe::ops {

// The logits' dtype: float64 for float64 x, float32 otherwise (routers/base.py gate_dtype).
inline at::ScalarType gate_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_gate_linear(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const char* op = "gate_linear") {
  TORCH_CHECK(weight.device() == x.device(), "smoe::", op, ": weight must be on ", x.device(),
              " like x, got ", weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device(), "smoe::", op, ": bias must be on ", x.device(),
                " like x, got ", bias->device());
  }
  check_float(op, "x", x);
  check_float(op, "weight", weight);
  if (bias.has_value()) check_float(op, "bias", *bias);
  TORCH_CHECK(x.dim() == 2, "smoe::", op, ": x must be 2-D [T, d], got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "smoe::", op, ": weight must be 2-D [E, d], got ", weight.dim(),
              "-D");
  TORCH_CHECK(weight.size(1) == x.size(1), "smoe::", op, ": weight must be [E, d] with d = ",
              x.size(1), " (x's columns), got [", weight.size(0), ", ", weight.size(1), "]");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "smoe::", op,
                ": bias must be [E] with E = ", weight.size(0), " (weight's rows), got ",
                bias->sizes());
  }
}

// grad: the logits' gradient, [T, E] in the logits' dtype (gate_dtype(x)), on x's device.
inline void check_gate_linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                       const at::Tensor& weight) {
  constexpr const char* op = "gate_linear_backward";
  check_gate_linear(x, weight, std::nullopt, op);
  TORCH_CHECK(grad.device() == x.device(), "smoe::gate_linear_backward: grad must be on ",
              x.device(), " like x, got ", grad.device());
  TORCH_CHECK(grad.scalar_type() == gate_dtype(x), "smoe::gate_linear_backward: grad must be ",
              c10::toString(gate_dtype(x)), " (the logits' dtype for ", x.scalar_type(),
              " x), got ", grad.scalar_type());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0),
              "smoe::gate_linear_backward: grad must be [T, E] = [", x.size(0), ", ",
              weight.size(0), "], got ", grad.sizes());
}

// The logits as torch.linear on the inputs upcast to the logits' dtype.
inline at::Tensor gate_linear_upcast(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias) {
  const at::ScalarType dt = gate_dtype(x);
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(dt);
  return at::linear(x.to(dt), weight.to(dt), b);
}

// The backward as two GEMMs in the logits' dtype on the upcast inputs, each gradient cast to its
// input's dtype: grad_x = grad @ weight, grad_weight = grad^T @ x (an output not needed: empty).
inline std::tuple<at::Tensor, at::Tensor> gate_linear_backward_upcast(const at::Tensor& grad,
                                                                      const at::Tensor& x,
                                                                      const at::Tensor& weight,
                                                                      bool need_x, bool need_w) {
  const at::ScalarType dt = grad.scalar_type();
  at::Tensor gx = need_x ? at::mm(grad, weight.to(dt)).to(x.scalar_type())
                         : at::empty({0}, x.options());
  at::Tensor gw = need_w ? at::mm(grad.t(), x.to(dt)).to(weight.scalar_type())
                         : at::empty({0}, weight.options());
  return {gx, gw};
}

}  // namespace smoe::ops
