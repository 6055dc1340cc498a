// Torch-free CPU kernels of cosine_scores (X-MoE hypersphere routing, specs/xmoe.md §6-§8) and
// its backward. Every function works on a [begin, end) range of rows, in the accumulation type A
// (float, or double for double storage), and writes each output element from exactly one call,
// so results do not depend on how the glue splits the ranges over threads.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/dtype.h"

namespace smoe::cpu {

// Token rows summed in blocks of this many before joining the running total: a fixed order (no
// dependence on threads) and a smaller rounding error than one long running sum.
constexpr int64_t kCosineChunk = 256;
// Output columns one task of the grad_proj reduction owns (an accumulator array on the stack).
constexpr int64_t kCosineCols = 64;

// sum_i a[i] * b[i] in A, with 8 partial sums so that -O3 vectorises the loop.
template <typename A, typename U, typename V>
inline A dot8(const U* a, const V* b, int64_t n) {
  A s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int u = 0; u < 8; ++u) s[u] += static_cast<A>(load(a[i + u])) * load(b[i + u]);
  }
  A tail = 0;
  for (; i < n; ++i) tail += static_cast<A>(load(a[i])) * load(b[i]);
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail;
}

// Euclidean norm scaled by the largest magnitude, so that large entries do not overflow the sum
// of squares (nor tiny ones underflow it). 0 for a zero (or all-NaN) row, inf for a row with inf.
template <typename U>
inline acc_t<U> robust_norm(const U* v, int64_t n) {
  using A = acc_t<U>;
  A m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::fmax(m, std::fabs(static_cast<A>(load(v[i]))));
  if (!(m > 0) || !std::isfinite(m)) return m;
  A s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const A q = static_cast<A>(load(v[i])) / m;
    s += q * q;
  }
  return m * std::sqrt(s);
}

// max(r, eps) as the floor of a norm; NaN stays NaN.
template <typename A>
inline A floored(A r, A eps) {
  return r < eps ? eps : r;
}

// Expert rows [begin, end) of e [N, de] (contiguous): ehat = e / max(|e|, eps), enorm = |e|.
template <typename T>
void cosine_normalize_experts(const T* e, int64_t de, acc_t<T> eps, int64_t begin, int64_t end,
                              acc_t<T>* ehat, acc_t<T>* enorm) {
  using A = acc_t<T>;
  for (int64_t i = begin; i < end; ++i) {
    const A r = robust_norm(e + i * de, de);
    const A denom = floored(r, eps);
    for (int64_t j = 0; j < de; ++j) ehat[i * de + j] = static_cast<A>(load(e[i * de + j])) / denom;
    enorm[i] = r;
  }
}

// One token: zhat = h W^T (normalised when `normalize`); returns |z|.
template <typename T>
acc_t<T> cosine_token(const T* h, const T* proj, int64_t d, int64_t de, acc_t<T> eps,
                      bool normalize, acc_t<T>* zhat) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < de; ++j) zhat[j] = dot8<A>(proj + j * d, h, d);
  const A r = robust_norm(zhat, de);
  if (normalize) {
    const A denom = floored(r, eps);
    for (int64_t j = 0; j < de; ++j) zhat[j] /= denom;
  }
  return r;
}

// The smallest finite entry of a score row, and whether the row has a non-finite one (the
// replacement value of specs/xmoe.md §8, taken per row: 0 when no entry is finite).
template <typename A>
inline A cosine_row_fill(const A* scores, int64_t N, bool* bad) {
  A lo = std::numeric_limits<A>::infinity();
  *bad = false;
  for (int64_t i = 0; i < N; ++i) {
    const A c = scores[i];
    if (std::isfinite(c)) {
      lo = c < lo ? c : lo;
    } else {
      *bad = true;
    }
  }
  return std::isfinite(lo) ? lo : A(0);
}

// Forward over tokens [begin, end): h [T, d] (row stride ldh), proj [de, d], ehat [N, de];
// cos and logits [T, N] contiguous; zbuf [T, de] scratch. tauc = max(tau, 1e-4).
template <typename T>
void cosine_scores_rows(const T* h, int64_t ldh, const T* proj, const acc_t<T>* ehat, int64_t d,
                        int64_t de, int64_t N, acc_t<T> eps, bool normalize, acc_t<T> tauc,
                        int64_t begin, int64_t end, acc_t<T>* zbuf, acc_t<T>* cos,
                        acc_t<T>* logits) {
  using A = acc_t<T>;
  for (int64_t t = begin; t < end; ++t) {
    A* zhat = zbuf + t * de;
    cosine_token(h + t * ldh, proj, d, de, eps, normalize, zhat);
    A* c = cos + t * N;
    A* l = logits + t * N;
    for (int64_t i = 0; i < N; ++i) c[i] = dot8<A>(zhat, ehat + i * de, de);  // once per score
    bool bad = false;
    const A fill = cosine_row_fill(c, N, &bad);
    for (int64_t i = 0; i < N; ++i) {
      if (bad && !std::isfinite(c[i])) c[i] = fill;
      l[i] = c[i] / tauc;
    }
  }
}

// d ehat -> d e (or d zhat -> d z) through x = v / max(|v|, eps):
//   |v| >= eps: (g - xhat (xhat . g)) / |v|;  otherwise g / eps.
template <typename A>
inline void cosine_unnormalize(const A* xhat, A r, A eps, int64_t n, A* g) {
  if (r >= eps) {
    A dot = 0;
    for (int64_t j = 0; j < n; ++j) dot += xhat[j] * g[j];
    for (int64_t j = 0; j < n; ++j) g[j] = (g[j] - xhat[j] * dot) / r;
  } else {
    for (int64_t j = 0; j < n; ++j) g[j] /= eps;
  }
}

// Backward, per token [begin, end): recomputes zhat and the scores, then
//   g = grad_cos + grad_logits / tauc (0 where the score was replaced),
//   gz = d z, grad_h = gz W, p[t] = sum_i grad_logits * cos (for d tau).
// Writes zbuf [T, de] (zhat), gbuf [T, N] (g), gzbuf [T, de] (gz), p [T] and grad_h [T, d].
template <typename T>
void cosine_scores_backward_rows(const acc_t<T>* grad_cos, const acc_t<T>* grad_logits, const T* h,
                                 int64_t ldh, const T* proj, const acc_t<T>* ehat, int64_t d,
                                 int64_t de, int64_t N, acc_t<T> eps, bool normalize, acc_t<T> tauc,
                                 int64_t begin, int64_t end, acc_t<T>* zbuf, acc_t<T>* gbuf,
                                 acc_t<T>* gzbuf, acc_t<T>* p, T* grad_h) {
  using A = acc_t<T>;
  for (int64_t t = begin; t < end; ++t) {
    A* zhat = zbuf + t * de;
    const A r = cosine_token(h + t * ldh, proj, d, de, eps, normalize, zhat);
    const A* gc = grad_cos + t * N;
    const A* gl = grad_logits + t * N;
    A* g = gbuf + t * N;  // the scores first (each computed once), then their gradients
    for (int64_t i = 0; i < N; ++i) g[i] = dot8<A>(zhat, ehat + i * de, de);
    bool bad = false;
    const A fill = cosine_row_fill(g, N, &bad);
    A pt = 0;
    for (int64_t i = 0; i < N; ++i) {
      const A v = g[i];
      const bool replaced = bad && !std::isfinite(v);
      g[i] = replaced ? A(0) : gc[i] + gl[i] / tauc;
      pt += gl[i] * (replaced ? fill : v);
    }
    p[t] = pt;
    A* gz = gzbuf + t * de;
    for (int64_t j = 0; j < de; ++j) gz[j] = 0;
    for (int64_t i = 0; i < N; ++i) {
      const A gi = g[i];
      for (int64_t j = 0; j < de; ++j) gz[j] += gi * ehat[i * de + j];
    }
    if (normalize) cosine_unnormalize(zhat, r, eps, de, gz);
    T* gh = grad_h + t * d;
    for (int64_t c0 = 0; c0 < d; c0 += kCosineCols) {
      const int64_t nc = d - c0 < kCosineCols ? d - c0 : kCosineCols;
      A acc[kCosineCols] = {};
      for (int64_t j = 0; j < de; ++j) {
        const A gj = gz[j];
        const T* w = proj + j * d + c0;
        for (int64_t u = 0; u < nc; ++u) acc[u] += gj * load(w[u]);
      }
      for (int64_t u = 0; u < nc; ++u) gh[c0 + u] = from_acc<T>(acc[u]);
    }
  }
}

// grad_proj [de, d] = gz^T h, tasks [begin, end) over column blocks of kCosineCols, each owning
// its columns of every row j. Every entry sums over the tokens in token order, in blocks of
// kCosineChunk joined in block order; a task walks the tokens once, reading each token's columns
// of h once for all de rows (acc holds de x kCosineCols partial sums).
template <typename T>
void cosine_grad_proj_tasks(const acc_t<T>* gzbuf, const T* h, int64_t ldh, int64_t T_, int64_t d,
                            int64_t de, int64_t begin, int64_t end, acc_t<T>* acc,
                            acc_t<T>* total, T* grad_proj) {
  using A = acc_t<T>;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t c0 = task * kCosineCols;
    const int64_t nc = d - c0 < kCosineCols ? d - c0 : kCosineCols;
    for (int64_t k = 0; k < de * kCosineCols; ++k) total[k] = 0;
    for (int64_t t0 = 0; t0 < T_; t0 += kCosineChunk) {
      const int64_t t1 = T_ - t0 < kCosineChunk ? T_ : t0 + kCosineChunk;
      for (int64_t k = 0; k < de * kCosineCols; ++k) acc[k] = 0;
      for (int64_t t = t0; t < t1; ++t) {
        const T* x = h + t * ldh + c0;
        const A* gz = gzbuf + t * de;
        for (int64_t j = 0; j < de; ++j) {
          const A gj = gz[j];
          A* a = acc + j * kCosineCols;
          for (int64_t u = 0; u < nc; ++u) a[u] += gj * load(x[u]);
        }
      }
      for (int64_t k = 0; k < de * kCosineCols; ++k) total[k] += acc[k];
    }
    for (int64_t j = 0; j < de; ++j) {
      for (int64_t u = 0; u < nc; ++u) {
        grad_proj[j * d + c0 + u] = from_acc<T>(total[j * kCosineCols + u]);
      }
    }
  }
}

// Experts per task of the gehat reduction.
constexpr int64_t kCosineExperts = 16;

// gehat [N, de] = g^T zhat, tasks [begin, end) over blocks of kCosineExperts experts (rows i),
// each owning its rows. Every entry sums over the tokens in token order, in blocks of
// kCosineChunk joined in block order (acc and total hold kCosineExperts x de sums).
template <typename A>
void cosine_grad_ehat_tasks(const A* gbuf, const A* zbuf, int64_t T_, int64_t N, int64_t de,
                            int64_t begin, int64_t end, A* acc, A* total, A* gehat) {
  for (int64_t task = begin; task < end; ++task) {
    const int64_t i0 = task * kCosineExperts;
    const int64_t ni = N - i0 < kCosineExperts ? N - i0 : kCosineExperts;
    for (int64_t k = 0; k < ni * de; ++k) total[k] = 0;
    for (int64_t t0 = 0; t0 < T_; t0 += kCosineChunk) {
      const int64_t t1 = T_ - t0 < kCosineChunk ? T_ : t0 + kCosineChunk;
      for (int64_t k = 0; k < ni * de; ++k) acc[k] = 0;
      for (int64_t t = t0; t < t1; ++t) {
        const A* z = zbuf + t * de;
        const A* g = gbuf + t * N + i0;
        for (int64_t i = 0; i < ni; ++i) {
          const A gi = g[i];
          A* a = acc + i * de;
          for (int64_t j = 0; j < de; ++j) a[j] += gi * z[j];
        }
      }
      for (int64_t k = 0; k < ni * de; ++k) total[k] += acc[k];
    }
    for (int64_t k = 0; k < ni * de; ++k) gehat[i0 * de + k] = total[k];
  }
}

// grad_expert_emb rows [begin, end) from gehat through the expert normalisation.
template <typename T>
void cosine_grad_experts_rows(acc_t<T>* gehat, const acc_t<T>* ehat, const acc_t<T>* enorm,
                              int64_t de, acc_t<T> eps, int64_t begin, int64_t end,
                              T* grad_expert_emb) {
  for (int64_t i = begin; i < end; ++i) {
    cosine_unnormalize(ehat + i * de, enorm[i], eps, de, gehat + i * de);
    for (int64_t j = 0; j < de; ++j) grad_expert_emb[i * de + j] = from_acc<T>(gehat[i * de + j]);
  }
}

// sum of p [n] in index order, in blocks of kCosineChunk.
template <typename A>
A cosine_ordered_sum(const A* p, int64_t n) {
  A total = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kCosineChunk) {
    const int64_t t1 = n - t0 < kCosineChunk ? n : t0 + kCosineChunk;
    A acc = 0;
    for (int64_t t = t0; t < t1; ++t) acc += p[t];
    total += acc;
  }
  return total;
}

}  // namespace smoe::cpu
