// CPU glue of gate_linear: a router's logits x @ weight^T (+ bias) in float32 (float64 for float64
// x) from the exact values of 16-bit inputs. When x and weight are both bf16, row tiles of x run
// through the bf16 micro-kernel with float32 accumulators (csrc/cpu/brgemm.h): the products of bf16
// values are exact in float32, so these are the logits of the float32 GEMM on the upcast inputs up
// to summation order, at the bf16 GEMM's rate (5x the float32 one on this AVX512-BF16 CPU, RESULTS.md),
// without the float32 copy of x. Every other case is that float32 GEMM itself (torch.linear).
// Tiles are fixed by T alone and each is one single-threaded call, so the bits do not depend on
// the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "checks_gate.h"
#include "cpu/brgemm.h"

namespace smoe::ops {
namespace {

using bf16 = c10::BFloat16;

// Output columns per micro-kernel call: a whole [d, kCols] panel of the packed weight.
constexpr int64_t kCols = 256;

// Below this many tokens the float32 GEMM is as fast: the packing of the weight dominates.
constexpr int64_t kMinTokens = 16;

bool use_tiles(const at::Tensor& x, const at::Tensor& weight) {
  return x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
         x.size(0) >= kMinTokens && x.size(1) > 0 && x.size(1) % 2 == 0 && weight.size(0) > 0 &&
         brgemm::bf16_enabled();
}

at::Tensor gate_linear_tiles(const at::Tensor& x_in, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  const at::Tensor x = rows_dense(x_in);
  const int64_t T = x.size(0), d = x.size(1), E = weight.size(0);
  // weight^T [d, E] in the VNNI layout, packed once and shared read-only by every tile
  at::Tensor panel = at::empty({d * E}, x.options());
  brgemm::pack_vnni(weight.const_data_ptr<bf16>(), weight.stride(1), weight.stride(0), d, E,
                    panel.mutable_data_ptr<bf16>());
  at::Tensor out = at::empty({T, E}, x.options().dtype(at::kFloat));
  const bf16* xp = x.const_data_ptr<bf16>();
  const bf16* pp = panel.const_data_ptr<bf16>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t ld_x = x.stride(0);
  const int64_t tiles = (T + brgemm::kTileRows - 1) / brgemm::kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * brgemm::kTileRows, rows = std::min(brgemm::kTileRows, T - r0);
      for (int64_t c = 0; c < E; c += kCols) {
        const int64_t nc = std::min(kCols, E - c);
        brgemm::gemm(rows, nc, d, xp + r0 * ld_x, ld_x, pp + 2 * c, E, op + r0 * E + c, E);
      }
    }
    brgemm::release();
  });
  if (bias.has_value()) out.add_(*bias);
  return out;
}

at::Tensor gate_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  check_gate_linear(x, weight, bias);
  if (use_tiles(x, weight)) return gate_linear_tiles(x, weight, bias);
  return gate_linear_upcast(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) { m.impl("gate_linear", &gate_linear_cpu); }

}  // namespace smoe::ops
