// Torch-free CPU kernels of momentum_update and its backward (specs/momentum_smoe.md §3-§5, §9):
// elementwise over [begin, end) of contiguous arrays. u, delta and grad_delta have the storage
// type T; the state (m, p, v) and its gradients have A = acc_t<T> (float, double for double), the
// type all math runs in. Every element is computed on its own, in a fixed order of operations.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtype.h"
#include "common/inline.h"

namespace smoe::cpu {

// The kind codes (smoe::ops::MomentumKind).
constexpr int kMomentumHeavyBall = 0;
constexpr int kMomentumAdam = 1;
constexpr int kMomentumRobust = 2;

// The scalar options in the math type; the derived constants are rounded once from double.
template <typename A>
struct MomentumParams {
  A mu, gamma, sign;
  A beta1, beta2, one_minus_beta1, one_minus_beta2, sign_gamma1, eps;
  A robust_a, robust_b;
};

// heavy ball (§3): m' = mu m + gamma u, delta = sign m'.  robust (§5): m' = -u + b m, delta = a m'.
template <typename T, bool kRobust>
SMOE_INLINE void momentum_linear_range(const T* __restrict__ u, const acc_t<T>* __restrict__ m,
                                       const MomentumParams<acc_t<T>>& q, int64_t begin,
                                       int64_t end, T* __restrict__ delta,
                                       acc_t<T>* __restrict__ m_out) {
  using A = acc_t<T>;
  const A cm = kRobust ? q.robust_b : q.mu;
  const A cu = kRobust ? A(-1) : q.gamma;
  const A cd = kRobust ? q.robust_a : q.sign;
  for (int64_t i = begin; i < end; ++i) {
    const A mn = cm * m[i] + cu * load(u[i]);
    m_out[i] = mn;
    delta[i] = from_acc<T>(cd * mn);
  }
}

// Adam step (§4): p' = b1 p + (1-b1) u, v' = b2 v + (1-b2) u², delta = sign g1 p' / sqrt(v' + eps);
// and the heavy-ball buffer m' = mu m + gamma u.
template <typename T>
SMOE_INLINE void momentum_adam_range(const T* __restrict__ u, const acc_t<T>* __restrict__ m,
                                     const acc_t<T>* __restrict__ p, const acc_t<T>* __restrict__ v,
                                     const MomentumParams<acc_t<T>>& q, int64_t begin, int64_t end,
                                     T* __restrict__ delta, acc_t<T>* __restrict__ m_out,
                                     acc_t<T>* __restrict__ p_out, acc_t<T>* __restrict__ v_out) {
  using A = acc_t<T>;
  for (int64_t i = begin; i < end; ++i) {
    const A x = load(u[i]);
    const A pn = q.beta1 * p[i] + q.one_minus_beta1 * x;
    const A vn = q.beta2 * v[i] + q.one_minus_beta2 * (x * x);
    m_out[i] = q.mu * m[i] + q.gamma * x;
    p_out[i] = pn;
    v_out[i] = vn;
    delta[i] = from_acc<T>(q.sign_gamma1 * (pn / std::sqrt(vn + q.eps)));
  }
}

// Backward of the linear kinds: G = grad_m + cd grad_delta; grad_u = cu G, grad_m_in = cm G.
template <typename T, bool kRobust>
SMOE_INLINE void momentum_linear_backward_range(const T* __restrict__ grad_delta,
                                                const acc_t<T>* __restrict__ grad_m,
                                                const MomentumParams<acc_t<T>>& q, int64_t begin,
                                                int64_t end, T* __restrict__ grad_u,
                                                acc_t<T>* __restrict__ grad_m_in) {
  using A = acc_t<T>;
  const A cm = kRobust ? q.robust_b : q.mu;
  const A cu = kRobust ? A(-1) : q.gamma;
  const A cd = kRobust ? q.robust_a : q.sign;
  for (int64_t i = begin; i < end; ++i) {
    const A g = grad_m[i] + cd * load(grad_delta[i]);
    grad_u[i] = from_acc<T>(cu * g);
    grad_m_in[i] = cm * g;
  }
}

// Backward of the Adam step (§9), recomputing p', v' from u, p, v. With r = sqrt(v' + eps):
// Gp = grad_p + grad_delta sign g1 / r, Gv = grad_v - grad_delta sign g1 p' / (2 r³);
// grad_u = (1-b1) Gp + 2 (1-b2) u Gv + gamma grad_m, grad_p_in = b1 Gp, grad_v_in = b2 Gv,
// grad_m_in = mu grad_m.
template <typename T>
SMOE_INLINE void momentum_adam_backward_range(
    const T* __restrict__ grad_delta, const acc_t<T>* __restrict__ grad_m,
    const acc_t<T>* __restrict__ grad_p, const acc_t<T>* __restrict__ grad_v,
    const T* __restrict__ u, const acc_t<T>* __restrict__ p, const acc_t<T>* __restrict__ v,
    const MomentumParams<acc_t<T>>& q, int64_t begin, int64_t end, T* __restrict__ grad_u,
    acc_t<T>* __restrict__ grad_m_in, acc_t<T>* __restrict__ grad_p_in,
    acc_t<T>* __restrict__ grad_v_in) {
  using A = acc_t<T>;
  for (int64_t i = begin; i < end; ++i) {
    const A x = load(u[i]);
    const A pn = q.beta1 * p[i] + q.one_minus_beta1 * x;
    const A vn = q.beta2 * v[i] + q.one_minus_beta2 * (x * x);
    const A inv_r = A(1) / std::sqrt(vn + q.eps);
    const A t = load(grad_delta[i]) * q.sign_gamma1 * inv_r;
    const A gp = grad_p[i] + t;
    const A gv = grad_v[i] - A(0.5) * t * pn * (inv_r * inv_r);
    const A gm = grad_m[i];
    grad_u[i] =
        from_acc<T>(q.one_minus_beta1 * gp + A(2) * q.one_minus_beta2 * x * gv + q.gamma * gm);
    grad_m_in[i] = q.mu * gm;
    grad_p_in[i] = q.beta1 * gp;
    grad_v_in[i] = q.beta2 * gv;
  }
}

// The entry points the glue calls, one clone per x86 vector ISA (SMOE_ISA_CLONES).
//
// p, v, p_out, v_out (grad_p, grad_v, u, p, v, grad_p_in, grad_v_in) are read or written only for
// the Adam kind; the others may pass nullptr.
#define SMOE_MOMENTUM_ENTRY(T, A)                                                                 \
  SMOE_ISA_CLONES inline void momentum_update(                                                    \
      int kind, const T* u, const A* m, const A* p, const A* v, const MomentumParams<A>& q,       \
      int64_t begin, int64_t end, T* delta, A* m_out, A* p_out, A* v_out) {                       \
    if (kind == kMomentumAdam) {                                                                  \
      momentum_adam_range<T>(u, m, p, v, q, begin, end, delta, m_out, p_out, v_out);              \
    } else if (kind == kMomentumRobust) {                                                         \
      momentum_linear_range<T, true>(u, m, q, begin, end, delta, m_out);                          \
    } else {                                                                                      \
      momentum_linear_range<T, false>(u, m, q, begin, end, delta, m_out);                         \
    }                                                                                             \
  }                                                                                               \
  SMOE_ISA_CLONES inline void momentum_update_backward(                                           \
      int kind, const T* grad_delta, const A* grad_m, const A* grad_p, const A* grad_v,           \
      const T* u, const A* p, const A* v, const MomentumParams<A>& q, int64_t begin, int64_t end, \
      T* grad_u, A* grad_m_in, A* grad_p_in, A* grad_v_in) {                                      \
    if (kind == kMomentumAdam) {                                                                  \
      momentum_adam_backward_range<T>(grad_delta, grad_m, grad_p, grad_v, u, p, v, q, begin, end, \
                                      grad_u, grad_m_in, grad_p_in, grad_v_in);                   \
    } else if (kind == kMomentumRobust) {                                                         \
      momentum_linear_backward_range<T, true>(grad_delta, grad_m, q, begin, end, grad_u,          \
                                              grad_m_in);                                         \
    } else {                                                                                      \
      momentum_linear_backward_range<T, false>(grad_delta, grad_m, q, begin, end, grad_u,         \
                                               grad_m_in);                                        \
    }                                                                                             \
  }
SMOE_MOMENTUM_ENTRY(float, float)
SMOE_MOMENTUM_ENTRY(double, double)
SMOE_MOMENTUM_ENTRY(half_t, float)
SMOE_MOMENTUM_ENTRY(bfloat16_t, float)
#undef SMOE_MOMENTUM_ENTRY

}  // namespace smoe::cpu
