// Argument checks of s2moe_perturb and its backward (specs/s2moe.md §5), shared by the CPU and
// CUDA glue, and the [A, S, C] view both kernels work on. Each error names the argument.
// The fakes run the same checks from a Python mirror, smoe/ops/_checks_methods.py, which
// tests/bad_inputs/test_fakes.py holds to these messages: change both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>

#include "checks.h"

namespace smoe::ops {

// x seen as [A, S, C] (contiguous): the statistics vary along A and C only, each either a full
// [A, C] block (scalar = false) or one value (scalar = true).
struct PerturbView {
  int64_t A, S, C;
  std::array<bool, 3> scalar;  // mu, s_mul, s_add
};

// The statistics (mu, s_mul, s_add) must each be one value or broadcast over the same run of
// consecutive dims of x (size 1 there, x's size elsewhere): DSU's per (sample, feature) stats
// [B, 1, d], per-token [T, 1], per-feature [1, d], or InstanceNorm's scalars.
inline PerturbView perturb_view(const char* op, const at::Tensor& x,
                                const std::array<const at::Tensor*, 3>& stats) {
  static const char* names[3] = {"mu", "s_mul", "s_add"};
  const int64_t D = x.dim();
  int64_t p = -1, q = -1;  // the broadcast run [p, q) of the first non-scalar statistic
  PerturbView v{1, 1, 1, {true, true, true}};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *stats[i];
    if (t.numel() == 1) continue;
    v.scalar[i] = false;
    TORCH_CHECK(t.dim() == D, "smoe::", op, ": ", names[i], " must have x's rank ", D,
                " (size 1 along the dims it is broadcast over) or one element, got shape ",
                t.sizes());
    int64_t tp = D, tq = D;
    for (int64_t d = 0; d < D; ++d) {
      const bool broadcast = t.size(d) == 1 && x.size(d) != 1;
      TORCH_CHECK(broadcast || t.size(d) == x.size(d), "smoe::", op, ": ", names[i],
                  " must broadcast to x's shape ", x.sizes(), ", got ", t.sizes());
      if (broadcast && tp == D) tp = d;
      if (broadcast) tq = d + 1;
    }
    if (tp == D) tq = D;  // no broadcast dim: S = 1
    for (int64_t d = tp; d < tq; ++d) {
      TORCH_CHECK(t.size(d) == 1 || x.size(d) == 1, "smoe::", op, ": ", names[i],
                  " must be broadcast over one run of consecutive dims of x, got shape ", t.sizes(),
                  " for x ", x.sizes());
    }
    if (p < 0) {
      p = tp;
      q = tq;
    }
    TORCH_CHECK(tp == p && tq == q, "smoe::", op,
                ": mu, s_mul and s_add must be broadcast over the same dims of x (or be one "
                "value), got ",
                names[i], " of shape ", t.sizes());
  }
  if (p < 0) p = q = D;  // all scalars
  for (int64_t d = 0; d < D; ++d) {
    (d < p ? v.A : d < q ? v.S : v.C) *= x.size(d);
  }
  return v;
}

inline void check_s2moe_perturb(const char* op, const at::Tensor& x, const at::Tensor& n1,
                                const at::Tensor& n2, const at::Tensor& mu, const at::Tensor& s_mul,
                                const at::Tensor& s_add) {
  check_float(op, "x", x);
  const std::array<const char*, 5> names = {"n1", "n2", "mu", "s_mul", "s_add"};
  const std::array<const at::Tensor*, 5> others = {&n1, &n2, &mu, &s_mul, &s_add};
  for (size_t i = 0; i < names.size(); ++i) {
    TORCH_CHECK(others[i]->device() == x.device(), "smoe::", op, ": ", names[i], " must be on ",
                x.device(), " like x, got ", others[i]->device());
    TORCH_CHECK(others[i]->scalar_type() == x.scalar_type(), "smoe::", op, ": ", names[i],
                " must have x's dtype ", x.scalar_type(), ", got ", others[i]->scalar_type());
  }
  TORCH_CHECK(x.dim() >= 1, "smoe::", op, ": x must have at least one dim, got a 0-dim tensor");
  TORCH_CHECK(n1.sizes() == x.sizes(), "smoe::", op, ": n1 must have x's shape ", x.sizes(),
              ", got ", n1.sizes());
  TORCH_CHECK(n2.sizes() == x.sizes(), "smoe::", op, ": n2 must have x's shape ", x.sizes(),
              ", got ", n2.sizes());
}

}  // namespace smoe::ops
