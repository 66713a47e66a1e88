"""Expansions: exactness, independent checks of individual terms, linear networks, the worked example."""

import math

import pytest
import torch

import jetfx
from jetfx import models
from jetfx import paths as P
from jetfx.errors import ExpansionError
from tiny_models import ARCHS, LinearResNet, TwoBlockToy, tokens, traced

SELECTIONS = {
    "all": None,
    "max1": P.max_blocks(1),
    "no_attn": P.no_attention(),
    "through_mlp": P.through("*.0.mlp") & P.max_blocks(3),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_paths_plus_remainder_equal_logits(arch, k):
    model, gm = traced(arch)
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
    for name, sel in SELECTIONS.items():
        if k == 2 and name != "max1":
            continue
        ex = jetfx.expand(gm, k=k, paths=sel, jets="nested")
        with torch.no_grad():
            out = ex(ids)
        assert len(out.names) == ex.path_graph.count(sel) == len(set(out.names))
        torch.testing.assert_close(sum(out.paths.values()) + out.remainder, ref, atol=1e-4, rtol=1e-4)
        assert out.stacked.abs().max() > 0


def test_path_selection_does_not_change_the_terms():
    _, gm = traced("gpt2")
    ids = tokens()
    with torch.no_grad():
        full = jetfx.expand(gm, k=1, jets="nested")(ids)
        some = jetfx.expand(gm, k=1, paths=P.only_kinds("mlp"), jets="nested")(ids)
    for name, value in some.paths.items():
        torch.testing.assert_close(value, full[name], atol=1e-6, rtol=1e-5)


def _layer_norm(ln, x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _hooked_inputs(model, module, ids):
    """The input of `module` in an eager forward pass."""
    seen = {}
    h = module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    return seen["x"]


def _nested_jet(f, x, y, k):
    """J^k f(x)(y) by plain nested torch.func.jvp, written independently of jetfx.jets."""
    v = y - x

    def g(t):
        return f(x + t * v)

    fs = [g]
    for _ in range(k):
        fs.append(lambda t, prev=fs[-1]: torch.func.jvp(prev, (t,), (torch.ones_like(t),))[1])
    t0 = torch.zeros((), dtype=x.dtype)
    return sum(fn(t0) / math.factorial(j) for j, fn in enumerate(fs))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("k", [1, 2])
def test_block_jet_term_matches_eager_submodules(arch, k):
    """Term w_1·J^k γ(x_1)(h_1) of the first MLP at centers {η, attention output}, decoded at k = 0."""
    model, gm = traced(arch)
    ids = tokens()
    if arch == "gpt2":
        layer = model.transformer.h[0]
        embed = _hooked_inputs(model, model.transformer.h[0].ln_1, ids)
        h1 = _hooked_inputs(model, layer.ln_2, ids)
        # layer norm written out: torch's nested forward AD through aten.layer_norm is wrong from
        # the second order on (torch 2.13), so the reference must not go through it
        gamma = lambda x: layer.mlp(_layer_norm(layer.ln_2, x))  # noqa: E731
        decode = lambda x: model.lm_head(_layer_norm(model.transformer.ln_f, x))  # noqa: E731
        attn, mlp = "h.0.attn", "h.0.mlp"
    else:
        layer = model.model.layers[0]
        embed = _hooked_inputs(model, layer.input_layernorm, ids)
        h1 = _hooked_inputs(model, layer.post_attention_layernorm, ids)
        gamma = lambda x: layer.mlp(layer.post_attention_layernorm(x))  # noqa: E731
        decode = lambda x: model.lm_head(model.model.norm(x))  # noqa: E731
        attn, mlp = "layers.0.self_attn", "layers.0.mlp"
    w = (0.25, 0.75)
    step = gm.residual.block(mlp).step
    xi = jetfx.jet_expand(gm, step, [jetfx.stream(gm, step - 1), jetfx.branch(gm, attn)], k, w)
    assert xi.terms.names == ("embed", attn, mlp, f"{attn}>{mlp}")
    ex = jetfx.jet_expand(gm, "decoder", xi.terms, 0).compile(jets="nested")
    with torch.no_grad():
        out = ex(ids)
    centers = {mlp: embed, f"{attn}>{mlp}": h1 - embed}
    for (name, x), wi in zip(centers.items(), w):
        term = wi * _nested_jet(gamma, x, h1, k)
        with torch.no_grad():
            expected = decode(term) / 4  # uniform decoder weights over 4 terms
        torch.testing.assert_close(out[name], expected, atol=1e-5, rtol=1e-4)
    # the identity terms of a k ≥ 1 expansion are the centers themselves (no weight)
    with torch.no_grad():
        torch.testing.assert_close(out["embed"], decode(embed) / 4, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("k", [1, 2])
def test_decoder_jet_matches_eager(arch, k):
    model, gm = traced(arch)
    ids = tokens()
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    if arch == "gpt2":
        final = model.transformer.ln_f
        decode = lambda x: model.lm_head(_layer_norm(model.transformer.ln_f, x))  # noqa: E731
    else:
        final = model.model.norm
        decode = lambda x: model.lm_head(model.model.norm(x))  # noqa: E731
    hL = _hooked_inputs(model, final, ids)
    ex = jetfx.jet_expand(gm, "decoder", jetfx.stream(gm, 2), k, [1.0]).compile(jets="nested")
    with torch.no_grad():
        out = ex(ids)
    expected = _nested_jet(decode, hidden[1], hL, k)
    torch.testing.assert_close(out.stacked[0], expected.detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_logit_lens_is_a_zero_order_decoder_jet(arch):
    model, gm = traced(arch)
    ids = tokens()
    with torch.no_grad():
        res = model(ids, output_hidden_states=True)
    if arch == "gpt2":
        decode = lambda x: model.lm_head(model.transformer.ln_f(x))  # noqa: E731
    elif arch == "llama":
        decode = lambda x: model.lm_head(model.model.norm(x))  # noqa: E731
    else:
        decode = lambda x: model.get_output_embeddings()(model.gpt_neox.final_layer_norm(x))  # noqa: E731
    per_layer = len(gm.residual.steps) // (len(res.hidden_states) - 1)
    L = len(gm.residual.steps)
    for layer in range(len(res.hidden_states) - 1):  # the last hidden state is already normalized
        ex = jetfx.jet_expand(gm, L, [jetfx.stream(gm, layer * per_layer)], 0, [1.0]).compile()
        with torch.no_grad():
            lens = ex(ids).stacked[0]
            torch.testing.assert_close(lens, decode(res.hidden_states[layer]), atol=1e-5, rtol=1e-5)
    top = jetfx.jet_expand(gm, L, [jetfx.stream(gm, L)], 0, [1.0]).compile()
    with torch.no_grad():
        torch.testing.assert_close(top(ids).stacked[0], res.logits, atol=1e-5, rtol=1e-5)


# --- linear residual networks -------------------------------------------------------------------


def _matrices(model):
    E = model.embed.weight.detach()
    A = [b.weight.detach() for b in model.blocks]
    U = model.unembed.weight.detach()
    return E, A, U


@pytest.mark.parametrize("layers", [1, 3, 5])
def test_linear_network_k0_paths_are_weighted_matrix_products(layers):
    model = LinearResNet(layers=layers)
    ids = torch.randint(0, 11, (2, 4))
    gm = jetfx.trace(model, ids)
    assert all(b.linear for b in gm.residual.blocks)
    ex = jetfx.expand(gm, k=0)
    assert len(ex.path_names) == 2**layers == gm.residual.num_paths
    with torch.no_grad():
        out = ex(ids)
    E, A, U = _matrices(model)
    # Algorithm 2 at k = 0: step s ≥ 1 weighs its terms by 1/2^s, the decoder by 1/2^L
    weight = math.prod(2.0**-s for s in range(1, layers + 1))
    for path in ex.path_graph.iter_paths():
        h = E[ids]
        for name in path.blocks:
            h = h @ A[int(name.split(".")[-1])].T
        torch.testing.assert_close(out[path.name], weight * h @ U.T, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2])
def test_linear_network_remainder_vanishes_for_any_weights(k):
    model = LinearResNet(layers=3, seed=3)
    ids = torch.randint(0, 11, (2, 4))
    gm = jetfx.trace(model, ids)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        terms = [jetfx.stream(gm, 0), jetfx.branch(gm, gm.residual.blocks[0])]
        for step in range(1, 3):
            w = torch.rand(len(terms) if isinstance(terms, list) else len(terms), generator=g, dtype=torch.float64)
            xi = jetfx.jet_expand(gm, step, terms, k, (w / w.sum()).tolist())
            terms = xi.terms
        w = torch.rand(len(terms), generator=g, dtype=torch.float64)
        ex = jetfx.jet_expand(gm, "decoder", terms, k, (w / w.sum()).tolist()).compile()
        with torch.no_grad():
            out = ex(ids)
        assert len(out.names) == 8
        assert out.remainder.abs().max() < 1e-4 * out.logits.abs().max()


@pytest.mark.parametrize("layers", [1, 2, 4])
@pytest.mark.parametrize("k", [1, 2])
def test_symbolic_sum_is_the_expanded_product(layers, k):
    import sympy

    gm = jetfx.trace(LinearResNet(layers=layers), torch.randint(0, 11, (1, 3)))
    sym = jetfx.expand(gm, k=k).symbolic()
    assert all(not e.is_commutative for e in sym.terms.values())
    E, U = sympy.Symbol("E", commutative=False), sympy.Symbol("U", commutative=False)
    product = E
    for b in gm.residual.blocks:
        product = (1 + sympy.Symbol(f"A_{b.name}", commutative=False)) * product
    assert sympy.expand(sym.total(simplex=True) - sympy.expand(U * product)) == 0
    # without the simplex constraint the terms do not add up
    assert sympy.expand(sym.total(simplex=False) - sympy.expand(U * product)) != 0


def test_symbolic_view_of_a_transformer_keeps_jets_as_functions():
    _, gm = traced("gpt2")
    sym = jetfx.expand(gm, k=1, paths=P.max_blocks(1)).symbolic()
    text = str(sym)
    assert "J1_υ" in text and "γ_h.0.attn" in text


def test_worked_example_two_blocks():
    """k = 0 path through block 2 only = ω·U·γ_3(w_1·γ_2(η(z))) (the paper's §3 example)."""
    model = TwoBlockToy().eval()
    ids = torch.randint(0, 13, (2, 5))
    gm = jetfx.trace(model, ids)
    assert [b.name for b in gm.residual.blocks] == ["block1", "block2"]
    ex = jetfx.expand(gm, k=0)
    assert set(ex.path_names) == {"embed", "block1", "block2", "block1>block2"}
    with torch.no_grad():
        out = ex(ids)
        eta = model.embed(ids)
        w1, omega = 0.5, 0.25  # step 2 has 2 centers, the decoder 4 terms: uniform weights
        expected = omega * model.unembed(model.norm(w1 * model.block2(eta)))
        torch.testing.assert_close(out["block2"], expected, atol=1e-6, rtol=1e-5)
        expected = omega * model.unembed(model.norm(w1 * model.block2(model.block1(eta))))
        torch.testing.assert_close(out["block1>block2"], expected, atol=1e-6, rtol=1e-5)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_orders_weights_centers_and_filters():
    _, gm = traced("gpt2")
    for k in (-1, 1.5, "2", True):
        with pytest.raises(ExpansionError, match="order"):
            jetfx.expand(gm, k=k)
    with pytest.raises(ExpansionError, match="simplex"):
        jetfx.jet_expand(gm, 1, [jetfx.stream(gm, 0), jetfx.stream(gm, 1)], 1, [0.7, 0.7])
    with pytest.raises(ExpansionError, match="simplex"):
        jetfx.jet_expand(gm, 1, [jetfx.stream(gm, 0), jetfx.stream(gm, 1)], 1, [1.5, -0.5])
    with pytest.raises(ExpansionError, match="2 centers"):
        jetfx.jet_expand(gm, 1, [jetfx.stream(gm, 0), jetfx.stream(gm, 1)], 1, [1.0])
    with pytest.raises(ExpansionError, match="width 32"):
        jetfx.jet_expand(gm, 1, torch.zeros(3, 7), 1)
    with pytest.raises(ExpansionError, match="out of range"):
        jetfx.jet_expand(gm, 9, jetfx.stream(gm, 0), 1)
    with pytest.raises(ExpansionError, match="selects no path"):
        jetfx.expand(gm, k=1, paths=P.through("h.1.*") & P.max_blocks(0))
    with pytest.raises(ExpansionError, match="'h.7.*' in through.*matches no block"):
        jetfx.expand(gm, k=1, paths=P.through("h.7.*"))
    with pytest.raises(ExpansionError, match="16 paths.*max_paths=4.*max_blocks"):
        jetfx.expand(gm, k=1, max_paths=4)


def test_constant_center_of_wrong_token_shape_is_refused_at_run_time():
    _, gm = traced("gpt2")
    ex = jetfx.jet_expand(gm, "decoder", torch.zeros(1, 9, 32), 0).compile()
    with pytest.raises(jetfx.InputError, match="does not fit"):
        ex(tokens())


# ---------------------------------------------------------------------------------------------
# each tensor held once: the module owns the model's weights, the jets and the source share them


def _every_name(module):
    """(name, tensor) for every name a tensor is registered under, aliases included."""
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def _linear_resnet_expansion():
    model = LinearResNet(layers=2)  # 4 parameters: the embedding, two blocks, the unembedding
    ids = tokens(length=4) % 11
    return model, ids, jetfx.expand(jetfx.trace(model, ids), k=1)


def test_expanded_module_holds_each_tensor_once():
    model, _, ex = _linear_resnet_expansion()
    state = ex.state_dict(keep_vars=True)
    distinct = {id(t) for _, t in _every_name(ex)}
    # the model's 4 weights, the jet weights of 2 sites (step 1, decoder), 2 index vectors (13 entries before)
    assert len(state) == len(distinct) == 8
    assert len({t.untyped_storage().data_ptr() for t in state.values()}) == 8
    assert {k for k in state if k.startswith("model.")} == {f"model.{n}" for n, _ in model.named_parameters()}
    assert not [k for k in state if not k.startswith(("model.", "weights.", "index."))]
    aliases = ex.aliases()
    assert aliases and all(a.startswith("jets.") and o.startswith("model.") for a, o in aliases.items())
    for alias, owner in aliases.items():  # the jet of block 1 reads the module's own weight, not a copy
        assert ex.get_parameter(alias) is ex.get_parameter(owner)
    assert "source" not in dict(ex.named_children())
    for name, t in _every_name(ex.source):
        assert t is state[name]


def test_moves_and_loads_keep_the_tensors_shared():
    _, ids, ex = _linear_resnet_expansion()
    before = {k: v.detach().clone() for k, v in ex.state_dict().items()}
    aliases = ex.aliases()
    assert aliases
    ex.double()
    state = ex.state_dict(keep_vars=True)
    assert list(state) == list(before) and ex.aliases() == aliases
    for name, value in state.items():
        if value.is_floating_point():
            assert value.dtype == torch.float64 and torch.equal(value, before[name].double()), name
    for alias, owner in ex.aliases().items():
        assert ex.get_parameter(alias) is ex.get_parameter(owner)
    for name, t in _every_name(ex.source):
        assert t is state[name]
    with torch.no_grad():
        out = ex(ids)
    assert out.stacked.dtype == torch.float64 and out.max_error() < 1e-12
    # a state dict without the aliases loads into them too (strict): the jets see the new weights
    doubled = {k: 2 * v.detach() if k.startswith("model.") else v.detach() for k, v in ex.state_dict().items()}
    ex.load_state_dict(doubled)
    for alias, owner in ex.aliases().items():
        assert ex.get_parameter(alias) is ex.get_parameter(owner)
        assert torch.equal(ex.get_parameter(alias), 2 * before[owner].double())
    with torch.no_grad():
        again = ex(ids)
    assert again.max_error() < 1e-12
    with torch.no_grad():  # the source reads the loaded weights too
        assert torch.equal(ex.source(ids), again.logits)
    # to another device type torch registers a new tensor for each name: the aliases and the source follow
    ex.to("meta")
    state = ex.state_dict(keep_vars=True)
    assert list(state) == list(before) and ex.aliases() == aliases
    assert all(t.device.type == "meta" for _, t in _every_name(ex))
    for name, t in _every_name(ex.source):
        assert t is state[name]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("k", [0, 1])
def test_decoder_weights_are_applied_before_the_unembedding(arch, k):
    """The logits (paths, B, T, V) are an expansion's largest tensor: the decoder's jet weights scale its
    d-space jets, so no product is taken of the logits (it would hold two of them at once)."""
    from jetfx.passes.materialize import scale_terms

    _, gm = traced(arch)
    ex = jetfx.expand(gm, k=k, paths=P.max_blocks(1))
    def downstream(nodes):
        seen, frontier = set(), list(nodes)
        while frontier:
            for user in frontier.pop().users:
                if user not in seen:
                    seen.add(user)
                    frontier.append(user)
        return seen

    decoder_jets = [n for n in ex.graph.nodes if n.op == "call_module" and n.target.startswith("jets.decoder")]
    unembedding = [n for n in downstream(decoder_jets) if n.target is torch.ops.aten.matmul.default]
    assert decoder_jets and unembedding
    assert not [n for n in downstream(unembedding) if n.op == "call_function" and n.target is scale_terms]
    # and the decoder's weights still count: other weights, other paths (the identity holds for any weights)
    ids = tokens()
    with torch.no_grad():
        base = ex(ids)
        other = ex(ids, weights={"decoder": 2 * ex.jet_weights["decoder"]})
    torch.testing.assert_close(other.stacked, 2 * base.stacked, rtol=1e-5, atol=1e-6)
    assert other.max_error() < 1e-4


def test_exactness_of_outputs_that_require_grad_is_read_without_warnings():
    import warnings

    _, ids, ex = _linear_resnet_expansion()
    out = ex(ids)  # the model's parameters require grad: so do the outputs
    assert out.stacked.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert out.max_error() < 1e-5 and out.relative_error() < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_deepcopy_is_an_independent_expansion(arch):
    import copy

    _, gm = traced(arch)
    ids = tokens()
    ex = jetfx.expand(gm, k=1, paths=P.max_blocks(1))
    with torch.no_grad():
        ref = ex(ids)
    twin = copy.deepcopy(ex)
    assert twin.path_names == ex.path_names and twin.k == ex.k and twin.aliases() == ex.aliases()
    assert twin.source is not ex.source
    with torch.no_grad():
        out = twin(ids)
    assert torch.equal(out.stacked, ref.stacked) and torch.equal(out.remainder, ref.remainder)
    originals = {id(t) for _, t in _every_name(ex)}
    assert not any(id(t) in originals for _, t in [*_every_name(twin), *_every_name(twin.source)])
    # the copy's source reads the copy's tensors where the original's source reads the original's
    held, twin_held = ({id(t): n for n, t in _every_name(m)} for m in (ex, twin))
    shared = [(held[id(t)], name) for name, t in _every_name(ex.source) if id(t) in held]
    assert shared
    twin_source = dict(_every_name(twin.source))
    assert all(twin_held.get(id(twin_source[name])) == owner for owner, name in shared)
    # changing the copy leaves the original as it was
    twin.set_jet_weights({"decoder": torch.full_like(twin.jet_weights["decoder"], 0.5)}, constraint="affine")
    twin.double()
    with torch.no_grad():
        again = ex(ids)
        changed = twin(ids)
    assert torch.equal(again.stacked, ref.stacked) and again.stacked.dtype == torch.float32
    assert changed.stacked.dtype == torch.float64 and changed.max_error() < 1e-10
    assert not torch.allclose(changed.stacked.float(), ref.stacked)
    assert copy.deepcopy(ex.compile()).compiled  # a compiled module's copy compiles too (at its first call)


@pytest.mark.real
@pytest.mark.skipif(not (models.cache_dir() / "smollm2-135m").exists(), reason="the SmolLM2 weights are not cached")
def test_smollm2_expansion_state_dict_has_one_entry_per_storage():
    model, tokenizer = jetfx.load("smollm2-135m", progress=False)
    gm = jetfx.trace(model, "The capital of France is", tokenizer=tokenizer)
    ex = jetfx.expand(gm, k=1, paths=P.max_blocks(1) & P.within("layers.0.*", "layers.29.*"))  # the demo's export
    state = ex.state_dict(keep_vars=True)
    storages = {t.untyped_storage().data_ptr() for t in state.values()}
    assert len(storages) == len(state)
    # the model's weights once each: its tied embedding/unembedding is one tensor
    weights = {id(p) for p in model.parameters()}
    assert sum(id(t) in weights for t in state.values()) == len(weights)
    assert len(ex.aliases()) > 0  # (the jets' regions do read the model's weights)
