"""Centers mapped by a graph traced once through vmap (`jetfx.passes.batching.BatchedGraph`)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import fx

from jetfx.jets import Evaluate, NestedJet
from jetfx.passes.batching import BatchedGraph, drop_identity_views, trace_batched
from jetfx.passes.taylor import TaylorJet

aten = torch.ops.aten


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=None)
def _traced64(arch):
    from tiny_models import hf_model, tokens

    import jetfx

    ids = tokens()
    return jetfx.trace(hf_model(arch, dtype=torch.float64), ids, dtype=torch.float64), ids


def _block(arch, which):
    from jetfx.functions import block_region, capture

    gm, ids = _traced64(arch)
    block = [b for b in gm.residual.blocks if b.kind == which][0]
    region = block_region(gm, block)
    vals = capture(gm, ids, [block.input, *region.side_inputs])
    x = vals[block.input]
    return region.module, x, [vals[s] for s in region.side_inputs]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("which", ["attn", "mlp"])
def test_traced_block_jets_match_nested_ad(arch, which):
    """Real blocks (batch 2, grouped-query attention, RoPE, masks) at 3 centers: every call, the
    first (vmap) and the traced ones, agree with nested forward AD to 1e-9 in float64."""
    region, x, side = _block(arch, which)
    centers = torch.stack([0.5 * x, x + 0.1 * torch.randn(x.shape, generator=_gen(3), dtype=x.dtype), -x])
    for k in (1, 2):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="Taylor-mode")
            tj = TaylorJet(region, k)
        tj.batched.trace_estimate_s = 0.0  # trace at the first call
        want = NestedJet(region, k, coefficients=True)(centers, x, *side)
        with torch.no_grad():
            for call in range(3):
                got = tj(centers, x, *side, coefficients=True)
                err = ((got - want).abs().max() / want.abs().max()).item()
                assert err < 1e-9, f"{arch} {which} k={k} call {call}: {err}"
        assert len(tj.batched.graphs) == 1 and next(iter(tj.batched.graphs.values())) is not None


def test_traced_graph_has_the_center_dimension_and_no_vmap():
    region, x, side = _block("llama", "attn")
    tj = TaylorJet(region, 2)
    centers = torch.stack([x, 2 * x])
    graph = trace_batched(tj.graph_module, centers, x, *side)
    code = graph.code
    assert "vmap" not in code and "_add_batch_dim" not in code
    outs = graph(dict(tj.graph_module.named_parameters()), centers, x, *side)
    assert len(outs) == 3 and all(o.shape == (2, *x.shape) for o in outs)
    # no view that changes nothing survives
    for n in graph.graph.nodes:
        if n.op == "call_function" and n.target in (aten.view.default, aten.expand.default, aten.permute.default):
            a, b = n.meta["val"], n.args[0].meta["val"]
            assert (a.shape, a.stride()) != (b.shape, b.stride()), n.format_node()


def test_drop_identity_views_keeps_values():
    def f(x):
        y = aten.view.default(x, [3, 4])
        y = aten.permute.default(y, [0, 1])
        y = aten.expand.default(y, [3, 4])
        return aten.mul.Tensor(aten.view.default(aten.view.default(y, [12]), [4, 3]), 2.0)

    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(3, 4, dtype=torch.float64)
    gm = make_fx(f)(x)
    before = sum(n.op == "call_function" for n in gm.graph.nodes)
    gm = drop_identity_views(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert len(targets) < before and aten.permute.default not in targets and aten.expand.default not in targets
    assert targets.count(aten.view.default) == 1  # view(view(x)) of a contiguous x: one view
    torch.testing.assert_close(gm(x), f(x), rtol=0, atol=0)


def test_graph_reads_current_weights():
    """The traced graph takes the parameters as inputs: an in-place update after tracing is seen."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3).double()
    region = fx.symbolic_trace(torch.nn.Sequential(lin, torch.nn.Tanh()))
    batched = BatchedGraph(region)
    centers = torch.randn(2, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        batched.trace(centers)
        batched(centers)
        assert next(iter(batched.graphs.values())) is not None
        lin.weight.mul_(-2.0)
        lin.bias.add_(1.0)
        torch.testing.assert_close(batched(centers), torch.tanh(lin(centers)), rtol=0, atol=0)


def test_new_shape_traces_again_and_old_one_is_kept():
    region, x, side = _block("gpt2", "mlp")
    ev = Evaluate(region)
    ev.batched.trace_estimate_s = 0.0
    with torch.no_grad():
        for n in (2, 3, 2, 3, 2, 3):
            centers = torch.stack([x * (i + 1) for i in range(n)])
            got = ev(centers, x, *side)
            torch.testing.assert_close(got, torch.stack([region(c, *side) for c in centers]), rtol=1e-12, atol=1e-12)
    assert len(ev.batched.graphs) == 2 and all(g is not None for g in ev.batched.graphs.values())


def test_gradients_use_vmap_not_the_traced_graph():
    """With grad enabled on inputs that require it, calls map by vmap so autograd sees them."""
    region, x, side = _block("llama", "mlp")
    tj = TaylorJet(region, 1)
    centers = torch.stack([x, 0.5 * x]).requires_grad_(True)
    for _ in range(3):
        out = tj(centers, x, *side)
    assert not tj.batched.graphs
    (grad,) = torch.autograd.grad(out.sum(), centers)
    c = centers.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(NestedJet(region, 1)(c, x, *side).sum(), c)
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)


def test_fallback_ops_are_exact_when_traced():
    """Ops without a rule run nested forward AD inside the graph: traced or not, still exact."""
    def f(x):
        return aten.tanh.default(aten.sin.default(x))

    class Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = out
            return out

    x = torch.rand(3, 4, generator=_gen(1), dtype=torch.float64)
    y = torch.rand(3, 4, generator=_gen(2), dtype=torch.float64)
    region = fx.symbolic_trace(f)
    Record(region).run(x)
    with pytest.warns(UserWarning, match="aten.sin"):
        tj = TaylorJet(region, 3)
    centers = torch.stack([x, y])
    want = NestedJet(region, 3, coefficients=True)(centers, y)
    tj.batched.trace(centers, y)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(tj(centers, y, coefficients=True), want, rtol=1e-10, atol=1e-12)


def test_tracing_waits_until_vmap_has_cost_as_much():
    """Calls stay on vmap while the time they took is below the estimated tracing cost; the call
    after that traces; one-off calls never trace."""
    region, x, side = _block("llama", "mlp")
    tj = TaylorJet(region, 1)
    assert tj.batched.trace_estimate_s > 0
    centers = torch.stack([x, 0.5 * x])
    tj.batched.trace_estimate_s = 1e9
    with torch.no_grad():
        first = tj(centers, x, *side)
        for _ in range(4):
            tj(centers, x, *side)
        assert not tj.batched.graphs and list(tj.batched.spent.values())[0] > 0
        tj.batched.trace_estimate_s = list(tj.batched.spent.values())[0]  # now spent as much as tracing
        tj(centers, x, *side)
        assert list(tj.batched.graphs.values())[0] is not None and not tj.batched.spent
        torch.testing.assert_close(tj(centers, x, *side), first, rtol=1e-12, atol=1e-12)


def _call_ops(gm):
    return sum(n.op == "call_function" for n in gm.graph.nodes)


@pytest.mark.parametrize("arch,fired", [("gpt2", ("bias_in_place", "negated_add", "scalar_where", "stack_before_copy")),
                                        ("llama", ("dedupe", "scalar_where", "stack_before_copy"))])
def test_peephole_rewrites_give_the_same_bits(arch, fired, monkeypatch):
    """The rewrites of the traced attention jet (passes/peephole.py) fire and change no bit."""
    from jetfx.passes import batching

    region, x, side = _block(arch, "attn")
    centers = torch.stack([0.5 * x, x + 0.1 * torch.randn(x.shape, generator=_gen(4), dtype=x.dtype)])
    for k in (1, 2):
        tj = TaylorJet(region, k)
        params = dict(tj.graph_module.named_parameters())
        with torch.no_grad():
            rewritten = trace_batched(tj.graph_module, centers, x, *side)
            with monkeypatch.context() as m:
                m.setattr(batching, "peephole", lambda gm: gm)
                plain = trace_batched(tj.graph_module, centers, x, *side)
            counts = rewritten.meta["peephole"]
            assert all(counts[name] >= 1 for name in fired), counts
            assert _call_ops(rewritten) < _call_ops(plain)
            for got, want in zip(rewritten(params, centers, x, *side), plain(params, centers, x, *side)):
                assert torch.equal(got, want)


def test_bias_is_added_in_place_only_into_a_fresh_product():
    """select(T, 0, 0).add_(b) replaces the cat only when T is computed by a matmul here; an
    input T (a weight, a caller's tensor) is never written."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from jetfx.passes.peephole import peephole

    def biased(t, b):
        return aten.cat.default([aten.unsqueeze.default(aten.add.Tensor(aten.select.int(t, 0, 0), b), 0),
                                 aten.slice.Tensor(t, 0, 1, 2**63 - 1)], 0)

    a, w, b = (torch.randn(s, generator=_gen(5), dtype=torch.float64) for s in ((6, 3), (3, 4), (4,)))
    fresh = peephole(make_fx(lambda a, w, b: biased(aten.view.default(aten.mm.default(a, w), [2, 3, 4]), b))(a, w, b))
    assert fresh.meta["peephole"]["bias_in_place"] == 1
    assert aten.cat.default not in [n.target for n in fresh.graph.nodes]
    assert torch.equal(fresh(a, w, b), biased((a @ w).view(2, 3, 4), b))
    t = torch.randn(2, 3, 4, generator=_gen(6), dtype=torch.float64)
    kept = t.clone()
    given = peephole(make_fx(biased)(t, b))
    assert given.meta["peephole"]["bias_in_place"] == 0
    assert torch.equal(given(t, b), biased(kept, b)) and torch.equal(t, kept)


def test_equal_calls_are_not_merged_in_a_graph_that_writes_in_place():
    """Two `zeros` written differently afterwards are two tensors: merging them would alias the writes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from jetfx.passes.peephole import peephole

    def two_buffers(x):
        a = aten.zeros.default([3], dtype=x.dtype)
        b = aten.zeros.default([3], dtype=x.dtype)
        aten.add_.Tensor(a, x)
        aten.sub_.Tensor(b, x)
        return aten.add.Tensor(aten.mul.Tensor(a, 2), b)

    x = torch.arange(3.0, dtype=torch.float64)
    gm = peephole(make_fx(two_buffers)(x))
    assert gm.meta["peephole"]["dedupe"] == 0
    assert torch.equal(gm(x), x)
