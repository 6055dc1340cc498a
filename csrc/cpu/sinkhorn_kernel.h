// Torch-free CPU kernels of sinkhorn (entropic optimal transport in the log domain,
// specs/sinkhorn_ssr.md §3, §7, §8) and its backward through the unrolled iterations.
//
// All functions take S = scores / eps [T, E] (contiguous, accumulation type A: float, or double
// for double inputs). Row work runs on a [begin, end) range of rows; column reductions run over
// fixed chunks of kSinkhornChunk rows, each chunk writing its own partial, and the partials are
// joined in chunk order. Every output element is written by exactly one call, so results do not
// depend on how the glue splits the work over threads.
//
// One iteration i = 1..n (f_0 = 0):
//   g_i[j] = log c - logsumexp_t(S[t, j] + f_{i-1}[t])
//   f_i[t] = log r - logsumexp_j(S[t, j] + g_i[j])
// and log_plan[t, j] = f_n[t] + S[t, j] + g_n[j].
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/math.h"

namespace smoe::cpu {

constexpr int64_t kSinkhornChunk = 256;

inline int64_t sinkhorn_chunks(int64_t T) { return (T + kSinkhornChunk - 1) / kSinkhornChunk; }

// Column partial of chunk c: m[c * E + j] = max_t v[t, j] and s[c * E + j] = sum_t exp(v[t, j] -
// m[c * E + j]) over the chunk's rows, with v[t, j] = S[t, j] + a[t] (a = nullptr: a = 0).
template <typename A>
void sinkhorn_col_partial(const A* S, const A* a, int64_t T, int64_t E, int64_t c, A* m, A* s) {
  const int64_t b = c * kSinkhornChunk, e = std::min(T, b + kSinkhornChunk);
  A* mc = m + c * E;
  A* sc = s + c * E;
  for (int64_t j = 0; j < E; ++j) {
    mc[j] = -std::numeric_limits<A>::infinity();
    sc[j] = 0;
  }
  for (int64_t t = b; t < e; ++t) {
    const A* row = S + t * E;
    const A at = a ? a[t] : A(0);
    for (int64_t j = 0; j < E; ++j) mc[j] = std::max(mc[j], row[j] + at);
  }
  for (int64_t t = b; t < e; ++t) {
    const A* row = S + t * E;
    const A at = a ? a[t] : A(0);
    for (int64_t j = 0; j < E; ++j) sc[j] += exp_acc(row[j] + at - mc[j]);
  }
}

// Joins the chunk partials of column j in chunk order: the column's logsumexp.
template <typename A>
A sinkhorn_col_lse(const A* m, const A* s, int64_t chunks, int64_t E, int64_t j) {
  A M = -std::numeric_limits<A>::infinity();
  for (int64_t c = 0; c < chunks; ++c) M = std::max(M, m[c * E + j]);
  if (!(M > -std::numeric_limits<A>::infinity())) return M;
  A sum = 0;
  for (int64_t c = 0; c < chunks; ++c) sum += s[c * E + j] * exp_acc(m[c * E + j] - M);
  return M + std::log(sum);
}

// logsumexp_j(S[t, j] + g[j]) of one row.
template <typename A>
A sinkhorn_row_lse(const A* row, const A* g, int64_t E) {
  A M = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < E; ++j) M = std::max(M, row[j] + g[j]);
  if (!(M > -std::numeric_limits<A>::infinity())) return M;
  A sum = 0;
  for (int64_t j = 0; j < E; ++j) sum += exp_acc(row[j] + g[j] - M);
  return M + std::log(sum);
}

// f[t] = log_r - logsumexp_j(S[t, j] + g[j]) for rows [begin, end).
template <typename A>
void sinkhorn_row_update(const A* S, const A* g, A log_r, int64_t E, int64_t begin, int64_t end,
                         A* f) {
  for (int64_t t = begin; t < end; ++t) f[t] = log_r - sinkhorn_row_lse(S + t * E, g, E);
}

// Column residual partial of chunk c: r[c * E + j] = sum_t exp(f[t] + S[t, j] + g[j]) over the
// chunk's rows (the plan's column sums, joined in chunk order by the caller).
template <typename A>
void sinkhorn_col_mass_partial(const A* S, const A* f, const A* g, int64_t T, int64_t E, int64_t c,
                               A* r) {
  const int64_t b = c * kSinkhornChunk, e = std::min(T, b + kSinkhornChunk);
  A* rc = r + c * E;
  for (int64_t j = 0; j < E; ++j) rc[j] = 0;
  for (int64_t t = b; t < e; ++t) {
    const A* row = S + t * E;
    for (int64_t j = 0; j < E; ++j) rc[j] += exp_acc(f[t] + row[j] + g[j]);
  }
}

// Row residual of rows [begin, end): out[t] = sum_j exp(f[t] + S[t, j] + g[j]) - row_mass.
template <typename A>
void sinkhorn_row_residual(const A* S, const A* f, const A* g, A row_mass, int64_t E, int64_t begin,
                           int64_t end, A* out) {
  for (int64_t t = begin; t < end; ++t) {
    const A* row = S + t * E;
    A sum = 0;
    for (int64_t j = 0; j < E; ++j) sum += exp_acc(f[t] + row[j] + g[j]);
    out[t] = sum - row_mass;
  }
}

// log_plan[t, j] = f[t] + S[t, j] + g[j] for rows [begin, end).
template <typename A>
void sinkhorn_log_plan(const A* S, const A* f, const A* g, int64_t E, int64_t begin, int64_t end,
                       A* out) {
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t j = 0; j < E; ++j) out[t * E + j] = f[t] + S[t * E + j] + g[j];
  }
}

// ---- backward ------------------------------------------------------------------------------
// Reverse step through f_i = log r - LSE_j(S + g_i), rows [begin, end): with P[t, j] =
// softmax_j(S[t, :] + g)[j], dS[t, j] -= fbar[t] P[t, j], and q[t, j] = fbar[t] P[t, j] is kept
// for the column sums that give gbar_i[j] = -sum_t q[t, j].
template <typename A>
void sinkhorn_back_rows_f(const A* S, const A* g, const A* fbar, int64_t E, int64_t begin,
                          int64_t end, A* dS, A* q) {
  for (int64_t t = begin; t < end; ++t) {
    const A* row = S + t * E;
    const A lse = sinkhorn_row_lse(row, g, E);
    for (int64_t j = 0; j < E; ++j) {
      const A v = fbar[t] * exp_acc(row[j] + g[j] - lse);
      q[t * E + j] = v;
      dS[t * E + j] -= v;
    }
  }
}

// Column sums of q over chunk c: out[c * E + j] = sum_t q[t, j] (joined in chunk order).
template <typename A>
void sinkhorn_col_sum_partial(const A* q, int64_t T, int64_t E, int64_t c, A* out) {
  const int64_t b = c * kSinkhornChunk, e = std::min(T, b + kSinkhornChunk);
  A* oc = out + c * E;
  for (int64_t j = 0; j < E; ++j) oc[j] = 0;
  for (int64_t t = b; t < e; ++t) {
    for (int64_t j = 0; j < E; ++j) oc[j] += q[t * E + j];
  }
}

// Reverse step through g_i = log c - LSE_t(S + f_{i-1}), rows [begin, end): with P[t, j] =
// exp(S[t, j] + fprev[t] - lse_col[j]) (the column softmax), dS[t, j] -= gbar[j] P[t, j] and
// fbar_prev[t] = -sum_j gbar[j] P[t, j].
template <typename A>
void sinkhorn_back_rows_g(const A* S, const A* fprev, const A* lse_col, const A* gbar, int64_t E,
                          int64_t begin, int64_t end, A* dS, A* fbar_prev) {
  for (int64_t t = begin; t < end; ++t) {
    const A* row = S + t * E;
    const A ft = fprev ? fprev[t] : A(0);
    A acc = 0;
    for (int64_t j = 0; j < E; ++j) {
      const A v = gbar[j] * exp_acc(row[j] + ft - lse_col[j]);
      dS[t * E + j] -= v;
      acc += v;
    }
    fbar_prev[t] = -acc;
  }
}

}  // namespace smoe::cpu
