// CPU glue of gate_linear: a router's logits x @ weight^T (+ bias) in float32 (float64 for float64
// x) from the exact values of 16-bit inputs. When x and weight are both bf16, row tiles of x run
// through the bf16 micro-kernel with float32 accumulators (csrc/cpu/brgemm.h): the products of bf16
// values are exact in float32, so these are the logits of the float32 GEMM on the upcast inputs up
// to summation order, at the bf16 GEMM's rate (5x the float32 one on this AVX512-BF16 CPU, RESULTS.md),
// without the float32 copy of x. Every other case is that float32 GEMM itself (torch.linear).
// Tiles are fixed by T alone and each is one single-threaded call, so the bits do not depend on
// the thread count.
//
// The backward's two GEMMs take the micro-kernel too when x and weight are bf16 (their gradients
// are then bf16): the float32 logit gradient enters as two bf16 parts, hi = bf16(g) and
// lo = bf16(g - hi), side by side along the reduction, each multiplied by the same bf16 value of
// the other operand, with float32 accumulators. hi + lo is g to ~2^-17 relative, so the gradients
// are those of the float32 GEMMs on upcasts up to that and the summation order, well inside the
// final rounding to bf16 (2^-9), at twice the bf16 GEMM's work instead of the float32 GEMM's (5x
// slower) and without float32 copies of x and weight.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "checks_gate.h"
#include "cpu/brgemm.h"
#include "cpu/vnni_pack.h"

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

// ---- backward ----

// Output columns of a weight-gradient item, and the tokens of one of its reduction chunks: each
// chunk packs its x panel ([2 kChunkTokens, kColsW] bf16, 512 KiB: it stays in L2, and the scratch
// does not grow with T) and adds its product into the item's float32 tile.
constexpr int64_t kColsW = 64;
constexpr int64_t kChunkTokens = 2048;

uint32_t* words(at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.mutable_data_ptr<bf16>()); }
const uint16_t* halves(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<bf16>());
}
uint16_t* halves(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.mutable_data_ptr<bf16>()); }

// grad_x [T, d] = grad [T, E] @ weight [E, d] as A [T, 2E] (each row's (hi, lo) pairs, split per
// row tile) x B [2E, d] (weight's rows twice), in tiles of brgemm::kTileRows rows.
at::Tensor grad_x_tiles(const at::Tensor& grad, const at::Tensor& weight) {
  const int64_t T = grad.size(0), E = grad.size(1), d = weight.size(1);
  at::Tensor panel = at::empty({2 * E * d}, weight.options());
  cpu::pack_vnni_dup(halves(weight), weight.stride(0), weight.stride(1), E, d, words(panel));
  at::Tensor a = at::empty({T, 2 * E}, weight.options());
  at::Tensor out = at::empty({T, d}, weight.options());
  const float* g = grad.const_data_ptr<float>();
  const bf16* ap = a.const_data_ptr<bf16>();
  const bf16* pp = panel.const_data_ptr<bf16>();
  const int64_t tiles = (T + brgemm::kTileRows - 1) / brgemm::kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> c(brgemm::kTileRows * std::min(kCols, d));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * brgemm::kTileRows, rows = std::min(brgemm::kTileRows, T - r0);
      cpu::split_pairs(g + r0 * grad.stride(0), grad.stride(0), grad.stride(1), rows, E,
                       words(a) + r0 * E);
      for (int64_t col = 0; col < d; col += kCols) {
        const int64_t nc = std::min(kCols, d - col);
        brgemm::gemm(rows, nc, 2 * E, ap + r0 * 2 * E, 2 * E, pp + 2 * col, d, c.data(), nc);
        cpu::round_bf16(c.data(), nc, rows, nc, halves(out) + r0 * d + col, d);
      }
    }
    brgemm::release();
  });
  return out;
}

// grad_weight [E, d] = grad^T [E, T] @ x [T, d] as A [E, 2T] (each expert's column of grad as
// (hi, lo) pairs) x B [2T, d] (x's rows twice), in items of kColsW columns, each summing over all
// T tokens in chunks of kChunkTokens, in a fixed order: no sum crosses items, and the chunks
// follow from T alone, so the bits do not depend on the thread count.
at::Tensor grad_weight_tiles(const at::Tensor& grad, const at::Tensor& x) {
  const int64_t T = grad.size(0), E = grad.size(1), d = x.size(1);
  at::Tensor a = at::empty({E, 2 * T}, x.options());
  const float* g = grad.const_data_ptr<float>();
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    cpu::split_pairs(g + begin * grad.stride(1), grad.stride(1), grad.stride(0), end - begin, T,
                     words(a) + begin * T);
  });
  at::Tensor out = at::empty({E, d}, x.options());
  const bf16* ap = a.const_data_ptr<bf16>();
  const int64_t items = (d + kColsW - 1) / kColsW;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> panel(std::min(kChunkTokens, T) * std::min(kColsW, d));
    std::vector<float> c(E * std::min(kColsW, d));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t col = i * kColsW, nc = std::min(kColsW, d - col);
      for (int64_t t0 = 0; t0 < T; t0 += kChunkTokens) {
        const int64_t n = std::min(kChunkTokens, T - t0);
        cpu::pack_vnni_dup(halves(x) + t0 * x.stride(0) + col * x.stride(1), x.stride(0),
                           x.stride(1), n, nc, panel.data());
        brgemm::gemm(E, nc, 2 * n, ap + 2 * t0, 2 * T, reinterpret_cast<const bf16*>(panel.data()),
                     nc, c.data(), nc, /*accumulate=*/t0 > 0);
      }
      cpu::round_bf16(c.data(), nc, E, nc, halves(out) + col, d);
    }
    brgemm::release();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gate_linear_backward_cpu(const at::Tensor& grad_in,
                                                            const at::Tensor& x,
                                                            const at::Tensor& weight, bool need_x,
                                                            bool need_w) {
  check_gate_linear_backward(grad_in, x, weight);
  if (!use_tiles(x, weight)) {
    return gate_linear_backward_upcast(grad_in, x, weight, need_x, need_w);
  }
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor gx = need_x ? grad_x_tiles(grad, weight) : at::empty({0}, x.options());
  at::Tensor gw = need_w ? grad_weight_tiles(grad, x) : at::empty({0}, weight.options());
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("gate_linear", &gate_linear_cpu);
  m.impl("gate_linear_backward", &gate_linear_backward_cpu);
}

}  // namespace smoe::ops
