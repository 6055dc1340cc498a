// CUDA kernels of graph_mix and its backward: one batched shared-memory tiled GEMM, out[b] =
// beta R[b] + alpha P[b] Q[b] (32x32 output tile, 32-deep k slices, 256 threads each computing
// 2x2 outputs), instantiated for the three products: the forward A x' (R = x), grad_x = A_cur^T g
// (R = g) and grad_A = g x'^T (no R). Operands are loaded into tiles of the math type (float;
// double for double) along whichever of their dims is contiguous. No atomics: every output element
// is computed by one thread over a fixed k order, so results are reproducible run to run.
//
// Thread (tx, ty) = (tid % 16, tid / 16) owns rows ty + 16 i and columns tx + 16 j (i, j < 2).
// Batch entries, row tiles and column tiles are walked by grid-stride loops over z, y and x (all
// block-uniform, so every thread reaches each __syncthreads).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda/dtype.cuh"
#include "cuda/graph_mix.h"

namespace smoe::cuda {
namespace {

constexpr int kBM = 32;  // tile rows
constexpr int kBN = 32;  // tile columns
constexpr int kBK = 32;  // reduction slice
constexpr int kThreads = 256;
constexpr int kSide = 16;  // threads along each tile side
constexpr int kR = 2;      // outputs per thread along each side
static_assert(kSide * kSide == kThreads && kSide * kR == kBM && kBM == kBN, "square tiles");
constexpr int kLoads = kBM * kBK / kThreads;  // elements each thread loads per operand tile
static_assert(kLoads * kThreads == kBM * kBK && kBN * kBK == kBM * kBK, "even tile loads");

constexpr int64_t kMaxGridX = INT_MAX;
constexpr int64_t kMaxGridYZ = 65535;

template <typename T>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};

__device__ __forceinline__ double to_math(double v) { return v; }
template <typename T>
__device__ __forceinline__ float to_math(T v) {
  return to_float(v);
}
template <typename T, typename M>
__device__ __forceinline__ T from_math(M v) {
  return from_float<T>(v);
}
template <>
__device__ __forceinline__ double from_math<double, double>(double v) {
  return v;
}

// A batched row-major matrix whose rows r < split lie in `lo` and the others in `hi` (row
// r - split): x' = [cache; x] without a copy. Element (b, r, c) is at row base + col0 + c.
template <typename T>
struct Operand {
  const T* lo;
  const T* hi;
  int64_t split, lo_batch, hi_batch, ld, col0;

  __device__ __forceinline__ T at(int64_t b, int64_t r, int64_t c) const {
    const T* row = r < split ? lo + b * lo_batch + r * ld : hi + b * hi_batch + (r - split) * ld;
    return row[col0 + c];
  }
};

template <typename T>
Operand<T> dense(const T* p, int64_t rows, int64_t ld, int64_t col0 = 0) {
  return {p, p, 0, 0, rows * ld, ld, col0};
}

// x' = [cache; x] of a call: C cache rows, then S rows of x, E columns.
template <typename T>
Operand<T> stacked(const T* x, const T* cache, const GraphMixArgs& a) {
  return {cache, x, a.C, a.C * a.E, a.S * a.E, a.E, 0};
}

// Padded by one column so that the transposed tile stores hit distinct banks.
template <typename M>
struct Tiles {
  M p[kBK][kBM + 1];  // p[kk][m]: the left operand, k-major
  M q[kBK][kBN + 1];  // q[kk][n]
};

// out[b, m, n] (contiguous [B, Mr, N]) = beta R[b, m, n] + alpha sum_k P(b, m, k) Q(b, k, n), or
// beta R (0 without R) when !mix. P(m, k) is p.at(b, m, k), or p.at(b, k, m) when kTransP;
// Q(k, n) is q.at(b, k, n), or q.at(b, n, k) when kTransQ.
template <typename T, bool kTransP, bool kTransQ>
__global__ void __launch_bounds__(kThreads)
    graph_gemm_kernel(Operand<T> p, Operand<T> q, const T* __restrict__ r, int64_t B, int64_t Mr,
                      int64_t N, int64_t K, typename MathType<T>::type beta,
                      typename MathType<T>::type alpha, bool mix, T* __restrict__ out) {
  using M = typename MathType<T>::type;
  __shared__ Tiles<M> s;
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kSide, ty = tid / kSide;
  const int64_t m_tiles = (Mr + kBM - 1) / kBM, n_tiles = (N + kBN - 1) / kBN;
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    for (int64_t mt = blockIdx.y; mt < m_tiles; mt += gridDim.y) {
      for (int64_t nt = blockIdx.x; nt < n_tiles; nt += gridDim.x) {
        const int64_t m0 = mt * kBM, n0 = nt * kBN;
        M acc[kR][kR] = {};
        for (int64_t k0 = 0; mix && k0 < K; k0 += kBK) {
#pragma unroll
          for (int i = 0; i < kLoads; ++i) {
            const int l = tid + i * kThreads;
            const int kk = kTransP ? l / kBM : l % kBK;
            const int m = kTransP ? l % kBM : l / kBK;
            const int64_t mg = m0 + m, kg = k0 + kk;
            const bool in = mg < Mr && kg < K;
            s.p[kk][m] = in ? to_math(kTransP ? p.at(b, kg, mg) : p.at(b, mg, kg)) : M(0);
          }
#pragma unroll
          for (int i = 0; i < kLoads; ++i) {
            const int l = tid + i * kThreads;
            const int kk = kTransQ ? l % kBK : l / kBN;
            const int n = kTransQ ? l / kBK : l % kBN;
            const int64_t kg = k0 + kk, ng = n0 + n;
            const bool in = kg < K && ng < N;
            s.q[kk][n] = in ? to_math(kTransQ ? q.at(b, ng, kg) : q.at(b, kg, ng)) : M(0);
          }
          __syncthreads();
#pragma unroll 8
          for (int kk = 0; kk < kBK; ++kk) {
            M pv[kR], qv[kR];
#pragma unroll
            for (int i = 0; i < kR; ++i) pv[i] = s.p[kk][ty + kSide * i];
#pragma unroll
            for (int j = 0; j < kR; ++j) qv[j] = s.q[kk][tx + kSide * j];
#pragma unroll
            for (int i = 0; i < kR; ++i) {
#pragma unroll
              for (int j = 0; j < kR; ++j) acc[i][j] = fma(pv[i], qv[j], acc[i][j]);
            }
          }
          __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < kR; ++i) {
          const int64_t m = m0 + ty + kSide * i;
          if (m >= Mr) continue;
#pragma unroll
          for (int j = 0; j < kR; ++j) {
            const int64_t n = n0 + tx + kSide * j;
            if (n >= N) continue;
            const int64_t o = (b * Mr + m) * N + n;
            const M base = r != nullptr ? beta * to_math(r[o]) : M(0);
            out[o] = from_math<T>(mix ? base + alpha * acc[i][j] : base);
          }
        }
      }
    }
  }
}

template <typename T, bool kTransP, bool kTransQ>
cudaError_t launch(const Operand<T>& p, const Operand<T>& q, const T* r, int64_t B, int64_t Mr,
                   int64_t N, int64_t K, const GraphMixArgs& a, double beta, T* out,
                   cudaStream_t stream) {
  if (B == 0 || Mr == 0 || N == 0) return cudaSuccess;
  using M = typename MathType<T>::type;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((N + kBN - 1) / kBN, kMaxGridX)),
                  static_cast<unsigned>(std::min<int64_t>((Mr + kBM - 1) / kBM, kMaxGridYZ)),
                  static_cast<unsigned>(std::min<int64_t>(B, kMaxGridYZ)));
  graph_gemm_kernel<T, kTransP, kTransQ><<<grid, kThreads, 0, stream>>>(
      p, q, r, B, Mr, N, K, static_cast<M>(beta), static_cast<M>(a.lam), a.mix, out);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t graph_mix(const T* x, const T* cache, const T* A, const GraphMixArgs& args, T* out,
                      cudaStream_t stream) {
  const int64_t Sp = args.C + args.S;
  return launch<T, false, false>(dense(A, args.S, Sp), stacked(x, cache, args), x, args.B, args.S,
                                 args.E, Sp, args, args.self_coef, out, stream);
}

template <typename T>
cudaError_t graph_mix_grad_x(const T* g, const T* A, const GraphMixArgs& args, T* grad_x,
                             cudaStream_t stream) {
  // P(j, i) = A[b, i, C + j]: A's rows are indexed by k, its columns (from C on) by m.
  const int64_t Sp = args.C + args.S;
  return launch<T, true, false>(dense(A, args.S, Sp, args.C), dense(g, args.S, args.E), g, args.B,
                                args.S, args.E, args.S, args, args.self_coef, grad_x, stream);
}

template <typename T>
cudaError_t graph_mix_grad_a(const T* g, const T* x, const T* cache, const GraphMixArgs& args,
                             T* grad_A, cudaStream_t stream) {
  // Q(e, j) = x'[b, j, e]: x' rows are indexed by n, its columns by k.
  const int64_t Sp = args.C + args.S;
  return launch<T, false, true>(dense(g, args.S, args.E), stacked(x, cache, args), nullptr, args.B,
                                args.S, Sp, args.E, args, 0.0, grad_A, stream);
}

#define SMOE_INSTANTIATE(T)                                                                       \
  template cudaError_t graph_mix<T>(const T*, const T*, const T*, const GraphMixArgs&, T*,        \
                                    cudaStream_t);                                                \
  template cudaError_t graph_mix_grad_x<T>(const T*, const T*, const GraphMixArgs&, T*,           \
                                           cudaStream_t);                                         \
  template cudaError_t graph_mix_grad_a<T>(const T*, const T*, const T*, const GraphMixArgs&, T*, \
                                           cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(double)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
