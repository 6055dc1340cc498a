// The CPU workspace cache (csrc/cpu/workspace.h): blocks from c10::alloc_cpu, tensors over them by
// at::from_blob with a deleter that returns the block to the cache. Each hand-out and return is
// reported to torch's memory profiler as the CPU allocator reports its own (a tensor's bytes while
// it lives; cached blocks count as reserved), so that profile_memory and the benchmarks' peak
// memory see these outputs like any other tensor's.
#include "cpu/workspace.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string>

namespace smoe::ops::workspace {
namespace {

struct Cache {
  std::mutex mutex;
  std::multimap<int64_t, void*> free;  // block size -> block, blocks no tensor uses
  int64_t bytes = 0;                   // sum of the free blocks' sizes
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors may be freed during exit
  return *c;
}

std::atomic<int64_t> live{0};  // bytes of the blocks tensors use now

// A block of `size` bytes handed out (size > 0) or returned (size < 0); tells the profiler when
// `profiled` (a return only when its hand-out was told: one made before the profiling began, or on
// a pool thread, which does not carry the profiler's state, would drive its count below zero).
// Returns whether the profiler was told. The reserved figure counts a returned block, which is on
// its way into the cache.
bool report(void* ptr, int64_t size, bool profiled) {
  const int64_t now = live.fetch_add(size) + size;
  if (!profiled) return false;
  const int64_t reserved = now + cached_bytes() + std::max<int64_t>(0, -size);
  c10::reportMemoryUsageToProfiler(ptr, size, static_cast<size_t>(now),
                                   static_cast<size_t>(reserved), c10::Device(c10::kCPU));
  return true;
}

int64_t read_cap() {
  const char* v = std::getenv("SMOE_CPU_CACHE_MB");
  if (v == nullptr || *v == '\0') return int64_t{2048} << 20;
  try {
    return std::max<int64_t>(0, std::stoll(v)) << 20;
  } catch (const std::exception&) {
    TORCH_CHECK(false, "smoe: SMOE_CPU_CACHE_MB must be a whole number of MB, got '", v, "'");
  }
}

// A block of at least `bytes`: the smallest cached one no more than 1/8 larger, or a new one.
std::pair<void*, int64_t> take(int64_t bytes) {
  Cache& c = cache();
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.free.lower_bound(bytes);
    if (it != c.free.end() && it->first <= bytes + bytes / 8) {
      const auto block = std::make_pair(it->second, it->first);
      c.bytes -= it->first;
      c.free.erase(it);
      return block;
    }
  }
  return {c10::alloc_cpu(static_cast<size_t>(bytes)), bytes};
}

void give_back(void* ptr, int64_t size) {
  Cache& c = cache();
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    if (c.bytes + size <= cap_bytes()) {
      c.free.emplace(size, ptr);
      c.bytes += size;
      return;
    }
  }
  c10::free_cpu(ptr);
}

// A tensor over a cached or new block of `bytes`; contiguous unless `strides` are given.
at::Tensor wrap(int64_t bytes, c10::IntArrayRef sizes, std::optional<c10::IntArrayRef> strides,
                const at::TensorOptions& options) {
  const auto [ptr, size] = take(bytes);
  const bool profiled = report(ptr, size, c10::memoryProfilingEnabled());
  const auto deleter = [size = size, profiled](void* p) {
    report(p, -size, profiled);
    give_back(p, size);
  };
  return strides.has_value() ? at::from_blob(ptr, sizes, *strides, deleter, options)
                             : at::from_blob(ptr, sizes, deleter, options);
}

}  // namespace

int64_t cap_bytes() {
  static const int64_t cap = read_cap();
  return cap;
}

at::Tensor empty(c10::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t n = 1;
  for (const int64_t s : sizes) n *= s;
  const int64_t bytes = n * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  if (bytes < kMinBytes || cap_bytes() == 0) return at::empty(sizes, options);
  return wrap(bytes, sizes, std::nullopt, options);
}

at::Tensor empty_strided(c10::IntArrayRef sizes, c10::IntArrayRef strides,
                         const at::TensorOptions& options) {
  int64_t span = 1;  // elements from the first to one past the last (strides are non-negative)
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] == 0) return at::empty_strided(sizes, strides, options);
    span += (sizes[i] - 1) * strides[i];
  }
  const int64_t bytes =
      span * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  if (bytes < kMinBytes || cap_bytes() == 0) return at::empty_strided(sizes, strides, options);
  return wrap(bytes, sizes, strides, options);
}

int64_t cached_bytes() {
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  return c.bytes;
}

int64_t release() {
  Cache& c = cache();
  std::multimap<int64_t, void*> blocks;
  int64_t freed = 0;
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    blocks.swap(c.free);
    freed = c.bytes;
    c.bytes = 0;
  }
  for (const auto& [size, ptr] : blocks) c10::free_cpu(ptr);
  return freed;
}

}  // namespace smoe::ops::workspace
