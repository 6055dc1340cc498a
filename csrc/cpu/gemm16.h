// The CPU GEMM of one work item of grouped_mm and expert_mlp, with the 16-bit path chosen per CPU.
//
// ATen runs a bf16 (fp16) mm through oneDNN only where oneDNN has a 16-bit kernel for the CPU
// (AVX-512 for bf16; AVX512-FP16 or AMX-FP16 for fp16, torch.ops.mkldnn._is_mkldnn_*_supported).
// Elsewhere, on every AVX2-only x86 CPU and for fp16 on most AVX-512 ones, it falls back to a
// scalar loop: 0.6-0.7 GF/s against 30-70 GF/s for float32 on this project's 2-core AVX2 machine
// (2026-12-05). There the item's inputs are upcast to float32, multiplied by the float32 BLAS (MKL
// on x86 wheels) and the float32 result is rounded once into the output: the fallback's own
// arithmetic (float32 products and accumulators), at the speed of the float32 GEMM plus the
// conversions.
//
// SMOE_CPU_GEMM16 = auto (the default: upcast where ATen has no oneDNN kernel for the dtype, or
// torch.backends.mkldnn is disabled), native (always ATen's own 16-bit mm) or upcast (always).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace smoe::ops {

enum class Gemm16Mode { kAuto = 0, kNative = 1, kUpcast = 2 };

// The mode in force: SMOE_CPU_GEMM16 at the first call, or what set_gemm16_mode set since.
Gemm16Mode gemm16_mode();
// "auto", "native" or "upcast"; anything else raises, naming the argument.
void set_gemm16_mode(const std::string& mode);
// Whether a GEMM with this output dtype runs on upcast float32 inputs here (false for 32/64-bit).
bool gemm16_upcast(at::ScalarType dtype);
// One line for smoe.info: the path of each 16-bit dtype, and why.
std::string gemm16_path();

// out = a @ b (+ bias, broadcast over rows), any strides, on the path above for out's dtype; an
// out of fewer than 6 rows over an output-major b (decoding: dot products that read each weight
// once, ATen's fallback at its fastest) keeps ATen's own mm.
void block_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
              const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace smoe::ops
