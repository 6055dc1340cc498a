// CUDA glue of permute, combine and their backwards (all gathers).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/permute.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

at::Tensor permute_cuda(const at::Tensor& x_in, const at::Tensor& token_in, const at::Tensor& row) {
  check_permute(x_in, token_in, row);
  check_not_double("permute", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_device_arch(x_in.device());
  const at::Tensor x = rows_dense(x_in), token = token_in.contiguous();
  const int64_t M = token.size(0), d = x.size(1);
  at::Tensor out = at::empty({M, d}, x.options());
  if (M == 0 || d == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(x.scalar_type(), "permute", [&] {
    C10_CUDA_CHECK(cuda::permute(kptr<scalar_t>(x), x.stride(0), x.size(0),
                                 token.const_data_ptr<int32_t>(), M, d, kmut<scalar_t>(out),
                                 stream));
  });
  return out;
}

at::Tensor permute_backward_cuda(const at::Tensor& grad_in, const at::Tensor& row_in) {
  check_permute_backward(grad_in, row_in);
  check_not_double("permute_backward", grad_in);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  check_device_arch(grad_in.device());
  const at::Tensor grad = rows_dense(grad_in), row = row_in.contiguous();
  const int64_t T = row.size(0), k = row.size(1), d = grad.size(1);
  at::Tensor out = at::empty({T, d}, grad.options());
  if (T == 0 || d == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(grad.scalar_type(), "permute_backward", [&] {
    C10_CUDA_CHECK(cuda::permute_backward(kptr<scalar_t>(grad), grad.stride(0), grad.size(0),
                                          row.const_data_ptr<int32_t>(), T, k, d,
                                          kmut<scalar_t>(out), stream));
  });
  return out;
}

at::Tensor combine_cuda(const at::Tensor& ys_in, const at::Tensor& weight_in,
                        const at::Tensor& token, const at::Tensor& slot, const at::Tensor& row_in) {
  check_combine("combine", ys_in, weight_in, token, slot, row_in);
  check_not_double("combine", ys_in);
  const c10::cuda::CUDAGuard guard(ys_in.device());
  check_device_arch(ys_in.device());
  const at::Tensor ys = rows_dense(ys_in), weight = weight_in.contiguous();
  const at::Tensor row = row_in.contiguous();
  const int64_t T = row.size(0), k = row.size(1), d = ys.size(1);
  at::Tensor out = at::empty({T, d}, ys.options());
  if (T == 0 || d == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(ys.scalar_type(), "combine", [&] {
    C10_CUDA_CHECK(cuda::combine(kptr<scalar_t>(ys), ys.stride(0), ys.size(0),
                                 kptr<scalar_t>(weight), row.const_data_ptr<int32_t>(), T, k, d,
                                 kmut<scalar_t>(out), stream));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& ys_in, const at::Tensor& weight_in,
    const at::Tensor& token_in, const at::Tensor& slot_in, const at::Tensor& row_in) {
  check_combine_backward(grad_in, ys_in, weight_in, token_in, slot_in, row_in);
  check_not_double("combine_backward", ys_in);
  const c10::cuda::CUDAGuard guard(ys_in.device());
  check_device_arch(ys_in.device());
  const at::Tensor grad = rows_dense(grad_in), ys = rows_dense(ys_in);
  const at::Tensor weight = weight_in.contiguous(), token = token_in.contiguous();
  const at::Tensor slot = slot_in.contiguous(), row = row_in.contiguous();
  const int64_t T = row.size(0), k = row.size(1), d = ys.size(1), M = ys.size(0);
  at::Tensor grad_ys = at::empty({M, d}, ys.options());
  at::Tensor grad_w = at::empty({T, k}, ys.options());
  if ((M == 0 || d == 0) && T * k == 0) return {grad_ys, grad_w};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(ys.scalar_type(), "combine_backward", [&] {
    C10_CUDA_CHECK(cuda::combine_backward(
        kptr<scalar_t>(grad), grad.stride(0), kptr<scalar_t>(ys), ys.stride(0),
        kptr<scalar_t>(weight), token.const_data_ptr<int32_t>(), slot.const_data_ptr<int32_t>(),
        row.const_data_ptr<int32_t>(), T, k, M, d, kmut<scalar_t>(grad_ys), kmut<scalar_t>(grad_w),
        stream));
  });
  return {grad_ys, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("permute_backward", &permute_backward_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("combine_backward", &combine_backward_cuda);
}

}  // namespace smoe::ops
