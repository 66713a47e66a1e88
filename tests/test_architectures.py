"""Architecture families beyond dense pre-norm decoders, one tiny random model each.

Mixture of experts (routed + shared experts), multi-head latent attention, shared-norm parallel
blocks, post-norm layers and a state-space model, next to a dense decoder: residual structure,
exact expansions of order 0–2 (float64: Σ paths + remainder = logits, Taylor mode = nested-AD
reference), the stream as a sum of block outputs, the iterative lens. The sweep over every causal
LM class of transformers is `tools/architectures.py` (docs/architectures.md).
"""

import functools
import warnings

import pytest
import torch

import jetfx
from jetfx import paths as P
from jetfx.errors import InputError, StructureError
from jetfx.functions import block_region, capture
from jetfx.lens import iterative_lens
from jetfx.passes.taylor import TaylorJet
from tiny_configs import tiny_model, tokens

TOL = 1e-9  # float64, relative to max |logits|

# family -> (class, block kinds of the two layers in step order)
FAMILIES = {
    "dense": ("Qwen3ForCausalLM", ["attn", "mlp", "attn", "mlp"]),
    "moe": ("Qwen2MoeForCausalLM", ["attn", "moe", "attn", "moe"]),  # routed + shared experts
    "mla": ("DeepseekV3ForCausalLM", ["attn", "mlp", "attn", "moe"]),  # latent attention; layer 0 dense
    "parallel": ("CohereForCausalLM", ["attn", "mlp", "attn", "mlp"]),  # one norm for both branches
    "post_norm": ("BertLMHeadModel", ["attn", "mlp", "attn", "mlp"]),
    "ssm": ("MambaForCausalLM", ["mixer", "mixer"]),
}


@functools.lru_cache(maxsize=None)
def traced64(name: str):
    model = tiny_model(name)
    ids = tokens(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Mamba: "the graph is specialised to 7 tokens" (tested below)
        gm = jetfx.trace(model, ids, dtype=torch.float64)
    gm.trace_warnings = [str(w.message) for w in caught]
    return model, ids, gm


def _rel(a, b, scale):
    return float((a - b).abs().max().detach() / scale.abs().max().detach())


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_and_kinds(family):
    name, kinds = FAMILIES[family]
    _, _, gm = traced64(name)
    assert [b.kind for b in gm.residual.blocks] == kinds
    assert gm.residual.decoder.has_norm


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_is_a_sum_of_block_outputs(family):
    """h_{s+1} = h_s + Σ_b γ_b(h_s) for every step, on the model's own values (rewrites included)."""
    _, ids, gm = traced64(FAMILIES[family][0])
    s = gm.residual
    names = list(s.stream) + [b.output for b in s.blocks]
    v = capture(gm, ids, names)
    for step in s.steps:
        total = v[step.input] + sum(v[b.output] for b in step.blocks)
        nxt = s.stream[step.index + 1]
        assert _rel(total, v[nxt], v[nxt]) < 1e-12, f"step {step.index}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_one_block_paths_are_exact(family, k):
    _, ids, gm = traced64(FAMILIES[family][0])
    with torch.no_grad():
        logits = gm(ids)
        out = jetfx.expand(gm, k=k, paths=P.max_blocks(1))(ids)
    assert len(out.names) == 1 + gm.residual.num_blocks
    assert _rel(out.total(), logits, logits) < TOL
    assert torch.isfinite(out.stacked).all() and out.remainder.abs().max() > 0
    if k:
        with torch.no_grad():
            ref = jetfx.expand(gm, k=k, paths=P.max_blocks(1), jets="nested")(ids)
        assert _rel(out.stacked, ref.stacked, logits) < TOL


@pytest.mark.parametrize("family", ["moe", "post_norm", "ssm"])
def test_iterative_lens_last_row_is_the_logits(family):
    _, ids, gm = traced64(FAMILIES[family][0])
    lens = iterative_lens(gm, ids, k=1)
    assert _rel(lens.row_logits[-1], lens.model_logits, lens.model_logits) < TOL


def test_moe_jets_keep_the_centers_routing_by_rules():
    """Routing (top-k indices, sorting, expert offsets) is constant in Taylor mode: no op of a routed
    block falls back on nested AD, and the jets of two centers with different routings agree with
    the nested-AD reference (which differentiates through the center's routing too)."""
    _, ids, gm = traced64(FAMILIES["moe"][0])
    block = next(b for b in gm.residual.blocks if b.kind == "moe")
    region = block_region(gm, block)
    jet = TaylorJet(region.module, k=2)
    assert jet.fallback_ops == []
    v = capture(gm, ids, (block.input,) + region.side_inputs)
    h = v[block.input]
    side = [v[n] for n in region.side_inputs]
    centers = torch.stack([h, 0.5 * h.roll(1, dims=1)])
    ours = jet(centers, h, *side)
    ref = jetfx.jets.NestedJet(region.module, k=2)(centers, h, *side)
    assert _rel(ours, ref, ref) < TOL


def test_parallel_blocks_are_named_after_their_modules():
    _, _, gm = traced64(FAMILIES["parallel"][0])
    assert [[b.name for b in s.blocks] for s in gm.residual.steps] == [
        ["layers.0.self_attn", "layers.0.mlp"], ["layers.1.self_attn", "layers.1.mlp"]]
    assert gm.residual.num_paths == 9
    falcon = tiny_model("FalconForCausalLM")  # parallel_attn: one input_layernorm, h += attn (in place)
    s = jetfx.trace(falcon, tokens(falcon)).residual
    assert [[b.name for b in st.blocks] for st in s.steps] == [
        ["h.0.self_attention", "h.0.mlp"], ["h.1.self_attention", "h.1.mlp"]]


def test_post_norm_layers_are_rewritten_into_residual_form():
    _, _, gm = traced64(FAMILIES["post_norm"][0])
    s = gm.residual
    assert len(s.rewrites) == 3  # four post-norm sublayers; the last norm belongs to the decoder
    assert all("post-norm" in r and "LayerNorm" in r for r in s.rewrites)
    assert [b.name for b in s.blocks] == ["layer.0.attention", "layer.0", "layer.1.attention", "layer.1"]


def test_state_space_graph_is_specialised_to_the_given_length():
    model, ids, gm = traced64(FAMILIES["ssm"][0])
    assert ids.shape[1] == 7 and gm.jetfx.specialized_length == 7
    assert any("specialised to 7 tokens" in w for w in gm.trace_warnings)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids).float(), model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
        assert gm(ids[:1]).shape[:2] == (1, 7)  # the batch stays dynamic
    with pytest.raises(InputError, match="specialised to sequences of 7 tokens"):
        gm(tokens(model, length=6))


class _Widening(torch.nn.Module):
    """Residual blocks around a projection that changes the stream's width: no residual form."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.block = torch.nn.Linear(4, 4)
        self.widen = torch.nn.Linear(4, 6)
        self.block2 = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, 10)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + torch.tanh(self.block(h))
        h = self.widen(h)
        h = h + torch.tanh(self.block2(h))
        return self.out(h)


def test_stream_that_changes_width_is_refused_naming_the_module():
    with pytest.raises(StructureError, match="widen") as e:
        jetfx.trace(_Widening(), torch.randint(0, 10, (2, 5)))
    assert "residual form" in str(e.value)
