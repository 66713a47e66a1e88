"""Split jet terms (the super-exponential path set): mixed coefficients, sums, regrouping, counts."""

from __future__ import annotations

import functools
import itertools
import shutil
import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jetfx
from jetfx import split as S
from jetfx.functions import block_region, capture, decoder_region
from jetfx.passes.mixed import MixedJet, interpolation_row, lattice
from jetfx.passes.taylor import TaylorJet
from tiny_models import LinearResNet, TwoBlockToy, hf_model, tokens


@functools.lru_cache(maxsize=None)
def traced64(arch: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf_model(arch).double()
    return model, jetfx.trace(model, tokens(), dtype=torch.float64)


def _rel(a, b) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


# --- mixed coefficients ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=3), st.integers(0, 10**6))
def test_interpolation_recovers_every_coefficient_of_a_homogeneous_polynomial(mult, seed):
    s, d = len(mult), sum(mult)
    rng = __import__("random").Random(seed)
    coef = {n: Fraction(rng.randint(-9, 9), rng.randint(1, 5)) for n in lattice(s, d)}

    def c_d(a):  # the d-th Taylor coefficient along Σ a_j u_j of this polynomial
        return sum(v * math.prod(ai**ni for ai, ni in zip(a, n)) for n, v in coef.items())

    got = sum(Fraction(w) * c_d(a) for a, w in interpolation_row(tuple(mult)))
    assert abs(float(got - coef[tuple(mult)])) < 1e-9 * (1 + abs(float(coef[tuple(mult)])))


def _nested_mixed(f, x, directions):
    if not directions:
        return f(x)
    return torch.func.jvp(lambda z: _nested_mixed(f, z, directions[1:]), (x,), (directions[0],))[1]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mixed_coefficients_match_nested_jvp(arch):
    _, gm = traced64(arch)
    block = gm.residual.blocks[2]
    region = block_region(gm, block)
    vals = capture(gm, tokens(), (block.input, *region.side_inputs))
    x, side = vals[block.input], [vals[s] for s in region.side_inputs]
    g = torch.Generator().manual_seed(0)
    u = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(3)]
    for mult in [(1,), (2,), (3,), (1, 1), (2, 1), (1, 1, 1)]:
        dirs = u[: len(mult)]
        full = [d for d, m in zip(dirs, mult) for _ in range(m)]
        want = _nested_mixed(lambda z: region.module(z, *side), x, full) / math.prod(map(math.factorial, mult))
        got = MixedJet(region.module, mult)(x.unsqueeze(0), torch.stack(dirs).unsqueeze(0), *side)[0]
        assert _rel(got, want) < 1e-10, mult


# --- split parts sum to the unsplit term ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_parts_sum_to_the_unsplit_term(arch, k):
    _, gm = traced64(arch)
    ids = tokens()
    blocks = gm.residual.blocks
    step = 3
    centers = [jetfx.stream(gm, 0)] + [jetfx.branch(gm, b) for b in blocks[:step]]  # Σ = h_3
    w = [0.1, 0.2, 0.3, 0.4]
    unsplit = jetfx.jet_expand(gm, step, centers, k, w)
    split = jetfx.jet_expand(gm, step, centers, k, w, split=True)
    # 4 centers: Σ_d 3 multichoose d parts per center
    assert len(split.terms) == 4 + 4 * sum(math.comb(3 + d - 1, d) for d in range(k + 1))
    with torch.no_grad():
        un, un_rem = unsplit.evaluate(ids)
        sp, sp_rem = split.evaluate(ids)
    for idx, name in enumerate(unsplit.terms.names):
        members = [i for i, n in enumerate(split.terms.names) if n == name or n.startswith(name + "[")]
        assert _rel(sp[members].sum(0), un[idx]) < 1e-10, name
    assert (sp_rem - un_rem).abs().max() < 1e-10 * un.abs().max()

    # decoder, around constant centers (the unsplit term's variate is then Σ centers)
    g = torch.Generator().manual_seed(k)
    h = capture(gm, ids, [gm.residual.decoder.input])[gm.residual.decoder.input]
    parts = torch.stack([h * 0.5, h * 0.3 + 0.1 * torch.randn(h.shape, generator=g, dtype=h.dtype)])
    parts = torch.cat([parts, (h - parts.sum(0)).unsqueeze(0)])
    split = jetfx.jet_expand(gm, "decoder", parts, k, [0.5, 0.25, 0.25], split=True, max_terms=10**4)
    with torch.no_grad():
        sp, _ = split.evaluate(ids)
        region = decoder_region(gm)
        full = TaylorJet(region.module, k)(parts, parts.sum(0), *[capture(gm, ids, region.side_inputs)[s]
                                                                 for s in region.side_inputs])
    for i, c in enumerate(("c0", "c1", "c2")):
        members = [j for j, n in enumerate(split.terms.names) if n == c or n.startswith(c + ">decoder[")]
        assert _rel(sp[members].sum(0), [0.5, 0.25, 0.25][i] * full[i]) < 1e-10, c


def test_split_names_degrees_and_multiplicities():
    _, gm = traced64("gpt2")
    centers = [jetfx.stream(gm, 0), jetfx.branch(gm, "h.0.attn"), jetfx.branch(gm, "h.0.mlp")]
    ex = jetfx.jet_expand(gm, 2, centers, 2, split=True, degrees=[2])
    names = ex.terms.names[3:]
    assert "h.1.attn[h.0.attn, h.0.mlp]" in names and "h.1.attn[h.0.attn, h.0.attn]" in names
    assert "h.0.mlp>h.1.attn[embed, h.0.attn]" in names
    assert len(names) == 3 * 3  # three centers, C(2+1, 2) multisets of the two others each


# --- linear networks: regrouping recovers U·Π_{j∈S} A_j·E ------------------------------------------


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 5, 6])
def test_linear_regrouping_recovers_every_matrix_product_path(layers):
    from jetfx.passes.materialize import compile_expansion

    model = LinearResNet(layers=layers, seed=layers).double()
    ids = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(layers))
    gm = jetfx.trace(model, ids, dtype=torch.float64)
    g = torch.Generator().manual_seed(100 + layers)
    blocks = gm.residual.blocks

    def weights(n):  # any point of the simplex
        w = torch.rand(n, generator=g, dtype=torch.float64) ** 3
        return (w / w.sum()).tolist()

    centers, labels = [jetfx.stream(gm, 0), jetfx.branch(gm, blocks[0])], None
    for s in range(1, layers):
        ex = jetfx.jet_expand(gm, s, centers, 1, weights(len(centers)), split=True)
        assert len(ex.terms) == len(centers) + len(centers) ** 2  # identity + N·(1 + (N−1)) parts
        centers, labels = S.regroup(ex, labels)
        assert len(centers) == 2 ** (s + 1)
    ex = jetfx.jet_expand(gm, "decoder", centers, 1, weights(len(centers)), split=True)
    terms, labels = S.regroup(ex, labels)
    out = compile_expansion(gm, terms)(ids)
    assert len(out.names) == 2**layers
    E, U = model.embed.weight.detach(), model.unembed.weight.detach()
    A = {b.name: m.weight.detach() for b, m in zip(blocks, model.blocks)}
    scale = out.logits.abs().max()
    for label, name in zip(labels, out.names):
        h = E[ids]
        for b in blocks:
            if b.name in label:
                h = h @ A[b.name].T
        assert (out[name] - h @ U.T).abs().max() < 1e-12 * scale, name
    assert out.remainder.abs().max() < 1e-12 * scale


# --- the super-exponential path set: counts ---------------------------------------------------------


def _brute_levels(structure, k):
    """Every term of every level, as nested tuples, by plain enumeration."""
    steps = structure.steps
    level = [("leaf", None)] + [("leaf", b.name) for b in steps[0].blocks]
    for step in steps[1:]:
        new = []
        for b in step.blocks:
            for i, c in enumerate(level):
                others = level[:i] + level[i + 1:]
                for d in range(k + 1):
                    for ms in itertools.combinations_with_replacement(others, d):
                        new.append(("split", c, b.name, ms))
        level = level + new
    final = []
    for i, c in enumerate(level):
        others = level[:i] + level[i + 1:]
        for d in range(k + 1):
            for ms in itertools.combinations_with_replacement(others, d):
                final.append(("split", c, None, ms))
    return final


def _blocks(t):
    if t[0] == "leaf":
        return {t[1]} - {None}
    return _blocks(t[1]) | ({t[2]} - {None}) | set().union(*[_blocks(o) for o in t[3]])


def _splits(t):
    if t[0] == "leaf":
        return []
    return [t] + _splits(t[1]) + [s for o in t[3] for s in _splits(o)]


def _interacts(t, name):
    return any(name in _blocks(o) for s in _splits(t) for o in s[3])


def _kind_ok(t, kinds, kind_of):
    return all(kind_of[b] in kinds for b in _blocks(t))


def _tiny_structure(arch_or_toy, layers: int = 1):
    if arch_or_toy == "toy":
        return jetfx.trace(TwoBlockToy(), torch.randint(0, 13, (2, 4))).residual
    cfg = {"gpt_neox": "gpt_neox"}.get(arch_or_toy, arch_or_toy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers
        from tiny_models import config

        c = config(cfg)
        c.num_hidden_layers = layers
        model = transformers.AutoModelForCausalLM.from_config(c).eval()
    return jetfx.trace(model, tokens()).residual


@pytest.mark.parametrize("model,layers,k", [("toy", 0, 1), ("toy", 0, 2), ("toy", 0, 3), ("gpt2", 1, 1),
                                            ("gpt_neox", 2, 1), ("gpt_neox", 2, 2)])
def test_split_counts_equal_brute_force(model, layers, k):
    structure = _tiny_structure(model, layers)
    graph = S.SplitPathGraph(structure, k)
    every = _brute_levels(structure, k)
    kind_of = {b.name: b.kind for b in structure.blocks}
    names = [b.name for b in structure.blocks]
    last = names[-1]
    cases = {
        S.all_split_paths(): lambda t: True,
        S.max_degree(0): lambda t: all(len(s[3]) == 0 for s in _splits(t)),
        S.max_degree(1): lambda t: all(len(s[3]) <= 1 for s in _splits(t)),
        S.total_degree(min=1, max=2): lambda t: 1 <= sum(len(s[3]) for s in _splits(t)) <= 2,
        S.interacts_with(names[0]): lambda t: _interacts(t, names[0]),
        S.contains(last): lambda t: last in _blocks(t),
        S.only_kinds(kind_of[names[0]]): lambda t: _kind_ok(t, {kind_of[names[0]]}, kind_of),
        S.max_degree(1) & ~S.interacts_with(names[0]): lambda t: all(len(s[3]) <= 1 for s in _splits(t))
        and not _interacts(t, names[0]),
        S.contains(last) | S.total_degree(max=0): lambda t: last in _blocks(t) or not any(s[3] for s in _splits(t)),
    }
    assert graph.count() == len(every)
    for f, pred in cases.items():
        want = sum(1 for t in every if pred(t))
        assert graph.count(f) == want, f
        if want <= 3000:
            listed = graph.paths(f)
            assert len(listed) == want and len({p.name for p in listed}) == want, f


def test_counts_grow_super_exponentially_without_enumeration():
    structure = _tiny_structure("toy")
    assert S.SplitPathGraph(structure, 1).level_sizes() == [2, 6]
    gm = jetfx.trace(LinearResNet(layers=8), torch.randint(0, 11, (1, 3)))
    graph = S.SplitPathGraph(gm.residual, 1)
    sizes = graph.level_sizes()
    for a, b in zip(sizes, sizes[1:]):  # N_{s+1} = N_s + N_s·(1 + N_s − 1) at k = 1
        assert b == a + a * a
    assert graph.count() == sizes[-1] ** 2 and graph.count() > 10**100
    assert graph.count(S.max_degree(0)) == 2**8  # no interactions: the exponential path set
    kinds = {d["kind"] for _, _, d in graph.graph.edges(data=True)}
    assert kinds == {"carry", "interaction"}


def test_deep_models_count_in_log_space_and_refuse_vanishing_uniform_weights():
    model = LinearResNet(layers=30).double()
    ids = torch.randint(0, 11, (1, 3), generator=torch.Generator().manual_seed(0))
    gm = jetfx.trace(model, ids, dtype=torch.float64)
    graph = S.SplitPathGraph(gm.residual, 1)
    # N_s squares at every step: N_30 has about 10^(3·2^25) digits, so exact counts stop at 10^1000
    sizes = graph.level_sizes()
    assert sizes[8] < S.COUNT_CAP == sizes[-1] and sizes[9] == sizes[8] * (1 + sizes[8])
    with pytest.raises(jetfx.ExpansionError, match="too many to count exactly; log10_count"):
        graph.count()
    big = graph.log10_count()
    assert 1e8 < big < 1e12 and graph.describe().startswith("~10^(")
    assert graph.count(S.max_degree(0)) == 2**30 and graph.count_at_most(S.max_degree(0), 10) is None
    # the log-space program agrees with the exact one where both apply
    small = S.SplitPathGraph(jetfx.trace(LinearResNet(layers=8), ids).residual, 1)
    for f in (S.all_split_paths(), S.total_degree(max=3), S.interacts_with("blocks.2") & S.max_degree(1)):
        assert small._count(f, S._Log10) == pytest.approx(math.log10(small.count(f)), rel=1e-9)
    # uniform weights 1/N_s are 0 in float64 from step 9 on: every split path would be 0, so refused
    f = S.within("blocks.3", "blocks.20") & S.total_degree(max=1)
    with pytest.raises(jetfx.ExpansionError, match="weights='uniform' .* exactly 0 .* Use weights='exponential'"):
        jetfx.expand(gm, 1, split=True, paths=f, weights="uniform")
    ex = jetfx.expand(gm, 1, split=True, paths=f)
    out = ex(ids)
    # 4 carriers (η, blocks.3, blocks.20, blocks.3>blocks.20) at the decoder, alone or along one of the 3 others
    assert len(out.names) == graph.count(f & S.exponential_centers()) == 4 + 4 * 3
    assert out.max_error() < 1e-12 * out.logits.abs().max()
    with torch.no_grad():  # η → blocks.3 → decoder, weights 1/2^3 and 1/2^30 (Algorithm 2's 1/|ξ|)
        want = model.unembed(model.blocks[3](model.embed(ids))) / 2**33
        assert _rel(out["blocks.3"], want) < 1e-12
        assert out["blocks.3"].abs().max() > 0


# --- the compiled split expansion ---------------------------------------------------------------


def _eager_value(model, ids, weight):
    """A split path's logits by eager jvps, with `weight(level index, center)` the jet weights."""
    blocks = {"block1": model.block1, "block2": model.block2}

    def value(p: S.SplitPath):
        if p.center is None:
            e = model.embed(ids)
            return e if p.block is None else model.block1(e)
        f = (lambda h: model.unembed(model.norm(h))) if p.block is None else blocks[p.block.name]
        w = weight(-1 if p.block is None else p.block.step - 1, p.center)
        x = value(p.center)
        if not p.others:
            return w * f(x)
        return w * torch.func.jvp(f, (x,), (value(p.others[0]),))[1]

    return value


def test_split_expansion_matches_eager_jvps_and_is_exact():
    model = TwoBlockToy().double()
    ids = torch.randint(0, 13, (2, 4), generator=torch.Generator().manual_seed(3))
    gm = jetfx.trace(model, ids, dtype=torch.float64)
    ex = jetfx.expand(gm, 1, split=True, weights="uniform")
    out = ex(ids)
    assert len(out.names) == 36 and len(set(out.names)) == 36
    assert out.max_error() < 1e-12 * out.logits.abs().max()
    sizes = S.SplitPathGraph(gm.residual, 1).level_sizes()
    value = _eager_value(model, ids, lambda s, center: 1 / sizes[s])
    with torch.no_grad():
        for p in ex.selected:
            assert (out[p.name] - value(p)).abs().max() < 1e-12 * out.logits.abs().max(), p.name
    # a filter compiles only the selected paths; the rest is in the remainder
    sub = jetfx.expand(gm, 1, split=True, paths=S.interacts_with("block1") & S.max_degree(1), weights="uniform")
    o2 = sub(ids)
    assert len(o2.names) == ex.split_graph.count(S.interacts_with("block1") & S.max_degree(1))
    assert all("block1" in n.split("[", 1)[1] for n in o2.names)
    for n in o2.names:
        assert (o2[n] - out[n]).abs().max() < 1e-12 * out.logits.abs().max()
    assert o2.max_error() < 1e-12 * out.logits.abs().max()


def test_exponential_weights_take_jets_at_the_papers_paths_only():
    model = TwoBlockToy().double()
    ids = torch.randint(0, 13, (2, 4), generator=torch.Generator().manual_seed(4))
    gm = jetfx.trace(model, ids, dtype=torch.float64)
    ex = jetfx.expand(gm, 1, split=True)  # weights="exponential"
    out = ex(ids)
    graph = ex.split_graph
    assert len(out.names) == graph.count(S.exponential_centers()) < graph.count()
    assert out.max_error() < 1e-12 * out.logits.abs().max()
    # |ξ_s| = 2^s paths of total degree 0 per level, weight 1/2^s on each, 0 on the rest
    carriers = [2, 4]  # η, block1 | and block2 at each
    value = _eager_value(model, ids, lambda s, center: 1 / carriers[s] if center.total_degree == 0 else 0.0)
    with torch.no_grad():
        for p in ex.selected:
            assert p.center.total_degree == 0
            assert (out[p.name] - value(p)).abs().max() < 1e-12 * out.logits.abs().max(), p.name


# --- bad input ----------------------------------------------------------------------------------


def test_bad_split_requests_say_what_to_do():
    _, gm = traced64("gpt2")
    centers = [jetfx.stream(gm, 0), jetfx.branch(gm, "h.0.attn")]
    with pytest.raises(jetfx.ExpansionError, match="out of range for a jet of order k=1"):
        jetfx.jet_expand(gm, 1, centers, 1, split=True, degrees=[2])
    with pytest.raises(jetfx.ExpansionError, match="split needs k ≥ 1"):
        jetfx.jet_expand(gm, 1, centers, 0, split=True)
    with pytest.raises(jetfx.ExpansionError, match="split needs k ≥ 1"):
        jetfx.expand(gm, 0, split=True)
    with pytest.raises(jetfx.ExpansionError, match="keeps no part"):
        jetfx.jet_expand(gm, 1, centers, 1, split=True, degrees=[])
    with pytest.raises(jetfx.ExpansionError, match="pass split=True"):
        jetfx.jet_expand(gm, 1, centers, 1, degrees=[1])
    with pytest.raises(jetfx.ExpansionError, match="selects no path"):
        jetfx.expand(gm, 1, split=True, paths=S.only_kinds("mlp") & S.interacts_with("h.*.attn"))
    with pytest.raises(jetfx.ExpansionError, match="filters of jetfx.split"):
        jetfx.expand(gm, 1, split=True, paths=jetfx.paths.max_blocks(1))
    with pytest.raises(jetfx.ExpansionError, match="more than max_paths"):
        jetfx.expand(gm, 1, split=True)
    with pytest.raises(jetfx.ExpansionError, match="weights='uniform' .* or 'exponential'"):
        jetfx.expand(gm, 1, split=True, paths=S.max_degree(0), weights="optimized")
    with pytest.raises(jetfx.ExpansionError, match="pass split=True"):
        jetfx.expand(gm, 1, weights="uniform")
    with pytest.raises(jetfx.ExpansionError, match="max_degree needs a non-negative integer"):
        S.max_degree(-1)
    with pytest.raises(jetfx.ExpansionError, match="max_terms"):
        jetfx.jet_expand(gm, 1, centers * 30, 3, split=True)


# --- GPU ----------------------------------------------------------------------------------------


def _split_and_view_on(device: str):
    """The split expansion and the interaction view on `device` equal the CPU's (float64)."""
    from jetfx.interactions import interactions

    model, gm = traced64("llama")
    ids = tokens()
    f = S.total_degree(max=1) & S.within("model.layers.0.*", "model.layers.1.mlp")
    ex = jetfx.expand(gm, 1, split=True, paths=f)
    with torch.no_grad():
        cpu = ex(ids)
        ex.to(device)
        dev = ex(ids.to(device))
        ex.to("cpu")
    assert dev.logits.device.type == torch.device(device).type and len(dev.names) == len(cpu.names) > 20
    # relative to the largest path: paths can exceed the logits they sum to (and cancel)
    scale = max(float(cpu.logits.abs().max()), max(float(cpu[n].abs().max()) for n in cpu.names))
    assert dev.max_error() < 1e-10 * scale
    # across devices only to 1e-8: Llama's rotary tables are float32 in the model itself (cos/sin differ)
    assert max(float((dev[n].cpu() - cpu[n]).abs().max()) for n in cpu.names) < 1e-8 * scale
    one = ids[:1]
    want = interactions(gm, one, progress=False)
    got = interactions(gm.to(device), one, progress=False)
    gm.to("cpu")
    assert [(r.block, r.center, r.direction) for r in got.records] == [(r.block, r.center, r.direction)
                                                                      for r in want.records]
    for a, b in zip(got.records, want.records):
        assert a.size == pytest.approx(b.size, rel=1e-7, abs=1e-10) and a.effect == pytest.approx(b.effect, abs=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (checked on the GPU machine)")
def test_split_expansion_and_interaction_view_run_on_cuda():
    _split_and_view_on("cuda")


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` is not installed (apt-get install graphviz)")
def test_split_expansion_renders_carry_and_interaction_edges(tmp_path):
    from jetfx.pictures import split_edges

    model = TwoBlockToy().double()
    gm = jetfx.trace(model, torch.randint(0, 13, (1, 4)), dtype=torch.float64)
    ex = jetfx.expand(gm, 1, split=True, paths=S.interacts_with("block1") & S.max_degree(1))
    carry, interact = split_edges(ex.selected)
    # every selected path differentiates along a term through block1, which reaches block2 or the decoder
    assert ("block1", "block2") in interact or ("block1", "logits") in interact
    assert all(v in ("block2", "logits") for _, v in interact)
    svg = ex.render(str(tmp_path / "split.svg"))
    assert svg.count('stroke-dasharray') == len(interact) and f"{len(ex.selected)} selected" in svg
    assert (tmp_path / "split.svg").read_text() == svg
