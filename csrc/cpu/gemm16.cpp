// The 16-bit GEMM path of the CPU ops (csrc/cpu/gemm16.h).
#include "cpu/gemm16.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace smoe::ops {
namespace {

// ATen's 16-bit fallback is fast in one case: few rows against a weight block stored
// output-major (b's columns contiguous, as Experts' [E, out, in] weights are handed over), which it
// runs as dot products that read each weight once. Upcasting the block first would triple that
// traffic. bf16 [M, 3584] x [3584, 256], one thread, native / upcast ms: output-major
// 0.10 / 0.41 at M = 1, 0.36 / 0.66 at M = 4, 0.68 / 0.44 at M = 8; row-major 2.55 / 0.62 at
// M = 1 and worse after (its scalar loop walks the weight by rows). So an item of fewer than
// kNativeMaxRows rows over an output-major block keeps ATen's mm: decoding, where one token at the
// Mixtral-like shape took 5.7 ms upcast and 1.6 ms native (bench_gemm16.py --tokens 1).
constexpr int64_t kNativeMaxRows = 6;

bool dot_product_form(const at::Tensor& out, const at::Tensor& b) {
  return out.size(0) < kNativeMaxRows && b.stride(0) == 1 && b.size(0) > 1;
}

Gemm16Mode parse(const std::string& mode, const char* what) {
  if (mode == "auto") return Gemm16Mode::kAuto;
  if (mode == "native") return Gemm16Mode::kNative;
  if (mode == "upcast") return Gemm16Mode::kUpcast;
  TORCH_CHECK_VALUE(false, "smoe: ", what, " must be \"auto\", \"native\" or \"upcast\", got \"",
                    mode, "\"");
}

std::atomic<int>& mode_slot() {
  static std::atomic<int> slot{[] {
    const char* v = std::getenv("SMOE_CPU_GEMM16");
    return static_cast<int>(v == nullptr || *v == '\0' ? Gemm16Mode::kAuto
                                                       : parse(v, "SMOE_CPU_GEMM16"));
  }()};
  return slot;
}

// Whether oneDNN has a kernel for this 16-bit dtype on this CPU, as ATen decides it (the
// mkldnn::_is_mkldnn_{bf16,fp16}_supported ops; false where torch lacks them).
bool onednn_has(at::ScalarType dtype) {
  static const auto ask = [](const char* name) {
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    return op.has_value() && op->typed<bool()>().call();
  };
  static const bool bf16 = ask("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = ask("mkldnn::_is_mkldnn_fp16_supported");
  return dtype == at::kBFloat16 ? bf16 : dtype == at::kHalf ? fp16 : true;
}

const char* why(at::ScalarType dtype) {
  switch (gemm16_mode()) {
    case Gemm16Mode::kNative:
      return "SMOE_CPU_GEMM16=native";
    case Gemm16Mode::kUpcast:
      return "SMOE_CPU_GEMM16=upcast";
    case Gemm16Mode::kAuto:
      break;
  }
  if (!at::globalContext().userEnabledMkldnn()) return "torch.backends.mkldnn is disabled";
  return onednn_has(dtype) ? "oneDNN has a kernel for this CPU"
                           : "oneDNN has no kernel for this CPU: ATen's scalar fallback";
}

}  // namespace

Gemm16Mode gemm16_mode() { return static_cast<Gemm16Mode>(mode_slot().load()); }

void set_gemm16_mode(const std::string& mode) {
  mode_slot().store(static_cast<int>(parse(mode, "mode")));
}

bool gemm16_upcast(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  switch (gemm16_mode()) {
    case Gemm16Mode::kNative:
      return false;
    case Gemm16Mode::kUpcast:
      return true;
    case Gemm16Mode::kAuto:
      break;
  }
  return !at::globalContext().userEnabledMkldnn() || !onednn_has(dtype);
}

std::string gemm16_path() {
  std::string line = "CPU 16-bit expert GEMMs (grouped_mm, gather_mm, expert_mlp):";
  for (const auto dtype : {at::kBFloat16, at::kHalf}) {
    line += dtype == at::kBFloat16 ? " bf16 " : "; fp16 ";
    line += gemm16_upcast(dtype) ? "float32 GEMM on upcast inputs" : "ATen's 16-bit mm";
    line += std::string(" (") + why(dtype) + ")";
  }
  return line;
}

void block_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
              const std::optional<at::Tensor>& bias) {
  if (!gemm16_upcast(out.scalar_type()) || dot_product_form(out, b)) {
    if (bias.has_value()) {
      at::addmm_out(out, *bias, a, b);
    } else {
      at::mm_out(out, a, b);
    }
    return;
  }
  at::Tensor acc = at::empty(out.sizes(), out.options().dtype(at::kFloat));
  const at::Tensor a32 = a.to(at::kFloat), b32 = b.to(at::kFloat);
  if (bias.has_value()) {
    at::addmm_out(acc, bias->to(at::kFloat), a32, b32);
  } else {
    at::mm_out(acc, a32, b32);
  }
  out.copy_(acc);
}

}  // namespace smoe::ops
