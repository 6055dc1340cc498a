// The tensor-core path of grouped_mm on CUDA: ATen's _grouped_mm, the CUTLASS grouped GEMM that
// torchtitan's MoE layers use. torch runs it without a host sync only for bf16 on sm90 / sm100;
// elsewhere its fallback loops over the groups and reads the offsets on the host, so we dispatch to
// it only there, and only where its input checks pass (16-byte aligned pointers and strides, one
// unit stride per matrix, fewer than 1024 experts, no bias). Everything else keeps smoe's tiled kernel (cuda/grouped_mm.cu).
// SMOE_CUDA_GROUPED_MM=tiled forces the tiled kernel (the CUDA tests compare both paths).
//
// Offsets: _grouped_mm takes int32 end offsets [E] (our offsets[1:], converted on the device). Rows
// past offsets[E] (capacity padding) it leaves unwritten: zeroed here by a device-side mask; the
// weight gradient of an empty group likewise. No host sync anywhere.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/arange.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>

#if __has_include(<ATen/ops/_grouped_mm.h>)
#include <ATen/ops/_grouped_mm.h>
#define SMOE_HAVE_ATEN_GROUPED_MM 1
#else
#define SMOE_HAVE_ATEN_GROUPED_MM 0
#endif

namespace smoe::ops::tensor_core {

inline bool forced_tiled() {
  const char* v = std::getenv("SMOE_CUDA_GROUPED_MM");
  return v != nullptr && std::strcmp(v, "tiled") == 0;
}

// A matrix _grouped_mm accepts, by ATen's own rule (check_valid_strides_and_return_transposed,
// which throws rather than falls back): a 16-byte aligned data pointer; among the last two dims one
// unit stride and the other at least the first's size (no stride-0 or overlapping rows, such as
// the expanded gradient of a sum) and a multiple of 8 elements (16 bytes of bf16), size-1 dims
// included; a 3-D batch stride a multiple of 8 too.
inline bool aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  const int64_t d = t.dim();
  const int64_t rows = t.size(d - 2), cols = t.size(d - 1);
  const int64_t s_row = t.stride(d - 2), s_col = t.stride(d - 1);
  int64_t lead;  // the non-unit stride of the last two dims
  if (s_row == 1 && s_col >= std::max<int64_t>(1, rows)) {
    lead = s_col;  // column-major (ATen checks this order first)
  } else if (s_col == 1 && s_row >= std::max<int64_t>(1, cols)) {
    lead = s_row;
  } else {
    return false;
  }
  if (lead % 8 != 0) return false;
  for (int64_t i = 0; i + 2 < d; ++i) {
    if (t.stride(i) % 8 != 0) return false;
  }
  return true;
}

// torch's CUTLASS grouped GEMM takes fewer than 1024 groups, and int32 row offsets.
constexpr int64_t kMaxGroups = 1023;

// Whether out = per-group a @ b[e] (a [M, K], b [E, K, N]) and its weight gradient take
// _grouped_mm here (the caller has checked shapes, devices and dtypes agree).
inline bool eligible(const at::Tensor& a, const at::Tensor& b, bool has_bias) {
#if SMOE_HAVE_ATEN_GROUPED_MM
  if (has_bias || forced_tiled() || a.scalar_type() != at::kBFloat16) return false;
  if (a.size(0) == 0 || a.size(1) == 0 || b.size(0) == 0 || b.size(2) == 0) return false;
  if (b.size(0) > kMaxGroups || a.size(0) > std::numeric_limits<int32_t>::max()) return false;
  if (a.size(1) % 8 != 0 || b.size(2) % 8 != 0) return false;  // K and N: 16-byte rows
  const int major = at::cuda::getDeviceProperties(a.device().index())->major;
  if (major != 9 && major != 10) return false;  // torch's CUTLASS path: sm90 / sm100 only
  return aligned(a) && aligned(b);
#else
  (void)a, (void)b, (void)has_bias;
  return false;
#endif
}

#if SMOE_HAVE_ATEN_GROUPED_MM
// offsets [E + 1] int64 -> _grouped_mm's end offsets [E] int32, on the device.
inline at::Tensor ends(const at::Tensor& offsets) { return offsets.slice(0, 1).to(at::kInt); }

// out [M, N] = per-group a @ b[e], rows past offsets[E] zero.
inline at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  const int64_t M = a.size(0), E = b.size(0);
  at::Tensor out = at::_grouped_mm(a, b, ends(offsets)).contiguous();
  const at::Tensor past = at::arange(M, offsets.options()).ge(offsets.select(0, E));
  return out.masked_fill_(past.unsqueeze(1), 0);
}

// grad_w [E, d_in, d_out]: x[g]^T @ grad[g] per group, in w's layout (transposed-contiguous when w
// is a transposed view), zeros for empty groups. Both are 2-D x 2-D products grouped along rows.
inline at::Tensor weight_grad(const at::Tensor& grad, const at::Tensor& x, bool transposed,
                              const at::Tensor& offsets) {
  const int64_t E = offsets.size(0) - 1;
  const at::Tensor e = ends(offsets);
  at::Tensor gw = transposed ? at::_grouped_mm(grad.t(), x, e).contiguous().transpose(1, 2)
                             : at::_grouped_mm(x.t(), grad, e).contiguous();
  const at::Tensor empty = offsets.slice(0, 1).eq(offsets.slice(0, 0, E));
  return gw.masked_fill_(empty.view({E, 1, 1}), 0);
}
#endif

// One line for smoe.info: which path CUDA grouped_mm takes, by dtype and device.
inline std::string path() {
#if SMOE_HAVE_ATEN_GROUPED_MM
  if (forced_tiled()) return "CUDA grouped_mm: smoe's tiled kernel (SMOE_CUDA_GROUPED_MM=tiled)";
  return "CUDA grouped_mm: bf16 on sm90/sm100 through ATen's _grouped_mm (CUTLASS tensor cores), "
         "otherwise smoe's tiled kernel";
#else
  return "CUDA grouped_mm: smoe's tiled kernel (this torch has no _grouped_mm)";
#endif
}

}  // namespace smoe::ops::tensor_core
