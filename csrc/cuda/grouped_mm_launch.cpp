// CUDA glue of grouped_mm and its backward. The offsets stay on the device: their validity is
// checked with asynchronous device asserts built from a few ATen ops (no host sync), with the CPU
// op's messages minus the data-dependent numbers. bf16 on sm90/sm100 takes ATen's _grouped_mm
// (tensor cores, cuda/grouped_mm_tensor_core.h); everything else smoe's tiled kernel.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks_grouped_mm.h"
#include "cuda/grouped_mm.h"
#include "cuda/grouped_mm_tensor_core.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

// The messages of the offsets asserts, one set per op. Literals: formatting the op name or M
// into a message would cost a string build on every call.
struct OffsetsMessages {
  const char* first;
  const char* order;
  const char* last;
};
#define SMOE_OFFSETS_MESSAGES(op, rows)                                                   \
  OffsetsMessages {                                                                       \
    "smoe::" op ": offsets[0] must be 0", "smoe::" op ": offsets must be non-decreasing", \
        "smoe::" op ": offsets[E] (rows in use) must be <= " rows                         \
  }
constexpr OffsetsMessages kForward = SMOE_OFFSETS_MESSAGES("grouped_mm", "x.size(0)");
constexpr OffsetsMessages kBackward = SMOE_OFFSETS_MESSAGES("grouped_mm_backward", "x.size(0)");
constexpr OffsetsMessages kBiasBackward =
    SMOE_OFFSETS_MESSAGES("grouped_mm_bias_backward", "grad_out.size(0)");
#undef SMOE_OFFSETS_MESSAGES

// The CPU op's offsets checks, as device asserts (offsets [E+1] int64, on x's device).
void assert_offsets_async(const at::Tensor& offsets, int64_t M, const OffsetsMessages& msg) {
  const int64_t E = offsets.size(0) - 1;
  at::_assert_async(offsets.select(0, 0).eq(0), msg.first);
  at::_assert_async(offsets.slice(0, 1).ge(offsets.slice(0, 0, E)).all(), msg.order);
  at::_assert_async(offsets.select(0, E).le(M), msg.last);
}

// out [M, d_out] = per-group x @ w[e], rows past offsets[E] zero; x has dense rows. With
// transpose_w, uses w[e]^T ([E, d_out, d_in] -> [E, d_in, d_out] by swapping strides, no copy).
at::Tensor grouped_mm_impl(const at::Tensor& x, const at::Tensor& w, bool transpose_w,
                           const at::Tensor& offsets,
                           const std::optional<at::Tensor>& bias = std::nullopt) {
  const int64_t M = x.size(0), K = x.size(1), E = w.size(0);
  const int64_t N = transpose_w ? w.size(1) : w.size(2);
  const int64_t sb_k = transpose_w ? w.stride(2) : w.stride(1);
  const int64_t sb_n = transpose_w ? w.stride(1) : w.stride(2);
#if SMOE_HAVE_ATEN_GROUPED_MM
  const at::Tensor w_kn = transpose_w ? w.transpose(1, 2) : w;  // [E, K, N]
  if (tensor_core::eligible(x, w_kn, bias.has_value())) {
    return tensor_core::grouped_mm(x, w_kn, offsets);
  }
#endif
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(x.scalar_type(), "grouped_mm", [&] {
    const auto* b = bias.has_value() ? kptr<scalar_t>(*bias) : nullptr;
    const int64_t sbias_e = bias.has_value() ? bias->stride(0) : 0;
    const int64_t sbias_n = bias.has_value() ? bias->stride(1) : 0;
    C10_CUDA_CHECK(cuda::grouped_mm(kptr<scalar_t>(x), x.stride(0), kptr<scalar_t>(w), w.stride(0),
                                    sb_k, sb_n, b, sbias_e, sbias_n,
                                    offsets.const_data_ptr<int64_t>(), E, M, K, N,
                                    kmut<scalar_t>(out), stream));
  });
  return out;
}

// grad_w[e] = x[g]^T @ grad[g] in w's layout (transposed-contiguous when w is a transposed view,
// as on the CPU), zeros for empty groups.
at::Tensor grouped_mm_weight_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w,
                                  const at::Tensor& offsets) {
  const int64_t M = x.size(0), E = w.size(0), d_in = w.size(1), d_out = w.size(2);
  at::Tensor gw = is_transposed_weight(w)
                      ? at::empty_strided({E, d_in, d_out}, {d_in * d_out, 1, d_in}, w.options())
                      : at::empty({E, d_in, d_out}, w.options());
  if (gw.numel() == 0) return gw;
#if SMOE_HAVE_ATEN_GROUPED_MM
  if (M > 0 && tensor_core::eligible(x, w, false) && tensor_core::aligned(grad)) {
    return tensor_core::weight_grad(grad, x, is_transposed_weight(w), offsets);
  }
#endif
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(x.scalar_type(), "grouped_mm_backward", [&] {
    C10_CUDA_CHECK(cuda::grouped_mm_weight_grad(
        kptr<scalar_t>(x), x.stride(0), kptr<scalar_t>(grad), grad.stride(0),
        offsets.const_data_ptr<int64_t>(), E, M, d_in, d_out, kmut<scalar_t>(gw), gw.stride(0),
        gw.stride(1), gw.stride(2), stream));
  });
  return gw;
}

at::Tensor grouped_mm_cuda(const at::Tensor& x_in, const at::Tensor& w,
                           const at::Tensor& offsets_in, const std::optional<at::Tensor>& bias) {
  check_grouped_mm(x_in, w, offsets_in);
  check_grouped_mm_bias(w, bias);
  check_not_double("grouped_mm", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_device_arch(x_in.device());
  const at::Tensor offsets = offsets_in.contiguous();
  assert_offsets_async(offsets, x_in.size(0), kForward);
  const at::Tensor x = rows_dense(x_in);
  return grouped_mm_impl(x, w, /*transpose_w=*/false, offsets, bias);
}

at::Tensor grouped_mm_bias_backward_cuda(const at::Tensor& grad_in, const at::Tensor& offsets_in) {
  check_grouped_mm_bias_backward(grad_in, offsets_in);
  check_not_double("grouped_mm_bias_backward", grad_in);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  check_device_arch(grad_in.device());
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t M = grad_in.size(0), N = grad_in.size(1), E = offsets.size(0) - 1;
  assert_offsets_async(offsets, M, kBiasBackward);
  const at::Tensor grad = rows_dense(grad_in);
  at::Tensor out = at::empty({E, N}, grad.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(grad.scalar_type(), "grouped_mm_bias_backward", [&] {
    C10_CUDA_CHECK(cuda::grouped_mm_bias_grad(kptr<scalar_t>(grad), grad.stride(0),
                                              offsets.const_data_ptr<int64_t>(), E, M, N,
                                              kmut<scalar_t>(out), stream));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cuda(const at::Tensor& grad_in,
                                                            const at::Tensor& x_in,
                                                            const at::Tensor& w,
                                                            const at::Tensor& offsets_in,
                                                            bool need_x, bool need_w) {
  check_grouped_mm_backward(grad_in, x_in, w, offsets_in);
  check_not_double("grouped_mm_backward", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_device_arch(x_in.device());
  const at::Tensor offsets = offsets_in.contiguous();
  assert_offsets_async(offsets, x_in.size(0), kBackward);
  const at::Tensor grad = rows_dense(grad_in);
  const at::Tensor x = rows_dense(x_in);
  at::Tensor gx = need_x ? grouped_mm_impl(grad, w, /*transpose_w=*/true, offsets)
                         : at::empty({0}, x.options());
  at::Tensor gw =
      need_w ? grouped_mm_weight_grad(grad, x, w, offsets) : at::empty({0}, w.options());
  return {gx, gw};
}

}  // namespace

std::string cuda_grouped_mm_path() { return tensor_core::path(); }

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_backward", &grouped_mm_backward_cuda);
  m.impl("grouped_mm_bias_backward", &grouped_mm_bias_backward_cuda);
}

}  // namespace smoe::ops
