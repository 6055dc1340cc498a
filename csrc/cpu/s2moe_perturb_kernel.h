// Torch-free CPU kernels of s2moe_perturb (S2MoE's Gaussian perturbation, specs/s2moe.md §5) and
// its backward, on x seen as [A, S, C] with statistics [A, C] (or one value each).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace smoe::cpu {

// A statistic: a full [A, C] block (stride_a = C) or one value (stride 0).
template <typename T>
struct Stat {
  const T* p;
  int64_t stride_a, stride_c;
  acc_t<T> at(int64_t a, int64_t c) const { return load(p[a * stride_a + c * stride_c]); }
};

// out = (1 + s_mul n1) x + (mu + s_add n2), for a in [begin, end).
template <typename T>
void s2moe_perturb(const T* x, const T* n1, const T* n2, Stat<T> mu, Stat<T> s_mul, Stat<T> s_add,
                   int64_t S, int64_t C, int64_t begin, int64_t end, T* out) {
  using A = acc_t<T>;
  for (int64_t a = begin; a < end; ++a) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t base = (a * S + s) * C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = base + c;
        const A v = (A(1) + s_mul.at(a, c) * load(n1[i])) * load(x[i]) +
                    (mu.at(a, c) + s_add.at(a, c) * load(n2[i]));
        out[i] = from_acc<T>(v);
      }
    }
  }
}

// Backward for a in [begin, end): grad_x = g (1 + s_mul n1) (when grad_x is not null); the
// statistics' gradients summed over S in s order per (a, c), into acc buffers [A, C] (each null
// when not asked for): d mu = sum g, d s_mul = sum g n1 x, d s_add = sum g n2.
template <typename T>
void s2moe_perturb_backward(const T* g, const T* x, const T* n1, const T* n2, Stat<T> s_mul,
                            int64_t S, int64_t C, int64_t begin, int64_t end, T* grad_x,
                            acc_t<T>* d_mu, acc_t<T>* d_mul, acc_t<T>* d_add) {
  using A = acc_t<T>;
  for (int64_t a = begin; a < end; ++a) {
    for (int64_t c = 0; c < C; ++c) {
      if (d_mu) d_mu[a * C + c] = A(0);
      if (d_mul) d_mul[a * C + c] = A(0);
      if (d_add) d_add[a * C + c] = A(0);
    }
    for (int64_t s = 0; s < S; ++s) {
      const int64_t base = (a * S + s) * C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = base + c;
        const A gi = load(g[i]);
        if (grad_x) grad_x[i] = from_acc<T>(gi * (A(1) + s_mul.at(a, c) * load(n1[i])));
        if (d_mu) d_mu[a * C + c] += gi;
        if (d_mul) d_mul[a * C + c] += gi * load(n1[i]) * load(x[i]);
        if (d_add) d_add[a * C + c] += gi * load(n2[i]);
      }
    }
  }
}

}  // namespace smoe::cpu
