// What the CPU glue of the GEMM ops (grouped_mm, gather_mm, expert_mlp) shares: the offsets'
// check, and work items whose BLAS GEMMs run single-threaded on torch's thread pool, so that every
// item's summation order (hence its bits) is the same for every thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#if defined(__linux__)
// MKL's per-thread thread count, exported by libtorch_cpu where torch uses MKL (x86-64 wheels);
// weak, so that the extension still loads against a torch built with another BLAS.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#endif

namespace smoe::ops {

// The offsets' values; M is the row count of `rows` (x, or grad_out for the bias gradient).
inline void check_offsets_cpu(const at::Tensor& offsets, int64_t M,
                              const char* op = "grouped_mm", const char* rows = "x") {
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t E = offsets.size(0) - 1;
  TORCH_CHECK(off[0] == 0, "smoe::", op, ": offsets[0] must be 0, got ", off[0]);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(off[e + 1] >= off[e], "smoe::", op,
                ": offsets must be non-decreasing, got offsets[", e + 1, "] = ", off[e + 1],
                " < offsets[", e, "] = ", off[e]);
  }
  TORCH_CHECK(off[E] <= M, "smoe::", op, ": offsets[E] (rows in use) must be <= ", rows,
              ".size(0) = ", M, ", got ", off[E]);
}

// Work-item sizes, set by the shapes alone, so that the partition (and with it every GEMM's shape,
// hence its summation order) is the same for every thread count.
constexpr int64_t kRowBlock = 256;  // least rows of a forward item
constexpr int64_t kColBlock = 256;  // output columns of an item (forward and weight gradient)
constexpr int64_t kItemWork = int64_t{1} << 22;  // multiply-adds a thin forward item grows to
// 16-bit GEMMs run several times faster per multiply-add (AVX512-BF16 / AMX / F16C paths) and
// their per-call packing costs relatively more, so their items hold 16x the work
constexpr int64_t kItemWork16 = kItemWork << 4;

// Rows of a forward item: kRowBlock, or more for a thin GEMM, so that an item's work outweighs its
// per-call overhead. A function of the shapes and the dtype only, never of the thread count.
inline int64_t item_rows(int64_t d_in, int64_t cols, int64_t elem_size) {
  const int64_t work = elem_size < 4 ? kItemWork16 : kItemWork;
  return std::clamp<int64_t>(work / std::max<int64_t>(1, d_in * cols), kRowBlock,
                             16 * kRowBlock);
}

// Makes the GEMM libraries single-threaded on the calling thread while in scope: MKL (fp32, fp64)
// through its per-thread setting, oneDNN (bf16, fp16) through OpenMP's per-task thread count, which
// it plans its work by. A multi-threaded GEMM may split its reduction by thread, and neither runs
// the plain sequential GEMM when merely called inside torch's OpenMP region: there, their bits
// follow the thread count (measured with MKL 2024.2 and oneDNN 3.12).
class SequentialGemm {
 public:
  SequentialGemm() {
#if defined(__linux__)
    if (MKL_Set_Num_Threads_Local) mkl_prev_ = MKL_Set_Num_Threads_Local(1);
#endif
#ifdef _OPENMP
    omp_prev_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
  }
  ~SequentialGemm() {
#ifdef _OPENMP
    omp_set_num_threads(omp_prev_);
#endif
#if defined(__linux__)
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_prev_);
#endif
  }
  SequentialGemm(const SequentialGemm&) = delete;
  SequentialGemm& operator=(const SequentialGemm&) = delete;

 private:
  [[maybe_unused]] int mkl_prev_ = 0;  // MKL's previous per-thread setting (0: the global one)
  [[maybe_unused]] int omp_prev_ = 1;
};

// Runs fn(i, scratch) for i in [0, n) on torch's pool, each item's GEMM single-threaded. Items are
// handed out one at a time from a shared counter (dynamic scheduling): items of uneven size (an
// expert's last row block, uneven groups) then keep every thread busy, where a static split into
// equal counts leaves one thread to finish alone. Which thread runs an item does not change its
// result. Each of the min(n, threads) workers owns one scratch T, all made here by make(T&) on the
// calling thread before going parallel: torch's memory profiler (the benchmarks' peak memory) sees
// only the calling thread's allocations.
template <typename T, typename Make, typename F>
void for_each_block_with(int64_t n, const Make& make, const F& fn) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  std::vector<T> scratch(workers);
  for (T& s : scratch) make(s);
  std::atomic<int64_t> next{0}, slot{0};
  // parallel_for splits [0, workers) into at most `workers` chunks (one, run inline, when nested),
  // so a worker's slot, taken with its first item, is always in range
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Pool threads do not inherit the caller's dispatch state; we are below autograd here.
    at::AutoDispatchBelowADInplaceOrView guard;
    const SequentialGemm sequential;
    T* mine = nullptr;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      if (mine == nullptr) mine = &scratch[slot.fetch_add(1)];
      fn(i, *mine);
    }
  });
}

// for_each_block_with without scratch.
template <typename F>
void for_each_block(int64_t n, const F& fn) {
  struct None {};
  for_each_block_with<None>(n, [](None&) {}, [&](int64_t i, None&) { fn(i); });
}

}  // namespace smoe::ops
