// The CPU grouped GEMMs that grouped_mm (csrc/cpu/grouped_mm.cpp) and gather_mm
// (csrc/cpu/gather_mm.cpp) share. Inputs are checked by the callers; x has dense rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace smoe::ops {

// out [M, d_out] = per-group rows @ w[e] (+ bias[e]), rows past offsets[E] zero. The rows are x's
// own (M = x.size(0)), or with token x[token[r]] (0 where token[r] < 0; M = token.size(0)),
// gathered per work item without materialising them. Bitwise the same either way.
at::Tensor grouped_mm_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
                           const std::optional<at::Tensor>& bias = std::nullopt,
                           const at::Tensor* token = nullptr);

// grad_w [E, d_in, d_out] (w's layout) = per-group rows^T @ grad, the rows as above.
at::Tensor grouped_mm_weight_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w,
                                  const at::Tensor& offsets, const at::Tensor* token = nullptr);

}  // namespace smoe::ops
