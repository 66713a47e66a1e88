"""Every Taylor-mode rule, by the name it is registered under, against nested forward AD.

`CASES` maps each key of `jetfx.passes.taylor.RULES` (by `rule_name`) to a small float64 function
that goes through that op. The test runs the function's Taylor jet at orders 1–3 and compares its
coefficients with nested forward AD (`jetfx.jets.jet_coefficients`, the reference) to 1e-9
relative; it also checks that the registered rule itself ran and that nothing fell back on nested
AD. A rule registered without an entry here fails `test_every_registered_rule_has_a_case`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import fx

from jetfx.jets import jet_coefficients
from jetfx.passes.decompose import grouped_mm
from jetfx.passes.taylor import RULES, TaylorJet, rule_name
from test_taylor import region_of as recorded_region  # an fx region with meta["val"] on every node

fx.wrap("grouped_mm")  # a leaf of the traced functions: it loops over the offsets' values

aten = torch.ops.aten
K_ORDERS = (1, 2, 3)


def _rand(*shape, seed=0, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)


X, Y = _rand(3, 4, seed=1), _rand(3, 4, seed=2)
XP, YP = _rand(3, 4, seed=3, lo=0.5, hi=2.0), _rand(3, 4, seed=4, lo=0.5, hi=2.0)  # log, sqrt, …
W = _rand(5, 4, seed=5)
BIAS = _rand(5, seed=6)
MASK = _rand(3, 4, seed=7) > 0
C33 = _rand(1, 3, 3, seed=8)
W143 = _rand(1, 4, 3, seed=9)
NAN133 = torch.full((1, 3, 3), float("nan"), dtype=torch.float64)  # what torch.empty may hold
W43 = _rand(4, 3, seed=10)
KERNEL = _rand(2, 3, 2, seed=11)  # conv1d: 2 output channels, 3 input channels, width 2
KBIAS = _rand(2, seed=12)
ROWS = torch.tensor([2, 0])
IDS = torch.tensor([[0, 2], [1, 1]])
GATHER = torch.tensor([[3, 0], [1, 1], [0, 2]])
OFFSETS = torch.tensor([1, 3])  # grouped_mm: row 0 → expert 0, rows 1–2 → expert 1
EXPERTS = _rand(2, 4, 3, seed=13)
ROTATION = torch.complex(_rand(3, 2, seed=14), _rand(3, 2, seed=15))


def exp(x):
    return aten.exp.default(x)


def tanh(x):
    return aten.tanh.default(x)


def sigmoid(x):
    return aten.sigmoid.default(x)


def pick(cond):
    """where(cond, exp(x), tanh(x)): a boolean series (a comparison's rule) chooses between two."""
    return lambda x: aten.where.self(cond(x), exp(x), tanh(x))


def scaled_by(index):
    """exp(x) times an integer series (argmax's rule): the index enters as a constant factor."""
    return lambda x: aten.mul.Tensor(exp(x), index(x))


@dataclass
class Case:
    """f(x) going through the op; `ref`: the same function without ops nested AD cannot see
    through (detach cuts the tangent, layer_norm's nested jvp is wrong from order 2: see
    passes/decompose.py); `positive`: x and y in [0.5, 2]; `strip`: integer and boolean outputs
    lose their recorded values, so that the interpreter does not take them at the center by
    itself and their rules run."""

    f: object
    ref: object = None
    positive: bool = False
    strip: bool = False


def _ln_ref(x):
    xc = x - x.mean(-1, keepdim=True)
    return xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + 1e-5) * W[0, :4] + BIAS[:4]


def _rms_ref(x):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * W[0, :4]


def _product_of_halves(pieces):
    return aten.mul.Tensor(pieces[0], pieces[1])


def _conv_input(x):
    return aten.unsqueeze.default(exp(x), 0)  # (1, 3, 4): batch 1, 3 channels, length 4


CASES: dict[str, Case] = {
    # -- linear.py: shape ops, views, copies
    "_operator.getitem": Case(lambda x: _product_of_halves(aten.split.Tensor(exp(x), 2, 1))),
    "aten._unsafe_view.default": Case(lambda x: aten._unsafe_view.default(exp(x), [2, 6])),
    "aten.view.default": Case(lambda x: aten.view.default(tanh(x), [4, 3])),
    "aten.view": Case(lambda x: aten.view.dtype(exp(x), torch.float64),  # view.dtype: not differentiable
                      ref=lambda x: torch.exp(x)),
    "aten.reshape": Case(lambda x: aten.reshape.default(exp(x), [12])),
    "aten.view_copy": Case(lambda x: aten.view_copy.default(exp(x), [6, 2])),
    "aten.alias": Case(lambda x: aten.alias.default(exp(x))),
    "aten.clone": Case(lambda x: aten.clone.default(exp(x))),
    "aten.contiguous": Case(lambda x: aten.contiguous.default(aten.t.default(exp(x)))),
    "aten.lift_fresh_copy": Case(lambda x: aten.lift_fresh_copy.default(exp(x))),
    "aten.neg": Case(lambda x: aten.neg.default(exp(x))),
    "aten.t": Case(lambda x: aten.mm.default(aten.t.default(exp(x)), tanh(x))),
    "aten.transpose": Case(lambda x: aten.transpose.int(exp(x), 0, 1)),
    "aten.transpose_copy": Case(lambda x: aten.transpose_copy.int(exp(x), 0, 1)),
    "aten.swapaxes": Case(lambda x: aten.swapaxes.default(exp(x), 0, 1)),
    "aten.permute": Case(lambda x: aten.permute.default(exp(x), [1, 0])),
    "aten.permute_copy": Case(lambda x: aten.permute_copy.default(exp(x), [1, 0])),
    "aten.movedim": Case(lambda x: aten.movedim.int(aten.unsqueeze.default(exp(x), 0), 0, 2)),
    "aten.slice": Case(lambda x: aten.slice.Tensor(exp(x), 1, 1, 3)),
    "aten.slice_copy": Case(lambda x: aten.slice_copy.Tensor(exp(x), 0, 0, 2)),
    "aten.select": Case(lambda x: aten.select.int(exp(x), 1, 2)),
    "aten.select_copy": Case(lambda x: aten.select_copy.int(exp(x), 0, 1)),
    "aten.narrow": Case(lambda x: aten.narrow.default(exp(x), 1, 1, 2)),
    "aten.unsqueeze": Case(lambda x: aten.unsqueeze.default(exp(x), 1)),
    "aten.unsqueeze_copy": Case(lambda x: aten.unsqueeze_copy.default(exp(x), 0)),
    "aten.squeeze": Case(lambda x: aten.squeeze.dim(aten.unsqueeze.default(exp(x), 0), 0)),
    "aten.squeeze_copy": Case(lambda x: aten.squeeze_copy.dim(aten.unsqueeze.default(exp(x), 2), 2)),
    "aten.expand": Case(lambda x: aten.expand.default(aten.unsqueeze.default(exp(x), 0), [2, 3, 4])),
    "aten.expand_copy": Case(lambda x: aten.expand_copy.default(aten.unsqueeze.default(exp(x), 0), [2, 3, 4])),
    "aten.flatten": Case(lambda x: aten.flatten.using_ints(aten.unsqueeze.default(exp(x), 0), 0, 1)),
    "aten.unflatten": Case(lambda x: aten.unflatten.int(exp(x), 1, [2, 2])),
    "aten.as_strided": Case(lambda x: aten.as_strided.default(aten.contiguous.default(exp(x)), [2, 2], [4, 1], 1)),
    "aten.repeat": Case(lambda x: aten.repeat.default(exp(x), [2, 1])),
    "aten.repeat_interleave": Case(lambda x: aten.repeat_interleave.self_int(exp(x), 2, 0)),
    "aten.roll": Case(lambda x: aten.roll.default(exp(x), [1], [1])),
    "aten.flip": Case(lambda x: aten.flip.default(exp(x), [0])),
    "aten.tril": Case(lambda x: aten.tril.default(exp(x))),
    "aten.triu": Case(lambda x: aten.triu.default(exp(x), 1)),
    "aten.diagonal": Case(lambda x: aten.diagonal.default(exp(x))),
    "aten.split": Case(lambda x: aten.split.Tensor(exp(x), 2, 1)[1]),
    "aten.split_with_sizes": Case(lambda x: aten.split_with_sizes.default(exp(x), [1, 3], 1)[1]),
    "aten.chunk": Case(lambda x: aten.chunk.default(exp(x), 2, 1)[0]),
    "aten.unbind": Case(lambda x: aten.unbind.int(sigmoid(x), 0)[1]),
    "aten.view_as_complex": Case(lambda x: aten.view_as_real.default(aten.mul.Tensor(
        aten.view_as_complex.default(aten.view.default(exp(x), [3, 2, 2])), ROTATION))),
    "aten.view_as_real": Case(lambda x: aten.view_as_real.default(aten.view_as_complex.default(
        aten.view.default(tanh(x), [3, 2, 2])))),
    # -- linear.py: sums, casts, gathers
    "aten.sum": Case(lambda x: aten.sum.dim_IntList(exp(x), [1], True)),
    "aten.mean": Case(lambda x: aten.mean.dim(tanh(x), [-1])),
    "aten.cumsum": Case(lambda x: aten.cumsum.default(exp(x), 1)),
    "aten.trace": Case(lambda x: aten.trace.default(exp(x))),
    "aten._to_copy": Case(lambda x: aten._to_copy.default(exp(x), dtype=torch.float64)),
    "aten.to": Case(lambda x: aten.to.dtype(exp(x), torch.float64)),
    "aten.type_as": Case(lambda x: aten.type_as.default(exp(x), W)),  # the dtype of a constant (of a series: no rule)
    "aten.index_select": Case(lambda x: aten.index_select.default(exp(x), 0, ROWS)),
    "aten.gather": Case(lambda x: aten.gather.default(exp(x), 1, GATHER)),
    "aten.index": Case(lambda x: aten.index.Tensor(exp(x), [ROWS])),
    "aten.embedding": Case(lambda x: aten.embedding.default(exp(x), IDS)),
    "jetfx.passes.decompose.grouped_mm": Case(lambda x: grouped_mm(exp(x), EXPERTS, OFFSETS)),
    # -- linear.py: joint linear ops, lists, sums of series
    "aten.slice_scatter": Case(lambda x: aten.slice_scatter.default(tanh(x), exp(aten.slice.Tensor(x, 1, 0, 2)), 1, 0, 2)),
    "aten.select_scatter": Case(lambda x: aten.select_scatter.default(tanh(x), exp(aten.select.int(x, 0, 1)), 0, 0)),
    "aten.diagonal_scatter": Case(lambda x: aten.diagonal_scatter.default(tanh(x), exp(aten.diagonal.default(x)))),
    "aten.copy": Case(lambda x: aten.copy.default(aten.zeros_like.default(x), exp(x)),
                      ref=lambda x: torch.exp(x)),  # forward AD has no rule for copy
    "aten.index_put.default": Case(lambda x: aten.index_put.default(tanh(x), [ROWS], exp(aten.index_select.default(x, 0, ROWS)))),
    "aten.cat": Case(lambda x: aten.cat.default([aten.slice.Tensor(x, 1, 0, 2), exp(aten.slice.Tensor(x, 1, 2, 4))], 1)),
    "aten.concat": Case(lambda x: aten.concat.default([exp(x), W[:2, :4]], 0)),
    "aten.concatenate": Case(lambda x: aten.concatenate.default([tanh(x), exp(x)], 1)),
    "aten.stack": Case(lambda x: aten.stack.default([exp(x), aten.ones_like.default(x)])),
    "aten.hstack": Case(lambda x: aten.hstack.default([exp(x), tanh(x)])),
    "aten.vstack": Case(lambda x: aten.vstack.default([exp(x), W[:1, :4]])),
    "aten.add": Case(lambda x: aten.add.Tensor(exp(x), tanh(x), alpha=2.0)),
    "aten.sub": Case(lambda x: aten.sub.Tensor(aten.sub.Tensor(exp(x), tanh(x), alpha=0.5), W[:3, :4])),
    "aten.rsub": Case(lambda x: aten.rsub.Scalar(exp(x), 2.0)),
    "aten.constant_pad_nd": Case(lambda x: aten.constant_pad_nd.default(exp(x), [1, 1], 2.0)),
    "aten.detach": Case(lambda x: aten.detach.default(exp(x)), ref=lambda x: torch.exp(x)),
    "aten.conv1d.default": Case(lambda x: aten.conv1d.default(_conv_input(x), KERNEL, KBIAS)),
    "aten.convolution.default": Case(lambda x: aten.convolution.default(
        _conv_input(x), KERNEL, KBIAS, [1], [1], [1], False, [0], 1)),
    # -- bilinear.py
    "aten.mul": Case(lambda x: aten.mul.Tensor(aten.mul.Tensor(exp(x), tanh(x)), aten.mul.Tensor(x, x))),
    "aten.div": Case(lambda x: aten.div.Tensor(aten.div.Tensor(tanh(x), aten.add.Tensor(exp(x), 1.0)), 3.0)),
    "aten.mm": Case(lambda x: aten.mm.default(exp(x), aten.t.default(tanh(x)))),
    "aten.bmm": Case(lambda x: aten.bmm.default(aten.unsqueeze.default(exp(x), 0),
                                                aten.unsqueeze.default(aten.t.default(tanh(x)), 0))),
    "aten.matmul": Case(lambda x: aten.matmul.default(sigmoid(x), aten.t.default(tanh(x)))),
    "aten.outer": Case(lambda x: aten.outer.default(exp(aten.select.int(x, 0, 0)), tanh(aten.select.int(x, 0, 1)))),
    "aten.dot": Case(lambda x: aten.dot.default(exp(aten.select.int(x, 0, 0)), tanh(aten.select.int(x, 0, 1)))),
    "aten.vdot": Case(lambda x: aten.vdot.default(exp(aten.select.int(x, 0, 2)), tanh(aten.select.int(x, 0, 1)))),
    "aten.mv": Case(lambda x: aten.mv.default(exp(x), tanh(aten.select.int(x, 0, 0)))),
    "aten.einsum": Case(lambda x: aten.add.Tensor(
        aten.einsum.default("ij,kj->ik", [exp(x), tanh(x)]),  # both operands depend on x
        aten.einsum.default("ij,jk->ik", [sigmoid(x), W43]))),  # one does
    "aten.linear": Case(lambda x: tanh(aten.linear.default(x, W, BIAS))),
    "aten.addmm": Case(lambda x: aten.addmm.default(BIAS, exp(x), W.t(), beta=0.5, alpha=2.0)),
    "aten.baddbmm": Case(lambda x: aten.add.Tensor(aten.baddbmm.default(
        aten.baddbmm.default(C33, aten.unsqueeze.default(exp(x), 0),  # both batches depend on x
                             aten.unsqueeze.default(aten.t.default(tanh(x)), 0), beta=0.5, alpha=2.0),
        aten.unsqueeze.default(sigmoid(x), 0), W143, alpha=1.5),  # so does the input; one batch does
        aten.baddbmm.default(NAN133, aten.unsqueeze.default(exp(x), 0), aten.unsqueeze.default(aten.t.default(x), 0),
                             beta=0.0, alpha=0.5))),  # beta = 0: the input is ignored, NaNs included
    # -- elementwise.py
    "aten.exp": Case(exp),
    "aten.log": Case(lambda x: aten.log.default(x), positive=True),
    "aten.pow": Case(lambda x: aten.add.Tensor(aten.pow.Tensor_Scalar(x, -1.5), aten.pow.Tensor_Scalar(x, 3)),
                     positive=True),
    "aten.rsqrt": Case(lambda x: aten.rsqrt.default(x), positive=True),
    "aten.sqrt": Case(lambda x: aten.sqrt.default(x), positive=True),
    "aten.reciprocal": Case(lambda x: aten.reciprocal.default(x), positive=True),
    "aten.tanh": Case(tanh),
    "aten.sigmoid": Case(sigmoid),
    "aten.erf": Case(lambda x: aten.erf.default(x)),
    "aten.gelu": Case(lambda x: aten.add.Tensor(aten.gelu.default(x), aten.gelu.default(x, approximate="tanh"))),
    "aten.silu": Case(lambda x: aten.silu.default(x)),
    "aten.mish": Case(lambda x: aten.mish.default(x)),
    "aten.softplus": Case(lambda x: aten.softplus.default(x, 2.0)),
    # -- reductions.py
    "aten.var": Case(lambda x: aten.add.Tensor(aten.var.correction(exp(x), [-1], correction=1, keepdim=True),
                                               aten.var.dim(exp(x), [1], False, True))),
    "aten.rms_norm": Case(lambda x: aten.rms_norm.default(x, [4], W[0, :4].contiguous(), 1e-6), ref=_rms_ref),
    "aten.layer_norm": Case(lambda x: aten.layer_norm.default(x, [4], W[0, :4].contiguous(), BIAS[:4].contiguous(), 1e-5),
                            ref=_ln_ref),
    # -- attention.py
    "aten.softmax": Case(lambda x: aten.softmax.int(x, -1)),
    "aten._softmax": Case(lambda x: aten._softmax.default(x, 0, False)),
    "aten.special_softmax": Case(lambda x: aten.special_softmax.default(x, 1)),
    "aten.log_softmax": Case(lambda x: aten.log_softmax.int(x, -1)),
    "aten._log_softmax": Case(lambda x: aten._log_softmax.default(x, 0, False)),
    # -- casts.py: masks, selections, piecewise-constant ops
    "aten.where": Case(lambda x: aten.softmax.int(aten.where.ScalarOther(MASK, x, float("-inf")), -1)),
    "aten.masked_fill": Case(lambda x: aten.masked_fill.Scalar(exp(x), MASK, 3.0)),
    "aten.topk": Case(lambda x: exp(aten.topk.default(x, 2, -1)[0])),
    "aten.sort": Case(lambda x: tanh(aten.sort.default(x, 0, True)[0])),
    "aten.max.dim": Case(lambda x: exp(aten.max.dim(x, 1, True)[0])),
    "aten.min.dim": Case(lambda x: tanh(aten.min.dim(x, 0)[0])),
    "aten.amax": Case(lambda x: aten.amax.default(exp(x), [1])),
    "aten.amin": Case(lambda x: aten.amin.default(tanh(x), [0], True)),
    "aten.eq": Case(pick(lambda x: aten.eq.Tensor(x, aten.amax.default(x, [1], True))), strip=True),
    "aten.ne": Case(pick(lambda x: aten.ne.Tensor(x, aten.amax.default(x, [1], True))), strip=True),
    "aten.gt": Case(pick(lambda x: aten.gt.Scalar(x, 0.2)), strip=True),
    "aten.ge": Case(pick(lambda x: aten.ge.Scalar(x, -0.1)), strip=True),
    "aten.lt": Case(pick(lambda x: aten.lt.Scalar(x, 0.3)), strip=True),
    "aten.le": Case(pick(lambda x: aten.le.Tensor(x, aten.neg.default(x))), strip=True),
    "aten.isnan": Case(pick(lambda x: aten.isnan.default(x)), strip=True),
    "aten.isinf": Case(pick(lambda x: aten.isinf.default(x)), strip=True),
    "aten.isfinite": Case(pick(lambda x: aten.isfinite.default(x)), strip=True),
    "aten.isposinf": Case(pick(lambda x: aten.isposinf.default(x)), strip=True),
    "aten.isneginf": Case(pick(lambda x: aten.isneginf.default(x)), strip=True),
    "aten.logical_not": Case(pick(lambda x: aten.logical_not.default(aten.gt.Scalar(x, 0.0))), strip=True),
    "aten.logical_and": Case(pick(lambda x: aten.logical_and.default(aten.gt.Scalar(x, -0.5), aten.lt.Scalar(x, 0.5))),
                             strip=True),
    "aten.logical_or": Case(pick(lambda x: aten.logical_or.default(aten.gt.Scalar(x, 0.5), aten.lt.Scalar(x, -0.5))),
                            strip=True),
    "aten.logical_xor": Case(pick(lambda x: aten.logical_xor.default(aten.gt.Scalar(x, 0.0), MASK)), strip=True),
    "aten.argmax": Case(scaled_by(lambda x: aten.argmax.default(x, 1, True)), strip=True),
    "aten.argmin": Case(scaled_by(lambda x: aten.argmin.default(x, 0)), strip=True),
}


def region_of(f, x, strip: bool) -> fx.GraphModule:
    """f as a GraphModule region f(x) with meta['val'] on every node, as exported regions have;
    `strip`: nodes with integer or boolean values lose theirs."""
    gm = recorded_region(f, x)
    if strip:
        for n in gm.graph.nodes:
            v = n.meta.get("val")
            if n.op == "call_function" and isinstance(v, torch.Tensor) and not v.is_floating_point():
                del n.meta["val"]
    return gm


KEYS = {rule_name(key): key for key in RULES}


def test_every_registered_rule_has_a_case():
    assert sorted(set(KEYS) - set(CASES)) == [], "registered rules without a test case in CASES"
    assert sorted(set(CASES) - set(KEYS)) == [], "test cases for rules that are not registered"


def test_register_refuses_an_unknown_op_name():
    from jetfx.passes.taylor.registry import register

    with pytest.raises(ValueError, match="einsum_placeholder"):
        register(["einsum_placeholder"], lambda ctx, node, args, kwargs: None)
    assert not any("placeholder" in name for name in KEYS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_nested_ad(name, monkeypatch):
    case, key = CASES[name], KEYS[name]
    x, y = (XP, YP) if case.positive else (X, Y)
    region = region_of(case.f, x, case.strip)
    calls = []
    rule = RULES[key]

    def counted(ctx, node, args, kwargs):  # the registered rule itself, counted when it answers
        out = rule(ctx, node, args, kwargs)
        calls.append(node.name)
        return out

    monkeypatch.setitem(RULES, key, counted)
    ref = case.ref or case.f
    for k in K_ORDERS:
        calls.clear()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="Taylor-mode")  # no op falls back on nested AD
            tj = TaylorJet(region, k)
        assert calls, f"the rule for {name} never ran"
        got = tj(x.unsqueeze(0), y, coefficients=True)[:, 0]
        want = torch.stack(jet_coefficients(ref, x, y, k))
        assert got.shape == want.shape
        scale = want.abs().max().clamp_min(1e-12)
        err = ((got - want).abs().max() / scale).item()
        assert err < 1e-9, f"{name} k={k}: relative error {err}"


def _imported_modules(path, package: str) -> set[str]:
    """Absolute names of every module `path` imports, at the top or inside functions."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from .. import jets`
    return names


def test_taylor_pass_imports_no_jetfx_module_above_it():
    """passes/taylor/* and passes/mixed.py import only jetfx.errors and other passes: the
    user-facing modules (jetfx.jets, jetfx.expansion, …) import them, never the other way."""
    from pathlib import Path

    import jetfx.passes

    root = Path(jetfx.passes.__file__).resolve().parent
    files = {path: "jetfx.passes.taylor" for path in (root / "taylor").glob("*.py")}
    files[root / "mixed.py"] = "jetfx.passes"
    assert len(files) > 10
    bad = {}
    for path, package in files.items():
        names = _imported_modules(path, package)
        up = sorted(n for n in names if n.startswith("jetfx.") and not n.startswith(("jetfx.passes", "jetfx.errors")))
        if up:
            bad[path.name] = up
    assert bad == {}


LAYERS = ["series", "builder", "elementwise", "linear", "bilinear", "reductions", "attention", "casts", "registry",
          "fallback", "interpreter", "jet", "__init__"]


def test_taylor_modules_import_only_modules_below_them():
    """The package's layout, bottom to top (its docstring lists it): series values, the builder,
    the rule families, the table, the fall-back, the interpreter, the module."""
    from pathlib import Path

    import jetfx.passes.taylor

    root = Path(jetfx.passes.taylor.__file__).resolve().parent
    assert sorted(p.stem for p in root.glob("*.py")) == sorted(LAYERS)
    for i, name in enumerate(LAYERS):
        names = _imported_modules(root / f"{name}.py", "jetfx.passes.taylor")
        inside = {n.split(".")[3] for n in names if n.startswith("jetfx.passes.taylor.")}
        assert inside <= set(LAYERS[:i]), f"{name}.py imports {sorted(inside - set(LAYERS[:i]))}, not below it"
