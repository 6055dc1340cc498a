// CPU glue of momentum_update and momentum_update_backward. The work is split into fixed blocks
// of kBlock elements, each computed by one kernel call whatever the thread count, so results are
// bitwise independent of it. Inputs are made contiguous here (outputs are contiguous).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string_view>
#include <tuple>

#include "checks_momentum.h"
#include "cpu/momentum_kernel.h"

namespace smoe::ops {
namespace {

using MomentumOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr int64_t kBlock = 8192;

template <typename A>
cpu::MomentumParams<A> params(const MomentumOptions& o) {
  return {static_cast<A>(o.mu),          static_cast<A>(o.gamma),
          static_cast<A>(o.sign),        static_cast<A>(o.beta1),
          static_cast<A>(o.beta2),       static_cast<A>(1.0 - o.beta1),
          static_cast<A>(1.0 - o.beta2), static_cast<A>(o.sign * o.gamma1),
          static_cast<A>(o.eps),         static_cast<A>(o.robust_a),
          static_cast<A>(o.robust_b)};
}

// Calls fn(begin, end) once per block of kBlock elements, blocks spread over torch's threads.
template <typename Fn>
void for_blocks(int64_t n, const Fn& fn) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b * kBlock, std::min(n, (b + 1) * kBlock));
  });
}

at::Tensor state_or_empty(bool adam, const at::Tensor& u, const at::TensorOptions& state) {
  return adam ? at::empty(u.sizes(), state) : at::empty({0}, state);
}

template <typename A>
const A* cptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

MomentumOut momentum_update_cpu(const at::Tensor& u_in, const at::Tensor& m_in,
                                const std::optional<at::Tensor>& p_in,
                                const std::optional<at::Tensor>& v_in, std::string_view kind_name,
                                double mu, double gamma, double sign, double beta1, double beta2,
                                double gamma1, double eps, double robust_a, double robust_b) {
  const MomentumOptions o{mu, gamma, sign, beta1, beta2, gamma1, eps, robust_a, robust_b};
  const MomentumKind kind =
      check_momentum_update("momentum_update", u_in, m_in, p_in, v_in, kind_name, o);
  const bool adam = kind == MomentumKind::kAdam;
  const auto state = u_in.options().dtype(momentum_state_dtype(u_in));
  at::Tensor delta = at::empty(u_in.sizes(), u_in.options());
  at::Tensor m_out = at::empty(u_in.sizes(), state);
  at::Tensor p_out = state_or_empty(adam, u_in, state);
  at::Tensor v_out = state_or_empty(adam, u_in, state);
  const int64_t n = u_in.numel();
  if (n == 0) return {delta, m_out, p_out, v_out};
  const at::Tensor u = u_in.contiguous(), m = m_in.contiguous();
  const at::Tensor p = adam ? p_in->contiguous() : at::Tensor();
  const at::Tensor v = adam ? v_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, u.scalar_type(), "momentum_update", [&] {
        using T = typename kernel_type<scalar_t>::type;
        using A = acc_t<T>;
        const auto q = params<A>(o);
        const auto* up = reinterpret_cast<const T*>(u.const_data_ptr<scalar_t>());
        auto* dp = reinterpret_cast<T*>(delta.mutable_data_ptr<scalar_t>());
        const A *mp = cptr<A>(m), *pp = cptr<A>(p), *vp = cptr<A>(v);
        A* mo = m_out.mutable_data_ptr<A>();
        A* po = adam ? p_out.mutable_data_ptr<A>() : nullptr;
        A* vo = adam ? v_out.mutable_data_ptr<A>() : nullptr;
        for_blocks(n, [&](int64_t b, int64_t e) {
          cpu::momentum_update(static_cast<int>(kind), up, mp, pp, vp, q, b, e, dp, mo, po, vo);
        });
      });
  return {delta, m_out, p_out, v_out};
}

MomentumOut momentum_update_backward_cpu(
    const at::Tensor& grad_delta_in, const at::Tensor& grad_m_in, const at::Tensor& grad_p_in,
    const at::Tensor& grad_v_in, const at::Tensor& u_in, const at::Tensor& m_in,
    const std::optional<at::Tensor>& p_in, const std::optional<at::Tensor>& v_in,
    std::string_view kind_name, double mu, double gamma, double sign, double beta1, double beta2,
    double gamma1, double eps, double robust_a, double robust_b) {
  const MomentumOptions o{mu, gamma, sign, beta1, beta2, gamma1, eps, robust_a, robust_b};
  const MomentumKind kind = check_momentum_update_backward(
      grad_delta_in, grad_m_in, grad_p_in, grad_v_in, u_in, m_in, p_in, v_in, kind_name, o);
  const bool adam = kind == MomentumKind::kAdam;
  const auto state = u_in.options().dtype(momentum_state_dtype(u_in));
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
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, u_in.scalar_type(), "momentum_update_backward", [&] {
        using T = typename kernel_type<scalar_t>::type;
        using A = acc_t<T>;
        const auto q = params<A>(o);
        const auto* gdp = reinterpret_cast<const T*>(gd.const_data_ptr<scalar_t>());
        const auto* up = adam ? reinterpret_cast<const T*>(u.const_data_ptr<scalar_t>()) : nullptr;
        auto* gu = reinterpret_cast<T*>(grad_u.mutable_data_ptr<scalar_t>());
        const A *gmp = cptr<A>(gm), *gpp = cptr<A>(gp), *gvp = cptr<A>(gv);
        const A *pp = cptr<A>(p), *vp = cptr<A>(v);
        A* gmo = grad_m.mutable_data_ptr<A>();
        A* gpo = adam ? grad_p.mutable_data_ptr<A>() : nullptr;
        A* gvo = adam ? grad_v.mutable_data_ptr<A>() : nullptr;
        for_blocks(n, [&](int64_t b, int64_t e) {
          cpu::momentum_update_backward(static_cast<int>(kind), gdp, gmp, gpp, gvp, up, pp, vp, q,
                                        b, e, gu, gmo, gpo, gvo);
        });
      });
  return {grad_u, grad_m, grad_p, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("momentum_update", &momentum_update_cpu);
  m.impl("momentum_update_backward", &momentum_update_backward_cpu);
}

}  // namespace smoe::ops
