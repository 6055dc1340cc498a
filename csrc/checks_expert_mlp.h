// Argument checks of expert_mlp, shared by the CPU and CUDA glue. Each error names the argument and
// what was expected.
// The fakes run the same checks from a Python mirror, smoe/ops/_checks.py, which
// tests/bad_inputs/test_fakes.py holds to these messages: change both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "checks.h"
#include "checks_grouped_mm.h"
#include "checks_size_rule.h"

namespace smoe::ops {

enum class MlpActivation { kSwiglu, kGelu, kGeluTanh, kRelu };

inline MlpActivation parse_mlp_activation(std::string_view name) {
  if (name == "swiglu") return MlpActivation::kSwiglu;
  if (name == "gelu") return MlpActivation::kGelu;
  if (name == "gelu_tanh") return MlpActivation::kGeluTanh;
  if (name == "relu") return MlpActivation::kRelu;
  TORCH_CHECK(false, "smoe::expert_mlp: activation must be one of 'swiglu', 'gelu', 'gelu_tanh', ",
              "'relu', got '", std::string(name), "'");
}

inline void check_mlp_weight(const char* name, const at::Tensor& w, const at::Tensor& x) {
  TORCH_CHECK(w.device() == x.device(), "smoe::expert_mlp: ", name, " must be on ", x.device(),
              " like x, got ", w.device());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "smoe::expert_mlp: ", name,
              " must have x's dtype ", x.scalar_type(), ", got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 3, "smoe::expert_mlp: ", name, " must be 3-D, got ", w.dim(), "-D");
}

// x [T, d] with token [M] / row [T, k] (rows gathered through the plan), or x [M, d] grouped rows
// without them; w_in [E, d, n_in], w_out [E, d_ff, d_out] (n_in = 2 d_ff for swiglu, else d_ff);
// offsets [E+1] int64; fuse_min_bytes >= 0. Returns the activation and M.
inline std::pair<MlpActivation, int64_t> check_expert_mlp(
    const at::Tensor& x, const std::optional<at::Tensor>& token,
    const std::optional<at::Tensor>& row, const at::Tensor& offsets, const at::Tensor& w_in,
    const std::optional<at::Tensor>& b_in, const at::Tensor& w_out,
    const std::optional<at::Tensor>& b_out, std::string_view activation, int64_t fuse_min_bytes) {
  const MlpActivation act = parse_mlp_activation(activation);
  check_min_bytes("expert_mlp", "fuse_min_bytes", fuse_min_bytes, "fused");
  check_float("expert_mlp", "x", x);
  TORCH_CHECK(x.dim() == 2, "smoe::expert_mlp: x must be 2-D ([T, d] with a plan, [M, d] without),",
              " got ", x.dim(), "-D");
  check_mlp_weight("w_in", w_in, x);
  check_mlp_weight("w_out", w_out, x);
  TORCH_CHECK(token.has_value() == row.has_value(),
              "smoe::expert_mlp: token and row come together (a plan) or not at all, got ",
              token.has_value() ? "token without row" : "row without token");
  if (token.has_value()) {
    check_plan("expert_mlp", x, row->dim() == 2 ? row->size(0) : -1, "x (T = row.size(0))",
               &*token, nullptr, *row);
  }
  check_index("expert_mlp", "offsets", offsets, x, 1, at::kLong);
  const int64_t E = w_in.size(0);
  TORCH_CHECK(w_in.size(1) == x.size(1), "smoe::expert_mlp: w_in must be [E, d, n_in] with d = ",
              x.size(1), " (x.size(1)), got shape ", w_in.sizes());
  TORCH_CHECK(w_out.size(0) == E, "smoe::expert_mlp: w_out must have E = ", E,
              " experts like w_in, got shape ", w_out.sizes());
  const int64_t n_in = w_in.size(2), d_ff = w_out.size(1);
  const bool gated = act == MlpActivation::kSwiglu;
  TORCH_CHECK(n_in == (gated ? 2 * d_ff : d_ff), "smoe::expert_mlp: w_in must have ",
              gated ? "2 * d_ff = " : "d_ff = ", gated ? 2 * d_ff : d_ff,
              " output columns for activation '", std::string(activation),
              "' (d_ff = w_out.size(1)), got ", n_in);
  TORCH_CHECK(offsets.size(0) == E + 1, "smoe::expert_mlp: offsets must have E + 1 = ", E + 1,
              " entries, got ", offsets.size(0));
  if (b_in.has_value()) check_expert_bias("expert_mlp", "b_in", *b_in, "w_in", w_in, "n_in");
  if (b_out.has_value()) check_expert_bias("expert_mlp", "b_out", *b_out, "w_out", w_out, "d_out");
  return {act, token.has_value() ? token->size(0) : x.size(0)};
}

}  // namespace smoe::ops
