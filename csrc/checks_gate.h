// What the CPU and CUDA glue of gate_linear (the routers' gate GEMM) share: its argument checks
// and the float32 GEMM on upcast inputs (CUDA's path, the CPU's outside the bf16 micro-kernel).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>
#include <c10/util/Exception.h>

#include <optional>

#include "checks.h"

namespace smoe::ops {

// The logits' dtype: float64 for float64 x, float32 otherwise (routers/base.py gate_dtype).
inline at::ScalarType gate_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_gate_linear(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "gate_linear";
  TORCH_CHECK(weight.device() == x.device(), "smoe::gate_linear: weight must be on ", x.device(),
              " like x, got ", weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device(), "smoe::gate_linear: bias must be on ", x.device(),
                " like x, got ", bias->device());
  }
  check_float(op, "x", x);
  check_float(op, "weight", weight);
  if (bias.has_value()) check_float(op, "bias", *bias);
  TORCH_CHECK(x.dim() == 2, "smoe::gate_linear: x must be 2-D [T, d], got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "smoe::gate_linear: weight must be 2-D [E, d], got ",
              weight.dim(), "-D");
  TORCH_CHECK(weight.size(1) == x.size(1), "smoe::gate_linear: weight must be [E, d] with d = ",
              x.size(1), " (x's columns), got [", weight.size(0), ", ", weight.size(1), "]");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "smoe::gate_linear: bias must be [E] with E = ", weight.size(0),
                " (weight's rows), got ", bias->sizes());
  }
}

// The logits as torch.linear on the inputs upcast to the logits' dtype.
inline at::Tensor gate_linear_upcast(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias) {
  const at::ScalarType dt = gate_dtype(x);
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(dt);
  return at::linear(x.to(dt), weight.to(dt), b);
}

}  // namespace smoe::ops
