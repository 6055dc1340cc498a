// CUDA glue of swiglu and swiglu_backward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/swiglu.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

at::Tensor swiglu_cuda(const at::Tensor& h_in) {
  check_swiglu("swiglu", h_in);
  check_not_double("swiglu", h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  check_device_arch(h_in.device());
  const at::Tensor h = rows_dense(h_in);
  const int64_t M = h.size(0), f = h.size(1) / 2;
  at::Tensor out = at::empty({M, f}, h.options());
  if (M == 0 || f == 0) return out;
  SMOE_CUDA_DISPATCH(h.scalar_type(), "swiglu", [&] {
    C10_CUDA_CHECK(cuda::swiglu(kptr<scalar_t>(h), h.stride(0), M, f, kmut<scalar_t>(out),
                                c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& h_in) {
  check_swiglu_backward(grad_in, h_in);
  check_not_double("swiglu_backward", h_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  check_device_arch(h_in.device());
  const at::Tensor h = rows_dense(h_in), grad = rows_dense(grad_in);
  const int64_t M = h.size(0), f = h.size(1) / 2;
  at::Tensor dh = at::empty({M, 2 * f}, h.options());
  if (M == 0 || f == 0) return dh;
  SMOE_CUDA_DISPATCH(h.scalar_type(), "swiglu_backward", [&] {
    C10_CUDA_CHECK(cuda::swiglu_backward(kptr<scalar_t>(grad), grad.stride(0), kptr<scalar_t>(h),
                                         h.stride(0), M, f, kmut<scalar_t>(dh),
                                         c10::cuda::getCurrentCUDAStream()));
  });
  return dh;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace smoe::ops
