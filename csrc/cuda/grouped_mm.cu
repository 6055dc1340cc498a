// CUDA kernels of grouped_mm and its weight gradient: classic shared-memory tiled GEMMs
// (64x64 output tile, 16-deep k slices, 256 threads each computing 4x4 outputs), loading any
// storage type into float tiles and accumulating in float. No atomics: every output element is
// computed by one thread over a fixed k order, so results are reproducible run to run.
//
// Forward tiling. Row tiles are numbered group by group: group e owns ceil(rows_e / 64) tiles
// starting at its own first row, and one extra "group" E covers the rows past offsets[E], which
// are written as zeros. The number of tiles is at most ceil(M / 64) + E, the grid's x bound; each
// block walks `offsets` in device memory to find its (group, tile), so the host never reads
// offsets. The walk clamps the offsets into a non-decreasing sequence in [0, M] starting at 0:
// for valid offsets this changes nothing, and for invalid ones (which the glue reports with an
// async assert) it keeps every access in bounds and every output row written exactly once.
//
// Thread (tx, ty) = (tid % 16, tid / 16) owns rows ty + 16 i and columns tx + 16 j (i, j < 4),
// so shared-memory reads are conflict-free and global writes are coalesced along columns.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda/dtype.cuh"
#include "cuda/grouped_mm.h"

namespace smoe::cuda {
namespace {

constexpr int kBM = 64;  // tile rows
constexpr int kBN = 64;  // tile columns
constexpr int kBK = 16;  // reduction slice
constexpr int kThreads = 256;
constexpr int kSide = 16;  // threads along each tile side
constexpr int kR = 4;      // outputs per thread along each side
static_assert(kSide * kSide == kThreads, "one thread per (tx, ty)");
static_assert(kSide * kR == kBM && kBM == kBN, "thread tile covers the (square) block tile");
static_assert((kBM * kBK) % kThreads == 0 && (kBN * kBK) % kThreads == 0, "even tile loads");
constexpr int kLoads = kBM * kBK / kThreads;  // elements each thread loads per operand tile

constexpr int64_t kMaxGridX = INT_MAX;
constexpr int64_t kMaxGridYZ = 65535;

// Padded by one column so that the transposed tile stores hit distinct banks.
struct Tiles {
  float a[kBK][kBM + 1];  // a[kk][m]: the left operand, k-major
  float b[kBK][kBN + 1];  // b[kk][n]
};

__device__ __forceinline__ void tile_fma(const Tiles& s, int tx, int ty, float (&acc)[kR][kR]) {
#pragma unroll
  for (int kk = 0; kk < kBK; ++kk) {
    float av[kR], bv[kR];
#pragma unroll
    for (int i = 0; i < kR; ++i) av[i] = s.a[kk][ty + kSide * i];
#pragma unroll
    for (int j = 0; j < kR; ++j) bv[j] = s.b[kk][tx + kSide * j];
#pragma unroll
    for (int i = 0; i < kR; ++i) {
#pragma unroll
      for (int j = 0; j < kR; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
}

// v clamped into [lo, hi] (lo <= hi).
__device__ __forceinline__ int64_t clamp_to(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Finds row tile `tile`: its group (E for the zero tail) and its rows [*row0, *row_end).
// Returns false past the last tile. Every thread of a block gets the same answer.
__device__ __forceinline__ bool find_tile(const int64_t* __restrict__ offsets, int64_t E, int64_t M,
                                          int64_t tile, int64_t* group, int64_t* row0,
                                          int64_t* row_end) {
  int64_t lo = 0, base = 0;
  for (int64_t e = 0; e <= E; ++e) {
    const int64_t hi = e < E ? clamp_to(offsets[e + 1], lo, M) : M;
    const int64_t n_tiles = (hi - lo + kBM - 1) / kBM;
    if (tile < base + n_tiles) {
      *group = e;
      *row0 = lo + (tile - base) * kBM;
      *row_end = hi;
      return true;
    }
    base += n_tiles;
    lo = hi;
  }
  return false;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grouped_mm_kernel(const T* __restrict__ a, int64_t lda, const T* __restrict__ b, int64_t sb_e,
                      int64_t sb_k, int64_t sb_n, const T* __restrict__ bias, int64_t sbias_e,
                      int64_t sbias_n, const int64_t* __restrict__ offsets, int64_t E, int64_t M,
                      int64_t K, int64_t N, T* __restrict__ out) {
  __shared__ Tiles s;
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kSide, ty = tid / kSide;
  // Load b along whichever of its dims is contiguous (a transposed view has k contiguous).
  const bool b_k_contiguous = sb_k == 1 && sb_n != 1;
  for (int64_t tile = blockIdx.x;; tile += gridDim.x) {
    int64_t group = 0, row0 = 0, row_end = 0;
    if (!find_tile(offsets, E, M, tile, &group, &row0, &row_end)) break;  // block-uniform
    for (int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN; n0 < N;
         n0 += static_cast<int64_t>(gridDim.y) * kBN) {
      float acc[kR][kR] = {};
      if (group < E) {  // block-uniform: the tail group keeps acc = 0
        const T* bg = b + group * sb_e;
        for (int64_t k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
          for (int i = 0; i < kLoads; ++i) {
            const int l = tid + i * kThreads;
            const int m = l / kBK, kk = l % kBK;
            const int64_t r = row0 + m, kg = k0 + kk;
            s.a[kk][m] = (r < row_end && kg < K) ? to_float(a[r * lda + kg]) : 0.f;
          }
#pragma unroll
          for (int i = 0; i < kLoads; ++i) {
            const int l = tid + i * kThreads;
            const int kk = b_k_contiguous ? l % kBK : l / kBN;
            const int n = b_k_contiguous ? l / kBK : l % kBN;
            const int64_t kg = k0 + kk, ng = n0 + n;
            s.b[kk][n] = (kg < K && ng < N) ? to_float(bg[kg * sb_k + ng * sb_n]) : 0.f;
          }
          __syncthreads();
          tile_fma(s, tx, ty, acc);
          __syncthreads();
        }
      }
      // Epilogue: the group's bias row, added in float before the one rounding to T.
      float bias_v[kR] = {};
      if (bias != nullptr && group < E) {
#pragma unroll
        for (int j = 0; j < kR; ++j) {
          const int64_t n = n0 + tx + kSide * j;
          if (n < N) bias_v[j] = to_float(bias[group * sbias_e + n * sbias_n]);
        }
      }
#pragma unroll
      for (int i = 0; i < kR; ++i) {
        const int64_t r = row0 + ty + kSide * i;
        if (r >= row_end) continue;
#pragma unroll
        for (int j = 0; j < kR; ++j) {
          const int64_t n = n0 + tx + kSide * j;
          if (n < N) out[r * N + n] = from_float<T>(acc[i][j] + bias_v[j]);
        }
      }
    }
  }
}

// out[e][p][n] = sum over rows r of group e of a[r][p] * b[r][n], at e*so_e + p*so_p + n*so_n.
// Group rows are clamped into [0, M] (groups may then overlap; they are only read).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    weight_grad_kernel(const T* __restrict__ a, int64_t lda, const T* __restrict__ b, int64_t ldb,
                       const int64_t* __restrict__ offsets, int64_t E, int64_t M, int64_t P,
                       int64_t N, T* __restrict__ out, int64_t so_e, int64_t so_p, int64_t so_n) {
  __shared__ Tiles s;
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kSide, ty = tid / kSide;
  for (int64_t e = blockIdx.z; e < E; e += gridDim.z) {
    const int64_t lo = clamp_to(offsets[e], 0, M);
    const int64_t hi = clamp_to(offsets[e + 1], lo, M);
    for (int64_t p0 = static_cast<int64_t>(blockIdx.y) * kBM; p0 < P;
         p0 += static_cast<int64_t>(gridDim.y) * kBM) {
      for (int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN; n0 < N;
           n0 += static_cast<int64_t>(gridDim.x) * kBN) {
        float acc[kR][kR] = {};
        for (int64_t r0 = lo; r0 < hi; r0 += kBK) {
          // Both operands are read along their contiguous column dim.
#pragma unroll
          for (int i = 0; i < kLoads; ++i) {
            const int l = tid + i * kThreads;
            const int kk = l / kBM, p = l % kBM;
            const int64_t r = r0 + kk, pg = p0 + p;
            s.a[kk][p] = (r < hi && pg < P) ? to_float(a[r * lda + pg]) : 0.f;
          }
#pragma unroll
          for (int i = 0; i < kLoads; ++i) {
            const int l = tid + i * kThreads;
            const int kk = l / kBN, n = l % kBN;
            const int64_t r = r0 + kk, ng = n0 + n;
            s.b[kk][n] = (r < hi && ng < N) ? to_float(b[r * ldb + ng]) : 0.f;
          }
          __syncthreads();
          tile_fma(s, tx, ty, acc);
          __syncthreads();
        }
        T* o = out + e * so_e;
#pragma unroll
        for (int i = 0; i < kR; ++i) {
          const int64_t p = p0 + ty + kSide * i;
          if (p >= P) continue;
#pragma unroll
          for (int j = 0; j < kR; ++j) {
            const int64_t n = n0 + tx + kSide * j;
            if (n < N) o[p * so_p + n * so_n] = from_float<T>(acc[i][j]);
          }
        }
      }
    }
  }
}

// out[e][n] = sum of g[r][n] over the rows r of group e, in row order, in float; one thread per
// (e, n), consecutive threads on consecutive columns (coalesced reads). Rows clamped into [0, M].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    bias_grad_kernel(const T* __restrict__ g, int64_t ldg, const int64_t* __restrict__ offsets,
                     int64_t E, int64_t M, int64_t N, T* __restrict__ out) {
  for (int64_t e = blockIdx.y; e < E; e += gridDim.y) {
    const int64_t lo = clamp_to(offsets[e], 0, M);
    const int64_t hi = clamp_to(offsets[e + 1], lo, M);
    for (int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; n < N;
         n += static_cast<int64_t>(gridDim.x) * kThreads) {
      float acc = 0.f;
      for (int64_t r = lo; r < hi; ++r) acc += to_float(g[r * ldg + n]);
      out[e * N + n] = from_float<T>(acc);
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

template <typename T>
cudaError_t grouped_mm(const T* a, int64_t lda, const T* b, int64_t sb_e, int64_t sb_k,
                       int64_t sb_n, const T* bias, int64_t sbias_e, int64_t sbias_n,
                       const int64_t* offsets, int64_t E, int64_t M, int64_t K, int64_t N, T* out,
                       cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(std::min(ceil_div(M, kBM) + E, kMaxGridX)),
                  static_cast<unsigned>(std::min(ceil_div(N, kBN), kMaxGridYZ)));
  grouped_mm_kernel<T><<<grid, kThreads, 0, stream>>>(a, lda, b, sb_e, sb_k, sb_n, bias, sbias_e,
                                                      sbias_n, offsets, E, M, K, N, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t grouped_mm_bias_grad(const T* grad, int64_t ldg, const int64_t* offsets, int64_t E,
                                 int64_t M, int64_t N, T* out, cudaStream_t stream) {
  if (E <= 0 || N <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(std::min(ceil_div(N, kThreads), kMaxGridX)),
                  static_cast<unsigned>(std::min(E, kMaxGridYZ)));
  bias_grad_kernel<T><<<grid, kThreads, 0, stream>>>(grad, ldg, offsets, E, M, N, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t grouped_mm_weight_grad(const T* x, int64_t ldx, const T* grad, int64_t ldg,
                                   const int64_t* offsets, int64_t E, int64_t M, int64_t d_in,
                                   int64_t d_out, T* grad_w, int64_t so_e, int64_t so_in,
                                   int64_t so_out, cudaStream_t stream) {
  if (E <= 0 || d_in <= 0 || d_out <= 0) return cudaSuccess;
  // The kernel's column index moves fastest in its writes; make it grad_w's contiguous dim, by
  // computing grad_w[e]^T = grad[g]^T @ x[g] when grad_w is column-major (a transposed layout).
  const bool transposed = so_in == 1 && so_out != 1;
  const T* a = transposed ? grad : x;
  const T* b = transposed ? x : grad;
  const int64_t lda = transposed ? ldg : ldx, ldb = transposed ? ldx : ldg;
  const int64_t P = transposed ? d_out : d_in, N = transposed ? d_in : d_out;
  const int64_t so_p = transposed ? so_out : so_in, so_n = transposed ? so_in : so_out;
  const dim3 grid(static_cast<unsigned>(std::min(ceil_div(N, kBN), kMaxGridX)),
                  static_cast<unsigned>(std::min(ceil_div(P, kBM), kMaxGridYZ)),
                  static_cast<unsigned>(std::min(E, kMaxGridYZ)));
  weight_grad_kernel<T><<<grid, kThreads, 0, stream>>>(a, lda, b, ldb, offsets, E, M, P, N, grad_w,
                                                       so_e, so_p, so_n);
  return cudaGetLastError();
}

#define SMOE_INSTANTIATE(T)                                                                     \
  template cudaError_t grouped_mm<T>(const T*, int64_t, const T*, int64_t, int64_t, int64_t,    \
                                     const T*, int64_t, int64_t, const int64_t*, int64_t,       \
                                     int64_t, int64_t, int64_t, T*, cudaStream_t);              \
  template cudaError_t grouped_mm_bias_grad<T>(const T*, int64_t, const int64_t*, int64_t,      \
                                               int64_t, int64_t, T*, cudaStream_t);             \
  template cudaError_t grouped_mm_weight_grad<T>(                                               \
      const T*, int64_t, const T*, int64_t, const int64_t*, int64_t, int64_t, int64_t, int64_t, \
      T*, int64_t, int64_t, int64_t, cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
