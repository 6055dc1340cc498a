// CUDA glue of momentum_update and momentum_update_backward: float32/float16/bfloat16 u with
// float32 state (float64 is CPU only), float32 math. Inputs are made contiguous here. No host
// sync: the options are host scalars and every check reads shapes only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "checks_momentum.h"
#include "cuda/momentum.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

using MomentumOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

cuda::MomentumParams params(const MomentumOptions& o) {
  return {static_cast<float>(o.mu),          static_cast<float>(o.gamma),
          static_cast<float>(o.sign),        static_cast<float>(o.beta1),
          static_cast<float>(o.beta2),       static_cast<float>(1.0 - o.beta1),
          static_cast<float>(1.0 - o.beta2), static_cast<float>(o.sign * o.gamma1),
          static_cast<float>(o.eps),         static_cast<float>(o.robust_a),
          static_cast<float>(o.robust_b)};
}

at::Tensor state_or_empty(bool adam, const at::Tensor& u, const at::TensorOptions& state) {
  return adam ? at::empty(u.sizes(), state) : at::empty({0}, state);
}

const float* fptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

float* fmut(at::Tensor& t, bool use) { return use ? t.mutable_data_ptr<float>() : nullptr; }

MomentumOut momentum_update_cuda(const at::Tensor& u_in, const at::Tensor& m_in,
                                 const std::optional<at::Tensor>& p_in,
                                 const std::optional<at::Tensor>& v_in, std::string_view kind_name,
                                 double mu, double gamma, double sign, double beta1, double beta2,
                                 double gamma1, double eps, double robust_a, double robust_b) {
  const MomentumOptions o{mu, gamma, sign, beta1, beta2, gamma1, eps, robust_a, robust_b};
  const MomentumKind kind =
      check_momentum_update("momentum_update", u_in, m_in, p_in, v_in, kind_name, o);
  check_not_double("momentum_update", u_in);
  const c10::cuda::CUDAGuard guard(u_in.device());
  check_device_arch(u_in.device());
  const bool adam = kind == MomentumKind::kAdam;
  const auto state = u_in.options().dtype(at::kFloat);
  at::Tensor delta = at::empty(u_in.sizes(), u_in.options());
  at::Tensor m_out = at::empty(u_in.sizes(), state);
  at::Tensor p_out = state_or_empty(adam, u_in, state);
  at::Tensor v_out = state_or_empty(adam, u_in, state);
  const int64_t n = u_in.numel();
  if (n == 0) return {delta, m_out, p_out, v_out};
  const at::Tensor u = u_in.contiguous(), m = m_in.contiguous();
  const at::Tensor p = adam ? p_in->contiguous() : at::Tensor();
  const at::Tensor v = adam ? v_in->contiguous() : at::Tensor();
  SMOE_CUDA_DISPATCH(u.scalar_type(), "momentum_update", [&] {
    C10_CUDA_CHECK(cuda::momentum_update(static_cast<int>(kind), kptr<scalar_t>(u), fptr(m),
                                         fptr(p), fptr(v), n, params(o), kmut<scalar_t>(delta),
                                         m_out.mutable_data_ptr<float>(), fmut(p_out, adam),
                                         fmut(v_out, adam), c10::cuda::getCurrentCUDAStream()));
  });
  return {delta, m_out, p_out, v_out};
}

MomentumOut momentum_update_backward_cuda(
    const at::Tensor& grad_delta_in, const at::Tensor& grad_m_in, const at::Tensor& grad_p_in,
    const at::Tensor& grad_v_in, const at::Tensor& u_in, const at::Tensor& m_in,
    const std::optional<at::Tensor>& p_in, const std::optional<at::Tensor>& v_in,
    std::string_view kind_name, double mu, double gamma, double sign, double beta1, double beta2,
    double gamma1, double eps, double robust_a, double robust_b) {
  const MomentumOptions o{mu, gamma, sign, beta1, beta2, gamma1, eps, robust_a, robust_b};
  const MomentumKind kind = check_momentum_update_backward(
      grad_delta_in, grad_m_in, grad_p_in, grad_v_in, u_in, m_in, p_in, v_in, kind_name, o);
  check_not_double("momentum_update_backward", u_in);
  const c10::cuda::CUDAGuard guard(u_in.device());
  check_device_arch(u_in.device());
  const bool adam = kind == MomentumKind::kAdam;
  const auto state = u_in.options().dtype(at::kFloat);
  at::Tensor grad_u = at::empty(u_in.sizes(), u_in.options());
  at::Tensor grad_m = at::empty(u_in.sizes(), state);
  at::Tensor grad_p = state_or_empty(adam, u_in, state);
  at::Tensor grad_v = state_or_empty(adam, u_in, state);
  const int64_t n = u_in.numel();
  if (n == 0) return {grad_u, grad_m, grad_p, grad_v};
  // m is never read (no gradient depends on it); u, p, v only by the Adam step.
  const at::Tensor gd = grad_delta_in.contiguous(), gm = grad_m_in.contiguous();
  const at::Tensor gp = adam ? grad_p_in.contiguous() : at::Tensor();
  const at::Tensor gv = adam ? grad_v_in.contiguous() : at::Tensor();
  const at::Tensor u = adam ? u_in.contiguous() : at::Tensor();
  const at::Tensor p = adam ? p_in->contiguous() : at::Tensor();
  const at::Tensor v = adam ? v_in->contiguous() : at::Tensor();
  SMOE_CUDA_DISPATCH(u_in.scalar_type(), "momentum_update_backward", [&] {
    const auto* up = adam ? kptr<scalar_t>(u) : nullptr;
    C10_CUDA_CHECK(cuda::momentum_update_backward(
        static_cast<int>(kind), kptr<scalar_t>(gd), fptr(gm), fptr(gp), fptr(gv), up, fptr(p),
        fptr(v), n, params(o), kmut<scalar_t>(grad_u), grad_m.mutable_data_ptr<float>(),
        fmut(grad_p, adam), fmut(grad_v, adam), c10::cuda::getCurrentCUDAStream()));
  });
  return {grad_u, grad_m, grad_p, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("momentum_update", &momentum_update_cuda);
  m.impl("momentum_update_backward", &momentum_update_backward_cuda);
}

}  // namespace smoe::ops
