// CUDA glue of expert_mlp: the unfused chain on the device, permute -> grouped_mm -> activation ->
// grouped_mm through the dispatcher (expert_mlp_chain.h), that is through smoe's own CUDA kernels,
// with no host sync (the offsets stay on the device), whatever fuse_min_bytes says. The CPU op's
// win, no page faults on a large hidden, does not apply on the GPU; a gather-GEMM with the
// activation in the tile epilogue belongs to issue 25's tensor-core work.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string_view>

#include "checks_expert_mlp.h"
#include "cuda_glue.h"
#include "expert_mlp_chain.h"

namespace smoe::ops {
namespace {

at::Tensor expert_mlp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& token,
                           const std::optional<at::Tensor>& row, const at::Tensor& offsets,
                           const at::Tensor& w_in, const std::optional<at::Tensor>& b_in,
                           const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
                           c10::string_view activation, int64_t fuse_min_bytes) {
  const auto checked =
      check_expert_mlp(x, token, row, offsets, w_in, b_in, w_out, b_out,
                       std::string_view(activation.data(), activation.size()), fuse_min_bytes);
  check_not_double("expert_mlp", x);
  const c10::cuda::CUDAGuard guard(x.device());
  check_device_arch(x.device());
  return expert_mlp_chain(x, token, row, offsets, w_in, b_in, w_out, b_out, checked.first);
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) { m.impl("expert_mlp", &expert_mlp_cuda); }

}  // namespace smoe::ops
