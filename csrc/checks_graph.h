// Argument checks of graph_mix and graph_mix_backward (specs/graph_routing.md §2, §5), shared by
// the CPU and CUDA glue. Each error names the argument and what was expected. Order: device,
// dtype, rank, sizes, options (STYLE.md §4).
// The fakes run the same checks from a Python mirror, smoe/ops/_checks_methods.py, which
// tests/bad_inputs/test_fakes.py holds to these messages: change both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "checks.h"

namespace smoe::ops {

// The sizes of one call: x [B, S, E], cache [B, C, E] (C = 0 without one), A [B, S, C + S].
struct GraphMixSizes {
  int64_t B, S, E, C;
  int64_t Sp() const { return C + S; }
};

inline void check_graph_device(const char* op, const char* name, const at::Tensor& t,
                               const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "smoe::", op, ": ", name, " must be on ", x.device(),
              " like x, got ", t.device());
}

inline void check_graph_dtype(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "smoe::", op, ": ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
}

// Written so that NaN fails both.
inline void check_graph_options(const char* op, double self_coef, double lam) {
  TORCH_CHECK(std::isfinite(self_coef), "smoe::", op, ": self_coef must be finite, got ",
              self_coef);
  TORCH_CHECK(lam >= 0 && std::isfinite(lam), "smoe::", op, ": lam must be >= 0 and finite, got ",
              lam);
}

inline GraphMixSizes check_graph_mix(const char* op, const at::Tensor& x, const at::Tensor& A,
                                     const std::optional<at::Tensor>& cache, double self_coef,
                                     double lam) {
  check_graph_device(op, "A", A, x);
  if (cache.has_value()) check_graph_device(op, "cache", *cache, x);
  check_float(op, "x", x);
  check_graph_dtype(op, "A", A, x);
  if (cache.has_value()) check_graph_dtype(op, "cache", *cache, x);
  TORCH_CHECK(x.dim() == 3, "smoe::", op, ": x must be 3-D [B, S, E], got ", x.dim(), "-D");
  TORCH_CHECK(A.dim() == 3, "smoe::", op, ": A must be 3-D [B, S, S'], got ", A.dim(), "-D");
  GraphMixSizes n{x.size(0), x.size(1), x.size(2), 0};
  if (cache.has_value()) {
    const at::Tensor& c = *cache;
    TORCH_CHECK(c.dim() == 3 && c.size(0) == n.B && c.size(2) == n.E, "smoe::", op,
                ": cache must be [B, C, E] with B = ", n.B, " and E = ", n.E, " (x's), got shape ",
                c.sizes());
    n.C = c.size(1);
  }
  TORCH_CHECK(A.size(0) == n.B && A.size(1) == n.S && A.size(2) == n.Sp(), "smoe::", op,
              ": A must be [B, S, S'] = [", n.B, ", ", n.S, ", ", n.Sp(),
              "] (B, S from x; S' = C + S with C = ", n.C, " cached rows), got ", A.sizes());
  check_graph_options(op, self_coef, lam);
  return n;
}

inline GraphMixSizes check_graph_mix_backward(const at::Tensor& grad, const at::Tensor& x,
                                              const at::Tensor& A,
                                              const std::optional<at::Tensor>& cache,
                                              double self_coef, double lam) {
  const char* op = "graph_mix_backward";
  check_graph_device(op, "grad", grad, x);
  const GraphMixSizes n = check_graph_mix(op, x, A, cache, self_coef, lam);
  check_graph_dtype(op, "grad", grad, x);
  TORCH_CHECK(grad.sizes() == x.sizes(), "smoe::", op,
              ": grad must have x's shape [B, S, E] = ", x.sizes(), ", got ", grad.sizes());
  return n;
}

}  // namespace smoe::ops
