// CPU glue of grouped_mm and its backward: one single-threaded BLAS GEMM per work item (expert,
// row block, column block), spread over torch's thread pool; 16-bit items take the path that
// csrc/cpu/gemm16.h chooses for this CPU. Work-item sizes follow from the
// shapes, never from the thread count, and no item reduces into another's output, so results are
// bitwise equal for every torch.set_num_threads (tests/test_determinism.py); a big expert is still
// many items, so it keeps every core busy. The forward and the weight gradient also run in gather
// mode for gather_mm (csrc/cpu/gather_mm.cpp): their rows x[token[r]] are copied into a thread's
// scratch as an item needs them (the weight gradient, where that would copy a group more than
// once, gathers every row once up front), instead of being read from an x_sorted that the
// autograd graph holds from the forward on.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "checks_grouped_mm.h"
#include "cpu/gemm16.h"
#include "cpu/gemm_glue.h"
#include "cpu/grouped_mm.h"
#include "cpu/permute_kernel.h"
#include "cpu/workspace.h"

namespace smoe::ops {
namespace {

struct Block {
  int64_t expert, begin, rows, col, cols;
};

// Output columns of a 16-bit item of n rows: kColBlock, or up to kWideColBlock for a block too
// thin to hold kItemWork16 (decoding: one to a few tokens per expert), where oneDNN's per-call cost
// dominates (bf16 [1, 1024] x [1024, 7168]: 28 calls of 256 columns take 2.1x the time of one call
// of 7168, 4 calls of 1024 columns 1.3x). fp32 (MKL) gains nothing from wider calls there.
constexpr int64_t kWideColBlock = 1024;

int64_t item_cols(int64_t rows, int64_t d_in, int64_t elem_size) {
  if (elem_size >= 4) return kColBlock;
  const int64_t want = kItemWork16 / std::max<int64_t>(1, rows * d_in);
  return std::clamp<int64_t>((want + kColBlock - 1) / kColBlock * kColBlock, kColBlock,
                             kWideColBlock);
}

// (expert, row block, column block) items of out = per-group x @ w[e].
std::vector<Block> out_blocks(const int64_t* off, int64_t E, int64_t d_in, int64_t d_out,
                              int64_t elem_size) {
  const int64_t rows = item_rows(d_in, std::min(kColBlock, d_out), elem_size);
  std::vector<Block> blocks;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = off[e]; r < off[e + 1]; r += rows) {
      const int64_t n = std::min(rows, off[e + 1] - r);
      const int64_t cols = item_cols(n, d_in, elem_size);
      for (int64_t c = 0; c < d_out; c += cols) {
        blocks.push_back({e, r, n, c, std::min(cols, d_out - c)});
      }
    }
  }
  return blocks;
}

// dst rows [0, n) = x[idx[r]], or 0 where idx[r] < 0 (dst dense, x with dense rows). The source
// rows are scattered, so a row of at most kPrefetchRowBytes is prefetched 8 rows ahead, as
// permute's gathers do (the weight gradient's gather of the fine-grained shape, 32 MB per step:
// +3.0 ms over reading x_sorted without, +1.1 ms with); wider rows are left to the hardware
// prefetcher, which follows them.
void copy_rows(const at::Tensor& x, const int32_t* idx, int64_t n, char* dst) {
  const auto* src = static_cast<const char*>(x.const_data_ptr());
  const int64_t bytes = x.size(1) * x.element_size(), ld = x.stride(0) * x.element_size();
  const bool prefetch = bytes <= cpu::kPrefetchRowBytes;
  for (int64_t r = 0; r < n; ++r) {
    if (prefetch && r + 8 < n && idx[r + 8] >= 0) {
      const char* p = src + idx[r + 8] * ld;
      for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(p + c);
    }
    if (idx[r] < 0) {
      std::memset(dst + r * bytes, 0, bytes);
    } else {
      std::memcpy(dst + r * bytes, src + idx[r] * ld, bytes);
    }
  }
}

// A gather_rows scratch for up to `rows` rows of x.
at::Tensor gather_scratch(const at::Tensor& x, int64_t rows) {
  return workspace::empty({rows * x.size(1) + 64 / x.element_size()}, x.options());
}

// The first `rows` grouped rows x[token[r]] at once, in a dense [rows, d] tensor: the rows'
// alignment is x_sorted's (both start 64-byte aligned).
at::Tensor gather_all(const at::Tensor& x, const int32_t* token, int64_t rows) {
  at::Tensor out = workspace::empty({rows, x.size(1)}, x.options());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t bytes = x.size(1) * x.element_size();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, bytes));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    copy_rows(x, token + b, e - b, dst + b * bytes);
  });
  return out;
}

// Rows [begin, begin + n) of the grouped input, gathered from x through token into buf (a 1-D
// scratch of x's dtype, 64-byte aligned, at least n * d + 64 / element_size elements): row r is
// x[token[begin + r]], or 0 where that is negative. The copy starts at the offset modulo 64 bytes
// that row `begin` of a dense x_sorted [M, d] would have, so that the BLAS sees the alignment of the
// unfused path (its kernels may choose by it) and gather mode gives permute -> grouped_mm's bits.
at::Tensor gather_rows(const at::Tensor& x, const int32_t* token, int64_t begin, int64_t n,
                       const at::Tensor& buf) {
  const int64_t d = x.size(1), es = x.element_size();
  const int64_t shift = (begin * d * es) % 64 / es;
  at::Tensor out = buf.narrow(0, shift, n * d).view({n, d});
  copy_rows(x, token + begin, n, static_cast<char*>(out.mutable_data_ptr()));
  return out;
}

}  // namespace

// out [M, d_out] = per-group x @ w[e] (+ bias[e]); rows past offsets[E] are zero. The bias is the
// GEMM's own beta = 1 input (addmm: the block starts as the broadcast bias row and the product
// accumulates onto it), not a second pass over the output. With token, row r of the grouped input
// is x[token[r]] (M = token.size(0)): the items sharing a row block run as one task that gathers
// those rows once and makes the same GEMM calls as without a gather.
at::Tensor grouped_mm_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
                           const std::optional<at::Tensor>& bias, const at::Tensor* token) {
  const int64_t M = token ? token->size(0) : x.size(0), E = w.size(0), d_out = w.size(2);
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  at::Tensor out = workspace::empty({M, d_out}, x.options());
  if (off[E] < M) out.narrow(0, off[E], M - off[E]).zero_();
  if (off[E] == 0 || d_out == 0) return out;
  if (x.size(1) == 0 && !bias.has_value()) {
    out.zero_();
    return out;
  }
  const std::vector<Block> blocks = out_blocks(off, E, x.size(1), d_out, x.element_size());
  const auto run_block = [&](const Block& b, const at::Tensor& xs) {
    at::Tensor o = out.narrow(0, b.begin, b.rows).narrow(1, b.col, b.cols);
    const at::Tensor ws = w.select(0, b.expert).narrow(1, b.col, b.cols);
    std::optional<at::Tensor> bs;
    if (bias.has_value()) bs = bias->select(0, b.expert).narrow(0, b.col, b.cols);
    block_mm(o, xs, ws, bs);
  };
  if (token == nullptr) {
    for_each_block(static_cast<int64_t>(blocks.size()), [&](int64_t i) {
      run_block(blocks[i], x.narrow(0, blocks[i].begin, blocks[i].rows));
    });
    return out;
  }
  // gather mode: one task per row block (its column blocks are consecutive in `blocks`)
  std::vector<int64_t> first;  // index of each task's first block, then blocks.size()
  int64_t cap = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(blocks.size()); ++i) {
    if (i == 0 || blocks[i].begin != blocks[i - 1].begin) first.push_back(i);
    cap = std::max(cap, blocks[i].rows);
  }
  first.push_back(static_cast<int64_t>(blocks.size()));
  const int32_t* idx = token->const_data_ptr<int32_t>();
  for_each_block_with<at::Tensor>(
      static_cast<int64_t>(first.size()) - 1,
      [&](at::Tensor& scratch) { scratch = gather_scratch(x, cap); },
      [&](int64_t j, at::Tensor& scratch) {
        const Block& b0 = blocks[first[j]];
        const at::Tensor xs = gather_rows(x, idx, b0.begin, b0.rows, scratch);
        for (int64_t i = first[j]; i < first[j + 1]; ++i) run_block(blocks[i], xs);
      });
  return out;
}

namespace {

at::Tensor grouped_mm_cpu(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& offsets_in,
                          const std::optional<at::Tensor>& bias) {
  check_grouped_mm(x_in, w, offsets_in);
  check_grouped_mm_bias(w, bias);
  const at::Tensor offsets = offsets_in.contiguous();  // read through a plain pointer
  check_offsets_cpu(offsets, x_in.size(0));
  return grouped_mm_impl(rows_dense(x_in), w, offsets, bias);
}

// grad_bias [E, d_out]: each group's rows of grad_out summed in row order, in the accumulation
// type (float for 16-bit grads), one item per (expert, column block): no reduction crosses items,
// so the bits do not depend on the thread count.
at::Tensor grouped_mm_bias_backward_cpu(const at::Tensor& grad_in, const at::Tensor& offsets_in) {
  check_grouped_mm_bias_backward(grad_in, offsets_in);
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t M = grad_in.size(0), d = grad_in.size(1), E = offsets.size(0) - 1;
  check_offsets_cpu(offsets, M, "grouped_mm_bias_backward", "grad_out");
  const at::Tensor grad = rows_dense(grad_in);
  at::Tensor out = at::empty({E, d}, grad.options());
  if (out.numel() == 0) return out;
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t n_col = (d + kColBlock - 1) / kColBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "grouped_mm_bias_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t ld = grad.stride(0);
    at::parallel_for(0, E * n_col, 1, [&](int64_t b, int64_t end) {
      std::vector<acc_t> acc(kColBlock);
      for (int64_t i = b; i < end; ++i) {
        const int64_t e = i / n_col, c0 = (i % n_col) * kColBlock;
        const int64_t nc = std::min(kColBlock, d - c0);
        std::fill(acc.begin(), acc.begin() + nc, acc_t(0));
        for (int64_t r = off[e]; r < off[e + 1]; ++r) {
          const scalar_t* row = g + r * ld + c0;
          for (int64_t c = 0; c < nc; ++c) acc[c] += static_cast<acc_t>(row[c]);
        }
        for (int64_t c = 0; c < nc; ++c) o[e * d + c0 + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return out;
}

}  // namespace

// grad_w[e] = x[g]^T @ grad[g], written in w's layout (transposed when w is a transposed view, so
// that the gradient of a [E, d_out, d_in] parameter needs no copy). Work items are (expert,
// column block of the output): each sums over all of its group's rows in one GEMM, so no
// reduction crosses items. With token the group's rows are x[token[r]]: where each expert is one
// item and the experts' largest group times the threads is less than all the rows (many experts,
// few threads: the fine-grained shapes), each item gathers its group into its thread's scratch;
// otherwise (several column blocks per expert, whose items land on different threads, or few
// experts on many threads) every row is gathered once, up front, into x_sorted's shape, which then
// lives only for this call. Either way no row is copied twice, and the GEMMs see x_sorted's rows.
at::Tensor grouped_mm_weight_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w,
                                  const at::Tensor& offsets, const at::Tensor* token) {
  const int64_t E = w.size(0), d_in = w.size(1), d_out = w.size(2);
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t n_col = std::max<int64_t>(1, (d_out + kColBlock - 1) / kColBlock);
  int64_t cap = 0;
  for (int64_t e = 0; e < E; ++e) cap = std::max(cap, off[e + 1] - off[e]);
  if (token && d_in > 0 && d_out > 0 && (n_col > 1 || at::get_num_threads() * cap >= off[E])) {
    const at::Tensor xs = gather_all(x, token->const_data_ptr<int32_t>(), off[E]);
    return grouped_mm_weight_grad(grad, xs, w, offsets);
  }
  const bool transposed = is_transposed_weight(w);
  at::Tensor gw = transposed
                      ? workspace::empty_strided({E, d_in, d_out}, {d_in * d_out, 1, d_in},
                                                 w.options())
                      : workspace::empty({E, d_in, d_out}, w.options());
  if (gw.numel() == 0) return gw;
  const int64_t col = kColBlock;
  const auto make = [&](at::Tensor& scratch) {
    if (token) scratch = gather_scratch(x, cap);
  };
  for_each_block_with<at::Tensor>(E * n_col, make, [&](int64_t i, at::Tensor& scratch) {
    const int64_t e = i / n_col, c0 = (i % n_col) * col;
    const int64_t nc = std::min(col, d_out - c0);
    if (nc <= 0) return;
    at::Tensor o = gw.select(0, e).narrow(1, c0, nc);
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0 || d_in == 0) {
      o.zero_();
      return;
    }
    const at::Tensor xs =
        token ? gather_rows(x, token->const_data_ptr<int32_t>(), off[e], rows, scratch)
              : x.narrow(0, off[e], rows);
    const at::Tensor gs = grad.narrow(0, off[e], rows).narrow(1, c0, nc);
    if (transposed) {
      at::Tensor ot = o.t();  // [nc, d_in], row-major in gw's storage
      block_mm(ot, gs.t(), xs);
    } else {
      block_mm(o, xs.t(), gs);
    }
  });
  return gw;
}

namespace {

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(const at::Tensor& grad_in,
                                                           const at::Tensor& x_in,
                                                           const at::Tensor& w,
                                                           const at::Tensor& offsets_in,
                                                           bool need_x, bool need_w) {
  check_grouped_mm_backward(grad_in, x_in, w, offsets_in);
  const at::Tensor offsets = offsets_in.contiguous();  // read through a plain pointer
  check_offsets_cpu(offsets, x_in.size(0));
  const at::Tensor grad = rows_dense(grad_in);
  const at::Tensor x = rows_dense(x_in);
  at::Tensor gx =
      need_x ? grouped_mm_impl(grad, w.transpose(1, 2), offsets) : at::empty({0}, x.options());
  at::Tensor gw =
      need_w ? grouped_mm_weight_grad(grad, x, w, offsets) : at::empty({0}, w.options());
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_backward", &grouped_mm_backward_cpu);
  m.impl("grouped_mm_bias_backward", &grouped_mm_bias_backward_cpu);
}

}  // namespace smoe::ops
