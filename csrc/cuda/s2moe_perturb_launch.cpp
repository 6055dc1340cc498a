// CUDA glue of s2moe_perturb and s2moe_perturb_backward (float32, float16, bfloat16).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "checks.h"
#include "checks_s2moe.h"
#include "cuda/s2moe_perturb.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

at::Tensor s2moe_perturb_cuda(const at::Tensor& x_in, const at::Tensor& n1_in,
                              const at::Tensor& n2_in, const at::Tensor& mu_in,
                              const at::Tensor& s_mul_in, const at::Tensor& s_add_in) {
  check_s2moe_perturb("s2moe_perturb", x_in, n1_in, n2_in, mu_in, s_mul_in, s_add_in);
  check_not_double("s2moe_perturb", x_in);
  const PerturbView v = perturb_view("s2moe_perturb", x_in, {&mu_in, &s_mul_in, &s_add_in});
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_device_arch(x_in.device());
  const at::Tensor x = x_in.contiguous(), n1 = n1_in.contiguous(), n2 = n2_in.contiguous();
  const at::Tensor mu = mu_in.contiguous(), sm = s_mul_in.contiguous(), sa = s_add_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(x.scalar_type(), "s2moe_perturb", [&] {
    C10_CUDA_CHECK(cuda::s2moe_perturb(kptr<scalar_t>(x), kptr<scalar_t>(n1), kptr<scalar_t>(n2),
                                       kptr<scalar_t>(mu), kptr<scalar_t>(sm), kptr<scalar_t>(sa),
                                       v.scalar[0], v.scalar[1], v.scalar[2], v.A, v.S, v.C,
                                       kmut<scalar_t>(out), stream));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> s2moe_perturb_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& n1_in,
    const at::Tensor& n2_in, const at::Tensor& mu_in, const at::Tensor& s_mul_in,
    const at::Tensor& s_add_in, std::array<bool, 4> mask) {
  const char* op = "s2moe_perturb_backward";
  check_s2moe_perturb(op, x_in, n1_in, n2_in, mu_in, s_mul_in, s_add_in);
  check_not_double(op, x_in);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type() &&
                  grad_in.device() == x_in.device(),
              "smoe::", op, ": grad must match x's shape ", x_in.sizes(),
              ", dtype and device, got ", grad_in.sizes(), " ", grad_in.scalar_type(), " on ",
              grad_in.device());
  const PerturbView v = perturb_view(op, x_in, {&mu_in, &s_mul_in, &s_add_in});
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_device_arch(x_in.device());
  const at::Tensor g = grad_in.contiguous(), x = x_in.contiguous(), n1 = n1_in.contiguous(),
                   n2 = n2_in.contiguous(), sm = s_mul_in.contiguous();
  // (outputs not asked for: an empty [0] tensor each, never one shared: outputs must not alias)
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = mask[0] ? at::empty(x.sizes(), x.options()) : empty();
  const std::array<const at::Tensor*, 3> stats = {&mu_in, &s_mul_in, &s_add_in};
  std::array<at::Tensor, 3> partial;
  for (int i = 0; i < 3; ++i) {
    if (!mask[i + 1]) continue;
    const int64_t size = v.scalar[i] ? std::max<int64_t>(v.A * v.C, 1) : v.A * v.C;
    partial[i] = at::zeros({size}, x.options().dtype(at::kFloat));
  }
  const auto buf = [&](int i) {
    return partial[i].defined() ? partial[i].mutable_data_ptr<float>() : nullptr;
  };
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(x.scalar_type(), "s2moe_perturb_backward", [&] {
    C10_CUDA_CHECK(cuda::s2moe_perturb_backward(
        kptr<scalar_t>(g), kptr<scalar_t>(x), kptr<scalar_t>(n1), kptr<scalar_t>(n2),
        kptr<scalar_t>(sm), v.scalar[1], v.scalar[0], v.scalar[2], v.A, v.S, v.C,
        mask[0] ? kmut<scalar_t>(grad_x) : nullptr, buf(0), buf(1), buf(2), stream));
  });
  std::array<at::Tensor, 3> grads = {empty(), empty(), empty()};
  for (int i = 0; i < 3; ++i) {
    if (!mask[i + 1]) continue;
    at::Tensor r = v.scalar[i] ? partial[i].narrow(0, 0, 1) : partial[i];
    grads[i] = r.to(x.scalar_type()).reshape(stats[i]->sizes()).contiguous();
  }
  return {grad_x, grads[0], grads[1], grads[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("s2moe_perturb", &s2moe_perturb_cuda);
  m.impl("s2moe_perturb_backward", &s2moe_perturb_backward_cuda);
}

}  // namespace smoe::ops
