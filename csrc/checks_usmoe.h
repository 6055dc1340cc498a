// Argument checks of unified_topk (USMoE, specs/usmoe.md §8), shared by the CPU and CUDA glue.
// Each error names the argument and what was expected.
// The fakes run the same checks from a Python mirror, smoe/ops/_checks_methods.py, which
// tests/bad_inputs/test_fakes.py holds to these messages: change both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "checks.h"

namespace smoe::ops {

inline void check_unified_topk(const at::Tensor& scores, int64_t n,
                               const std::optional<at::Tensor>& counts) {
  check_float("unified_topk", "scores", scores);
  TORCH_CHECK(scores.dim() == 2, "smoe::unified_topk: scores must be 2-D [G, L], got ",
              scores.dim(), "-D");
  const int64_t L = scores.size(1);
  TORCH_CHECK(L < std::numeric_limits<int32_t>::max(),
              "smoe::unified_topk: scores must have fewer than 2^31 - 1 columns (L), got ", L);
  TORCH_CHECK(n >= 0 && n <= L, "smoe::unified_topk: n must be in [0, L] = [0, ", L, "], got ", n);
  if (!counts.has_value()) return;
  const at::Tensor& c = *counts;
  TORCH_CHECK(c.device() == scores.device(), "smoe::unified_topk: counts must be on ",
              scores.device(), " like scores, got ", c.device());
  TORCH_CHECK(c.scalar_type() == at::kLong, "smoe::unified_topk: counts must be int64, got ",
              c.scalar_type());
  TORCH_CHECK(c.dim() == 1 && c.size(0) == scores.size(0),
              "smoe::unified_topk: counts must be [G] = [", scores.size(0), "], got ", c.sizes());
}

}  // namespace smoe::ops
