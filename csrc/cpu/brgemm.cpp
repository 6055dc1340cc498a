// The bf16 micro-kernel glue (csrc/cpu/brgemm.h): the one-time probe, the VNNI packing and the
// row-tile loop around at::native::cpublas::brgemm.
#include "cpu/brgemm.h"

#include "cpu/vnni_pack.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

namespace smoe::ops::brgemm {
namespace {

using bf16 = c10::BFloat16;

// Why the probe failed, or empty when it passed.
std::string probe() {
  // Small integers: every product and sum is exact in float32, so the result must match exactly.
  // N and K off every block size (16, 32, 64): a CPU whose kernel reads B in another layout (AMX
  // blocking, say) fails here and keeps the float32 path.
  constexpr int64_t M = 5, N = 40, K = 66;
  std::vector<bf16> a(M * K), b(K * N), packed(K * N);
  std::vector<float> c(M * N, -1.0f), want(M * N, 0.0f);
  for (int64_t i = 0; i < M * K; ++i) a[i] = static_cast<float>(i % 7 - 3);
  for (int64_t i = 0; i < K * N; ++i) b[i] = static_cast<float>(i % 5 - 2);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) want[m * N + n] += float(a[m * K + k]) * float(b[k * N + n]);
    }
  }
  try {
    pack_vnni(b.data(), N, 1, K, N, packed.data());
    gemm(M, N, K, a.data(), K, packed.data(), N, c.data(), N);
    release();
  } catch (const c10::Error& e) {
    return std::string("the micro-kernel is unavailable: ") + e.what_without_backtrace();
  } catch (const std::exception& e) {
    return std::string("the micro-kernel is unavailable: ") + e.what();
  }
  if (c != want) return "the micro-kernel's probe product was wrong";
  return "";
}

const std::string& probe_result() {
  static const std::string result = probe();
  return result;
}

bool disabled_by_env() {
  const char* v = std::getenv("SMOE_CPU_BRGEMM");
  return v != nullptr && std::strcmp(v, "0") == 0;
}

}  // namespace

bool bf16_enabled() {
  return !disabled_by_env() && at::globalContext().userEnabledMkldnn() && probe_result().empty();
}

std::string bf16_path() {
  const std::string head = "CPU bf16 router gate (gate_linear and its backward): ";
  if (disabled_by_env()) return head + "float32 GEMM on upcast inputs (SMOE_CPU_BRGEMM=0)";
  if (!at::globalContext().userEnabledMkldnn()) {
    return head + "float32 GEMM on upcast inputs (torch.backends.mkldnn is disabled)";
  }
  if (!probe_result().empty()) return head + "float32 GEMM on upcast inputs (" + probe_result() + ")";
  return head + "oneDNN bf16 brgemm micro-kernel, float32 accumulators (the backward's logit "
                "gradient as bf16 hi + lo)";
}

void pack_vnni(const bf16* b, int64_t ld_k, int64_t ld_n, int64_t K, int64_t N, bf16* out) {
  TORCH_CHECK(K % 2 == 0, "smoe: brgemm::pack_vnni needs an even K, got ", K);
  const auto* in = reinterpret_cast<const uint16_t*>(b);
  auto* words = reinterpret_cast<uint32_t*>(out);
  if (ld_n == 1) {
    cpu::pack_vnni_rows(in, ld_k, K, N, words);
  } else if (ld_k == 1) {
    cpu::pack_vnni_cols(in, ld_n, K, N, words);
  } else {  // any other strides (a sliced view): element by element
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t n = 0; n < N; ++n) out[(k / 2) * 2 * N + 2 * n + k % 2] = b[k * ld_k + n * ld_n];
    }
  }
}

void gemm(int64_t M, int64_t N, int64_t K, const bf16* a, int64_t lda, const bf16* packed,
          int64_t ld_b, float* c, int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; m += kTileRows) {
    const int64_t rows = std::min(kTileRows, M - m);
    at::native::cpublas::brgemm(rows, N, K, lda, ld_b, ldc, /*add_C=*/accumulate, a + m * lda,
                                packed, c + m * ldc, /*is_vnni=*/true);
  }
}

void release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

}  // namespace smoe::ops::brgemm
