// CPU glue of permute, combine and their backwards (all gathers).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "checks.h"
#include "cpu/index_check.h"
#include "cpu/permute_kernel.h"
#include "cpu/workspace.h"

namespace smoe::ops {
namespace {

int64_t grain(int64_t d) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, d)); }

#define SMOE_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

template <typename S>
auto kptr(const at::Tensor& t) {
  return reinterpret_cast<const typename kernel_type<S>::type*>(t.const_data_ptr<S>());
}
template <typename S>
auto kmut(at::Tensor& t) {
  return reinterpret_cast<typename kernel_type<S>::type*>(t.mutable_data_ptr<S>());
}

at::Tensor permute_cpu(const at::Tensor& x_in, const at::Tensor& token_in, const at::Tensor& row) {
  check_permute(x_in, token_in, row);
  const at::Tensor x = rows_dense(x_in), token = token_in.contiguous();
  const int64_t M = token.size(0), d = x.size(1);
  check_index_range("permute", "token", token, x.size(0), "T");
  at::Tensor out = workspace::empty({M, d}, x.options());
  if (M == 0 || d == 0) return out;
  SMOE_DISPATCH(x.scalar_type(), "permute", [&] {
    const auto* src = kptr<scalar_t>(x);
    auto* o = kmut<scalar_t>(out);
    const int32_t* idx = token.const_data_ptr<int32_t>();
    at::parallel_for(0, M, grain(d), [&](int64_t b, int64_t e) {
      cpu::gather_rows(src, x.stride(0), idx, d, b, e, o);
    });
  });
  return out;
}

at::Tensor permute_backward_cpu(const at::Tensor& grad_in, const at::Tensor& row_in) {
  check_permute_backward(grad_in, row_in);
  const at::Tensor grad = rows_dense(grad_in), row = row_in.contiguous();
  const int64_t T = row.size(0), k = row.size(1), d = grad.size(1);
  check_index_range("permute_backward", "row", row, grad.size(0), "M");
  at::Tensor out = workspace::empty({T, d}, grad.options());
  if (T == 0 || d == 0) return out;
  SMOE_DISPATCH(grad.scalar_type(), "permute_backward", [&] {
    const auto* src = kptr<scalar_t>(grad);
    auto* o = kmut<scalar_t>(out);
    const int32_t* r = row.const_data_ptr<int32_t>();
    at::parallel_for(0, T, grain(d * k), [&](int64_t b, int64_t e) {
      cpu::combine(src, grad.stride(0), r, nullptr, k, d, b, e, o);
    });
  });
  return out;
}

at::Tensor combine_cpu(const at::Tensor& ys_in, const at::Tensor& weight_in,
                       const at::Tensor& token, const at::Tensor& slot, const at::Tensor& row_in) {
  check_combine("combine", ys_in, weight_in, token, slot, row_in);
  const at::Tensor ys = rows_dense(ys_in), weight = weight_in.contiguous(),
                   row = row_in.contiguous();
  const int64_t T = row.size(0), k = row.size(1), d = ys.size(1);
  check_index_range("combine", "row", row, ys.size(0), "M");
  at::Tensor out = workspace::empty({T, d}, ys.options());
  if (T == 0 || d == 0) return out;
  SMOE_DISPATCH(ys.scalar_type(), "combine", [&] {
    const auto* src = kptr<scalar_t>(ys);
    const auto* w = kptr<scalar_t>(weight);
    auto* o = kmut<scalar_t>(out);
    const int32_t* r = row.const_data_ptr<int32_t>();
    at::parallel_for(0, T, grain(d * k), [&](int64_t b, int64_t e) {
      cpu::combine(src, ys.stride(0), r, w, k, d, b, e, o);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& ys_in, const at::Tensor& weight_in,
    const at::Tensor& token_in, const at::Tensor& slot_in, const at::Tensor& row_in) {
  check_combine_backward(grad_in, ys_in, weight_in, token_in, slot_in, row_in);
  const at::Tensor grad = rows_dense(grad_in), ys = rows_dense(ys_in),
                   weight = weight_in.contiguous();
  const at::Tensor token = token_in.contiguous(), slot = slot_in.contiguous(),
                   row = row_in.contiguous();
  const int64_t T = row.size(0), k = row.size(1), d = ys.size(1), M = ys.size(0);
  check_index_range("combine_backward", "row", row, M, "M");
  check_index_range("combine_backward", "token", token, T, "T");
  check_index_range("combine_backward", "slot", slot, T * k, "T*k");
  at::Tensor grad_ys = workspace::empty({M, d}, ys.options());
  at::Tensor grad_w = at::empty({T, k}, ys.options());
  SMOE_DISPATCH(ys.scalar_type(), "combine_backward", [&] {
    const auto* g = kptr<scalar_t>(grad);
    const auto* y = kptr<scalar_t>(ys);
    const auto* w = kptr<scalar_t>(weight);
    auto* gys = kmut<scalar_t>(grad_ys);
    auto* gw = kmut<scalar_t>(grad_w);
    const int32_t* tok = token.const_data_ptr<int32_t>();
    const int32_t* sl = slot.const_data_ptr<int32_t>();
    const int32_t* r = row.const_data_ptr<int32_t>();
    if (M > 0 && d > 0) {
      at::parallel_for(0, M, grain(d), [&](int64_t b, int64_t e) {
        cpu::scaled_gather(g, grad.stride(0), tok, w, sl, d, b, e, gys);
      });
    }
    if (T > 0) {
      at::parallel_for(0, T, grain(d * k), [&](int64_t b, int64_t e) {
        cpu::combine_weight_grad(g, grad.stride(0), y, ys.stride(0), r, k, d, b, e, gw);
      });
    }
  });
  return {grad_ys, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("permute_backward", &permute_backward_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("combine_backward", &combine_backward_cpu);
}

}  // namespace smoe::ops
