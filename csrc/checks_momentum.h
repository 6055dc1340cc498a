// Argument checks of momentum_update and momentum_update_backward (specs/momentum_smoe.md §3-§5,
// §9), shared by the CPU and CUDA glue. Each error names the argument and what was expected.
// The fakes run the same checks from a Python mirror, smoe/ops/_checks_methods.py, which
// tests/bad_inputs/test_fakes.py holds to these messages: change both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string_view>

#include "checks.h"

namespace smoe::ops {

// The three update rules; the values are the kernels' kind codes (cpu/momentum_kernel.h,
// cuda/momentum.h).
enum class MomentumKind : int { kHeavyBall = 0, kAdam = 1, kRobust = 2 };

// The scalar options of both ops, in schema order.
struct MomentumOptions {
  double mu, gamma, sign, beta1, beta2, gamma1, eps, robust_a, robust_b;
};

// The state (m, p, v) is float32 (float64 for float64 u): it accumulates across layers (§10).
inline at::ScalarType momentum_state_dtype(const at::Tensor& u) {
  return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline MomentumKind parse_momentum_kind(const char* op, std::string_view kind) {
  if (kind == "heavy_ball") return MomentumKind::kHeavyBall;
  if (kind == "adam") return MomentumKind::kAdam;
  TORCH_CHECK(kind == "robust", "smoe::", op,
              ": kind must be 'heavy_ball', 'adam' or 'robust', got '", kind, "'");
  return MomentumKind::kRobust;
}

// Written so that NaN fails every range.
inline void check_momentum_options(const char* op, const MomentumOptions& o) {
  auto unit = [&](const char* name, double x) {
    TORCH_CHECK(x >= 0 && x < 1, "smoe::", op, ": ", name, " must be in [0, 1), got ", x);
  };
  auto nonneg = [&](const char* name, double x) {
    TORCH_CHECK(x >= 0 && std::isfinite(x), "smoe::", op, ": ", name,
                " must be finite and >= 0, got ", x);
  };
  auto positive = [&](const char* name, double x) {
    TORCH_CHECK(x > 0 && std::isfinite(x), "smoe::", op, ": ", name,
                " must be finite and > 0, got ", x);
  };
  unit("mu", o.mu);
  nonneg("gamma", o.gamma);
  TORCH_CHECK(o.sign == 1.0 || o.sign == -1.0, "smoe::", op, ": sign must be -1 or +1, got ",
              o.sign);
  unit("beta1", o.beta1);
  unit("beta2", o.beta2);
  nonneg("gamma1", o.gamma1);
  positive("eps", o.eps);
  positive("robust_a", o.robust_a);
  unit("robust_b", o.robust_b);
}

// A state-like tensor: on u's device, of `dtype`, of u's shape.
inline void check_momentum_like(const char* op, const char* name, const at::Tensor& t,
                                const at::Tensor& u, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.device() == u.device(), "smoe::", op, ": ", name, " must be on ", u.device(),
              " like u, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "smoe::", op, ": ", name, " must be ", dtype, " (", what,
              " for ", u.scalar_type(), " u), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == u.sizes(), "smoe::", op, ": ", name, " must have u's shape ", u.sizes(),
              ", got ", t.sizes());
}

// p and v: required for kind='adam', refused otherwise.
inline void check_adam_state(const char* op, const char* name, const std::optional<at::Tensor>& t,
                             const at::Tensor& u, MomentumKind kind) {
  const bool adam = kind == MomentumKind::kAdam;
  TORCH_CHECK(!adam || t.has_value(), "smoe::", op, ": ", name,
              " must be given when kind='adam' (the Adam state)");
  TORCH_CHECK(adam || !t.has_value(), "smoe::", op, ": ", name,
              " must be None unless kind='adam', got a tensor");
  if (adam) check_momentum_like(op, name, *t, u, momentum_state_dtype(u), "the state dtype");
}

inline MomentumKind check_momentum_update(const char* op, const at::Tensor& u, const at::Tensor& m,
                                          const std::optional<at::Tensor>& p,
                                          const std::optional<at::Tensor>& v,
                                          std::string_view kind_name, const MomentumOptions& o) {
  const MomentumKind kind = parse_momentum_kind(op, kind_name);
  check_momentum_options(op, o);
  check_float(op, "u", u);
  check_momentum_like(op, "m", m, u, momentum_state_dtype(u), "the state dtype");
  check_adam_state(op, "p", p, u, kind);
  check_adam_state(op, "v", v, u, kind);
  return kind;
}

inline MomentumKind check_momentum_update_backward(
    const at::Tensor& grad_delta, const at::Tensor& grad_m, const at::Tensor& grad_p,
    const at::Tensor& grad_v, const at::Tensor& u, const at::Tensor& m,
    const std::optional<at::Tensor>& p, const std::optional<at::Tensor>& v,
    std::string_view kind_name, const MomentumOptions& o) {
  const char* op = "momentum_update_backward";
  const MomentumKind kind = check_momentum_update(op, u, m, p, v, kind_name, o);
  const at::ScalarType state = momentum_state_dtype(u);
  check_momentum_like(op, "grad_delta", grad_delta, u, u.scalar_type(), "delta's dtype");
  check_momentum_like(op, "grad_m", grad_m, u, state, "the state dtype");
  for (const auto& [name, g] :
       {std::pair<const char*, const at::Tensor*>{"grad_p", &grad_p}, {"grad_v", &grad_v}}) {
    if (kind == MomentumKind::kAdam) {
      check_momentum_like(op, name, *g, u, state, "the state dtype");
    } else {
      TORCH_CHECK(g->device() == u.device() && g->scalar_type() == state && g->dim() == 1 &&
                      g->numel() == 0,
                  "smoe::", op, ": ", name, " must be an empty [0] ", state, " tensor on ",
                  u.device(), " unless kind='adam' (the op returns no p, v), got ", g->sizes(), " ",
                  g->scalar_type(), " on ", g->device());
    }
  }
  return kind;
}

}  // namespace smoe::ops
