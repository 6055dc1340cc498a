// Torch-free CPU kernel of unified_topk (USMoE's joint top-N over a group's S * E scores).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/dtype.h"

namespace smoe::cpu {

// Groups [begin, end) of scores [G, L] (row stride ld): the counts[g] (or n) largest of each row,
// ties to the lower index, written in ascending index order to out [G, n], -1 after them. Returns
// the first group (>= begin) holding a NaN, or -1.
template <typename T>
int64_t unified_topk_rows(const T* scores, int64_t ld, int64_t L, int64_t n, const int64_t* counts,
                          int64_t begin, int64_t end, int64_t* out) {
  using A = acc_t<T>;
  std::vector<int64_t> idx(static_cast<size_t>(L));
  for (int64_t g = begin; g < end; ++g) {
    const T* row = scores + g * ld;
    for (int64_t i = 0; i < L; ++i) {
      if (std::isnan(load(row[i]))) return g;
    }
    const int64_t c = counts == nullptr ? n : counts[g];
    int64_t* o = out + g * n;
    if (c > 0) {
      for (int64_t i = 0; i < L; ++i) idx[i] = i;
      const auto before = [&](int64_t a, int64_t b) {
        const A va = load(row[a]), vb = load(row[b]);
        return va > vb || (va == vb && a < b);
      };
      std::nth_element(idx.begin(), idx.begin() + (c - 1), idx.end(), before);
      std::sort(idx.begin(), idx.begin() + c);
      std::copy(idx.begin(), idx.begin() + c, o);
    }
    std::fill(o + std::max<int64_t>(c, 0), o + n, int64_t(-1));
  }
  return -1;
}

}  // namespace smoe::cpu
