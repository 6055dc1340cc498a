// CPU glue of cosine_scores and cosine_scores_backward. Every parallel_for has a fixed grain and
// each output element is computed by one task in a fixed order, so results are bitwise
// independent of the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/cosine_scores_kernel.h"

namespace smoe::ops {
namespace {

int64_t grain_for(int64_t per_item_work) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_item_work));
}

// The temperature as used: max(tau, 1e-4), read on the host (a CPU tensor: no sync).
double clamped_tau(const at::Tensor& temperature) {
  const double tau = temperature.to(at::kDouble).item<double>();
  return tau < kMinTemperature ? kMinTemperature : tau;
}

std::tuple<at::Tensor, at::Tensor> cosine_scores_cpu(const at::Tensor& h_in,
                                                     const at::Tensor& proj_in,
                                                     const at::Tensor& expert_emb_in,
                                                     const at::Tensor& temperature, double eps,
                                                     bool normalize_tokens) {
  check_cosine_scores("cosine_scores", h_in, proj_in, expert_emb_in, temperature, eps);
  const at::Tensor h = rows_dense(h_in);
  const at::Tensor proj = proj_in.contiguous(), emb = expert_emb_in.contiguous();
  const int64_t T = h.size(0), d = h.size(1), de = proj.size(0), N = emb.size(0);
  const auto out_options = h.options().dtype(cosine_out_dtype(h));
  at::Tensor cos = at::empty({T, N}, out_options);
  at::Tensor logits = at::empty({T, N}, out_options);
  if (T == 0) return {cos, logits};
  const double tauc = clamped_tau(temperature);
  at::Tensor ehat = at::empty({N, de}, out_options);
  at::Tensor enorm = at::empty({N}, out_options);
  at::Tensor zbuf = at::empty({T, de}, out_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "cosine_scores", [&] {
    using T_ = typename kernel_type<scalar_t>::type;
    using A = acc_t<T_>;
    const auto* hp = reinterpret_cast<const T_*>(h.const_data_ptr<scalar_t>());
    const auto* wp = reinterpret_cast<const T_*>(proj.const_data_ptr<scalar_t>());
    const auto* ep = reinterpret_cast<const T_*>(emb.const_data_ptr<scalar_t>());
    A* eh = ehat.mutable_data_ptr<A>();
    cpu::cosine_normalize_experts<T_>(ep, de, static_cast<A>(eps), 0, N, eh,
                                      enorm.mutable_data_ptr<A>());
    at::parallel_for(0, T, grain_for(de * d + N * de), [&](int64_t b, int64_t e) {
      cpu::cosine_scores_rows<T_>(hp, h.stride(0), wp, eh, d, de, N, static_cast<A>(eps),
                                  normalize_tokens, static_cast<A>(tauc), b, e,
                                  zbuf.mutable_data_ptr<A>(), cos.mutable_data_ptr<A>(),
                                  logits.mutable_data_ptr<A>());
    });
  });
  return {cos, logits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosine_scores_backward_cpu(
    const at::Tensor& grad_cos_in, const at::Tensor& grad_logits_in, const at::Tensor& h_in,
    const at::Tensor& proj_in, const at::Tensor& expert_emb_in, const at::Tensor& temperature,
    double eps, bool normalize_tokens) {
  check_cosine_scores_backward(grad_cos_in, grad_logits_in, h_in, proj_in, expert_emb_in,
                               temperature, eps);
  const at::Tensor h = rows_dense(h_in);
  const at::Tensor proj = proj_in.contiguous(), emb = expert_emb_in.contiguous();
  const at::Tensor grad_cos = grad_cos_in.contiguous(), grad_logits = grad_logits_in.contiguous();
  const int64_t T = h.size(0), d = h.size(1), de = proj.size(0), N = emb.size(0);
  at::Tensor grad_h = at::empty({T, d}, h.options());
  if (T == 0) {
    return {grad_h, at::zeros_like(proj), at::zeros_like(emb), at::zeros_like(temperature)};
  }
  at::Tensor grad_proj = at::empty({de, d}, proj.options());
  at::Tensor grad_emb = at::empty({N, de}, emb.options());
  const auto acc_options = h.options().dtype(cosine_out_dtype(h));
  at::Tensor ehat = at::empty({N, de}, acc_options), enorm = at::empty({N}, acc_options);
  at::Tensor gehat = at::empty({N, de}, acc_options);
  at::Tensor zbuf = at::empty({T, de}, acc_options), gzbuf = at::empty({T, de}, acc_options);
  at::Tensor gbuf = at::empty({T, N}, acc_options), p = at::empty({T}, acc_options);
  const double tau = temperature.to(at::kDouble).item<double>();
  const double tauc = tau < kMinTemperature ? kMinTemperature : tau;
  double grad_tau = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "cosine_scores_backward", [&] {
        using T_ = typename kernel_type<scalar_t>::type;
        using A = acc_t<T_>;
        const A eps_a = static_cast<A>(eps), tau_a = static_cast<A>(tauc);
        const auto* hp = reinterpret_cast<const T_*>(h.const_data_ptr<scalar_t>());
        const auto* wp = reinterpret_cast<const T_*>(proj.const_data_ptr<scalar_t>());
        const auto* ep = reinterpret_cast<const T_*>(emb.const_data_ptr<scalar_t>());
        A* eh = ehat.mutable_data_ptr<A>();
        A* en = enorm.mutable_data_ptr<A>();
        A* zb = zbuf.mutable_data_ptr<A>();
        A* gb = gbuf.mutable_data_ptr<A>();
        A* gzb = gzbuf.mutable_data_ptr<A>();
        A* geh = gehat.mutable_data_ptr<A>();
        cpu::cosine_normalize_experts<T_>(ep, de, eps_a, 0, N, eh, en);
        at::parallel_for(0, T, grain_for(2 * de * d + 2 * N * de), [&](int64_t b, int64_t e) {
          cpu::cosine_scores_backward_rows<T_>(
              grad_cos.const_data_ptr<A>(), grad_logits.const_data_ptr<A>(), hp, h.stride(0), wp,
              eh, d, de, N, eps_a, normalize_tokens, tau_a, b, e, zb, gb, gzb,
              p.mutable_data_ptr<A>(), reinterpret_cast<T_*>(grad_h.mutable_data_ptr<scalar_t>()));
        });
        // the two reductions over tokens: tasks own output blocks (no cross-task sums), each
        // with its own partial-sum arrays
        const int64_t col_blocks = (d + cpu::kCosineCols - 1) / cpu::kCosineCols;
        auto* gw = reinterpret_cast<T_*>(grad_proj.mutable_data_ptr<scalar_t>());
        at::parallel_for(0, col_blocks, 1, [&](int64_t b, int64_t e) {
          std::vector<A> acc(de * cpu::kCosineCols), total(de * cpu::kCosineCols);
          cpu::cosine_grad_proj_tasks<T_>(gzb, hp, h.stride(0), T, d, de, b, e, acc.data(),
                                          total.data(), gw);
        });
        const int64_t expert_blocks = (N + cpu::kCosineExperts - 1) / cpu::kCosineExperts;
        at::parallel_for(0, expert_blocks, 1, [&](int64_t b, int64_t e) {
          std::vector<A> acc(cpu::kCosineExperts * de), total(cpu::kCosineExperts * de);
          cpu::cosine_grad_ehat_tasks<A>(gb, zb, T, N, de, b, e, acc.data(), total.data(), geh);
        });
        cpu::cosine_grad_experts_rows<T_>(
            geh, eh, en, de, eps_a, 0, N,
            reinterpret_cast<T_*>(grad_emb.mutable_data_ptr<scalar_t>()));
        const A total = cpu::cosine_ordered_sum<A>(p.const_data_ptr<A>(), T);
        grad_tau = tau < kMinTemperature ? 0.0 : -static_cast<double>(total) / (tauc * tauc);
      });
  at::Tensor grad_temperature = at::full_like(temperature, grad_tau);
  return {grad_h, grad_proj, grad_emb, grad_temperature};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("cosine_scores", &cosine_scores_cpu);
  m.impl("cosine_scores_backward", &cosine_scores_backward_cpu);
}

}  // namespace smoe::ops
