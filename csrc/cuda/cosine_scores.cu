// CUDA kernels of cosine_scores and its backward. Per-token work is one warp per token with
// warp-shuffle reductions in a fixed butterfly order; reductions over tokens (d proj, d E, d tau)
// are two-stage: fixed chunks of kChunk tokens, then the chunks summed in chunk order. No atomics,
// so every result is bitwise reproducible run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/cosine_scores.h"
#include "cuda/dtype.cuh"
#include "cuda/grid.cuh"

namespace smoe::cuda {
namespace {

using namespace grid;  // NOLINT: launch helpers of this file's kernels

constexpr int64_t kChunk = 256;  // tokens per partial sum of the token reductions
constexpr double kMinTemperature = 1e-4;  // compared in double, as the CPU op does

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = fminf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// The temperature as used: max(tau, 1e-4) in double (a float32 1e-4 is below it and clamps, as on
// the CPU), then float.
__device__ __forceinline__ float clamp_tau(double tau) {
  return static_cast<float>(tau < kMinTemperature ? kMinTemperature : tau);
}

__device__ __forceinline__ float floored(float r, float eps) { return r < eps ? eps : r; }

// Norm of a warp-held vector v [n] (lane-strided), scaled by its largest magnitude; all lanes get
// it. 0 for a zero (or all-NaN) vector, inf for one with inf.
template <typename U>
__device__ float warp_robust_norm(const U* v, int64_t n, int lane) {
  float m = 0.f;
  for (int64_t j = lane; j < n; j += kWarp) m = fmaxf(m, fabsf(to_float(v[j])));
  m = warp_max(m);
  if (!(m > 0.f) || isinf(m)) return m;
  float s = 0.f;
  for (int64_t j = lane; j < n; j += kWarp) {
    const float q = to_float(v[j]) / m;
    s += q * q;
  }
  return m * sqrtf(warp_sum(s));
}

// ehat [N, de] = e / max(|e|, eps), enorm [N] = |e|: one warp per expert row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    normalize_experts_kernel(const T* __restrict__ emb, int64_t N, int64_t de, float eps,
                             float* __restrict__ ehat, float* __restrict__ enorm) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  for (int64_t i = global_warp(); i < N; i += warps_in_grid()) {
    const float r = warp_robust_norm(emb + i * de, de, lane);
    const float denom = floored(r, eps);
    for (int64_t j = lane; j < de; j += kWarp) ehat[i * de + j] = to_float(emb[i * de + j]) / denom;
    if (lane == 0) enorm[i] = r;
  }
}

// One token, one warp: zhat [de] = h W^T (normalised when `normalize`) into z; returns |z|. Lane
// j % 32 owns z[j]; the trailing __syncwarp publishes z to every lane.
template <typename T>
__device__ float token_zhat(const T* h, const T* proj, int64_t d, int64_t de, float eps,
                            bool normalize, float* z, int lane) {
  for (int64_t j = 0; j < de; ++j) {
    const T* w = proj + j * d;
    float acc = 0.f;
    for (int64_t c = lane; c < d; c += kWarp) acc += to_float(w[c]) * to_float(h[c]);
    acc = warp_sum(acc);
    if (lane == j % kWarp) z[j] = acc;
  }
  __syncwarp();
  const float r = warp_robust_norm(z, de, lane);
  if (normalize) {
    const float denom = floored(r, eps);
    for (int64_t j = lane; j < de; j += kWarp) z[j] /= denom;
  }
  __syncwarp();
  return r;
}

__device__ __forceinline__ float score(const float* zhat, const float* e, int64_t de) {
  float c = 0.f;
  for (int64_t j = 0; j < de; ++j) c += zhat[j] * e[j];
  return c;
}

// First pass over a token's scores: writes the raw score of every expert into row [N] and returns
// (through *fill) the smallest finite one of the row (0 if none) and whether any is non-finite.
__device__ bool raw_scores(const float* zhat, const float* ehat, int64_t N, int64_t de, float* row,
                           float* fill, int lane) {
  float lo = INFINITY;
  bool bad = false;
  for (int64_t i = lane; i < N; i += kWarp) {
    const float c = score(zhat, ehat + i * de, de);
    row[i] = c;
    if (isfinite(c)) {
      lo = fminf(lo, c);
    } else {
      bad = true;
    }
  }
  lo = warp_min(lo);
  *fill = isfinite(lo) ? lo : 0.f;
  return __any_sync(kFullMask, bad);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cosine_scores_kernel(const T* __restrict__ h, int64_t ldh, const T* __restrict__ proj,
                         const float* __restrict__ ehat, const double* __restrict__ tau,
                         int64_t rows, int64_t d, int64_t de, int64_t N, float eps, bool normalize,
                         float* __restrict__ zbuf, float* __restrict__ cos,
                         float* __restrict__ logits) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const float tauc = clamp_tau(*tau);
  for (int64_t t = global_warp(); t < rows; t += warps_in_grid()) {
    float* z = zbuf + t * de;
    token_zhat(h + t * ldh, proj, d, de, eps, normalize, z, lane);
    float fill = 0.f;
    const bool bad = raw_scores(z, ehat, N, de, cos + t * N, &fill, lane);
    // Each lane rewrites only the entries it wrote above: no cross-lane hazard.
    for (int64_t i = lane; i < N; i += kWarp) {
      float c = cos[t * N + i];
      if (bad && !isfinite(c)) c = fill;
      cos[t * N + i] = c;
      logits[t * N + i] = c / tauc;
    }
  }
}

// d z of one token through z / max(|z|, eps), on a warp-held g [n] (lane-owned entries).
__device__ void unnormalize(const float* xhat, float r, float eps, int64_t n, float* g, int lane) {
  float dot = 0.f;
  for (int64_t j = lane; j < n; j += kWarp) dot += xhat[j] * g[j];
  dot = warp_sum(dot);
  for (int64_t j = lane; j < n; j += kWarp)
    g[j] = r >= eps ? (g[j] - xhat[j] * dot) / r : g[j] / eps;
}

// Backward per token: zbuf (zhat), gbuf (g = d cos + d logits / tauc, 0 where replaced), gzbuf
// (d z), p (sum_i d logits * cos) and grad_h = d z . W.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    cosine_backward_rows_kernel(const float* __restrict__ grad_cos,
                                const float* __restrict__ grad_logits, const T* __restrict__ h,
                                int64_t ldh, const T* __restrict__ proj,
                                const float* __restrict__ ehat, const double* __restrict__ tau,
                                int64_t rows, int64_t d, int64_t de, int64_t N, float eps,
                                bool normalize, float* __restrict__ zbuf, float* __restrict__ gbuf,
                                float* __restrict__ gzbuf, float* __restrict__ p,
                                T* __restrict__ grad_h) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const float tauc = clamp_tau(*tau);
  for (int64_t t = global_warp(); t < rows; t += warps_in_grid()) {
    float* z = zbuf + t * de;
    const float r = token_zhat(h + t * ldh, proj, d, de, eps, normalize, z, lane);
    float* g = gbuf + t * N;
    float fill = 0.f;
    const bool bad = raw_scores(z, ehat, N, de, g, &fill, lane);
    float pt = 0.f;
    for (int64_t i = lane; i < N; i += kWarp) {
      const float c = g[i];
      const bool replaced = bad && !isfinite(c);
      const float gl = grad_logits[t * N + i];
      g[i] = replaced ? 0.f : grad_cos[t * N + i] + gl / tauc;
      pt += gl * (replaced ? fill : c);
    }
    pt = warp_sum(pt);
    if (lane == 0) p[t] = pt;
    __syncwarp();
    float* gz = gzbuf + t * de;
    for (int64_t j = lane; j < de; j += kWarp) {
      float acc = 0.f;
      for (int64_t i = 0; i < N; ++i) acc += g[i] * ehat[i * de + j];
      gz[j] = acc;
    }
    if (normalize) unnormalize(z, r, eps, de, gz, lane);
    __syncwarp();
    T* gh = grad_h + t * d;
    for (int64_t c = lane; c < d; c += kWarp) {
      float acc = 0.f;
      for (int64_t j = 0; j < de; ++j) acc += gz[j] * to_float(proj[j * d + c]);
      gh[c] = from_float<T>(acc);
    }
  }
}

// Stage 1 of out [na, nb] = sum_t a[t, a] * b[t, b]: partial[chunk, a, b] over kChunk tokens.
template <typename B>
__global__ void __launch_bounds__(kThreads)
    chunk_outer_kernel(const float* __restrict__ a, int64_t lda, const B* __restrict__ b,
                       int64_t ldb, int64_t rows, int64_t na, int64_t nb, int64_t chunks,
                       float* __restrict__ partial) {
  const int64_t per_chunk = na * nb;
  for (int64_t idx = global_thread(); idx < chunks * per_chunk; idx += threads_in_grid()) {
    const int64_t chunk = idx / per_chunk, ia = (idx % per_chunk) / nb, ib = idx % nb;
    const int64_t end = (chunk + 1) * kChunk, t1 = end < rows ? end : rows;
    float acc = 0.f;
    for (int64_t t = chunk * kChunk; t < t1; ++t)
      acc += a[t * lda + ia] * to_float(b[t * ldb + ib]);
    partial[idx] = acc;
  }
}

// Stage 2: out[e] = sum over chunks of partial[chunk, e], in chunk order.
template <typename O>
__global__ void __launch_bounds__(kThreads)
    chunk_sum_kernel(const float* __restrict__ partial, int64_t chunks, int64_t n,
                     O* __restrict__ out) {
  for (int64_t e = global_thread(); e < n; e += threads_in_grid()) {
    float acc = 0.f;
    for (int64_t c = 0; c < chunks; ++c) acc += partial[c * n + e];
    out[e] = from_float<O>(acc);
  }
}

// grad_emb rows from gehat through the expert normalisation: one warp per expert.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    experts_backward_kernel(float* __restrict__ gehat, const float* __restrict__ ehat,
                            const float* __restrict__ enorm, int64_t N, int64_t de, float eps,
                            T* __restrict__ grad_emb) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  for (int64_t i = global_warp(); i < N; i += warps_in_grid()) {
    unnormalize(ehat + i * de, enorm[i], eps, de, gehat + i * de, lane);
    for (int64_t j = lane; j < de; j += kWarp)
      grad_emb[i * de + j] = from_float<T>(gehat[i * de + j]);
  }
}

// grad_tau = -sum_t p[t] / tauc^2 (0 where tau < 1e-4): one block, a fixed-order tree.
__global__ void __launch_bounds__(kThreads)
    tau_backward_kernel(const float* __restrict__ p, int64_t rows, const double* __restrict__ tau,
                        float* __restrict__ grad_tau) {
  __shared__ float partial[kThreads];
  float acc = 0.f;
  for (int64_t t = threadIdx.x; t < rows; t += kThreads) acc += p[t];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double raw = *tau;
    const float tauc = clamp_tau(raw);
    *grad_tau = raw < kMinTemperature ? 0.f : -partial[0] / (tauc * tauc);
  }
}

int64_t chunks_for(int64_t rows) { return (rows + kChunk - 1) / kChunk; }

struct BackwardLayout {
  size_t ehat, enorm, zbuf, gzbuf, gbuf, p, part_proj, part_emb, gehat, bytes;
};

BackwardLayout backward_layout(int64_t rows, int64_t d, int64_t de, int64_t N) {
  const size_t f = sizeof(float);
  const int64_t chunks = chunks_for(rows);
  Carver c{0};
  BackwardLayout l{};
  l.ehat = c.take(f * N * de);
  l.enorm = c.take(f * N);
  l.zbuf = c.take(f * rows * de);
  l.gzbuf = c.take(f * rows * de);
  l.gbuf = c.take(f * rows * N);
  l.p = c.take(f * rows);
  l.part_proj = c.take(f * chunks * de * d);
  l.part_emb = c.take(f * chunks * N * de);
  l.gehat = c.take(f * N * de);
  l.bytes = c.at;
  return l;
}

}  // namespace

template <typename T>
cudaError_t cosine_scores(const T* h, int64_t ldh, const T* proj, const T* emb, const double* tau,
                          int64_t rows, int64_t d, int64_t de, int64_t N, float eps, bool normalize,
                          float* ehat, float* enorm, float* zbuf, float* cos, float* logits,
                          cudaStream_t stream) {
  if (rows <= 0 || N <= 0) return cudaSuccess;
  normalize_experts_kernel<T><<<static_cast<unsigned>(blocks_for_rows(N)), kThreads, 0, stream>>>(
      emb, N, de, eps, ehat, enorm);
  cosine_scores_kernel<T><<<static_cast<unsigned>(blocks_for_rows(rows)), kThreads, 0, stream>>>(
      h, ldh, proj, ehat, tau, rows, d, de, N, eps, normalize, zbuf, cos, logits);
  return cudaGetLastError();
}

size_t cosine_scores_backward_workspace(int64_t rows, int64_t d, int64_t de, int64_t N) {
  return backward_layout(rows, d, de, N).bytes;
}

template <typename T>
cudaError_t cosine_scores_backward(const float* grad_cos, const float* grad_logits, const T* h,
                                   int64_t ldh, const T* proj, const T* emb, const double* tau,
                                   int64_t rows, int64_t d, int64_t de, int64_t N, float eps,
                                   bool normalize, void* workspace, T* grad_h, T* grad_proj,
                                   T* grad_emb, float* grad_tau, cudaStream_t stream) {
  if (rows <= 0 || N <= 0) return cudaSuccess;
  const BackwardLayout l = backward_layout(rows, d, de, N);
  auto* ws = static_cast<char*>(workspace);
  auto at = [&](size_t offset) { return reinterpret_cast<float*>(ws + offset); };
  const int64_t chunks = chunks_for(rows);
  const auto row_blocks = static_cast<unsigned>(blocks_for_rows(rows));
  const auto expert_blocks = static_cast<unsigned>(blocks_for_rows(N));
  normalize_experts_kernel<T>
      <<<expert_blocks, kThreads, 0, stream>>>(emb, N, de, eps, at(l.ehat), at(l.enorm));
  cosine_backward_rows_kernel<T><<<row_blocks, kThreads, 0, stream>>>(
      grad_cos, grad_logits, h, ldh, proj, at(l.ehat), tau, rows, d, de, N, eps, normalize,
      at(l.zbuf), at(l.gbuf), at(l.gzbuf), at(l.p), grad_h);
  // grad_proj [de, d] = gz^T h (nothing to reduce when d = 0)
  if (d > 0) {
    chunk_outer_kernel<T>
        <<<static_cast<unsigned>(blocks_for(chunks * de * d)), kThreads, 0, stream>>>(
            at(l.gzbuf), de, h, ldh, rows, de, d, chunks, at(l.part_proj));
    chunk_sum_kernel<T><<<static_cast<unsigned>(blocks_for(de * d)), kThreads, 0, stream>>>(
        at(l.part_proj), chunks, de * d, grad_proj);
  }
  // gehat [N, de] = g^T zhat, then through the expert normalisation
  chunk_outer_kernel<float>
      <<<static_cast<unsigned>(blocks_for(chunks * N * de)), kThreads, 0, stream>>>(
          at(l.gbuf), N, at(l.zbuf), de, rows, N, de, chunks, at(l.part_emb));
  chunk_sum_kernel<float><<<static_cast<unsigned>(blocks_for(N * de)), kThreads, 0, stream>>>(
      at(l.part_emb), chunks, N * de, at(l.gehat));
  experts_backward_kernel<T><<<expert_blocks, kThreads, 0, stream>>>(
      at(l.gehat), at(l.ehat), at(l.enorm), N, de, eps, grad_emb);
  tau_backward_kernel<<<1, kThreads, 0, stream>>>(at(l.p), rows, tau, grad_tau);
  return cudaGetLastError();
}

#define SMOE_INSTANTIATE(T)                                                                      \
  template cudaError_t cosine_scores<T>(const T*, int64_t, const T*, const T*, const double*,    \
                                        int64_t, int64_t, int64_t, int64_t, float, bool, float*, \
                                        float*, float*, float*, float*, cudaStream_t);           \
  template cudaError_t cosine_scores_backward<T>(                                                \
      const float*, const float*, const T*, int64_t, const T*, const T*, const double*, int64_t, \
      int64_t, int64_t, int64_t, float, bool, void*, T*, T*, T*, float*, cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
