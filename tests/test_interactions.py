"""The interaction view: every degree-1 cross term w·Dγ_l(x_i)[x_j] of one input, measured."""

from __future__ import annotations

import re

import pytest
import torch

import jetfx
from jetfx.functions import block_region, capture, decoder_region, logits_node
from jetfx.interactions import interactions
from test_split import traced64
from tiny_models import tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cross_terms_match_eager_jvps_and_the_logit_readout(arch, tmp_path):
    _, gm = traced64(arch)
    ids = tokens(batch=1, length=5)
    s = gm.residual
    m = interactions(gm, ids, position=3, progress=False)
    assert m.complete and m.blocks == [b.name for b in s.blocks if b.step >= 1]
    # N_l (N_l − 1) cross terms per block, N_l = 1 + blocks before it
    assert len(m.records) == sum((b.step + 1) * b.step for b in s.blocks if b.step >= 1)
    parts = [s.stream[0]] + [b.output for b in s.blocks]
    vals = capture(gm, ids, [*parts, s.decoder.input, logits_node(gm)])
    top = int(vals[logits_node(gm)][0, 3].argmax())
    dec = decoder_region(gm)
    value = dict(zip(m.parts, (vals[p] for p in parts)))
    for rec in m.records[:: max(1, len(m.records) // 12)]:
        block = s.block(rec.block)
        region = block_region(gm, block)
        side = list(capture(gm, ids, region.side_inputs).values())
        term = rec.weight * torch.func.jvp(lambda x: region.module(x, *side), (value[rec.center],),
                                           (value[rec.direction],))[1]
        tangent = torch.zeros_like(term)
        tangent[:, 3] = term[:, 3]
        dside = list(capture(gm, ids, dec.side_inputs).values())
        dlogits = torch.func.jvp(lambda h: dec.module(h, *dside), (vals[s.decoder.input],), (tangent,))[1][0, 3]
        assert rec.size == pytest.approx(float(dlogits.detach().norm()), rel=1e-8, abs=1e-12)
        assert rec.effect == pytest.approx(float(dlogits[top].detach()), rel=1e-8, abs=1e-10)
        assert rec.weight == pytest.approx(1 / (block.step + 1))
    rows, cols, mat = m.matrix("size", "blocks")
    assert rows == m.blocks and mat.shape == (len(rows), len(cols)) and (mat >= 0).all()
    files = m.save(tmp_path)
    svg = files["size_pairs"].read_text()
    assert len(re.findall(r"<rect [^>]*><title>", svg)) == len(m.parts[:-1]) ** 2
    assert files["csv"].read_text().count("\n") == len(m.records) + 1


def test_bad_inputs_of_the_interaction_view():
    _, gm = traced64("gpt2")
    with pytest.raises(jetfx.InputError, match="one input"):
        interactions(gm, tokens(batch=2), progress=False)
    with pytest.raises(jetfx.InputError, match="out of range"):
        interactions(gm, tokens(batch=1, length=4), position=9, progress=False)
    with pytest.raises(jetfx.InputError, match="no block after the first step matches"):
        interactions(gm, tokens(batch=1), blocks="h.9.*", progress=False)
    m = interactions(gm, tokens(batch=1, length=4), blocks="h.1.*", progress=False)
    assert m.blocks == ["h.1.attn", "h.1.mlp"]
    with pytest.raises(jetfx.InputError, match="value must be"):
        m.matrix("norm")


def test_checkpoint_resumes_finished_blocks_and_drops_torn_or_foreign_ones(tmp_path):
    """The checkpoint file: blocks are read back exactly (the resumed map equals a fresh one), a
    torn last line (a killed process) is dropped, and a file of another input starts afresh."""
    _, gm = traced64("llama")
    ids = tokens(batch=1, length=5)
    fresh = interactions(gm, ids, progress=False)
    path = tmp_path / "partial.jsonl"
    first = interactions(gm, ids, blocks=fresh.blocks, progress=False, checkpoint=path)
    lines = path.read_text().splitlines()
    assert first.to_json() == fresh.to_json() and len(lines) == 1 + len(fresh.blocks)
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # one block, then a torn line
    again = interactions(gm, ids, blocks=fresh.blocks, progress=False, checkpoint=path)
    assert again.resumed == 1 and again.to_json() == fresh.to_json()
    assert path.read_text().splitlines() == lines  # the torn line was replaced by the whole block
    other = interactions(gm, tokens(batch=1, length=5, seed=7), blocks=fresh.blocks, progress=False, checkpoint=path)
    assert other.resumed == 0 and path.read_text().splitlines()[0] != lines[0]
