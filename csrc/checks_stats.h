// Argument checks of router_stats and router_stats_backward (the auxiliary losses' statistics),
// shared by the CPU and CUDA glue. Each error names the argument and what was expected.
// The fakes run the same checks from a Python mirror, smoe/ops/_checks_routing.py, which
// tests/bad_inputs/test_fakes.py holds to these messages: change both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "checks.h"

namespace smoe::ops {

// The dtype of router_stats' outputs: float64 for float64 logits, else float32.
inline at::ScalarType stats_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_router_stats(const at::Tensor& logits, const char* op = "router_stats") {
  check_float(op, "logits", logits);
  TORCH_CHECK(logits.dim() == 2, "smoe::", op, ": logits must be 2-D [T, E], got ", logits.dim(),
              "-D");
  TORCH_CHECK(logits.size(1) >= 1, "smoe::", op,
              ": logits must have at least one expert (E >= 1), got E = 0");
}

// A statistic's tensor: on logits' device, the statistics' dtype, 1-D of n entries.
inline void check_stat(const char* name, const at::Tensor& t, const at::Tensor& logits, int64_t n,
                       const char* what) {
  constexpr const char* op = "router_stats_backward";
  const at::ScalarType dt = stats_dtype(logits);
  TORCH_CHECK(t.device() == logits.device(), "smoe::", op, ": ", name, " must be on ",
              logits.device(), " like logits, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dt, "smoe::", op, ": ", name, " must be ", dt, " (", what,
              "), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "smoe::", op, ": ", name, " must be [", n, "] (",
              what, "), got ", t.sizes());
}

inline void check_router_stats_backward(const std::optional<at::Tensor>& grad_prob_sum,
                                        const std::optional<at::Tensor>& grad_lse,
                                        const at::Tensor& logits) {
  check_router_stats(logits, "router_stats_backward");
  const int64_t T = logits.size(0), E = logits.size(1);
  if (grad_prob_sum.has_value()) check_stat("grad_prob_sum", *grad_prob_sum, logits, E, "[E]");
  if (grad_lse.has_value()) check_stat("grad_lse", *grad_lse, logits, T, "one per row of logits");
}

}  // namespace smoe::ops
