// CPU glue of unified_topk.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "checks_usmoe.h"
#include "common/rows.h"
#include "cpu/unified_topk_kernel.h"

namespace smoe::ops {
namespace {

at::Tensor unified_topk_cpu(const at::Tensor& scores_in, int64_t n,
                            const std::optional<at::Tensor>& counts_in) {
  check_unified_topk(scores_in, n, counts_in);
  const at::Tensor scores = rows_dense(scores_in);
  const int64_t G = scores.size(0), L = scores.size(1);
  at::Tensor counts;
  const int64_t* c = nullptr;
  if (counts_in.has_value()) {
    counts = counts_in->contiguous();
    c = counts.const_data_ptr<int64_t>();
    for (int64_t g = 0; g < G; ++g) {
      TORCH_CHECK(c[g] >= 0 && c[g] <= n, "smoe::unified_topk: counts must be in [0, n] = [0, ", n,
                  "], got ", c[g], " for group ", g);
    }
  }
  at::Tensor out = at::empty({G, n}, scores.options().dtype(at::kLong));
  if (G == 0 || L == 0) return out;  // (n = 0 still scans for NaN)
  int64_t bad_group = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, scores.scalar_type(), "unified_topk", [&] {
        using T_ = typename kernel_type<scalar_t>::type;
        const auto* s = reinterpret_cast<const T_*>(scores.const_data_ptr<scalar_t>());
        int64_t* o = out.mutable_data_ptr<int64_t>();
        bad_group = first_bad_row(G, grain_rows(L * 8), [&](int64_t b, int64_t e) {
          return cpu::unified_topk_rows<T_>(s, scores.stride(0), L, n, c, b, e, o);
        });
      });
  TORCH_CHECK(bad_group < 0, "smoe::unified_topk: scores must not be NaN, got NaN in group ",
              bad_group);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) { m.impl("unified_topk", &unified_topk_cpu); }

}  // namespace smoe::ops
