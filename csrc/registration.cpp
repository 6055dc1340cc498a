// The table of contents of smoe: every op schema, in data-flow order, in one TORCH_LIBRARY block.
// Kernels live in cpu/<op>.cpp and cuda/<op>_launch.cpp; fakes and autograd in
// smoe/ops/<family>.py, named by the set_python_module call above each family's schemas (torch
// checks it). This file also creates the `_C` Python module: build information, which paths the
// kernels take, and the CPU output cache's controls (no ops).
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <exception>
#include <string>

#include "cpu/brgemm.h"
#include "cpu/gemm16.h"
#include "cpu/workspace.h"

#ifdef SMOE_WITH_CUDA
namespace smoe::ops {
std::string cuda_grouped_mm_path();  // csrc/cuda/grouped_mm_launch.cpp
}
#endif

#ifndef SMOE_TORCH_VERSION
#define SMOE_TORCH_VERSION "unknown"
#endif
#ifndef SMOE_CUDA_ARCHS
#define SMOE_CUDA_ARCHS ""
#endif
#ifndef SMOE_CUDA_VERSION
#define SMOE_CUDA_VERSION ""
#endif

TORCH_LIBRARY(smoe, m) {
  // ---- the gate ----
  m.set_python_module("smoe.ops.gate");
  // a router's logits [T, E] = x [T, d] @ weight [E, d]^T (+ bias [E]) in float32 (float64 for
  // float64 x) from the exact values of 16-bit inputs, never rounded to 16 bits. Differentiable.
  m.def("gate_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // its backward from the logits' gradient grad [T, E] (the logits' dtype): grad_x [T, d] in x's
  // dtype and grad_weight [E, d] in weight's (each empty when not needed). The GEMMs run in the
  // logits' dtype on upcasts; on CPU with bf16 x and weight, through the bf16 micro-kernel with grad
  // as two bf16 parts (hi + lo, ~2^-17 relative) and float32 accumulators.
  m.def(
      "gate_linear_backward(Tensor grad, Tensor x, Tensor weight, bool need_x, bool need_weight)"
      " -> (Tensor, Tensor)");

  // ---- routers ----
  m.set_python_module("smoe.ops.routing");
  // token-choice top-k: softmax over E experts (fp32 math), then the k largest, ties to the lower
  // expert index; returns weight [T, k] (logits' dtype) and expert [T, k] int32. selection_bias
  // [E] float32 (aux-loss-free balancing, DeepSeek-V3) is added to the logits for the selection
  // only: the weights are the unbiased softmax's.
  m.def(
      "topk_softmax(Tensor logits, int k, Tensor? selection_bias=None, *, bool renormalize=True) "
      "-> (Tensor weight, Tensor expert)");

  // token-choice top-k on sigmoid scores (DeepSeek-V3): s = sigmoid(logits) (fp32 math); experts
  // chosen by s + selection_bias, within the topk_group (None: all) best of n_group consecutive
  // expert groups (a group scores the sum of its two best s + bias), ties to the lower index;
  // weight = s of the chosen (never the bias), divided by their sum + 1e-20 when renormalize, times
  // scale. Returns weight [T, k] (logits' dtype) and expert [T, k] int32, best first.
  m.def(
      "topk_sigmoid(Tensor logits, int k, Tensor? selection_bias=None, *, int n_group=1, int? "
      "topk_group=None, bool renormalize=False, float scale=1.0) -> (Tensor weight, Tensor "
      "expert)");

  // expert choice (Zhou et al. 2022): softmax over E experts per token (fp32 math), then in every
  // group of group_size consecutive tokens (None: one group; the last may be shorter) each expert
  // takes its `capacity` most probable tokens (clamped to the group size; ties to the lower token
  // index), listed in token order. A plan of M = E * C_tot rows (C_tot = sum over groups of the
  // clamped capacity): weight [T, E] (the probability where chosen, else 0), offsets [E+1] int64,
  // token [M] int32, slot [M] int32 (t * E + e), row [T, E] int32 (-1 where not chosen).
  m.def(
      "expert_choice(Tensor logits, SymInt capacity, *, SymInt? group_size=None) -> (Tensor weight, "
      "Tensor offsets, Tensor token, Tensor slot, Tensor row)");

  m.set_python_module("smoe.ops.xmoe");
  // X-MoE hypersphere scores (specs/xmoe.md §6): z = h proj^T (fp32 accumulation), z / max(|z|,
  // eps) when normalize_tokens, expert rows / max(|e|, eps), cos = z . e; non-finite scores take
  // the smallest finite score of their row. Returns cos [T, N] and logits = cos / max(tau, 1e-4)
  // [T, N], float32 (float64 for float64 inputs). proj and expert_emb are made contiguous.
  m.def(
      "cosine_scores(Tensor h, Tensor proj, Tensor expert_emb, Tensor temperature, *, float "
      "eps=1e-4, bool normalize_tokens=True) -> (Tensor cos, Tensor logits)");

  m.set_python_module("smoe.ops.sinkhorn");
  // entropic optimal transport in the log domain (specs/sinkhorn_ssr.md §3, §7): S = scores / eps,
  // f_0 = 0; each iteration g = log c - LSE_t(S + f), then f = log r - LSE_j(S + g), in float32
  // (float64 for float64 scores); log_plan = f + S + g. Rows carry row_mass, columns col_mass
  // (None: T * row_mass / E). A fixed max_iter by default; tol > 0 checks the L2 row and column
  // residuals every check_every iterations and stops below tol (on CUDA a host sync per check).
  // Returns log_plan [T, E], f [T], g [E], iters_done (int64 0-dim), row_err, col_err (0-dim), and
  // the per-iteration potentials f_hist [max_iter, T], g_hist [max_iter, E] the backward reads.
  m.def(
      "sinkhorn(Tensor scores, *, float eps, int max_iter, float tol=0., float row_mass=1., float? "
      "col_mass=None, int check_every=10) -> (Tensor log_plan, Tensor f, Tensor g, Tensor "
      "iters_done, Tensor row_err, Tensor col_err, Tensor f_hist, Tensor g_hist)");

  m.set_python_module("smoe.ops.graph");
  // similarity- / attention-aware routing (specs/graph_routing.md §2, §5): per batch entry,
  // out = self_coef x + lam A x' with x' = [cache; x] along dim 1 (x' = x without a cache); x
  // [B, S, E], cache [B, C, E], A [B, S, C + S], one dtype; float32 math (float64 for float64).
  // lam = 0 drops the graph term (out = self_coef x exactly). Inputs are made contiguous; returns
  // [B, S, E] in x's dtype.
  m.def(
      "graph_mix(Tensor x, Tensor A, Tensor? cache=None, *, float self_coef=1., float lam=1.) -> "
      "Tensor");

  m.set_python_module("smoe.ops.usmoe");
  // USMoE's unified competitive selection (specs/usmoe.md §3, §8): per group g of scores [G, L]
  // (L = S * E, flat index s * E + e), the n largest scores, ties to the lower flat index;
  // counts [G] int64 (None: n everywhere) takes only counts[g] <= n in group g. Returns indices
  // [G, n] int64, the chosen flat indices in ascending order, -1 past the group's count. NaN
  // scores are an error; -inf scores (padding) rank last.
  m.def("unified_topk(Tensor scores, SymInt n, Tensor? counts=None) -> Tensor");

  m.set_python_module("smoe.ops.s2moe");
  // S2MoE's Gaussian perturbation (specs/s2moe.md §2.2, §5): out = (1 + s_mul n1) x + (mu + s_add
  // n2), n1 and n2 x's shape (drawn by the caller), mu, s_mul, s_add one value each or broadcast
  // over one run of consecutive dims of x (DSU's [B, 1, d], [T, 1], [1, d]); one dtype; math in
  // float32 (float64 for float64). Returns x's shape, contiguous.
  m.def(
      "s2moe_perturb(Tensor x, Tensor n1, Tensor n2, Tensor mu, Tensor s_mul, Tensor s_add) -> "
      "Tensor");

  // ---- the auxiliary losses' statistics ----
  m.set_python_module("smoe.ops.stats");
  // one pass over router logits [T, E]: prob_sum [E] = sum over tokens of softmax(logits_t) (the
  // balance losses' P, times T) and lse [T] = logsumexp(logits_t) (the z-loss's), float32 (float64
  // for float64 logits) from the exact 16-bit values. prob_sum adds fixed blocks of rows in order:
  // the same bits at any thread count. NaN propagates; a row of only -inf has lse -inf.
  m.def("router_stats(Tensor logits) -> (Tensor prob_sum, Tensor lse)");

  // ---- dispatch ----
  m.set_python_module("smoe.ops.dispatch");
  // stable counting sort of the T*k slots by expert, with optional capacity dropping (rank-major);
  // returns offsets [E+1] int64, token [T*k] int32, slot [T*k] int32 (both -1 past offsets[E]),
  // row [T, k] int32 (sorted position of each slot, -1 if dropped) and kept [T, k] bool.
  m.def(
      "make_plan(Tensor expert, int num_experts, *, SymInt? capacity=None, Tensor? priority=None) -> "
      "(Tensor offsets, Tensor token, Tensor slot, Tensor row, Tensor kept)");
  // gather rows of x [T, d] into expert order: out[i] = x[token[i]] (0 where token[i] < 0);
  // returns [M, d] (M = token.size(0)). `row` is the plan's inverse map, used only by the backward.
  m.def("permute(Tensor x, Tensor token, Tensor row) -> Tensor");
  // weighted gather back to token order: y[t] = sum_j weight[t, j] * y_sorted[row[t, j]];
  // returns [T, d]. `token` and `slot` are used only by the backward.
  m.def("combine(Tensor y_sorted, Tensor weight, Tensor token, Tensor slot, Tensor row) -> Tensor");

  // ---- experts ----
  m.set_python_module("smoe.ops.experts");
  // one GEMM per expert group: out[r] = x[r] @ w[e] (+ bias[e]) for offsets[e] <= r <
  // offsets[e+1], zero rows past offsets[E]; w [E, d_in, d_out] may be a transposed view of
  // [E, d_out, d_in] (no copy); bias [E, d_out] is added in the GEMM's epilogue.
  m.def("grouped_mm(Tensor x, Tensor w, Tensor offsets, Tensor? bias=None) -> Tensor");
  m.set_python_module("smoe.ops.gather");
  // grouped_mm over the rows a plan gathers: out[r] = x[token[r]] @ w[e] (+ bias[e]) for
  // offsets[e] <= r < offsets[e+1] (x[token[r]] = 0 where token[r] < 0), zero rows past
  // offsets[E]: permute -> grouped_mm without materialising x_sorted (CPU: each row block is
  // gathered into a thread's scratch; grouped rows of at most gather_min_bytes > 0 are permuted
  // instead). x [T, d_in]; `row` is used only by the backward.
  m.def(
      "gather_mm(Tensor x, Tensor token, Tensor row, Tensor w, Tensor offsets, Tensor? bias=None, "
      "int gather_min_bytes=0) -> Tensor");
  m.set_python_module("smoe.ops.experts");
  // SwiGLU on a fused gate/up projection h [M, 2f] (gate columns first, transformers' gate_up_proj
  // layout): silu(gate) * up in one pass; returns [M, f].
  m.def("swiglu(Tensor h) -> Tensor");
  // each expert's whole MLP, out[r] = act(in[r] @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e] for
  // offsets[e] <= r < offsets[e+1] (zero rows past offsets[E]), where in[r] = x[token[r]] (0 where
  // token[r] < 0) with a plan's token [M] / row [T, k], or x[r] without one; activation "swiglu"
  // (w_in [E, d, 2 d_ff], gate columns first), "gelu", "gelu_tanh" or "relu". CPU: per (expert,
  // row block) in one thread's scratch, neither the gathered rows nor the hidden are materialised,
  // unless the hidden [M, n_in] is at most fuse_min_bytes > 0 (then the unfused chain; CUDA
  // always). Its backward (smoe.ops.experts) recomputes the hidden through the unfused ops.
  m.def(
      "expert_mlp(Tensor x, Tensor? token, Tensor? row, Tensor offsets, Tensor w_in, Tensor? b_in, "
      "Tensor w_out, Tensor? b_out, str activation, int fuse_min_bytes=0) -> Tensor");

  // ---- momentum ----
  m.set_python_module("smoe.ops.momentum");
  // MomentumSMoE / AdamSMoE / Robust MomentumSMoE state update (specs/momentum_smoe.md §3-§5),
  // elementwise over u's shape (any rank): kind="heavy_ball": m' = mu m + gamma u, delta = sign m';
  // "adam": p' = beta1 p + (1-beta1) u, v' = beta2 v + (1-beta2) u^2, delta = sign gamma1 p' /
  // sqrt(v' + eps), and m' as heavy_ball; "robust": m' = -u + robust_b m, delta = robust_a m'.
  // The state m, p, v (p, v only for adam) is float32 (float64 for float64 u), delta u's dtype;
  // inputs are made contiguous. Returns delta, m', p', v' (p', v' empty [0] unless adam).
  m.def(
      "momentum_update(Tensor u, Tensor m, Tensor? p=None, Tensor? v=None, *, str "
      "kind=\"heavy_ball\", float mu=0.7, float gamma=1.0, float sign=-1.0, float beta1=0.9, float "
      "beta2=0.999, float gamma1=1.0, float eps=1e-8, float robust_a=0.96, float robust_b=0.04) -> "
      "(Tensor delta, Tensor m_out, Tensor p_out, Tensor v_out)");

  // ---- backward ops ---- (their fakes sit beside their forward's)
  m.set_python_module("smoe.ops.routing");
  // d logits of topk_softmax, recomputing the softmax from the logits in fp32; [T, E].
  m.def(
      "topk_softmax_backward(Tensor grad_weight, Tensor logits, Tensor expert, bool renormalize) "
      "-> "
      "Tensor");
  // d logits of topk_sigmoid, recomputing the sigmoid from the logits in fp32; [T, E].
  m.def(
      "topk_sigmoid_backward(Tensor grad_weight, Tensor logits, Tensor expert, bool renormalize, "
      "float scale) -> Tensor");
  // d logits of expert_choice, recomputing the softmax from the logits in fp32; [T, E].
  m.def("expert_choice_backward(Tensor grad_weight, Tensor logits, Tensor row) -> Tensor");
  m.set_python_module("smoe.ops.xmoe");
  // d h [T, d], d proj [d_e, d], d expert_emb [N, d_e] (inputs' dtype) and d temperature (0-dim,
  // its dtype; 0 where tau < 1e-4) of cosine_scores, recomputing the scores from the inputs.
  m.def(
      "cosine_scores_backward(Tensor grad_cos, Tensor grad_logits, Tensor h, Tensor proj, Tensor "
      "expert_emb, Tensor temperature, float eps, bool normalize_tokens) -> (Tensor grad_h, "
      "Tensor grad_proj, Tensor grad_expert_emb, Tensor grad_temperature)");
  m.set_python_module("smoe.ops.sinkhorn");
  // d scores [T, E] (scores' dtype) of sinkhorn through its unrolled iterations, recomputing each
  // iteration's softmaxes from scores and the stored potentials; grad_f and grad_g are the
  // gradients of the returned f and g (zeros when unused).
  m.def(
      "sinkhorn_backward(Tensor grad_log_plan, Tensor grad_f, Tensor grad_g, Tensor scores, Tensor "
      "f_hist, Tensor g_hist, Tensor iters_done, float eps) -> Tensor");
  m.set_python_module("smoe.ops.graph");
  // d x [B, S, E] = self_coef g + lam A[:, :, C:]^T g and d A [B, S, C + S] = lam g x'^T of
  // graph_mix (the cache gets no gradient); an output not asked for (need_x, need_A) is an empty
  // [0] tensor, and an input it would have read (A; x and cache) is not read.
  m.def(
      "graph_mix_backward(Tensor grad, Tensor x, Tensor A, Tensor? cache, *, float self_coef=1., "
      "float lam=1., bool need_x=True, bool need_A=True) -> (Tensor grad_x, Tensor grad_A)");
  m.set_python_module("smoe.ops.s2moe");
  // d x = g (1 + s_mul n1), d mu = sum g, d s_mul = sum g n1 x, d s_add = sum g n2 of
  // s2moe_perturb, each statistic's sum over the dims it is broadcast over, in a fixed order;
  // output_mask (x, mu, s_mul, s_add) skips the others (an empty [0] tensor). No gradient for
  // the noise.
  m.def(
      "s2moe_perturb_backward(Tensor grad, Tensor x, Tensor n1, Tensor n2, Tensor mu, Tensor "
      "s_mul, Tensor s_add, bool[4] output_mask) -> (Tensor grad_x, Tensor grad_mu, Tensor "
      "grad_s_mul, Tensor grad_s_add)");
  m.set_python_module("smoe.ops.stats");
  // d logits [T, E] (logits' dtype) of router_stats from d prob_sum [E] and d lse [T] (either
  // None: zero), recomputing the softmax p as the forward does: p (d prob_sum - <p, d prob_sum> +
  // d lse).
  m.def("router_stats_backward(Tensor? grad_prob_sum, Tensor? grad_lse, Tensor logits) -> Tensor");
  m.set_python_module("smoe.ops.dispatch");
  // d x of permute: grad_x[t] = sum_j grad_out[row[t, j]]; [T, d].
  m.def("permute_backward(Tensor grad_out, Tensor row) -> Tensor");
  // d y_sorted [M, d] and d weight [T, k] of combine.
  m.def(
      "combine_backward(Tensor grad_out, Tensor y_sorted, Tensor weight, Tensor token, Tensor "
      "slot, Tensor row) -> (Tensor grad_y_sorted, Tensor grad_weight)");
  m.set_python_module("smoe.ops.experts");
  // d h [M, 2f] of swiglu, in one pass.
  m.def("swiglu_backward(Tensor grad_out, Tensor h) -> Tensor");
  // d x [M, d_in] and d w (w's layout: contiguous, or transposed-contiguous when w is a transposed
  // view) of grouped_mm; an output that is not asked for is returned as an empty [0] tensor.
  m.def(
      "grouped_mm_backward(Tensor grad_out, Tensor x, Tensor w, Tensor offsets, bool need_x, bool "
      "need_w) -> (Tensor grad_x, Tensor grad_w)");
  m.set_python_module("smoe.ops.gather");
  // d x [T, d_in] (per-token sums of the grouped rows' gradient, as permute_backward) and d w
  // (grouped_mm_backward's layout) of gather_mm; an output not asked for is an empty [0] tensor.
  // Its bias gradient is grouped_mm_bias_backward's.
  m.def(
      "gather_mm_backward(Tensor grad_out, Tensor x, Tensor token, Tensor row, Tensor w, Tensor "
      "offsets, bool need_x, bool need_w) -> (Tensor grad_x, Tensor grad_w)");
  m.set_python_module("smoe.ops.experts");
  // d bias [E, d_out] of grouped_mm: each group's rows of grad_out summed in row order.
  m.def("grouped_mm_bias_backward(Tensor grad_out, Tensor offsets) -> Tensor");
  m.set_python_module("smoe.ops.momentum");
  // d u (u's dtype), d m, d p, d v (state dtype; d p, d v empty [0] unless adam) of
  // momentum_update from the gradients of its four outputs (zeros for unused ones; grad_p, grad_v
  // empty [0] unless adam). Only the Adam step reads u, p and v; m is never read.
  m.def(
      "momentum_update_backward(Tensor grad_delta, Tensor grad_m, Tensor grad_p, Tensor grad_v, "
      "Tensor u, Tensor m, Tensor? p, Tensor? v, *, str kind=\"heavy_ball\", float mu=0.7, float "
      "gamma=1.0, float sign=-1.0, float beta1=0.9, float beta2=0.999, float gamma1=1.0, float "
      "eps=1e-8, float robust_a=0.96, float robust_b=0.04) -> (Tensor grad_u, Tensor grad_m_in, "
      "Tensor grad_p_in, Tensor grad_v_in)");
}

// ---- the _C module: build information, the kernels' paths and the CPU cache; no ops ----
namespace {

// Runs fn() -> PyObject*; a C++ exception (a bad SMOE_CPU_CACHE_MB, say) becomes a Python
// RuntimeError instead of escaping through the C API.
template <typename F>
PyObject* guarded(F fn) {
  try {
    return fn();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* cpu_gate_path(PyObject*, PyObject*) {
  return guarded([] { return PyUnicode_FromString(smoe::ops::brgemm::bf16_path().c_str()); });
}

PyObject* cpu_gemm16_path(PyObject*, PyObject*) {
  return guarded([] { return PyUnicode_FromString(smoe::ops::gemm16_path().c_str()); });
}

PyObject* set_cpu_gemm16(PyObject*, PyObject* arg) {
  if (!PyUnicode_Check(arg)) {
    PyErr_SetString(PyExc_TypeError,
                    "smoe: mode must be a str: \"auto\", \"native\" or \"upcast\"");
    return nullptr;
  }
  return guarded([arg] {
    smoe::ops::set_gemm16_mode(PyUnicode_AsUTF8(arg));
    Py_RETURN_NONE;
  });
}

PyObject* cpu_gemm16_upcasts(PyObject*, PyObject* arg) {
  if (!PyUnicode_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "smoe: dtype must be a str: \"bfloat16\" or \"float16\"");
    return nullptr;
  }
  const std::string dtype = PyUnicode_AsUTF8(arg);
  if (dtype != "bfloat16" && dtype != "float16") {
    PyErr_Format(PyExc_ValueError, "smoe: dtype must be \"bfloat16\" or \"float16\", got %R", arg);
    return nullptr;
  }
  return guarded([&dtype] {
    const bool up = smoe::ops::gemm16_upcast(dtype == "bfloat16" ? at::kBFloat16 : at::kHalf);
    return PyBool_FromLong(up ? 1 : 0);
  });
}

PyObject* cuda_grouped_mm_path(PyObject*, PyObject*) {
#ifdef SMOE_WITH_CUDA
  return guarded([] { return PyUnicode_FromString(smoe::ops::cuda_grouped_mm_path().c_str()); });
#else
  return PyUnicode_FromString("CUDA grouped_mm: not compiled in");
#endif
}

PyObject* cpu_cache_bytes(PyObject*, PyObject*) {
  return guarded([] { return PyLong_FromLongLong(smoe::ops::workspace::cached_bytes()); });
}

PyObject* cpu_cache_cap(PyObject*, PyObject*) {
  return guarded([] { return PyLong_FromLongLong(smoe::ops::workspace::cap_bytes()); });
}

PyObject* release_cpu_cache(PyObject*, PyObject*) {
  return guarded([] { return PyLong_FromLongLong(smoe::ops::workspace::release()); });
}

PyMethodDef smoe_c_methods[] = {
    {"cpu_gate_path", cpu_gate_path, METH_NOARGS,
     "Which path gate_linear's CPU bf16 GEMM takes here, and why (one line)."},
    {"cpu_gemm16_path", cpu_gemm16_path, METH_NOARGS,
     "Which path the CPU expert GEMMs take for bf16 and fp16 here, and why (one line)."},
    {"cpu_gemm16_upcasts", cpu_gemm16_upcasts, METH_O,
     "Whether the CPU expert GEMMs of this dtype (\"bfloat16\" or \"float16\") run as float32 "
     "GEMMs on upcasts here (the decision cpu_gemm16_path describes)."},
    {"set_cpu_gemm16", set_cpu_gemm16, METH_O,
     "Sets that path: \"auto\", \"native\" or \"upcast\" (SMOE_CPU_GEMM16 sets it at start)."},
    {"cuda_grouped_mm_path", cuda_grouped_mm_path, METH_NOARGS,
     "Which path CUDA grouped_mm takes, by dtype and device (one line)."},
    {"cpu_cache_bytes", cpu_cache_bytes, METH_NOARGS,
     "Bytes of freed large CPU op outputs cached for reuse (csrc/cpu/workspace.h)."},
    {"cpu_cache_cap", cpu_cache_cap, METH_NOARGS, "The cache's cap in bytes (SMOE_CPU_CACHE_MB)."},
    {"release_cpu_cache", release_cpu_cache, METH_NOARGS,
     "Frees every cached block; returns the bytes freed."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef smoe_c_module = {PyModuleDef_HEAD_INIT, "_C", "smoe build information", -1,
                             smoe_c_methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&smoe_c_module);
  if (mod == nullptr) return nullptr;
#ifdef SMOE_WITH_CUDA
  const bool with_cuda = true;
#else
  const bool with_cuda = false;
#endif
  PyModule_AddStringConstant(mod, "torch_version", SMOE_TORCH_VERSION);
  PyModule_AddStringConstant(mod, "cuda_version", SMOE_CUDA_VERSION);
  PyModule_AddStringConstant(mod, "cuda_archs", SMOE_CUDA_ARCHS);
  PyModule_AddObject(mod, "with_cuda", PyBool_FromLong(with_cuda));
  return mod;
}
