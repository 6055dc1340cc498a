// Torch-free CPU kernels of graph_mix and its backward (specs/graph_routing.md §2, §5). All three
// products are out = sum_k a(r, k) v(k, :) over rows r of a tile: the forward A x' (v = x' rows),
// grad_x = A_cur^T g (v = g rows) and grad_A = g x'^T (v = x'^T, packed). The tile's columns
// (one vector of W = 64 bytes of the math type A = acc_t<T>: 16 floats, 8 doubles) are packed in A
// per slice of kGraphK reduction steps, and a register-blocked micro-kernel runs kGraphR rows at a
// time. x' = [cache; x] is never built: row j of x' is cache row j for j < C, else x row j - C.
//
// Every output is one accumulator summed over k ascending (slices continue the same sum), so the
// result depends on the shapes only, never on how the glue spreads the tiles over threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/dtype.h"
#include "common/inline.h"

namespace smoe::cpu {

constexpr int64_t kGraphRows = 64;  // output rows of one tile (one glue work item)
constexpr int64_t kGraphK = 256;    // reduction steps packed at a time
constexpr int kGraphR = 4;          // rows of the micro-kernel's register block
// Output columns of one tile: one 64-byte vector of the math type.
template <typename A>
constexpr int64_t kGraphW = static_cast<int64_t>(64 / sizeof(A));

// One call's sizes: x [B, S, E], cache [B, C, E], A [B, S, C + S]; `mix` is false when lam = 0
// (the graph term is dropped, not multiplied by 0: out = self_coef x exactly).
template <typename A>
struct GraphParams {
  int64_t S, E, C;
  A self_coef, lam;
  bool mix;
};

// Row j of x' = [cache; x] in batch entry b.
template <typename T>
SMOE_INLINE const T* graph_row(const T* x, const T* cache, int64_t b, int64_t j, int64_t S,
                               int64_t E, int64_t C) {
  return j < C ? cache + (b * C + j) * E : x + (b * S + (j - C)) * E;
}

// One W-wide vector of the math type. GCC/Clang vector extensions make the micro-kernel's
// accumulators registers (the auto-vectoriser vectorised the wrong loop); plain arrays elsewhere.
#if defined(__GNUC__)
template <typename A>
struct GraphVec {
  typedef A type __attribute__((vector_size(64)));
};
#endif

// acc[r][:] += sum_{k < K} a(r, k) panel[k][:] for R rows, a(r, k) = p[r * rs + k * ks], with
// acc (R rows of W) loaded from and stored back to `res`.
template <typename T, int R>
SMOE_INLINE void graph_micro(const T* __restrict__ p, int64_t rs, int64_t ks,
                             const acc_t<T>* __restrict__ panel, int64_t K,
                             acc_t<T>* __restrict__ res) {
  using A = acc_t<T>;
  constexpr int64_t W = kGraphW<A>;
#if defined(__GNUC__)
  using V = typename GraphVec<A>::type;
  static_assert(sizeof(V) == W * sizeof(A), "one vector per row");
  V acc[R];
  for (int r = 0; r < R; ++r) std::memcpy(&acc[r], res + r * W, sizeof(V));
  for (int64_t k = 0; k < K; ++k) {
    V v;
    std::memcpy(&v, panel + k * W, sizeof(V));
    for (int r = 0; r < R; ++r) acc[r] += static_cast<A>(load(p[r * rs + k * ks])) * v;
  }
  for (int r = 0; r < R; ++r) std::memcpy(res + r * W, &acc[r], sizeof(V));
#else
  for (int64_t k = 0; k < K; ++k) {
    for (int r = 0; r < R; ++r) {
      const A a = load(p[r * rs + k * ks]);
      for (int64_t w = 0; w < W; ++w) res[r * W + w] += a * panel[k * W + w];
    }
  }
#endif
}

// res[r][:] += sum_{k < K} a(r, k) panel[k][:] for r < rows, kGraphR rows at a time.
template <typename T>
SMOE_INLINE void graph_panel_rows(const T* p, int64_t rows, int64_t rs, int64_t ks,
                                  const acc_t<T>* panel, int64_t K, acc_t<T>* res) {
  constexpr int64_t W = kGraphW<acc_t<T>>;
  int64_t r = 0;
  for (; r + kGraphR <= rows; r += kGraphR) {
    graph_micro<T, kGraphR>(p + r * rs, rs, ks, panel, K, res + r * W);
  }
  for (; r < rows; ++r) graph_micro<T, 1>(p + r * rs, rs, ks, panel, K, res + r * W);
}

// out[r][w] = self_coef src[r][w] + lam res[r][w] (self_coef src[r][w] when !mix) for the rows and
// columns of a tile; src and out rows are E apart.
template <typename T>
SMOE_INLINE void graph_epilogue(const T* src, const acc_t<T>* res, const GraphParams<acc_t<T>>& q,
                                int64_t rows, int64_t cols, T* out) {
  using A = acc_t<T>;
  constexpr int64_t W = kGraphW<A>;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t w = 0; w < cols; ++w) {
      const A s = q.self_coef * static_cast<A>(load(src[r * q.E + w]));
      out[r * q.E + w] = from_acc<T>(q.mix ? s + q.lam * res[r * W + w] : s);
    }
  }
}

// out[b, i, e] = self_coef x[b, i, e] + lam sum_j A[b, i, j] x'[b, j, e] for i in [i0, i1) (at
// most kGraphRows), e in [e0, e1) (at most kGraphW), j ascending.
template <typename T>
SMOE_INLINE void graph_mix_tile(const T* x, const T* cache, const T* a,
                                const GraphParams<acc_t<T>>& q, int64_t b, int64_t i0, int64_t i1,
                                int64_t e0, int64_t e1, T* out) {
  using A = acc_t<T>;
  constexpr int64_t W = kGraphW<A>;
  const int64_t S = q.S, E = q.E, C = q.C, Sp = C + S, ne = e1 - e0;
  alignas(64) A res[kGraphRows * W] = {};
  alignas(64) A panel[kGraphK * W];
  for (int64_t k0 = 0; q.mix && k0 < Sp; k0 += kGraphK) {
    const int64_t K = std::min(kGraphK, Sp - k0);
    for (int64_t k = 0; k < K; ++k) {
      const T* row = graph_row(x, cache, b, k0 + k, S, E, C) + e0;
      for (int64_t w = 0; w < W; ++w) panel[k * W + w] = w < ne ? A(load(row[w])) : A(0);
    }
    graph_panel_rows<T>(a + (b * S + i0) * Sp + k0, i1 - i0, Sp, 1, panel, K, res);
  }
  const int64_t o = (b * S + i0) * E + e0;
  graph_epilogue<T>(x + o, res, q, i1 - i0, ne, out + o);
}

// grad_x[b, j, e] = self_coef g[b, j, e] + lam sum_i A[b, i, C + j] g[b, i, e] for j in [j0, j1),
// e in [e0, e1), i ascending: the current-block columns of A only (the cache gets no gradient).
template <typename T>
SMOE_INLINE void graph_mix_grad_x_tile(const T* g, const T* a, const GraphParams<acc_t<T>>& q,
                                       int64_t b, int64_t j0, int64_t j1, int64_t e0, int64_t e1,
                                       T* grad_x) {
  using A = acc_t<T>;
  constexpr int64_t W = kGraphW<A>;
  const int64_t S = q.S, E = q.E, C = q.C, Sp = C + S, ne = e1 - e0;
  alignas(64) A res[kGraphRows * W] = {};
  alignas(64) A panel[kGraphK * W];
  for (int64_t k0 = 0; q.mix && k0 < S; k0 += kGraphK) {
    const int64_t K = std::min(kGraphK, S - k0);
    for (int64_t k = 0; k < K; ++k) {
      const T* row = g + (b * S + k0 + k) * E + e0;
      for (int64_t w = 0; w < W; ++w) panel[k * W + w] = w < ne ? A(load(row[w])) : A(0);
    }
    graph_panel_rows<T>(a + (b * S + k0) * Sp + C + j0, j1 - j0, 1, Sp, panel, K, res);
  }
  const int64_t o = (b * S + j0) * E + e0;
  graph_epilogue<T>(g + o, res, q, j1 - j0, ne, grad_x + o);
}

// grad_A[b, i, j] = lam sum_e g[b, i, e] x'[b, j, e] for i in [i0, i1), j in [j0, j1) (at most
// kGraphW), e ascending; 0 when lam = 0.
template <typename T>
SMOE_INLINE void graph_mix_grad_a_tile(const T* g, const T* x, const T* cache,
                                       const GraphParams<acc_t<T>>& q, int64_t b, int64_t i0,
                                       int64_t i1, int64_t j0, int64_t j1, T* grad_a) {
  using A = acc_t<T>;
  constexpr int64_t W = kGraphW<A>;
  const int64_t S = q.S, E = q.E, C = q.C, Sp = C + S, nj = j1 - j0;
  alignas(64) A res[kGraphRows * W] = {};
  alignas(64) A panel[kGraphK * W];
  for (int64_t k0 = 0; q.mix && k0 < E; k0 += kGraphK) {
    const int64_t K = std::min(kGraphK, E - k0);
    for (int64_t w = 0; w < W; ++w) {  // panel[e][w] = x'[j0 + w, k0 + e]
      const T* row = w < nj ? graph_row(x, cache, b, j0 + w, S, E, C) + k0 : nullptr;
      for (int64_t k = 0; k < K; ++k) panel[k * W + w] = row ? A(load(row[k])) : A(0);
    }
    graph_panel_rows<T>(g + (b * S + i0) * E + k0, i1 - i0, E, 1, panel, K, res);
  }
  for (int64_t i = 0; i < i1 - i0; ++i) {
    T* oi = grad_a + (b * S + i0 + i) * Sp + j0;
    for (int64_t w = 0; w < nj; ++w) oi[w] = from_acc<T>(q.lam * res[i * W + w]);
  }
}

// The entry points the glue calls, one clone per x86 vector ISA (SMOE_ISA_CLONES).
#define SMOE_GRAPH_ENTRY(T)                                                                      \
  SMOE_ISA_CLONES inline void graph_mix(const T* x, const T* cache, const T* a,                  \
                                        const GraphParams<acc_t<T>>& q, int64_t b, int64_t i0,   \
                                        int64_t i1, int64_t e0, int64_t e1, T* out) {            \
    graph_mix_tile<T>(x, cache, a, q, b, i0, i1, e0, e1, out);                                   \
  }                                                                                              \
  SMOE_ISA_CLONES inline void graph_mix_grad_x(                                                  \
      const T* g, const T* a, const GraphParams<acc_t<T>>& q, int64_t b, int64_t j0, int64_t j1, \
      int64_t e0, int64_t e1, T* grad_x) {                                                       \
    graph_mix_grad_x_tile<T>(g, a, q, b, j0, j1, e0, e1, grad_x);                                \
  }                                                                                              \
  SMOE_ISA_CLONES inline void graph_mix_grad_a(                                                  \
      const T* g, const T* x, const T* cache, const GraphParams<acc_t<T>>& q, int64_t b,         \
      int64_t i0, int64_t i1, int64_t j0, int64_t j1, T* grad_a) {                               \
    graph_mix_grad_a_tile<T>(g, x, cache, q, b, i0, i1, j0, j1, grad_a);                         \
  }
SMOE_GRAPH_ENTRY(float)
SMOE_GRAPH_ENTRY(double)
SMOE_GRAPH_ENTRY(half_t)
SMOE_GRAPH_ENTRY(bfloat16_t)
#undef SMOE_GRAPH_ENTRY

}  // namespace smoe::cpu
