// Argument checks shared by the CPU and CUDA glue, one function per op, so that both devices
// reject bad input with the same message. Order: device, dtype, rank, sizes (STYLE.md §4).
// The fakes run the same checks from a Python mirror (smoe/ops/_checks.py, _checks_routing.py,
// _checks_methods.py), which tests/bad_inputs/test_fakes.py holds to these messages: change both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "common/dtype.h"

namespace smoe::ops {

// The torch-free storage type a kernel sees for an ATen scalar type.
template <typename T>
struct kernel_type {
  using type = T;
};
template <>
struct kernel_type<c10::Half> {
  using type = smoe::half_t;
};
template <>
struct kernel_type<c10::BFloat16> {
  using type = smoe::bfloat16_t;
};

// Rows dense in their last dim (kernels take a row stride): a no-op for most inputs.
inline at::Tensor rows_dense(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_float_type(t.scalar_type()), "smoe::", op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline const char* index_type_name(at::ScalarType t) {
  return t == at::kInt ? "int32" : t == at::kLong ? "int64" : c10::toString(t);
}

inline void check_index(const char* op, const char* name, const at::Tensor& t,
                        const at::Tensor& like, int64_t dim, at::ScalarType dtype = at::kInt) {
  TORCH_CHECK(t.device() == like.device(), "smoe::", op, ": ", name, " must be on ", like.device(),
              " like the other inputs, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "smoe::", op, ": ", name, " must be a ", dim, "-D ",
              index_type_name(dtype), " tensor, got ", index_type_name(t.scalar_type()));
  TORCH_CHECK(t.dim() == dim, "smoe::", op, ": ", name, " must be a ", dim, "-D ",
              index_type_name(dtype), " tensor, got ", t.dim(), "-D");
}

// Plan indices (slot t*k + j, sorted row) are int32: a tensor of n slots or rows must have
// n < 2^31 - 1. Checked from shapes, before anything is allocated.
inline void check_int32_count(const char* op, const char* name, int64_t n, const char* what) {
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "smoe::", op, ": ", name,
              " must have fewer than 2^31 - 1 ", what, " (plan indices are int32), got ", n);
}

inline void check_topk_softmax(const at::Tensor& logits, int64_t k) {
  check_float("topk_softmax", "logits", logits);
  TORCH_CHECK(logits.dim() == 2, "smoe::topk_softmax: logits must be 2-D [T, E], got ",
              logits.dim(), "-D");
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1,
              "smoe::topk_softmax: logits must have at least one expert (E >= 1), got E = 0");
  TORCH_CHECK(k >= 1 && k <= E, "smoe::topk_softmax: k must be in [1, E] = [1, ", E, "], got ", k);
  check_int32_count("topk_softmax", "logits", logits.size(0) * k, "slots (T*k)");
}

// selection_bias of topk_softmax: [E] float32 on logits' device (finiteness: CPU glue / device
// assert).
inline void check_selection_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& logits,
                                 const char* op = "topk_softmax") {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.scalar_type() == at::kFloat, "smoe::", op, ": selection_bias must be float32, got ",
              b.scalar_type());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == logits.size(1), "smoe::", op,
              ": selection_bias must be [E] = [", logits.size(1), "], got ", b.sizes());
  TORCH_CHECK(b.device() == logits.device(), "smoe::", op, ": selection_bias must be on ",
              logits.device(), " (logits' device), got ", b.device());
}

// The selection_bias of a CPU call made contiguous after checking that it is finite (undefined
// when None); the CUDA glue asserts finiteness on the device instead.
inline at::Tensor finite_bias_cpu(const c10::optional<at::Tensor>& bias, const char* op) {
  if (!bias.has_value()) return at::Tensor();
  at::Tensor b = bias->contiguous();
  const float* v = b.const_data_ptr<float>();
  for (int64_t e = 0; e < b.numel(); ++e) {
    TORCH_CHECK(std::isfinite(v[e]), "smoe::", op, ": selection_bias must be finite, got ", v[e],
                " at expert ", e);
  }
  return b;
}

inline void check_topk_softmax_backward(const at::Tensor& grad_weight, const at::Tensor& logits,
                                        const at::Tensor& expert) {
  check_float("topk_softmax_backward", "logits", logits);
  TORCH_CHECK(logits.dim() == 2, "smoe::topk_softmax_backward: logits must be 2-D [T, E], got ",
              logits.dim(), "-D");
  check_index("topk_softmax_backward", "expert", expert, logits, 2);
  const int64_t E = logits.size(1), k = expert.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "smoe::topk_softmax_backward: expert must be [T, k] with k in [1, ",
              "E] = [1, ", E, "], got k = ", k);
  check_int32_count("topk_softmax_backward", "expert", expert.numel(), "slots (T*k)");
  TORCH_CHECK(grad_weight.device() == logits.device() &&
                  grad_weight.scalar_type() == logits.scalar_type() &&
                  grad_weight.sizes() == expert.sizes(),
              "smoe::topk_softmax_backward: grad_weight must match expert's shape ", expert.sizes(),
              " and logits' dtype and device, got ", grad_weight.sizes(), " ",
              grad_weight.scalar_type(), " on ", grad_weight.device());
  TORCH_CHECK(expert.size(0) == logits.size(0),
              "smoe::topk_softmax_backward: expert must have T = ", logits.size(0), " rows, got ",
              expert.size(0));
}

inline void check_make_plan(const at::Tensor& expert, int64_t num_experts,
                            const std::optional<int64_t>& capacity,
                            const std::optional<at::Tensor>& priority) {
  TORCH_CHECK(expert.scalar_type() == at::kInt,
              "smoe::make_plan: expert must be a 2-D int32 [T, k] tensor, got ",
              index_type_name(expert.scalar_type()));
  TORCH_CHECK(expert.dim() == 2, "smoe::make_plan: expert must be a 2-D int32 [T, k] tensor, got ",
              expert.dim(), "-D");
  TORCH_CHECK(num_experts >= 1, "smoe::make_plan: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(num_experts < std::numeric_limits<int32_t>::max(),
              "smoe::make_plan: num_experts must fit in int32, got ", num_experts);
  TORCH_CHECK(expert.numel() < std::numeric_limits<int32_t>::max(),
              "smoe::make_plan: expert must have fewer than 2^31 - 1 slots (T*k), got ",
              expert.numel());
  TORCH_CHECK(!capacity.has_value() || *capacity >= 0,
              "smoe::make_plan: capacity must be >= 0 (or None for no limit), got ",
              capacity.value_or(0));
  if (priority.has_value()) {
    const at::Tensor& p = *priority;
    TORCH_CHECK(p.device() == expert.device(), "smoe::make_plan: priority must be on ",
                expert.device(), " like expert, got ", p.device());
    check_float("make_plan", "priority", p);
    const bool per_token = p.dim() == 1 && p.size(0) == expert.size(0);
    const bool per_rank = p.dim() == 2 && p.sizes() == expert.sizes();
    TORCH_CHECK(per_token || per_rank, "smoe::make_plan: priority must be [T] = [", expert.size(0),
                "] (one score per token) or [T, k] = ", expert.sizes(),
                " (one per choice rank), got ", p.sizes());
  }
}

// Batch Prioritized Routing compares priorities as float32 keys (the kernels' type). A float64
// priority is replaced by its dense rank (equal values, -0.0 and +0.0 included, share one; NaN
// stays NaN for the kernels' check), exact in float32 below 2^24 entries: rounding the values
// instead tied distinct priorities (1e300 and 1e301, 0 and a subnormal) that the reference orders.
inline at::Tensor priority_as_float(const at::Tensor& priority) {
  if (priority.scalar_type() != at::kDouble || priority.numel() == 0) {
    return priority.to(at::kFloat).contiguous();
  }
  const at::Tensor flat = priority.reshape(-1);
  const auto sorted = flat.sort();
  const at::Tensor values = std::get<0>(sorted), order = std::get<1>(sorted);
  at::Tensor step = values.ne(values.roll(1)).to(at::kFloat);
  step.narrow(0, 0, 1).zero_();
  const at::Tensor rank = step.cumsum(0);
  return rank.scatter(0, order, rank)
      .masked_fill_(flat.isnan(), std::numeric_limits<float>::quiet_NaN())
      .view(priority.sizes());
}

inline void check_expert_choice(const at::Tensor& logits, int64_t capacity,
                                const std::optional<int64_t>& group_size) {
  check_float("expert_choice", "logits", logits);
  TORCH_CHECK(logits.dim() == 2, "smoe::expert_choice: logits must be 2-D [T, E], got ",
              logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) >= 1,
              "smoe::expert_choice: logits must have at least one expert (E >= 1), got E = 0");
  TORCH_CHECK(capacity >= 0, "smoe::expert_choice: capacity must be >= 0, got ", capacity);
  TORCH_CHECK(!group_size.has_value() || *group_size >= 1,
              "smoe::expert_choice: group_size must be >= 1 (or None for one group), got ",
              group_size.value_or(0));
  TORCH_CHECK(logits.numel() < std::numeric_limits<int32_t>::max(),
              "smoe::expert_choice: logits must have fewer than 2^31 - 1 entries (T*E), got ",
              logits.numel());
}

inline void check_expert_choice_backward(const at::Tensor& grad_weight, const at::Tensor& logits,
                                         const at::Tensor& row) {
  check_expert_choice(logits, 0, std::nullopt);
  check_index("expert_choice_backward", "row", row, logits, 2);
  TORCH_CHECK(row.sizes() == logits.sizes(),
              "smoe::expert_choice_backward: row must have logits' shape [T, E] = ", logits.sizes(),
              ", got ", row.sizes());
  TORCH_CHECK(grad_weight.device() == logits.device() &&
                  grad_weight.scalar_type() == logits.scalar_type() &&
                  grad_weight.sizes() == logits.sizes(),
              "smoe::expert_choice_backward: grad_weight must match logits' shape ", logits.sizes(),
              ", dtype and device, got ", grad_weight.sizes(), " ", grad_weight.scalar_type(),
              " on ", grad_weight.device());
}

// Shared by permute, combine and their backwards: the plan tensors agree with x / y_sorted. A plan
// has M sorted rows (M = T*k from make_plan, E*C from expert_choice): token and slot have M
// entries, row is [T, k].
inline void check_plan(const char* op, const at::Tensor& data, int64_t rows_expected,
                       const char* rows_name, const at::Tensor* token, const at::Tensor* slot,
                       const at::Tensor& row) {
  if (token) check_index(op, "token", *token, data, 1);
  if (slot) check_index(op, "slot", *slot, data, 1);
  check_index(op, "row", row, data, 2);
  check_int32_count(op, "row", row.numel(), "slots (T*k)");
  if (token) check_int32_count(op, "token", token->size(0), "plan rows (M)");
  if (token && slot) {
    TORCH_CHECK(slot->size(0) == token->size(0), "smoe::", op,
                ": slot must have as many entries as token (M = ", token->size(0), "), got ",
                slot->size(0));
  }
  TORCH_CHECK(rows_expected < 0 || data.size(0) == rows_expected, "smoe::", op, ": ", rows_name,
              " must have ", rows_expected, " rows, got ", data.size(0));
}

inline void check_permute(const at::Tensor& x, const at::Tensor& token, const at::Tensor& row) {
  check_float("permute", "x", x);
  TORCH_CHECK(x.dim() == 2, "smoe::permute: x must be 2-D [T, d], got ", x.dim(), "-D");
  check_plan("permute", x, row.dim() == 2 ? row.size(0) : -1, "x (T = row.size(0))", &token,
             nullptr, row);
}

inline void check_permute_backward(const at::Tensor& grad_out, const at::Tensor& row) {
  check_float("permute_backward", "grad_out", grad_out);
  TORCH_CHECK(grad_out.dim() == 2, "smoe::permute_backward: grad_out must be 2-D [M, d], got ",
              grad_out.dim(), "-D");
  check_plan("permute_backward", grad_out, -1, "grad_out", nullptr, nullptr, row);
}

inline void check_combine(const char* op, const at::Tensor& y_sorted, const at::Tensor& weight,
                          const at::Tensor& token, const at::Tensor& slot, const at::Tensor& row) {
  check_float(op, "y_sorted", y_sorted);
  TORCH_CHECK(y_sorted.dim() == 2, "smoe::", op, ": y_sorted must be 2-D [M, d], got ",
              y_sorted.dim(), "-D");
  TORCH_CHECK(weight.device() == y_sorted.device(), "smoe::", op, ": weight must be on ",
              y_sorted.device(), " like y_sorted, got ", weight.device());
  TORCH_CHECK(weight.scalar_type() == y_sorted.scalar_type(), "smoe::", op,
              ": weight must have y_sorted's dtype ", y_sorted.scalar_type(), ", got ",
              weight.scalar_type());
  check_plan(op, y_sorted, token.dim() == 1 ? token.size(0) : -1, "y_sorted (M = token.size(0))",
             &token, &slot, row);
  TORCH_CHECK(weight.sizes() == row.sizes(), "smoe::", op,
              ": weight must have row's shape [T, k] = ", row.sizes(), ", got ", weight.sizes());
}

inline void check_combine_backward(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                   const at::Tensor& weight, const at::Tensor& token,
                                   const at::Tensor& slot, const at::Tensor& row) {
  check_combine("combine_backward", y_sorted, weight, token, slot, row);
  check_float("combine_backward", "grad_out", grad_out);
  TORCH_CHECK(grad_out.device() == y_sorted.device(),
              "smoe::combine_backward: grad_out must be on ", y_sorted.device(),
              " like y_sorted, got ", grad_out.device());
  TORCH_CHECK(
      grad_out.dim() == 2 && grad_out.size(0) == row.size(0) &&
          grad_out.size(1) == y_sorted.size(1) && grad_out.scalar_type() == y_sorted.scalar_type(),
      "smoe::combine_backward: grad_out must be [T, d] = [", row.size(0), ", ", y_sorted.size(1),
      "] with y_sorted's dtype, got ", grad_out.sizes(), " ", grad_out.scalar_type());
}

inline void check_swiglu(const char* op, const at::Tensor& h) {
  check_float(op, "h", h);
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, "smoe::", op,
              ": h must be 2-D [M, 2*f] (gate columns, then up columns), got shape ", h.sizes());
}

inline void check_swiglu_backward(const at::Tensor& grad_out, const at::Tensor& h) {
  check_swiglu("swiglu_backward", h);
  TORCH_CHECK(grad_out.device() == h.device() && grad_out.scalar_type() == h.scalar_type() &&
                  grad_out.dim() == 2 && grad_out.size(0) == h.size(0) &&
                  grad_out.size(1) == h.size(1) / 2,
              "smoe::swiglu_backward: grad_out must be [M, f] = [", h.size(0), ", ", h.size(1) / 2,
              "] with h's dtype and device, got ", grad_out.sizes(), " ", grad_out.scalar_type(),
              " on ", grad_out.device());
}

// cosine_scores (X-MoE): the temperature floor, and the output dtype (at least float32).
constexpr double kMinTemperature = 1e-4;

inline at::ScalarType cosine_out_dtype(const at::Tensor& h) {
  return h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cosine_scores(const char* op, const at::Tensor& h, const at::Tensor& proj,
                                const at::Tensor& expert_emb, const at::Tensor& temperature,
                                double eps) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"proj", &proj},
                                {"expert_emb", &expert_emb},
                                {"temperature", &temperature}}) {
    TORCH_CHECK(t->device() == h.device(), "smoe::", op, ": ", name, " must be on ", h.device(),
                " like h, got ", t->device());
  }
  check_float(op, "h", h);
  TORCH_CHECK(proj.scalar_type() == h.scalar_type(), "smoe::", op, ": proj must have h's dtype ",
              h.scalar_type(), ", got ", proj.scalar_type());
  TORCH_CHECK(expert_emb.scalar_type() == h.scalar_type(), "smoe::", op,
              ": expert_emb must have h's dtype ", h.scalar_type(), ", got ",
              expert_emb.scalar_type());
  check_float(op, "temperature", temperature);
  TORCH_CHECK(h.dim() == 2, "smoe::", op, ": h must be 2-D [T, d], got ", h.dim(), "-D");
  TORCH_CHECK(proj.dim() == 2 && proj.size(1) == h.size(1) && proj.size(0) >= 1, "smoe::", op,
              ": proj must be [d_e, d] with d = h.size(1) = ", h.size(1),
              " and d_e >= 1, got shape ", proj.sizes());
  TORCH_CHECK(
      expert_emb.dim() == 2 && expert_emb.size(1) == proj.size(0) && expert_emb.size(0) >= 1,
      "smoe::", op, ": expert_emb must be [N, d_e] with d_e = proj.size(0) = ", proj.size(0),
      " and N >= 1, got shape ", expert_emb.sizes());
  TORCH_CHECK(temperature.dim() == 0, "smoe::", op,
              ": temperature must be a 0-dim (scalar) tensor, got shape ", temperature.sizes());
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "smoe::", op, ": eps must be finite and > 0, got ",
              eps);
}

inline void check_cosine_scores_backward(const at::Tensor& grad_cos, const at::Tensor& grad_logits,
                                         const at::Tensor& h, const at::Tensor& proj,
                                         const at::Tensor& expert_emb,
                                         const at::Tensor& temperature, double eps) {
  const char* op = "cosine_scores_backward";
  check_cosine_scores(op, h, proj, expert_emb, temperature, eps);
  const at::ScalarType out = cosine_out_dtype(h);
  for (const auto& [name, g] : {std::pair<const char*, const at::Tensor*>{"grad_cos", &grad_cos},
                                {"grad_logits", &grad_logits}}) {
    TORCH_CHECK(g->device() == h.device() && g->scalar_type() == out && g->dim() == 2 &&
                    g->size(0) == h.size(0) && g->size(1) == expert_emb.size(0),
                "smoe::", op, ": ", name, " must be [T, N] = [", h.size(0), ", ",
                expert_emb.size(0), "] ", out, " on ", h.device(), ", got ", g->sizes(), " ",
                g->scalar_type(), " on ", g->device());
  }
}

// w is "transposed" when each w[e] is column-major, i.e. a transposed view of [E, d_out, d_in].
inline bool is_transposed_weight(const at::Tensor& w) {
  return w.stride(2) != 1 && w.stride(1) == 1;
}

}  // namespace smoe::ops
