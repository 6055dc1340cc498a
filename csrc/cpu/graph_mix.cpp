// CPU glue of graph_mix and graph_mix_backward. The outputs are cut into fixed tiles (batch entry,
// row tile, column tile), each computed by one kernel call whatever the thread count, so results
// are bitwise independent of it. Inputs are made contiguous here (outputs are contiguous); a
// tensor the call does not read (A, cache at lam = 0; x, cache without need_A) is left as is.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "checks_graph.h"
#include "cpu/graph_mix_kernel.h"

namespace smoe::ops {
namespace {

int64_t tiles(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// Calls fn(b, r0, r1, c0, c1) once per tile of a [B, R, Ccols] output, tiles spread over threads.
template <typename Fn>
void for_tiles(int64_t B, int64_t R, int64_t Ccols, int64_t tr, int64_t tc, const Fn& fn) {
  const int64_t nr = tiles(R, tr), nc = tiles(Ccols, tc);
  at::parallel_for(0, B * nr * nc, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (nr * nc), r = (t / nc) % nr, c = t % nc;
      fn(b, r * tr, std::min(R, (r + 1) * tr), c * tc, std::min(Ccols, (c + 1) * tc));
    }
  });
}

// The contiguous tensor the kernels read, or an undefined one when the call does not read it.
at::Tensor dense_if(bool used, const at::Tensor& t) { return used ? t.contiguous() : at::Tensor(); }

at::Tensor dense_if(bool used, const std::optional<at::Tensor>& t) {
  return used && t.has_value() ? t->contiguous() : at::Tensor();
}

template <typename T, typename S>
const T* kp(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr<S>()) : nullptr;
}

template <typename A>
cpu::GraphParams<A> params(const GraphMixSizes& n, double self_coef, double lam) {
  return {n.S, n.E, n.C, static_cast<A>(self_coef), static_cast<A>(lam), lam != 0.0};
}

at::Tensor graph_mix_cpu(const at::Tensor& x_in, const at::Tensor& A_in,
                         const std::optional<at::Tensor>& cache_in, double self_coef, double lam) {
  const GraphMixSizes n = check_graph_mix("graph_mix", x_in, A_in, cache_in, self_coef, lam);
  at::Tensor out = at::empty(x_in.sizes(), x_in.options());
  if (out.numel() == 0) return out;
  const bool mix = lam != 0.0;
  const at::Tensor x = x_in.contiguous(), A = dense_if(mix, A_in), cache = dense_if(mix, cache_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "graph_mix", [&] {
    using T = typename kernel_type<scalar_t>::type;
    const auto q = params<acc_t<T>>(n, self_coef, lam);
    const T *xp = kp<T, scalar_t>(x), *cp = kp<T, scalar_t>(cache), *ap = kp<T, scalar_t>(A);
    T* op = reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>());
    for_tiles(n.B, n.S, n.E, cpu::kGraphRows, cpu::kGraphW<acc_t<T>>,
              [&](int64_t b, int64_t i0, int64_t i1, int64_t e0, int64_t e1) {
                cpu::graph_mix(xp, cp, ap, q, b, i0, i1, e0, e1, op);
              });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> graph_mix_backward_cpu(const at::Tensor& grad_in,
                                                          const at::Tensor& x_in,
                                                          const at::Tensor& A_in,
                                                          const std::optional<at::Tensor>& cache_in,
                                                          double self_coef, double lam, bool need_x,
                                                          bool need_A) {
  const GraphMixSizes n = check_graph_mix_backward(grad_in, x_in, A_in, cache_in, self_coef, lam);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x_in.scalar_type(), "graph_mix_backward", [&] {
        using T = typename kernel_type<scalar_t>::type;
        const auto q = params<acc_t<T>>(n, self_coef, lam);
        const T *gp = kp<T, scalar_t>(g), *ap = kp<T, scalar_t>(A);
        const T *xp = kp<T, scalar_t>(x), *cp = kp<T, scalar_t>(cache);
        if (do_x) {
          T* gx = reinterpret_cast<T*>(grad_x.mutable_data_ptr<scalar_t>());
          for_tiles(n.B, n.S, n.E, cpu::kGraphRows, cpu::kGraphW<acc_t<T>>,
                    [&](int64_t b, int64_t j0, int64_t j1, int64_t e0, int64_t e1) {
                      cpu::graph_mix_grad_x(gp, ap, q, b, j0, j1, e0, e1, gx);
                    });
        }
        if (do_A) {
          T* ga = reinterpret_cast<T*>(grad_A.mutable_data_ptr<scalar_t>());
          for_tiles(n.B, n.S, n.Sp(), cpu::kGraphRows, cpu::kGraphW<acc_t<T>>,
                    [&](int64_t b, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
                      cpu::graph_mix_grad_a(gp, xp, cp, q, b, i0, i1, j0, j1, ga);
                    });
        }
      });
  return {grad_x, grad_A};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("graph_mix", &graph_mix_cpu);
  m.impl("graph_mix_backward", &graph_mix_backward_cpu);
}

}  // namespace smoe::ops
