// CUDA glue of unified_topk. NaN scores and counts out of [0, n] are reported with asynchronous
// device asserts (no host sync).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "checks_usmoe.h"
#include "cuda/unified_topk.h"
#include "cuda_glue.h"

namespace smoe::ops {
namespace {

at::Tensor unified_topk_cuda(const at::Tensor& scores_in, int64_t n,
                             const std::optional<at::Tensor>& counts_in) {
  check_unified_topk(scores_in, n, counts_in);
  check_not_double("unified_topk", scores_in);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  check_device_arch(scores_in.device());
  const at::Tensor scores = rows_dense(scores_in);
  const int64_t G = scores.size(0), L = scores.size(1);
  at::Tensor out = at::empty({G, n}, scores.options().dtype(at::kLong));
  at::Tensor counts;
  if (counts_in.has_value()) {  // checked before any early return, as on the CPU
    counts = counts_in->contiguous();
    at::_assert_async(counts.ge(0).logical_and(counts.le(n)).all(),
                      "smoe::unified_topk: counts must be in [0, n]");
  }
  if (G == 0 || L == 0) return out;  // (n = 0 still scans for NaN)
  at::Tensor invalid = at::zeros({1}, scores.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SMOE_CUDA_DISPATCH(scores.scalar_type(), "unified_topk", [&] {
    C10_CUDA_CHECK(cuda::unified_topk(kptr<scalar_t>(scores), scores.stride(0), G, L, n,
                                      counts.defined() ? counts.const_data_ptr<int64_t>() : nullptr,
                                      out.mutable_data_ptr<int64_t>(),
                                      invalid.mutable_data_ptr<int32_t>(), stream));
  });
  at::_assert_async(invalid.eq(0), "smoe::unified_topk: scores must not be NaN");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CUDA, m) { m.impl("unified_topk", &unified_topk_cuda); }

}  // namespace smoe::ops
