// Torch-free CPU kernels of the fused SwiGLU activation and its backward, over [begin, end) rows.
// h holds the fused gate/up projection [M, 2f], gate columns first (transformers' gate_up_proj).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/inline.h"
#include "common/math.h"

namespace smoe::cpu {

// out[r, c] = silu(h[r, c]) * h[r, f + c]
template <typename T>
SMOE_INLINE void swiglu_rows(const T* h, int64_t ld, int64_t f, int64_t begin, int64_t end,
                             T* out) {
  using A = acc_t<T>;
  for (int64_t r = begin; r < end; ++r) {
    const T* gate = h + r * ld;
    const T* up = gate + f;
    T* o = out + r * f;
    for (int64_t c = 0; c < f; ++c) {
      const A g = load(gate[c]);
      o[c] = from_acc<T>(g * sigmoid(g) * load(up[c]));
    }
  }
}

// dh[r, c] = grad * up * s * (1 + g * (1 - s)),  dh[r, f + c] = grad * g * s,  s = sigmoid(g)
template <typename T>
SMOE_INLINE void swiglu_backward_rows(const T* grad, int64_t ld_grad, const T* h, int64_t ld,
                                      int64_t f, int64_t begin, int64_t end, T* dh) {
  using A = acc_t<T>;
  for (int64_t r = begin; r < end; ++r) {
    // restrict: the outputs never alias the inputs, which lets -O3 vectorise this loop
    const T* __restrict__ gate = h + r * ld;
    const T* __restrict__ up = gate + f;
    const T* __restrict__ go = grad + r * ld_grad;
    T* __restrict__ dgate = dh + r * 2 * f;
    T* __restrict__ dup = dh + r * 2 * f + f;
    for (int64_t c = 0; c < f; ++c) {
      const A g = load(gate[c]), u = load(up[c]), d = load(go[c]);
      const A s = sigmoid(g);
      dgate[c] = from_acc<T>(d * u * s * (A(1) + g * (A(1) - s)));
      dup[c] = from_acc<T>(d * g * s);
    }
  }
}

// The entry points the glue calls, one clone per x86 vector ISA (SMOE_ISA_CLONES).
#define SMOE_SWIGLU_ENTRY(T)                                                                     \
  SMOE_ISA_CLONES inline void swiglu(const T* h, int64_t ld, int64_t f, int64_t begin,           \
                                     int64_t end, T* out) {                                      \
    swiglu_rows<T>(h, ld, f, begin, end, out);                                                   \
  }                                                                                              \
  SMOE_ISA_CLONES inline void swiglu_backward(const T* grad, int64_t ld_grad, const T* h,        \
                                              int64_t ld, int64_t f, int64_t begin, int64_t end, \
                                              T* dh) {                                           \
    swiglu_backward_rows<T>(grad, ld_grad, h, ld, f, begin, end, dh);                            \
  }
SMOE_SWIGLU_ENTRY(float)
SMOE_SWIGLU_ENTRY(double)
SMOE_SWIGLU_ENTRY(half_t)
SMOE_SWIGLU_ENTRY(bfloat16_t)
#undef SMOE_SWIGLU_ENTRY

}  // namespace smoe::cpu
