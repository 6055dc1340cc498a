// Argument checks of sinkhorn and sinkhorn_backward (specs/sinkhorn_ssr.md §3, §7), shared by the
// CPU and CUDA glue. Each error names the argument and what was expected.
// The fakes run the same checks from a Python mirror, smoe/ops/_checks_routing.py, which
// tests/bad_inputs/test_fakes.py holds to these messages: change both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>

#include "checks.h"

namespace smoe::ops {

// The potentials, plan and residuals are float32 (float64 for float64 scores).
inline at::ScalarType sinkhorn_acc_dtype(const at::Tensor& scores) {
  return scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks the forward's arguments; returns the column mass (col_mass, or T * row_mass / E).
inline double check_sinkhorn(const at::Tensor& scores, double eps, int64_t max_iter, double tol,
                             double row_mass, const std::optional<double>& col_mass,
                             int64_t check_every) {
  const char* op = "sinkhorn";
  check_float(op, "scores", scores);
  TORCH_CHECK(scores.dim() == 2, "smoe::sinkhorn: scores must be 2-D [T, E], got ", scores.dim(),
              "-D");
  TORCH_CHECK(scores.size(1) >= 1, "smoe::sinkhorn: scores must have at least one expert column");
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "smoe::sinkhorn: eps must be finite and > 0, got ",
              eps);
  TORCH_CHECK(max_iter >= 1, "smoe::sinkhorn: max_iter must be >= 1, got ", max_iter);
  TORCH_CHECK(tol >= 0 && std::isfinite(tol), "smoe::sinkhorn: tol must be finite and >= 0, got ",
              tol);
  TORCH_CHECK(check_every >= 1, "smoe::sinkhorn: check_every must be >= 1, got ", check_every);
  TORCH_CHECK(row_mass > 0 && std::isfinite(row_mass),
              "smoe::sinkhorn: row_mass must be finite and > 0, got ", row_mass);
  const int64_t T = scores.size(0), E = scores.size(1);
  const double total = static_cast<double>(T) * row_mass;
  if (!col_mass.has_value()) return total / static_cast<double>(E);
  const double c = *col_mass;
  TORCH_CHECK(c > 0 && std::isfinite(c), "smoe::sinkhorn: col_mass must be finite and > 0, got ",
              c);
  const double cols = static_cast<double>(E) * c;
  TORCH_CHECK(T == 0 || std::fabs(total - cols) <= 1e-6 * std::max(total, cols),
              "smoe::sinkhorn: the marginals must carry the same mass: T * row_mass = ", T, " * ",
              row_mass, " = ", total, " but E * col_mass = ", E, " * ", c, " = ", cols);
  return c;
}

inline void check_sinkhorn_backward(const at::Tensor& grad_log_plan, const at::Tensor& grad_f,
                                    const at::Tensor& grad_g, const at::Tensor& scores,
                                    const at::Tensor& f_hist, const at::Tensor& g_hist,
                                    const at::Tensor& iters_done, double eps) {
  const char* op = "sinkhorn_backward";
  check_float(op, "scores", scores);
  TORCH_CHECK(scores.dim() == 2 && scores.size(1) >= 1,
              "smoe::sinkhorn_backward: scores must be 2-D [T, E] with E >= 1, got shape ",
              scores.sizes());
  TORCH_CHECK(eps > 0 && std::isfinite(eps),
              "smoe::sinkhorn_backward: eps must be finite and > 0, got ", eps);
  const int64_t T = scores.size(0), E = scores.size(1);
  const at::ScalarType acc = sinkhorn_acc_dtype(scores);
  auto expect = [&](const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape,
                    at::ScalarType dtype) {
    TORCH_CHECK(t.device() == scores.device(), "smoe::", op, ": ", name, " must be on ",
                scores.device(), " like scores, got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype && t.sizes().equals(shape), "smoe::", op, ": ", name,
                " must be ", at::IntArrayRef(shape), " ", dtype, ", got ", t.sizes(), " ",
                t.scalar_type());
  };
  expect("grad_log_plan", grad_log_plan, {T, E}, acc);
  expect("grad_f", grad_f, {T}, acc);
  expect("grad_g", grad_g, {E}, acc);
  TORCH_CHECK(f_hist.dim() == 2 && f_hist.size(0) >= 1,
              "smoe::sinkhorn_backward: f_hist must be [max_iter, T], got ", f_hist.sizes());
  expect("f_hist", f_hist, {f_hist.size(0), T}, acc);
  expect("g_hist", g_hist, {f_hist.size(0), E}, acc);
  expect("iters_done", iters_done, {}, at::kLong);
}

}  // namespace smoe::ops
