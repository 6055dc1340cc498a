// CUDA kernels of permute / combine and their backwards. All of them are gathers: each output
// element has exactly one writer and sums run in a fixed order, so results are bitwise
// reproducible. The element-wise sums use __fmul_rn / __fadd_rn (no FMA contraction), so combine
// and permute_backward round exactly like the CPU kernels (cpu/permute_kernel.h).
//
// Row kernels use a 2-D block: threadIdx.x walks a row's columns, threadIdx.y picks one of the
// block's rows; blockDim.x is the smallest power of two covering the row (at most kThreads), so
// narrow rows still fill the block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/dtype.cuh"
#include "cuda/permute.h"

namespace smoe::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;
constexpr unsigned kFullMask = 0xffffffffu;

struct RowLaunch {
  dim3 block;
  unsigned grid;
};

RowLaunch row_launch(int64_t rows, int64_t cols) {
  unsigned tx = 1;
  while (tx < static_cast<uint64_t>(cols) && tx < kThreads) tx *= 2;
  const unsigned ty = kThreads / tx;
  const int64_t blocks = std::min<int64_t>((rows + ty - 1) / ty, kMaxBlocks);
  return {dim3(tx, ty), static_cast<unsigned>(blocks)};
}

__device__ __forceinline__ int64_t first_row() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
}
__device__ __forceinline__ int64_t row_step() {
  return static_cast<int64_t>(gridDim.x) * blockDim.y;
}

// out[i] = src[idx[i]] in units of V (a raw-bits word), or zeros for an index outside [0, n_src).
template <typename V>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const V* __restrict__ src, int64_t ld, int64_t n_src,
                       const int32_t* __restrict__ idx, int64_t rows, int64_t cols,
                       V* __restrict__ out) {
  for (int64_t i = first_row(); i < rows; i += row_step()) {
    const int64_t s = idx[i];
    V* o = out + i * cols;
    if (s < 0 || s >= n_src) {
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) o[c] = V{};
    } else {
      const V* p = src + s * ld;
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) o[c] = p[c];
    }
  }
}

template <typename V>
cudaError_t launch_gather(const void* src, int64_t ld_bytes, int64_t n_src, const int32_t* idx,
                          int64_t rows, int64_t row_bytes, void* out, cudaStream_t stream) {
  const int64_t cols = row_bytes / static_cast<int64_t>(sizeof(V));
  const RowLaunch l = row_launch(rows, cols);
  gather_rows_kernel<V><<<l.grid, l.block, 0, stream>>>(
      static_cast<const V*>(src), ld_bytes / static_cast<int64_t>(sizeof(V)), n_src, idx, rows,
      cols, static_cast<V*>(out));
  return cudaGetLastError();
}

// out[t] = sum_j w_j * src[row[t, j]] over rows in [0, n_src); w_j = weight[t, j], or 1 when
// weight is null. Same j order and rounding as cpu::combine_rows.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const T* __restrict__ src, int64_t ld, int64_t n_src,
                   const T* __restrict__ weight, const int32_t* __restrict__ row, int64_t rows,
                   int64_t k, int64_t d, T* __restrict__ out) {
  for (int64_t t = first_row(); t < rows; t += row_step()) {
    const int32_t* r = row + t * k;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      float acc = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = r[j];
        if (s < 0 || s >= n_src) continue;
        const float w = weight != nullptr ? to_float(weight[t * k + j]) : 1.f;
        acc = __fadd_rn(acc, __fmul_rn(w, to_float(src[s * ld + c])));
      }
      out[t * d + c] = from_float<T>(acc);
    }
  }
}

// out[i] = weight.flat[slot[i]] * grad[token[i]], or 0 where token[i] < 0 (or out of range).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scaled_gather_kernel(const T* __restrict__ grad, int64_t ld, int64_t n_tokens,
                         const int32_t* __restrict__ token, const T* __restrict__ weight,
                         const int32_t* __restrict__ slot, int64_t n_slots, int64_t rows, int64_t d,
                         T* __restrict__ out) {
  for (int64_t i = first_row(); i < rows; i += row_step()) {
    const int64_t t = token[i], s = slot[i];
    T* o = out + i * d;
    if (t < 0 || t >= n_tokens || s < 0 || s >= n_slots) {
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) o[c] = from_float<T>(0.f);
    } else {
      const float w = to_float(weight[s]);
      const T* g = grad + t * ld;
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        o[c] = from_float<T>(__fmul_rn(w, to_float(g[c])));
      }
    }
  }
}

// grad_weight[p] = <grad[p / k], y_sorted[row[p]]>, 0 for dropped slots: one warp per entry,
// lanes strided over d, then a butterfly reduction (fixed order: reproducible).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    weight_grad_kernel(const T* __restrict__ grad, int64_t ld_g, const T* __restrict__ y_sorted,
                       int64_t ld_y, int64_t M, const int32_t* __restrict__ row, int64_t n_pairs,
                       int64_t k, int64_t d, T* __restrict__ grad_weight) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  // The loop and the branch below are warp-uniform, so the shuffles see all 32 lanes.
  for (int64_t p = warp; p < n_pairs; p += n_warps) {
    const int64_t r = row[p];
    float acc = 0.f;
    if (r >= 0 && r < M) {
      const T* g = grad + (p / k) * ld_g;
      const T* y = y_sorted + r * ld_y;
      for (int64_t c = lane; c < d; c += kWarp) acc += to_float(g[c]) * to_float(y[c]);
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o /= 2) acc += __shfl_xor_sync(kFullMask, acc, o);
    if (lane == 0) grad_weight[p] = from_float<T>(acc);
  }
}

template <typename T>
cudaError_t launch_combine(const T* src, int64_t ld, int64_t n_src, const T* weight,
                           const int32_t* row, int64_t n_tokens, int64_t k, int64_t d, T* out,
                           cudaStream_t stream) {
  if (n_tokens <= 0 || d <= 0) return cudaSuccess;
  const RowLaunch l = row_launch(n_tokens, d);
  combine_kernel<T>
      <<<l.grid, l.block, 0, stream>>>(src, ld, n_src, weight, row, n_tokens, k, d, out);
  return cudaGetLastError();
}

bool aligned_to(uintptr_t v, int64_t a) { return v % static_cast<uintptr_t>(a) == 0; }

}  // namespace

template <typename T>
cudaError_t permute(const T* x, int64_t ld, int64_t n_src, const int32_t* token, int64_t M,
                    int64_t d, T* out, cudaStream_t stream) {
  if (M <= 0 || d <= 0) return cudaSuccess;
  const int64_t size = static_cast<int64_t>(sizeof(T));
  const int64_t row_bytes = d * size, ld_bytes = ld * size;
  // The widest word that divides the row, the row stride and both base addresses.
  const auto fits = [&](int64_t a) {
    return row_bytes % a == 0 && ld_bytes % a == 0 &&
           aligned_to(reinterpret_cast<uintptr_t>(x), a) &&
           aligned_to(reinterpret_cast<uintptr_t>(out), a);
  };
  if (fits(16)) return launch_gather<uint4>(x, ld_bytes, n_src, token, M, row_bytes, out, stream);
  if (fits(8)) return launch_gather<uint2>(x, ld_bytes, n_src, token, M, row_bytes, out, stream);
  if (fits(4)) return launch_gather<uint32_t>(x, ld_bytes, n_src, token, M, row_bytes, out, stream);
  return launch_gather<uint16_t>(x, ld_bytes, n_src, token, M, row_bytes, out, stream);
}

template <typename T>
cudaError_t permute_backward(const T* grad, int64_t ld, int64_t n_src, const int32_t* row,
                             int64_t n_tokens, int64_t k, int64_t d, T* out, cudaStream_t stream) {
  return launch_combine<T>(grad, ld, n_src, nullptr, row, n_tokens, k, d, out, stream);
}

template <typename T>
cudaError_t combine(const T* y_sorted, int64_t ld, int64_t n_src, const T* weight,
                    const int32_t* row, int64_t n_tokens, int64_t k, int64_t d, T* out,
                    cudaStream_t stream) {
  return launch_combine<T>(y_sorted, ld, n_src, weight, row, n_tokens, k, d, out, stream);
}

template <typename T>
cudaError_t combine_backward(const T* grad, int64_t ld_g, const T* y_sorted, int64_t ld_y,
                             const T* weight, const int32_t* token, const int32_t* slot,
                             const int32_t* row, int64_t n_tokens, int64_t k, int64_t M, int64_t d,
                             T* grad_y_sorted, T* grad_weight, cudaStream_t stream) {
  const int64_t n_pairs = n_tokens * k;
  if (M > 0 && d > 0) {
    const RowLaunch l = row_launch(M, d);
    scaled_gather_kernel<T><<<l.grid, l.block, 0, stream>>>(grad, ld_g, n_tokens, token, weight,
                                                            slot, n_pairs, M, d, grad_y_sorted);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (n_pairs > 0) {
    const int64_t warps_per_block = kThreads / kWarp;
    const int64_t blocks =
        std::min<int64_t>((n_pairs + warps_per_block - 1) / warps_per_block, kMaxBlocks);
    weight_grad_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        grad, ld_g, y_sorted, ld_y, M, row, n_pairs, k, d, grad_weight);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

#define SMOE_INSTANTIATE(T)                                                                      \
  template cudaError_t permute<T>(const T*, int64_t, int64_t, const int32_t*, int64_t, int64_t,  \
                                  T*, cudaStream_t);                                             \
  template cudaError_t permute_backward<T>(const T*, int64_t, int64_t, const int32_t*, int64_t,  \
                                           int64_t, int64_t, T*, cudaStream_t);                  \
  template cudaError_t combine<T>(const T*, int64_t, int64_t, const T*, const int32_t*, int64_t, \
                                  int64_t, int64_t, T*, cudaStream_t);                           \
  template cudaError_t combine_backward<T>(                                                      \
      const T*, int64_t, const T*, int64_t, const T*, const int32_t*, const int32_t*,            \
      const int32_t*, int64_t, int64_t, int64_t, int64_t, T*, T*, cudaStream_t);
SMOE_INSTANTIATE(float)
SMOE_INSTANTIATE(__half)
SMOE_INSTANTIATE(__nv_bfloat16)
#undef SMOE_INSTANTIATE

}  // namespace smoe::cuda
