"""Tracing and residual analysis on every supported architecture, from the graph alone."""

import pytest
import torch

import jetfx
from jetfx.errors import InputError, StructureError, TraceError
from tiny_models import ARCHS, VOCAB, tokens, traced

EXPECTED_NAMES = {
    "gpt2": ["h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp"],
    "gpt_neo": ["h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp"],
    "gpt_neox": ["layers.0.attention", "layers.0.mlp", "layers.1.attention", "layers.1.mlp"],
    "llama": ["layers.0.self_attn", "layers.0.mlp", "layers.1.self_attn", "layers.1.mlp"],
    "olmo": ["layers.0.self_attn", "layers.0.mlp", "layers.1.self_attn", "layers.1.mlp"],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_trace_reproduces_logits_on_new_shapes(arch):
    model, gm = traced(arch)
    for shape in [(1, 3), (3, 9)]:
        ids = torch.randint(0, VOCAB, shape)
        with torch.no_grad():
            ref = model(ids).logits
            out = gm(ids)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_analysis_finds_two_named_blocks_per_layer(arch):
    _, gm = traced(arch)
    s = gm.residual
    assert [b.name for b in s.blocks] == EXPECTED_NAMES[arch]
    assert [b.kind for b in s.blocks] == ["attn", "mlp", "attn", "mlp"]
    assert s.decoder.has_norm
    if arch == "gpt_neox":  # parallel residual: both blocks of a layer read the same stream
        assert [len(st.blocks) for st in s.steps] == [2, 2]
        assert s.num_paths == 9
    else:
        assert [len(st.blocks) for st in s.steps] == [1, 1, 1, 1]
        assert s.num_paths == 16
    assert "exponential expansion" in str(s)


def test_side_inputs_do_not_depend_on_the_stream():
    _, gm = traced("llama")
    region = jetfx.functions.block_region(gm, "layers.0.self_attn")
    # rotary tables (cos, sin) and sizes are side inputs of attention; the MLP needs none
    assert len(region.side_inputs) >= 2
    assert jetfx.functions.block_region(gm, "layers.0.mlp").side_inputs == ()


def test_device_agnostic_graph_runs_on_meta():
    import copy

    _, shared = traced("gpt2")
    gm = copy.deepcopy(shared)  # moving an expansion moves the traced module it reads: not the shared one
    gm.residual, gm.jetfx = shared.residual, shared.jetfx
    meta = jetfx.expand(gm, k=0, paths=jetfx.paths.max_blocks(1))
    meta = meta.to("meta")
    out = meta(tokens().to("meta"))
    assert out.stacked.device.type == "meta"
    assert out.stacked.shape == (5, 2, 6, VOCAB)


def test_bad_tokens_get_clear_errors():
    _, gm = traced("gpt2")
    with pytest.raises(InputError, match="vocabulary|out of range"):
        jetfx.expand(gm, k=0, paths="embed")(torch.tensor([[1, VOCAB + 5]]))
    with pytest.raises(InputError, match="tokenizer"):
        jetfx.expand(gm, k=0, paths="embed")("some text")
    with pytest.raises(InputError):
        jetfx.tracing.as_tokens(torch.tensor([[0.5, 1.0]]))


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.lin = torch.nn.Linear(4, 10)

    def forward(self, ids):
        h = self.embed(ids)
        if h.sum() > 0:  # control flow on values: torch.export cannot trace this
            h = h + self.lin.weight[:4].T @ h.transpose(-1, -2)[..., :4, :].mean(-1, keepdim=True).squeeze(-1).unsqueeze(-1).T
        return self.lin(h)


class _NoResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, 10)

    def forward(self, ids):
        return self.out(torch.tanh(self.mid(self.embed(ids))))


def test_unexportable_model_says_why():
    with pytest.raises(TraceError, match="torch.export") as e:
        jetfx.trace(_DataDependent(), torch.randint(0, 10, (2, 5)))
    assert "data-dependent" in str(e.value).lower() or "guard" in str(e.value).lower()


def test_graph_without_residual_stream_is_refused():
    with pytest.raises(StructureError, match="residual"):
        jetfx.trace(_NoResidual(), torch.randint(0, 10, (2, 5)))
