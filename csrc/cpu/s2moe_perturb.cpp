// CPU glue of s2moe_perturb and s2moe_perturb_backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "checks.h"
#include "checks_s2moe.h"
#include "cpu/s2moe_perturb_kernel.h"

namespace smoe::ops {
namespace {

int64_t grain(int64_t per_a) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_a)); }

// A one-element tensor: the sum of a contiguous float/double buffer in index order (the same at
// any thread count, unlike at::sum).
at::Tensor sum_in_order(const at::Tensor& t) {
  at::Tensor out = at::empty({1}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "sum_in_order", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    scalar_t acc = 0;
    for (int64_t i = 0; i < t.numel(); ++i) acc += p[i];
    *out.mutable_data_ptr<scalar_t>() = acc;
  });
  return out;
}

template <typename T>
cpu::Stat<T> stat(const at::Tensor& t, bool scalar, int64_t C) {
  return {reinterpret_cast<const T*>(t.const_data_ptr()), scalar ? 0 : C, scalar ? 0 : 1};
}

at::Tensor s2moe_perturb_cpu(const at::Tensor& x_in, const at::Tensor& n1_in,
                             const at::Tensor& n2_in, const at::Tensor& mu_in,
                             const at::Tensor& s_mul_in, const at::Tensor& s_add_in) {
  check_s2moe_perturb("s2moe_perturb", x_in, n1_in, n2_in, mu_in, s_mul_in, s_add_in);
  const PerturbView v = perturb_view("s2moe_perturb", x_in, {&mu_in, &s_mul_in, &s_add_in});
  const at::Tensor x = x_in.contiguous(), n1 = n1_in.contiguous(), n2 = n2_in.contiguous();
  const at::Tensor mu = mu_in.contiguous(), sm = s_mul_in.contiguous(), sa = s_add_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "s2moe_perturb", [&] {
    using T = typename kernel_type<scalar_t>::type;
    const auto p = [](const at::Tensor& t) {
      return reinterpret_cast<const T*>(t.const_data_ptr());
    };
    const auto s_mu = stat<T>(mu, v.scalar[0], v.C), s_sm = stat<T>(sm, v.scalar[1], v.C),
               s_sa = stat<T>(sa, v.scalar[2], v.C);
    auto* o = reinterpret_cast<T*>(out.mutable_data_ptr());
    at::parallel_for(0, v.A, grain(v.S * v.C), [&](int64_t b, int64_t e) {
      cpu::s2moe_perturb<T>(p(x), p(n1), p(n2), s_mu, s_sm, s_sa, v.S, v.C, b, e, o);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> s2moe_perturb_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& n1_in,
    const at::Tensor& n2_in, const at::Tensor& mu_in, const at::Tensor& s_mul_in,
    const at::Tensor& s_add_in, std::array<bool, 4> mask) {
  const char* op = "s2moe_perturb_backward";
  check_s2moe_perturb(op, x_in, n1_in, n2_in, mu_in, s_mul_in, s_add_in);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type() &&
                  grad_in.device() == x_in.device(),
              "smoe::", op, ": grad must match x's shape ", x_in.sizes(),
              ", dtype and device, got ", grad_in.sizes(), " ", grad_in.scalar_type(), " on ",
              grad_in.device());
  const PerturbView v = perturb_view(op, x_in, {&mu_in, &s_mul_in, &s_add_in});
  const at::Tensor g = grad_in.contiguous(), x = x_in.contiguous(), n1 = n1_in.contiguous(),
                   n2 = n2_in.contiguous(), sm = s_mul_in.contiguous();
  // (outputs not asked for: an empty [0] tensor each, never one shared: outputs must not alias)
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = mask[0] ? at::empty(x.sizes(), x.options()) : empty();
  const std::array<const at::Tensor*, 3> stats = {&mu_in, &s_mul_in, &s_add_in};
  std::array<at::Tensor, 3> grads = {empty(), empty(), empty()};
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::array<at::Tensor, 3> partial;  // [A, C] sums over S, in the accumulation type
  for (int i = 0; i < 3; ++i) {
    if (mask[i + 1]) partial[i] = at::empty({v.A, v.C}, x.options().dtype(acc));
  }
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "s2moe_perturb_backward", [&] {
          using T = typename kernel_type<scalar_t>::type;
          using Acc = acc_t<T>;
          const auto p = [](const at::Tensor& t) {
            return reinterpret_cast<const T*>(t.const_data_ptr());
          };
          const auto acc_ptr = [&](int i) {
            return partial[i].defined() ? reinterpret_cast<Acc*>(partial[i].mutable_data_ptr())
                                        : nullptr;
          };
          T* gx = mask[0] ? reinterpret_cast<T*>(grad_x.mutable_data_ptr()) : nullptr;
          const auto s_sm = stat<T>(sm, v.scalar[1], v.C);
          at::parallel_for(0, v.A, grain(v.S * v.C), [&](int64_t b, int64_t e) {
            cpu::s2moe_perturb_backward<T>(p(g), p(x), p(n1), p(n2), s_sm, v.S, v.C, b, e, gx,
                                           acc_ptr(0), acc_ptr(1), acc_ptr(2));
          });
        });
  } else {
    for (int i = 0; i < 3; ++i) {
      if (partial[i].defined()) partial[i].zero_();
    }
  }
  for (int i = 0; i < 3; ++i) {  // [A, C] partials -> the statistic's shape
    if (!mask[i + 1]) continue;
    at::Tensor r = partial[i];
    if (v.scalar[i]) r = sum_in_order(partial[i]);
    grads[i] = r.to(x.scalar_type()).reshape(stats[i]->sizes()).contiguous();
  }
  return {grad_x, grads[0], grads[1], grads[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("s2moe_perturb", &s2moe_perturb_cpu);
  m.impl("s2moe_perturb_backward", &s2moe_perturb_backward_cpu);
}

}  // namespace smoe::ops
