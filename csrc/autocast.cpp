// Autocast rules of the ops that run matmuls, so that a model under torch.autocast runs its experts
// in the autocast dtype as nn.Linear does (transformers' Trainer with bf16=True, say). Only
// grouped_mm, gather_mm and expert_mlp run in lower precision: their floating inputs (float32;
// float64 is left alone, as autocast does for aten::mm) are cast to the autocast dtype of the device, through autocast's
// cache of casted weights. The routing ops keep their own fp32 rule (the routers disable autocast)
// and the elementwise ops (swiglu, permute, combine) follow their inputs' dtype.
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

namespace smoe::ops {
namespace {

at::Tensor call_grouped_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
                           const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("smoe::grouped_mm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  return op.call(x, w, offsets, bias);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor grouped_mm_autocast(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
                               const std::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  std::optional<at::Tensor> cast_bias;
  if (bias.has_value()) cast_bias = at::autocast::cached_cast(dtype, *bias, device);
  return call_grouped_mm(at::autocast::cached_cast(dtype, x, device),
                         at::autocast::cached_cast(dtype, w, device), offsets, cast_bias);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor gather_mm_autocast(const at::Tensor& x, const at::Tensor& token, const at::Tensor& row,
                              const at::Tensor& w, const at::Tensor& offsets,
                              const std::optional<at::Tensor>& bias, int64_t gather_min_bytes) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("smoe::gather_mm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, int64_t)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  std::optional<at::Tensor> cast_bias;
  if (bias.has_value()) cast_bias = at::autocast::cached_cast(dtype, *bias, device);
  return op.call(at::autocast::cached_cast(dtype, x, device), token, row,
                 at::autocast::cached_cast(dtype, w, device), offsets, cast_bias,
                 gather_min_bytes);
}

template <c10::DeviceType device>
std::optional<at::Tensor> cast_optional(at::ScalarType dtype, const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return at::autocast::cached_cast(dtype, *t, device);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor expert_mlp_autocast(const at::Tensor& x, const std::optional<at::Tensor>& token,
                               const std::optional<at::Tensor>& row, const at::Tensor& offsets,
                               const at::Tensor& w_in, const std::optional<at::Tensor>& b_in,
                               const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
                               c10::string_view activation, int64_t fuse_min_bytes) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("smoe::expert_mlp", "")
                       .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, const at::Tensor&,
                                         const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, int64_t)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return op.call(at::autocast::cached_cast(dtype, x, device), token, row, offsets,
                 at::autocast::cached_cast(dtype, w_in, device), cast_optional<device>(dtype, b_in),
                 at::autocast::cached_cast(dtype, w_out, device),
                 cast_optional<device>(dtype, b_out), activation, fuse_min_bytes);
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, AutocastCPU, m) {
  m.impl("grouped_mm", &grouped_mm_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("gather_mm", &gather_mm_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("expert_mlp", &expert_mlp_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(smoe, AutocastCUDA, m) {
  m.impl("grouped_mm", &grouped_mm_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("gather_mm", &gather_mm_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("expert_mlp",
         &expert_mlp_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace smoe::ops
