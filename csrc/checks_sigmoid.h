// Argument checks of topk_sigmoid and topk_sigmoid_backward (DeepSeek-V3 routing), shared by the
// CPU and CUDA glue. Each error names the argument and what was expected.
// The fakes run the same checks from a Python mirror, smoe/ops/_checks_routing.py, which
// tests/bad_inputs/test_fakes.py holds to these messages: change both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "checks.h"

namespace smoe::ops {

inline void check_topk_sigmoid(const at::Tensor& logits, int64_t k, int64_t n_group,
                               int64_t topk_group, double scale) {
  check_float("topk_sigmoid", "logits", logits);
  TORCH_CHECK(logits.dim() == 2, "smoe::topk_sigmoid: logits must be 2-D [T, E], got ",
              logits.dim(), "-D");
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1,
              "smoe::topk_sigmoid: logits must have at least one expert (E >= 1), got E = 0");
  TORCH_CHECK(n_group >= 1 && E % n_group == 0,
              "smoe::topk_sigmoid: n_group must be >= 1 and divide E = ", E, ", got ", n_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group,
              "smoe::topk_sigmoid: topk_group must be in [1, n_group] = [1, ", n_group, "], got ",
              topk_group);
  const int64_t reachable = topk_group * (E / n_group);
  TORCH_CHECK(k >= 1 && k <= reachable,
              "smoe::topk_sigmoid: k must be in [1, topk_group * E / n_group] = [1, ", reachable,
              "], got ", k);
  TORCH_CHECK(std::isfinite(scale), "smoe::topk_sigmoid: scale must be finite, got ", scale);
  check_int32_count("topk_sigmoid", "logits", logits.size(0) * k, "slots (T*k)");
}

inline void check_topk_sigmoid_backward(const at::Tensor& grad_weight, const at::Tensor& logits,
                                        const at::Tensor& expert, double scale) {
  constexpr const char* op = "topk_sigmoid_backward";
  check_float(op, "logits", logits);
  TORCH_CHECK(logits.dim() == 2, "smoe::", op, ": logits must be 2-D [T, E], got ", logits.dim(),
              "-D");
  check_index(op, "expert", expert, logits, 2);
  const int64_t E = logits.size(1), k = expert.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "smoe::", op, ": expert must be [T, k] with k in [1, E] = [1, ", E,
              "], got k = ", k);
  check_int32_count(op, "expert", expert.numel(), "slots (T*k)");
  TORCH_CHECK(grad_weight.device() == logits.device() &&
                  grad_weight.scalar_type() == logits.scalar_type() &&
                  grad_weight.sizes() == expert.sizes(),
              "smoe::", op, ": grad_weight must match expert's shape ", expert.sizes(),
              " and logits' dtype and device, got ", grad_weight.sizes(), " ",
              grad_weight.scalar_type(), " on ", grad_weight.device());
  TORCH_CHECK(expert.size(0) == logits.size(0), "smoe::", op,
              ": expert must have T = ", logits.size(0), " rows, got ", expert.size(0));
  TORCH_CHECK(std::isfinite(scale), "smoe::", op, ": scale must be finite, got ", scale);
}

}  // namespace smoe::ops
