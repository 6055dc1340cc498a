// Torch-free CPU kernels of permute / combine and their backwards: gathers only, no atomics, so
// every result is bitwise reproducible.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/dtype.h"

namespace smoe::cpu {

// The position of the first idx[i] outside [-1, hi), or -1 when all are in range. The gathers
// below trust their indices; the public ops check them with this first (one pass over n ints).
inline int64_t first_out_of_range(const int32_t* idx, int64_t n, int64_t hi) {
  for (int64_t i = 0; i < n; ++i) {
    if (idx[i] < -1 || idx[i] >= hi) return i;
  }
  return -1;
}

// out[i] = src[idx[i]] (a copy), or 0 where idx[i] < 0. src rows have stride ld; out is dense.
template <typename T>
void gather_rows(const T* src, int64_t ld, const int32_t* idx, int64_t d, int64_t begin,
                 int64_t end, T* out) {
  for (int64_t i = begin; i < end; ++i) {
    T* o = out + i * d;
    if (idx[i] < 0) {
      std::memset(static_cast<void*>(o), 0, sizeof(T) * d);
    } else {
      std::memcpy(static_cast<void*>(o), src + idx[i] * ld, sizeof(T) * d);
    }
  }
}

// out[i] = scale[sidx[i]] * src[idx[i]], or 0 where idx[i] < 0 (combine's backward to y_sorted).
template <typename T>
void scaled_gather_rows(const T* src, int64_t ld, const int32_t* idx, const T* scale,
                        const int32_t* sidx, int64_t d, int64_t begin, int64_t end, T* out) {
  using A = acc_t<T>;
  for (int64_t i = begin; i < end; ++i) {
    T* o = out + i * d;
    if (idx[i] < 0) {
      std::memset(static_cast<void*>(o), 0, sizeof(T) * d);
      continue;
    }
    const T* s = src + idx[i] * ld;
    const A w = load(scale[sidx[i]]);
    for (int64_t c = 0; c < d; ++c) o[c] = from_acc<T>(w * load(s[c]));
  }
}

// out[t] = sum_j weight[t, j] * src[row[t, j]] over rows row >= 0 (weight == nullptr: weight 1),
// accumulated in acc_t<T>; the j order is fixed, so the sum is reproducible.
template <typename T>
void combine_rows(const T* src, int64_t ld, const int32_t* row, const T* weight, int64_t k,
                  int64_t d, int64_t begin, int64_t end, T* out) {
  using A = acc_t<T>;
  for (int64_t t = begin; t < end; ++t) {
    const int32_t* r = row + t * k;
    T* o = out + t * d;
    for (int64_t c = 0; c < d; ++c) {
      A acc = 0;
      for (int64_t j = 0; j < k; ++j) {
        if (r[j] < 0) continue;
        const A w = weight ? load(weight[t * k + j]) : A(1);
        acc += w * load(src[r[j] * ld + c]);
      }
      o[c] = from_acc<T>(acc);
    }
  }
}

// grad_weight[t, j] = <grad_out[t], y_sorted[row[t, j]]>, 0 for dropped slots.
template <typename T>
void combine_weight_grad(const T* grad_out, int64_t ld_g, const T* y_sorted, int64_t ld_y,
                         const int32_t* row, int64_t k, int64_t d, int64_t begin, int64_t end,
                         T* grad_weight) {
  using A = acc_t<T>;
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t r = row[t * k + j];
      A acc = 0;
      if (r >= 0) {
        const T* g = grad_out + t * ld_g;
        const T* y = y_sorted + r * ld_y;
        for (int64_t c = 0; c < d; ++c) acc += load(g[c]) * load(y[c]);
      }
      grad_weight[t * k + j] = from_acc<T>(acc);
    }
  }
}

}  // namespace smoe::cpu
