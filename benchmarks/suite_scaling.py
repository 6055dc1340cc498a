"""The suite's ``scaling`` section (layer time as tokens and as experts grow) and ``compile``
section (graph breaks under dynamo, fullgraph forward+backward of smoe's layer)."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from baselines import build_baselines
from bench_layer import DTYPES, run_layer
from common import MODES, Clock, log, stat
from layer_metrics import dense_limit
from suite_layer import Shape, make_layer
from torch import Tensor

from smoe import MoELayer

SCALING = {  # d, d_ff, k fixed: FLOPs per token fixed
    "full": dict(d=128, d_ff=256, k=2, tokens=(1024, 4096, 16384, 65536), E_tokens=8,
                 experts=(8, 32, 128, 256), T_experts=8192),
    "quick": dict(d=32, d_ff=64, k=2, tokens=(256, 1024), E_tokens=8,
                  experts=(8, 32), T_experts=512),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# scaling
# ---------------------------------------------------------------------------------------------
def bench_scaling(cfg: dict, dname: str, clock: Clock) -> list[dict]:
    dtype = DTYPES[dname]
    points = [("tokens", T, cfg["E_tokens"]) for T in cfg["tokens"]]
    points += [("experts", cfg["T_experts"], E) for E in cfg["experts"]]
    rows = []
    for sweep, T, E in points:
        shape = Shape(T=T, d=cfg["d"], d_ff=cfg["d_ff"], E=E, k=cfg["k"])
        torch.manual_seed(0)
        layer, _ = make_layer(shape, dtype)
        baselines, _ = build_baselines(layer, shape.k, tokens=T, batched_mm_max_bytes=0)
        keep = ("sort+grouped_mm", "transformers-grouped_mm")
        contenders = {"smoe": layer, **{n: m for n, m in baselines.items() if n in keep}}
        x = torch.randn(T, shape.d, dtype=dtype)
        for mode in MODES:
            backward = mode == "fwd+bwd"
            xin = x.clone().requires_grad_(backward)
            res = {n: clock(run_layer(m, xin, backward), 3) for n, m in contenders.items()}
            fn = dense_limit(T * shape.k, shape.d, shape.inner, shape.d_ff, dtype, backward)
            res["dense"] = clock(fn, 3)
            rows.append(
                dict(
                    sweep=sweep,
                    T=T,
                    E=E,
                    d=shape.d,
                    d_ff=shape.d_ff,
                    k=shape.k,
                    dtype=dname,
                    mode=mode,
                    times={n: stat(s) for n, s in res.items()},
                    efficiency=res["dense"].median / res["smoe"].median,
                )
            )
            log(
                f"  scaling {sweep:<7} T={T:<6} E={E:<4} {mode:<7} "
                + " ".join(f"{n}={1e3 * s.median:.2f}ms" for n, s in res.items())
            )
    return rows


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_dynamo():
    names = ("torch._dynamo", "torch._subclasses.fake_tensor", "torch._inductor")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, lv in levels.items():
                logging.getLogger(n).setLevel(lv)


def bench_compile(dtypes: list[str]) -> list[dict]:
    shape = Shape(T=64, d=32, d_ff=32, E=8, k=2)
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        torch.manual_seed(0)
        layer, _ = make_layer(shape, dtype)
        baselines, _ = build_baselines(layer, shape.k, tokens=shape.T)
        x = torch.randn(shape.T, shape.d, dtype=dtype)
        for name, module in {"smoe": layer, **baselines}.items():
            row: dict = dict(contender=name, dtype=dname)
            with quiet_dynamo():
                torch._dynamo.reset()
                try:
                    e = torch._dynamo.explain(module)(x)
                    row.update(
                        graphs=e.graph_count,
                        graph_breaks=e.graph_break_count,
                        reasons=sorted({_first_line(b.reason) for b in e.break_reasons})[:3],
                    )
                except Exception as ex:  # noqa: BLE001 - a trace failure is a result here
                    row.update(graphs=None, graph_breaks=None, error=_first_line(str(ex)))
                if name == "smoe":
                    row["fullgraph_fwd_bwd"] = _fullgraph_ok(layer, x)
            rows.append(row)
            log(
                f"  compile {dname} {name:<24} graphs={row['graphs']} "
                f"breaks={row['graph_breaks']} {row.get('error', '')[:80]}"
            )
    torch._dynamo.reset()
    return rows


def _first_line(s: object) -> str:
    lines = [ln.strip() for ln in str(s).splitlines() if ln.strip()]
    return lines[0][:120] if lines else ""


def _fullgraph_ok(layer: MoELayer, x: Tensor) -> str:
    """Whether the layer compiles forward+backward as one graph (aot_eager) and matches eager."""
    try:
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        yc, ye = compiled(xc)[0], layer(xe)[0]
        g = torch.randn_like(ye)
        yc.backward(g)
        ye.backward(g)
        ok = torch.allclose(yc, ye) and torch.allclose(xc.grad, xe.grad)
        return "ok" if ok else "mismatch"
    except Exception as ex:  # noqa: BLE001
        return f"error: {_first_line(ex)}"
