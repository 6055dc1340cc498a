// CPU glue of swiglu and swiglu_backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu/swiglu_kernel.h"
#include "cpu/workspace.h"

namespace smoe::ops {
namespace {

int64_t grain(int64_t f) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, f)); }

at::Tensor swiglu_cpu(const at::Tensor& h_in) {
  check_swiglu("swiglu", h_in);
  const at::Tensor h = rows_dense(h_in);
  const int64_t M = h.size(0), f = h.size(1) / 2;
  at::Tensor out = workspace::empty({M, f}, h.options());
  if (M == 0 || f == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "swiglu", [&] {
    using T = typename kernel_type<scalar_t>::type;
    const auto* hp = reinterpret_cast<const T*>(h.const_data_ptr<scalar_t>());
    auto* o = reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>());
    at::parallel_for(0, M, grain(f),
                     [&](int64_t b, int64_t e) { cpu::swiglu(hp, h.stride(0), f, b, e, o); });
  });
  return out;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& h_in) {
  check_swiglu_backward(grad_in, h_in);
  const at::Tensor h = rows_dense(h_in);
  const at::Tensor grad = rows_dense(grad_in);
  const int64_t M = h.size(0), f = h.size(1) / 2;
  at::Tensor dh = workspace::empty({M, 2 * f}, h.options());
  if (M == 0 || f == 0) return dh;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "swiglu_backward", [&] {
        using T = typename kernel_type<scalar_t>::type;
        const auto* hp = reinterpret_cast<const T*>(h.const_data_ptr<scalar_t>());
        const auto* gp = reinterpret_cast<const T*>(grad.const_data_ptr<scalar_t>());
        auto* o = reinterpret_cast<T*>(dh.mutable_data_ptr<scalar_t>());
        at::parallel_for(0, M, grain(f), [&](int64_t b, int64_t e) {
          cpu::swiglu_backward(gp, grad.stride(0), hp, h.stride(0), f, b, e, o);
        });
      });
  return dh;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace smoe::ops
