// CPU glue of grouped_mm and its backward: one BLAS GEMM per (expert, row block), spread over
// torch's thread pool when there are enough blocks, so that many small experts keep every core
// busy; few large experts instead run one after another on multi-threaded BLAS.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"

namespace smoe::ops {
namespace {

void check_offsets_cpu(const at::Tensor& offsets, int64_t M) {
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t E = offsets.size(0) - 1;
  TORCH_CHECK(off[0] == 0, "smoe::grouped_mm: offsets[0] must be 0, got ", off[0]);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(off[e + 1] >= off[e],
                "smoe::grouped_mm: offsets must be non-decreasing, got offsets[", e + 1,
                "] = ", off[e + 1], " < offsets[", e, "] = ", off[e]);
  }
  TORCH_CHECK(off[E] <= M, "smoe::grouped_mm: offsets[E] (rows in use) must be <= x.size(0) = ", M,
              ", got ", off[E]);
}

struct Block {
  int64_t expert, begin, rows;
};

// Row blocks of every expert group, sized so that there are several per thread.
std::vector<Block> row_blocks(const int64_t* off, int64_t E) {
  const int64_t threads = at::get_num_threads();
  const int64_t target = std::clamp<int64_t>((off[E] + 8 * threads - 1) / (8 * threads), 64, 2048);
  std::vector<Block> blocks;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = off[e]; r < off[e + 1]; r += target) {
      blocks.push_back({e, r, std::min(target, off[e + 1] - r)});
    }
  }
  return blocks;
}

// Runs fn(i) for i in [0, n): on the thread pool when n is large enough to balance, else serially
// so that each call's BLAS can use every thread itself.
template <typename F>
void for_each_block(int64_t n, const F& fn) {
  if (n >= 2 * at::get_num_threads() && at::get_num_threads() > 1) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      // Pool threads do not inherit the caller's dispatch state; we are below autograd here.
      at::AutoDispatchBelowADInplaceOrView guard;
      for (int64_t i = b; i < e; ++i) fn(i);
    });
  } else {
    for (int64_t i = 0; i < n; ++i) fn(i);
  }
}

// out [M, d_out] = per-group x @ w[e]; rows past offsets[E] are zero.
at::Tensor grouped_mm_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  const int64_t M = x.size(0), E = w.size(0), d_out = w.size(2);
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  at::Tensor out = at::empty({M, d_out}, x.options());
  if (off[E] < M) out.narrow(0, off[E], M - off[E]).zero_();
  if (off[E] == 0 || d_out == 0) return out;
  if (x.size(1) == 0) {
    out.zero_();
    return out;
  }
  const std::vector<Block> blocks = row_blocks(off, E);
  for_each_block(static_cast<int64_t>(blocks.size()), [&](int64_t i) {
    const Block& b = blocks[i];
    at::Tensor o = out.narrow(0, b.begin, b.rows);
    at::mm_out(o, x.narrow(0, b.begin, b.rows), w.select(0, b.expert));
  });
  return out;
}

at::Tensor grouped_mm_cpu(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& offsets) {
  check_grouped_mm(x_in, w, offsets);
  check_offsets_cpu(offsets, x_in.size(0));
  return grouped_mm_impl(rows_dense(x_in), w, offsets);
}

// grad_w[e] = x[g]^T @ grad[g], written in w's layout (transposed when w is a transposed view, so
// that the gradient of a [E, d_out, d_in] parameter needs no copy). Work items are (expert,
// column block of the output), so no reduction across threads is needed.
at::Tensor grouped_mm_weight_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w,
                                  const at::Tensor& offsets) {
  const int64_t E = w.size(0), d_in = w.size(1), d_out = w.size(2);
  const bool transposed = is_transposed_weight(w);
  at::Tensor gw = transposed
                      ? at::empty_strided({E, d_in, d_out}, {d_in * d_out, 1, d_in}, w.options())
                      : at::empty({E, d_in, d_out}, w.options());
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t threads = at::get_num_threads();
  const int64_t n_col =
      std::max<int64_t>(1, std::min<int64_t>((2 * threads + E - 1) / E, d_out / 64));
  const int64_t col = (d_out + n_col - 1) / std::max<int64_t>(n_col, 1);
  for_each_block(E * n_col, [&](int64_t i) {
    const int64_t e = i / n_col, c0 = (i % n_col) * col;
    const int64_t nc = std::min(col, d_out - c0);
    if (nc <= 0) return;
    at::Tensor o = gw.select(0, e).narrow(1, c0, nc);
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0 || d_in == 0) {
      o.zero_();
      return;
    }
    const at::Tensor xs = x.narrow(0, off[e], rows),
                     gs = grad.narrow(0, off[e], rows).narrow(1, c0, nc);
    if (transposed) {
      at::Tensor ot = o.t();  // [nc, d_in], row-major in gw's storage
      at::mm_out(ot, gs.t(), xs);
    } else {
      at::mm_out(o, xs.t(), gs);
    }
  });
  return gw;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(const at::Tensor& grad_in,
                                                           const at::Tensor& x_in,
                                                           const at::Tensor& w,
                                                           const at::Tensor& offsets, bool need_x,
                                                           bool need_w) {
  check_grouped_mm_backward(grad_in, x_in, w, offsets);
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
}

}  // namespace smoe::ops
