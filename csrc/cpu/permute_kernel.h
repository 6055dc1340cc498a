// Torch-free CPU kernels of permute / combine and their backwards: gathers only, no atomics, so
// every result is bitwise reproducible.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/dtype.h"
#include "common/inline.h"

namespace smoe::cpu {

// The position of the first idx[i] outside [-1, hi), or -1 when all are in range. The gathers
// below trust their indices; the public ops check them with this first (one pass over n ints).
inline int64_t first_out_of_range(const int32_t* idx, int64_t n, int64_t hi) {
  for (int64_t i = 0; i < n; ++i) {
    if (idx[i] < -1 || idx[i] >= hi) return i;
  }
  return -1;
}

// Software prefetch for the gathers of combine and of the backwards. Their source rows are
// scattered (a token's k rows lie in k experts' groups), and a short row of a few cache lines ends
// before the hardware prefetcher has seen a stream, so each row would wait on memory. So the
// row-by-token loops fetch the k rows of the token kAhead ahead, and the row-by-row loop the row
// kRowsAhead ahead. Measured one thread, fine-grained shape (d = 256, k = 8, E = 64), C++ harness
// alternating both versions: combine fp32 2.2 -> 1.8 ms, its weight gradient 2.2 -> 1.6-1.9 ms, the
// bf16 scaled gather 0.8 -> 0.6 ms. Rows over kPrefetchRowBytes are left to the hardware prefetcher,
// which follows them (at Mixtral's d = 1024, prefetching them too made bf16 combine slower). The
// arithmetic is untouched: results are bitwise the same.
constexpr int64_t kAhead = 2;
constexpr int64_t kRowsAhead = 16;
constexpr int64_t kPrefetchRowBytes = 1024;

template <typename T>
SMOE_INLINE bool worth_prefetch(int64_t d) {
  return d * static_cast<int64_t>(sizeof(T)) <= kPrefetchRowBytes;
}

template <typename T>
SMOE_INLINE void prefetch_row(const T* src, int64_t ld, int32_t r, int64_t d) {
  constexpr int64_t kLine = 64 / sizeof(T);
  if (r < 0) return;
  const T* s = src + r * ld;
  for (int64_t c = 0; c < d; c += kLine) __builtin_prefetch(s + c);
}

// The rows r[0 .. k) of one token.
template <typename T>
SMOE_INLINE void prefetch_rows(const T* src, int64_t ld, const int32_t* r, int64_t k, int64_t d) {
  for (int64_t j = 0; j < k; ++j) prefetch_row(src, ld, r[j], d);
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
SMOE_INLINE void scaled_gather_rows(const T* src, int64_t ld, const int32_t* idx, const T* scale,
                        const int32_t* sidx, int64_t d, int64_t begin, int64_t end, T* out) {
  using A = acc_t<T>;
  const bool prefetch = worth_prefetch<T>(d);
  for (int64_t i = begin; i < end; ++i) {
    T* o = out + i * d;
    if (prefetch && i + kRowsAhead < end) prefetch_row(src, ld, idx[i + kRowsAhead], d);
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
// accumulated in acc_t<T>; each element adds its k terms in j order (0 + w0·x0 + w1·x1 + ...), so
// the sum is reproducible. Columns go in chunks through a local accumulator, the j loop outside
// the column loop, so that the column loop vectorises.
template <bool kPrefetch, typename T>
SMOE_INLINE void combine_rows_impl(const T* src, int64_t ld, const int32_t* row, const T* weight,
                                   int64_t k, int64_t d, int64_t begin, int64_t end, T* out) {
  using A = acc_t<T>;
  constexpr int64_t kChunk = 512;
  A acc[kChunk];
  for (int64_t t = begin; t < end; ++t) {
    const int32_t* r = row + t * k;
    T* o = out + t * d;
    if (kPrefetch && t + kAhead < end) prefetch_rows(src, ld, row + (t + kAhead) * k, k, d);
    for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
      const int64_t n = d - c0 < kChunk ? d - c0 : kChunk;
      for (int64_t c = 0; c < n; ++c) acc[c] = A(0);
      for (int64_t j = 0; j < k; ++j) {
        if (r[j] < 0) continue;
        const A w = weight ? load(weight[t * k + j]) : A(1);
        const T* s = src + r[j] * ld + c0;
        for (int64_t c = 0; c < n; ++c) acc[c] += w * load(s[c]);
      }
      for (int64_t c = 0; c < n; ++c) o[c0 + c] = from_acc<T>(acc[c]);
    }
  }
}
template <typename T>
SMOE_INLINE void combine_rows(const T* src, int64_t ld, const int32_t* row, const T* weight,
                              int64_t k, int64_t d, int64_t begin, int64_t end, T* out) {
  if (worth_prefetch<T>(d)) {
    combine_rows_impl<true>(src, ld, row, weight, k, d, begin, end, out);
  } else {
    combine_rows_impl<false>(src, ld, row, weight, k, d, begin, end, out);
  }
}

// <a, b> over d elements in acc_t<T>, in a fixed order whatever the vector width: element c
// goes to lane c % kLanes, and the lanes are summed pairwise (lane l + lane l + h, h = 8, 4, 2,
// 1). The lane loop vectorises; the result is reproducible across runs, threads and machines.
template <typename T>
SMOE_INLINE acc_t<T> dot_lanes(const T* a, const T* b, int64_t d) {
  using A = acc_t<T>;
  constexpr int kLanes = 16;
  A part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += load(a[c + l]) * load(b[c + l]);
  }
  for (int l = 0; c + l < d; ++l) part[l] += load(a[c + l]) * load(b[c + l]);
  for (int h = kLanes / 2; h > 0; h /= 2) {
    for (int l = 0; l < h; ++l) part[l] += part[l + h];
  }
  return part[0];
}

// grad_weight[t, j] = <grad_out[t], y_sorted[row[t, j]]> (dot_lanes), 0 for dropped slots.
template <bool kPrefetch, typename T>
SMOE_INLINE void combine_weight_grad_impl(const T* grad_out, int64_t ld_g, const T* y_sorted,
                                          int64_t ld_y, const int32_t* row, int64_t k, int64_t d,
                                          int64_t begin, int64_t end, T* grad_weight) {
  using A = acc_t<T>;
  for (int64_t t = begin; t < end; ++t) {
    if (kPrefetch && t + kAhead < end) prefetch_rows(y_sorted, ld_y, row + (t + kAhead) * k, k, d);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t r = row[t * k + j];
      const A acc = r >= 0 ? dot_lanes(grad_out + t * ld_g, y_sorted + r * ld_y, d) : A(0);
      grad_weight[t * k + j] = from_acc<T>(acc);
    }
  }
}
template <typename T>
SMOE_INLINE void combine_weight_grad_rows(const T* grad_out, int64_t ld_g, const T* y_sorted,
                                          int64_t ld_y, const int32_t* row, int64_t k, int64_t d,
                                          int64_t begin, int64_t end, T* grad_weight) {
  if (worth_prefetch<T>(d)) {
    combine_weight_grad_impl<true>(grad_out, ld_g, y_sorted, ld_y, row, k, d, begin, end,
                                   grad_weight);
  } else {
    combine_weight_grad_impl<false>(grad_out, ld_g, y_sorted, ld_y, row, k, d, begin, end,
                                    grad_weight);
  }
}

// The entry points the glue calls for the arithmetic kernels, one clone per x86 vector ISA
// (SMOE_ISA_CLONES; the 16-bit ones need AVX-512 BW to vectorise at full width). gather_rows is
// memcpy and needs none.
#define SMOE_PERMUTE_ENTRY(T)                                                                     \
  SMOE_ISA_CLONES inline void combine(const T* src, int64_t ld, const int32_t* row,               \
                                      const T* weight, int64_t k, int64_t d, int64_t begin,       \
                                      int64_t end, T* out) {                                      \
    combine_rows<T>(src, ld, row, weight, k, d, begin, end, out);                                 \
  }                                                                                               \
  SMOE_ISA_CLONES inline void scaled_gather(const T* src, int64_t ld, const int32_t* idx,         \
                                            const T* scale, const int32_t* sidx, int64_t d,       \
                                            int64_t begin, int64_t end, T* out) {                 \
    scaled_gather_rows<T>(src, ld, idx, scale, sidx, d, begin, end, out);                         \
  }                                                                                               \
  SMOE_ISA_CLONES inline void combine_weight_grad(                                                \
      const T* grad_out, int64_t ld_g, const T* y_sorted, int64_t ld_y, const int32_t* row,       \
      int64_t k, int64_t d, int64_t begin, int64_t end, T* grad_weight) {                         \
    combine_weight_grad_rows<T>(grad_out, ld_g, y_sorted, ld_y, row, k, d, begin, end,            \
                                grad_weight);                                                     \
  }
SMOE_PERMUTE_ENTRY(float)
SMOE_PERMUTE_ENTRY(double)
SMOE_PERMUTE_ENTRY(half_t)
SMOE_PERMUTE_ENTRY(bfloat16_t)
#undef SMOE_PERMUTE_ENTRY

}  // namespace smoe::cpu
