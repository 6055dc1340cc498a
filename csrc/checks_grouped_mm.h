// Argument checks of grouped_mm, grouped_mm_backward and grouped_mm_bias_backward, shared by the
// CPU and CUDA glue. Each error names the argument and what was expected.
// The fakes run the same checks from a Python mirror, smoe/ops/_checks.py, which
// tests/bad_inputs/test_fakes.py holds to these messages: change both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "checks.h"

namespace smoe::ops {

inline void check_grouped_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  TORCH_CHECK(w.device() == x.device(), "smoe::grouped_mm: w must be on ", x.device(),
              " like x, got ", w.device());
  check_index("grouped_mm", "offsets", offsets, x, 1, at::kLong);
  check_float("grouped_mm", "x", x);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "smoe::grouped_mm: w must have x's dtype ",
              x.scalar_type(), ", got ", w.scalar_type());
  TORCH_CHECK(x.dim() == 2, "smoe::grouped_mm: x must be 2-D [M, d_in], got ", x.dim(), "-D");
  TORCH_CHECK(w.dim() == 3, "smoe::grouped_mm: w must be 3-D [E, d_in, d_out], got ", w.dim(),
              "-D");
  TORCH_CHECK(w.size(1) == x.size(1),
              "smoe::grouped_mm: w must be [E, d_in, d_out] with d_in = ", x.size(1),
              " (x.size(1)), got w of shape ", w.sizes());
  TORCH_CHECK(offsets.size(0) == w.size(0) + 1,
              "smoe::grouped_mm: offsets must have E + 1 = ", w.size(0) + 1, " entries, got ",
              offsets.size(0));
}

// A per-expert bias `name` [E, cols] of a GEMM whose weight `w_name` is w [E, ., cols]: w's dtype
// and device, any strides (grouped_mm's bias; expert_mlp's b_in and b_out).
inline void check_expert_bias(const char* op, const char* name, const at::Tensor& b,
                              const char* w_name, const at::Tensor& w, const char* cols) {
  TORCH_CHECK(b.layout() == at::kStrided, "smoe::", op, ": ", name,
              " must be a strided tensor, got ", b.layout());
  TORCH_CHECK(b.device() == w.device(), "smoe::", op, ": ", name, " must be on ", w.device(),
              " like ", w_name, ", got ", b.device());
  TORCH_CHECK(b.scalar_type() == w.scalar_type(), "smoe::", op, ": ", name, " must have ", w_name,
              "'s dtype ", w.scalar_type(), ", got ", b.scalar_type());
  TORCH_CHECK(b.dim() == 2 && b.size(0) == w.size(0) && b.size(1) == w.size(2), "smoe::", op, ": ",
              name, " must be [E, ", cols, "] = [", w.size(0), ", ", w.size(2), "], got shape ",
              b.sizes());
}

// The optional per-expert bias [E, d_out] of grouped_mm.
inline void check_grouped_mm_bias(const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) check_expert_bias("grouped_mm", "bias", *bias, "w", w, "d_out");
}

// grouped_mm_bias_backward: grad_out [M, d_out] floating, offsets [E+1] int64 on its device.
inline void check_grouped_mm_bias_backward(const at::Tensor& grad_out, const at::Tensor& offsets) {
  check_float("grouped_mm_bias_backward", "grad_out", grad_out);
  TORCH_CHECK(grad_out.dim() == 2,
              "smoe::grouped_mm_bias_backward: grad_out must be 2-D [M, d_out], got ",
              grad_out.dim(), "-D");
  check_index("grouped_mm_bias_backward", "offsets", offsets, grad_out, 1, at::kLong);
  TORCH_CHECK(offsets.size(0) >= 1,
              "smoe::grouped_mm_bias_backward: offsets must have E + 1 >= 1 entries, got 0");
}

inline void check_grouped_mm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& w, const at::Tensor& offsets) {
  check_grouped_mm(x, w, offsets);
  TORCH_CHECK(grad_out.device() == x.device(), "smoe::grouped_mm_backward: grad_out must be on ",
              x.device(), " like x, got ", grad_out.device());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.dim() == 2 &&
                  grad_out.size(0) == x.size(0) && grad_out.size(1) == w.size(2),
              "smoe::grouped_mm_backward: grad_out must be [M, d_out] = [", x.size(0), ", ",
              w.size(2), "] with x's dtype, got ", grad_out.sizes(), " ", grad_out.scalar_type());
}

// gather_mm and its backward (op): x [T, d_in] with a plan's token [M] and row [T, k], w [E, d_in,
// d_out] of x's dtype and device, offsets [E+1] int64.
inline void check_gather_mm(const char* op, const at::Tensor& x, const at::Tensor& token,
                            const at::Tensor& row, const at::Tensor& w, const at::Tensor& offsets) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() == 2, "smoe::", op, ": x must be 2-D [T, d_in], got ", x.dim(), "-D");
  check_plan(op, x, row.dim() == 2 ? row.size(0) : -1, "x (T = row.size(0))", &token, nullptr,
             row);
  TORCH_CHECK(w.device() == x.device(), "smoe::", op, ": w must be on ", x.device(),
              " like x, got ", w.device());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "smoe::", op, ": w must have x's dtype ",
              x.scalar_type(), ", got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 3, "smoe::", op, ": w must be 3-D [E, d_in, d_out], got ", w.dim(), "-D");
  TORCH_CHECK(w.size(1) == x.size(1), "smoe::", op, ": w must be [E, d_in, d_out] with d_in = ",
              x.size(1), " (x.size(1)), got w of shape ", w.sizes());
  check_index(op, "offsets", offsets, x, 1, at::kLong);
  TORCH_CHECK(offsets.size(0) == w.size(0) + 1, "smoe::", op, ": offsets must have E + 1 = ",
              w.size(0) + 1, " entries, got ", offsets.size(0));
}

inline void check_gather_mm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& token, const at::Tensor& row,
                                     const at::Tensor& w, const at::Tensor& offsets) {
  check_gather_mm("gather_mm_backward", x, token, row, w, offsets);
  TORCH_CHECK(grad_out.device() == x.device(), "smoe::gather_mm_backward: grad_out must be on ",
              x.device(), " like x, got ", grad_out.device());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.dim() == 2 &&
                  grad_out.size(0) == token.size(0) && grad_out.size(1) == w.size(2),
              "smoe::gather_mm_backward: grad_out must be [M, d_out] = [", token.size(0), ", ",
              w.size(2), "] with x's dtype, got ", grad_out.sizes(), " ", grad_out.scalar_type());
}

}  // namespace smoe::ops
