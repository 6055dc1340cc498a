// CPU glue of sinkhorn and sinkhorn_backward. Row work is split over threads by parallel_for;
// column reductions go over fixed chunks of rows joined in chunk order (cpu/sinkhorn_kernel.h), so
// results are bitwise independent of the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <vector>

#include "checks_sinkhorn.h"
#include "cpu/sinkhorn_kernel.h"

namespace smoe::ops {
namespace {

using cpu::kSinkhornChunk;
using cpu::sinkhorn_chunks;

int64_t row_grain(int64_t E) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, E)); }

// S = scores / eps in the accumulation type, contiguous; refuses non-finite entries. One pass:
// the division and the finiteness check share the loop (each chunk of rows flags its own).
at::Tensor scaled_scores(const char* op, const at::Tensor& scores, double eps) {
  at::Tensor S = scores.to(sinkhorn_acc_dtype(scores), /*non_blocking=*/false, /*copy=*/true)
                     .contiguous();
  const int64_t n = S.numel(), grain = 1 << 16;
  std::vector<char> bad((n + grain - 1) / grain, 0);
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "sinkhorn_scaled_scores", [&] {
    using A = scalar_t;
    A* v = S.mutable_data_ptr<A>();
    const A e = static_cast<A>(eps);
    at::parallel_for(0, static_cast<int64_t>(bad.size()), 1, [&](int64_t b, int64_t end) {
      for (int64_t c = b; c < end; ++c) {
        bool ok = true;
        for (int64_t i = c * grain, stop = std::min(n, (c + 1) * grain); i < stop; ++i) {
          v[i] /= e;
          ok &= std::isfinite(v[i]);
        }
        bad[c] = !ok;
      }
    });
  });
  for (const char b : bad) {
    TORCH_CHECK(!b, "smoe::", op, ": scores must be finite (and scores / eps must not overflow)");
  }
  return S;
}

// A zero-filled tensor from calloc. The iteration history holds max_iter rows, of which a solve
// that stops early writes only the first few; at::zeros would write (and page-fault) all of them
// on every call, 16 MB at max_iter 1000 and T 4096. calloc takes a large block from a fresh mmap
// whose pages the kernel already zeroes, so the rows never written are never touched (glibc
// skips the memset for such blocks, and clears only reused memory otherwise).
at::Tensor zeros_untouched(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(numel, 1)) *
                       c10::elementSize(opts.dtype().toScalarType());
  void* data = std::calloc(bytes, 1);
  TORCH_CHECK(data != nullptr, "smoe::sinkhorn: out of memory allocating the ", bytes,
              "-byte iteration history (max_iter rows)");
  return at::from_blob(data, sizes, [](void* p) { std::free(p); }, opts);
}

template <typename A>
struct Residuals {
  A row, col;
};

// L2 norms of the row residual (plan row sums - row_mass) and the column residual (plan column
// sums - col_mass), each summed in a fixed order.
template <typename A>
Residuals<A> residuals(const A* S, const A* f, const A* g, int64_t T, int64_t E, A row_mass,
                       A col_mass, A* row_buf, A* col_buf) {
  at::parallel_for(0, T, row_grain(E), [&](int64_t b, int64_t e) {
    cpu::sinkhorn_row_residual(S, f, g, row_mass, E, b, e, row_buf);
  });
  const int64_t chunks = sinkhorn_chunks(T);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) cpu::sinkhorn_col_mass_partial(S, f, g, T, E, c, col_buf);
  });
  A row = 0, col = 0;
  for (int64_t t = 0; t < T; ++t) row += row_buf[t] * row_buf[t];
  for (int64_t j = 0; j < E; ++j) {
    A sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += col_buf[c * E + j];
    col += (sum - col_mass) * (sum - col_mass);
  }
  return {std::sqrt(row), std::sqrt(col)};
}

using SinkhornOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor>;

SinkhornOut sinkhorn_cpu(const at::Tensor& scores, double eps, int64_t max_iter, double tol,
                         double row_mass, std::optional<double> col_mass_opt, int64_t check_every) {
  const double col_mass =
      check_sinkhorn(scores, eps, max_iter, tol, row_mass, col_mass_opt, check_every);
  const int64_t T = scores.size(0), E = scores.size(1);
  const auto opts = scores.options().dtype(sinkhorn_acc_dtype(scores));
  at::Tensor f_hist = zeros_untouched({max_iter, T}, opts);
  at::Tensor g_hist = zeros_untouched({max_iter, E}, opts);
  at::Tensor log_plan = at::empty({T, E}, opts);
  if (T == 0) {
    return {log_plan,
            at::zeros({0}, opts),
            at::zeros({E}, opts),
            at::scalar_tensor(0, scores.options().dtype(at::kLong)),
            at::zeros({}, opts),
            at::zeros({}, opts),
            f_hist,
            g_hist};
  }
  const at::Tensor S_t = scaled_scores("sinkhorn", scores, eps);
  at::Tensor row_err = at::empty({}, opts), col_err = at::empty({}, opts);
  int64_t n = 0;
  AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "sinkhorn", [&] {
    using A = scalar_t;
    const A* S = S_t.const_data_ptr<A>();
    A* fh = f_hist.mutable_data_ptr<A>();
    A* gh = g_hist.mutable_data_ptr<A>();
    const int64_t chunks = sinkhorn_chunks(T);
    std::vector<A> m(chunks * E), s(chunks * E), row_buf(T), col_buf(chunks * E);
    const A log_r = std::log(static_cast<A>(row_mass)), log_c = std::log(static_cast<A>(col_mass));
    Residuals<A> res{0, 0};
    for (int64_t i = 1; i <= max_iter; ++i) {
      const A* fprev = i > 1 ? fh + (i - 2) * T : nullptr;
      A* g = gh + (i - 1) * E;
      A* f = fh + (i - 1) * T;
      at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c)
          cpu::sinkhorn_col_partial(S, fprev, T, E, c, m.data(), s.data());
      });
      for (int64_t j = 0; j < E; ++j) {
        g[j] = log_c - cpu::sinkhorn_col_lse(m.data(), s.data(), chunks, E, j);
      }
      at::parallel_for(0, T, row_grain(E), [&](int64_t b, int64_t e) {
        cpu::sinkhorn_row_update(S, g, log_r, E, b, e, f);
      });
      n = i;
      if (tol > 0 && i % check_every == 0 && i < max_iter) {
        res = residuals(S, f, g, T, E, static_cast<A>(row_mass), static_cast<A>(col_mass),
                        row_buf.data(), col_buf.data());
        if (res.row <= tol && res.col <= tol) break;
      }
    }
    const A* f = fh + (n - 1) * T;
    const A* g = gh + (n - 1) * E;
    res = residuals(S, f, g, T, E, static_cast<A>(row_mass), static_cast<A>(col_mass),
                    row_buf.data(), col_buf.data());
    row_err.fill_(res.row);
    col_err.fill_(res.col);
    A* lp = log_plan.mutable_data_ptr<A>();
    at::parallel_for(0, T, row_grain(E),
                     [&](int64_t b, int64_t e) { cpu::sinkhorn_log_plan(S, f, g, E, b, e, lp); });
  });
  return {log_plan,
          f_hist[n - 1].clone(),
          g_hist[n - 1].clone(),
          at::scalar_tensor(n, scores.options().dtype(at::kLong)),
          row_err,
          col_err,
          f_hist,
          g_hist};
}

at::Tensor sinkhorn_backward_cpu(const at::Tensor& grad_log_plan, const at::Tensor& grad_f,
                                 const at::Tensor& grad_g, const at::Tensor& scores,
                                 const at::Tensor& f_hist, const at::Tensor& g_hist,
                                 const at::Tensor& iters_done, double eps) {
  check_sinkhorn_backward(grad_log_plan, grad_f, grad_g, scores, f_hist, g_hist, iters_done, eps);
  const int64_t T = scores.size(0), E = scores.size(1), max_iter = f_hist.size(0);
  const int64_t n = iters_done.item<int64_t>();
  TORCH_CHECK(0 <= n && n <= max_iter && (n >= 1 || T == 0),
              "smoe::sinkhorn_backward: iters_done must be in [1, max_iter = ", max_iter,
              "] (0 only for T = 0), got ", n);
  if (T == 0) return at::empty({0, E}, scores.options());
  const at::Tensor S_t = scaled_scores("sinkhorn_backward", scores, eps);
  at::Tensor dS_t = grad_log_plan.contiguous().clone();
  AT_DISPATCH_FLOATING_TYPES(S_t.scalar_type(), "sinkhorn_backward", [&] {
    using A = scalar_t;
    const A* S = S_t.const_data_ptr<A>();
    const A* fh = f_hist.contiguous().const_data_ptr<A>();
    const A* gh = g_hist.contiguous().const_data_ptr<A>();
    A* dS = dS_t.mutable_data_ptr<A>();
    const at::Tensor gf = grad_f.contiguous(), gg = grad_g.contiguous();
    const A* gfp = gf.const_data_ptr<A>();
    const A* ggp = gg.const_data_ptr<A>();
    const int64_t chunks = sinkhorn_chunks(T);
    std::vector<A> fbar(T), fbar_prev(T), gbar(E), q(T * E), part(chunks * E), m(chunks * E),
        s(chunks * E), lse_col(E);
    // Through log_plan = f_n + S + g_n (S's own share is dS's initial value).
    at::parallel_for(0, T, row_grain(E), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        A sum = 0;
        for (int64_t j = 0; j < E; ++j) sum += dS[t * E + j];
        fbar[t] = sum + gfp[t];
      }
    });
    auto col_sums = [&](const A* x, A* out) {
      at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c) cpu::sinkhorn_col_sum_partial(x, T, E, c, part.data());
      });
      for (int64_t j = 0; j < E; ++j) {
        A sum = 0;
        for (int64_t c = 0; c < chunks; ++c) sum += part[c * E + j];
        out[j] = sum;
      }
    };
    col_sums(dS, gbar.data());
    for (int64_t j = 0; j < E; ++j) gbar[j] += ggp[j];
    std::vector<A> qsum(E);
    for (int64_t i = n; i >= 1; --i) {
      const A* g = gh + (i - 1) * E;
      const A* fprev = i > 1 ? fh + (i - 2) * T : nullptr;
      // through f_i = log r - LSE_j(S + g_i)
      at::parallel_for(0, T, row_grain(E), [&](int64_t b, int64_t e) {
        cpu::sinkhorn_back_rows_f(S, g, fbar.data(), E, b, e, dS, q.data());
      });
      col_sums(q.data(), qsum.data());
      for (int64_t j = 0; j < E; ++j) gbar[j] -= qsum[j];
      // through g_i = log c - LSE_t(S + f_{i-1})
      at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c)
          cpu::sinkhorn_col_partial(S, fprev, T, E, c, m.data(), s.data());
      });
      for (int64_t j = 0; j < E; ++j) {
        lse_col[j] = cpu::sinkhorn_col_lse(m.data(), s.data(), chunks, E, j);
      }
      at::parallel_for(0, T, row_grain(E), [&](int64_t b, int64_t e) {
        cpu::sinkhorn_back_rows_g(S, fprev, lse_col.data(), gbar.data(), E, b, e, dS,
                                  fbar_prev.data());
      });
      std::swap(fbar, fbar_prev);
      std::fill(gbar.begin(), gbar.end(), A(0));
    }
  });
  return dS_t.div_(eps).to(scores.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(smoe, CPU, m) {
  m.impl("sinkhorn", &sinkhorn_cpu);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cpu);
}

}  // namespace smoe::ops
