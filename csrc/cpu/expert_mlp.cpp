// CPU glue of expert_mlp: each expert's whole MLP, y = act(x w_in + b_in) w_out + b_out, run per
// (expert, row block) work item in one thread's scratch. The item gathers its rows of x through the
// plan, runs the first GEMM, the activation and the second GEMM, and writes only its output rows:
// the grouped input x_sorted and the hidden h = x w_in of the unfused path are never materialised
// (at the Mixtral-like inference shape h alone is 235 MB, and glibc maps and page-faults every
// allocation that large afresh on each call). The scratch is allocated once per worker per call
// (for_each_block_with, on the calling thread, so that torch's memory profiler counts it), small
// enough for glibc to recycle. Items go to threads one at a time (csrc/cpu/gemm_glue.h).
// Item sizes follow from the shapes and the dtype only, and each item's GEMMs run single-threaded,
// so results are bitwise equal for every torch.set_num_threads. Where the hidden [M, n_in] is at
// most the call's fuse_min_bytes (default 0: never), the op runs the unfused chain instead
// (expert_mlp_chain.h): the size rule is then decided at run time, from the real token count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string_view>
#include <vector>

#include "checks_expert_mlp.h"
#include "cpu/gemm16.h"
#include "cpu/gemm_glue.h"
#include "cpu/index_check.h"
#include "cpu/permute_kernel.h"
#include "cpu/swiglu_kernel.h"
#include "cpu/workspace.h"
#include "expert_mlp_chain.h"

namespace smoe::ops {
namespace {

// Rows of an item: those of grouped_mm's items for the first GEMM (so that each of its GEMM calls
// has the shape, and the packed weight panel, of the unfused path's), fewer if the item's scratch
// (gathered rows, h and the activation) would pass kMaxScratch, which glibc would map and
// page-fault afresh on each call.
constexpr int64_t kMaxScratch = int64_t{24} << 20;

int64_t block_rows(int64_t d, int64_t n_in, int64_t d_ff, int64_t elem_size) {
  const int64_t rows = item_rows(d, std::min(kColBlock, n_in), elem_size);
  const int64_t per_row = std::max<int64_t>(1, (d + n_in + d_ff) * elem_size);
  return std::max<int64_t>(16, std::min(rows, kMaxScratch / per_row / 16 * 16));
}

// out = a @ w (+ bias) in calls of kColBlock output columns: one call over all of w's columns would
// have the BLAS pack the whole [K, N] weight per call (29 MB at Mixtral's first GEMM), where a
// column block's panel stays in the cache.
void mm_cols(at::Tensor& out, const at::Tensor& a, const at::Tensor& w,
             const std::optional<at::Tensor>& bias) {
  for (int64_t c = 0; c < w.size(1); c += kColBlock) {
    const int64_t nc = std::min(kColBlock, w.size(1) - c);
    at::Tensor o = out.narrow(1, c, nc);
    std::optional<at::Tensor> bs;
    if (bias.has_value()) bs = bias->narrow(0, c, nc);
    block_mm(o, a, w.narrow(1, c, nc), bs);
  }
}

struct RowBlock {
  int64_t expert, begin, rows;
};

// The activation of h [rows, n_in] into a [rows, d_ff] (a aliases h unless swiglu).
void activate(MlpActivation act, at::Tensor& h, at::Tensor& a) {
  if (act != MlpActivation::kSwiglu) {
    pointwise_activation_(act, h);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "expert_mlp", [&] {
    using T = typename kernel_type<scalar_t>::type;
    cpu::swiglu(reinterpret_cast<const T*>(h.const_data_ptr<scalar_t>()), h.stride(0), a.size(1),
                0, h.size(0), reinterpret_cast<T*>(a.mutable_data_ptr<scalar_t>()));
  });
}

at::Tensor expert_mlp_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& token_in,
                          const std::optional<at::Tensor>& row, const at::Tensor& offsets_in,
                          const at::Tensor& w_in,
                          const std::optional<at::Tensor>& b_in, const at::Tensor& w_out,
                          const std::optional<at::Tensor>& b_out, c10::string_view activation,
                          int64_t fuse_min_bytes) {
  const auto [act, M] =
      check_expert_mlp(x_in, token_in, row, offsets_in, w_in, b_in, w_out, b_out,
                       std::string_view(activation.data(), activation.size()), fuse_min_bytes);
  const bool gather = token_in.has_value();
  const at::Tensor offsets = offsets_in.contiguous();  // read through a plain pointer
  check_offsets_cpu(offsets, M, "expert_mlp", gather ? "token" : "x");
  const at::Tensor x = rows_dense(x_in);
  const at::Tensor token = gather ? token_in->contiguous() : at::Tensor();
  if (gather) check_index_range("expert_mlp", "token", token, x.size(0), "T");
  // a small hidden is neither page-faulted nor worth the fusion (smoe.ops.experts.FUSE_MIN_BYTES)
  if (fuse_min_bytes > 0 && M * w_in.size(2) * x.element_size() <= fuse_min_bytes) {
    return expert_mlp_chain(x_in, token_in, row, offsets_in, w_in, b_in, w_out, b_out, act);
  }
  const int64_t E = w_in.size(0), d = x.size(1), n_in = w_in.size(2), d_ff = w_out.size(1),
                d_out = w_out.size(2);
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  at::Tensor out = workspace::empty({M, d_out}, x.options());
  if (off[E] < M) out.narrow(0, off[E], M - off[E]).zero_();
  if (off[E] == 0 || d_out == 0) return out;

  const int64_t es = x.element_size();
  const int64_t R = block_rows(d, n_in, d_ff, es);
  std::vector<RowBlock> blocks;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = off[e]; r < off[e + 1]; r += R) {
      blocks.push_back({e, r, std::min(R, off[e + 1] - r)});
    }
  }
  const bool gated = act == MlpActivation::kSwiglu;
  const int64_t cap = std::min<int64_t>(R, off[E]);  // rows of the largest item
  struct Scratch {
    at::Tensor xg, h, a;
  };
  const auto make = [&](Scratch& s) {
    if (gather) s.xg = at::empty({cap, d}, x.options());
    s.h = at::empty({cap, n_in}, x.options());
    s.a = gated ? at::empty({cap, d_ff}, x.options()) : s.h;
  };
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  for_each_block_with<Scratch>(n_blocks, make, [&](int64_t i, Scratch& s) {
    const RowBlock& blk = blocks[i];
    at::Tensor xs;
    if (gather) {
      const int32_t* idx = token.const_data_ptr<int32_t>() + blk.begin;
      const auto* src = static_cast<const char*>(x.const_data_ptr());
      auto* dst = static_cast<char*>(s.xg.mutable_data_ptr());
      for (int64_t r = 0; r < blk.rows; ++r) {
        if (idx[r] < 0) {
          std::memset(dst + r * d * es, 0, d * es);
        } else {
          std::memcpy(dst + r * d * es, src + idx[r] * x.stride(0) * es, d * es);
        }
      }
      xs = s.xg.narrow(0, 0, blk.rows);
    } else {
      xs = x.narrow(0, blk.begin, blk.rows);
    }
    at::Tensor hs = s.h.narrow(0, 0, blk.rows);
    std::optional<at::Tensor> b1, b2;
    if (b_in.has_value()) b1 = b_in->select(0, blk.expert);
    if (b_out.has_value()) b2 = b_out->select(0, blk.expert);
    mm_cols(hs, xs, w_in.select(0, blk.expert), b1);
    at::Tensor as = gated ? s.a.narrow(0, 0, blk.rows) : hs;
    activate(act, hs, as);
    at::Tensor os = out.narrow(0, blk.begin, blk.rows);
    mm_cols(os, as, w_out.select(0, blk.expert), b2);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) { m.impl("expert_mlp", &expert_mlp_cpu); }

}  // namespace smoe::ops
