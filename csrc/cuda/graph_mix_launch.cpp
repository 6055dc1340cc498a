// CUDA glue of graph_mix and graph_mix_backward: float32/float16/bfloat16/float64 inputs, float32
// math (float64 for float64). Inputs are made contiguous here; a tensor the call does not read (A,
// cache at lam = 0; x, cache without need_A) is left as is. No host sync: the options are host
// scalars and every check reads shapes only.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks_graph.h"
#include "cuda/graph_mix.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

at::Tensor dense_if(bool used, const at::Tensor& t) { return used ? t.contiguous() : at::Tensor(); }

at::Tensor dense_if(bool used, const std::optional<at::Tensor>& t) {
  return used && t.has_value() ? t->contiguous() : at::Tensor();
}

template <typename S>
auto kptr_or_null(const at::Tensor& t) -> decltype(kptr<S>(t)) {
  return t.defined() ? kptr<S>(t) : nullptr;
}

cuda::GraphMixArgs args(const GraphMixSizes& n, double self_coef, double lam) {
  return {n.B, n.S, n.E, n.C, self_coef, lam, lam != 0.0};
}

at::Tensor graph_mix_cuda(const at::Tensor& x_in, const at::Tensor& A_in,
                          const std::optional<at::Tensor>& cache_in, double self_coef, double lam) {
  const GraphMixSizes n = check_graph_mix("graph_mix", x_in, A_in, cache_in, self_coef, lam);
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_device_arch(x_in.device());
  at::Tensor out = at::empty(x_in.sizes(), x_in.options());
  if (out.numel() == 0) return out;
  const bool mix = lam != 0.0;
  const at::Tensor x = x_in.contiguous(), A = dense_if(mix, A_in), cache = dense_if(mix, cache_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "graph_mix", [&] {
    C10_CUDA_CHECK(cuda::graph_mix(kptr<scalar_t>(x), kptr_or_null<scalar_t>(cache),
                                   kptr_or_null<scalar_t>(A), args(n, self_coef, lam),
                                   kmut<scalar_t>(out), c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> graph_mix_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& A_in,
    const std::optional<at::Tensor>& cache_in, double self_coef, double lam, bool need_x,
    bool need_A) {
  const GraphMixSizes n = check_graph_mix_backward(grad_in, x_in, A_in, cache_in, self_coef, lam);
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_device_arch(x_in.device());
  at::Tensor grad_x =
      need_x ? at::empty(x_in.sizes(), x_in.options()) : at::empty({0}, x_in.options());
  at::Tensor grad_A =
      need_A ? at::empty(A_in.sizes(), A_in.options()) : at::empty({0}, A_in.options());
  const bool do_x = need_x && grad_x.numel() > 0, do_A = need_A && grad_A.numel() > 0;
  if (!do_x && !do_A) return {grad_x, grad_A};
  const bool mix = lam != 0.0;
  // grad_x reads A (when mixing); grad_A reads x and the cache (when mixing).
  const at::Tensor g = grad_in.contiguous(), A = dense_if(do_x && mix, A_in);
  const at::Tensor x = dense_if(do_A && mix, x_in), cache = dense_if(do_A && mix, cache_in);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x_in.scalar_type(), "graph_mix_backward", [&] {
        const auto a = args(n, self_coef, lam);
        if (do_x) {
          C10_CUDA_CHECK(cuda::graph_mix_grad_x(kptr<scalar_t>(g), kptr_or_null<scalar_t>(A), a,
                                                kmut<scalar_t>(grad_x), stream));
        }
        if (do_A) {
          C10_CUDA_CHECK(cuda::graph_mix_grad_a(kptr<scalar_t>(g), kptr_or_null<scalar_t>(x),
                                                kptr_or_null<scalar_t>(cache), a,
                                                kmut<scalar_t>(grad_A), stream));
        }
      });
  return {grad_x, grad_A};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) {
  m.impl("graph_mix", &graph_mix_cuda);
  m.impl("graph_mix_backward", &graph_mix_backward_cuda);
}

}  // namespace smoe::ops
