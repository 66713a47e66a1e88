"""Jet n-grams: scores equal brute-force evaluation through the eager model's own submodules,
pruned trigram search equals exhaustive search, db round-trip, resume, diff, mass index."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import jetfx
from jetfx import ngrams as N
from jetfx.errors import InputError
from jetfx.ngram_db import NgramDB, extract
from jetfx.passes.heads import analyze, bias_of, head_branch
from jetfx.functions import block_region, capture

V = 64


def _llama(seed=0, vocab=V):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return m, jetfx.trace(m, torch.tensor([[1, 2, 3]]))


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return m, jetfx.trace(m, torch.tensor([[1, 2, 3]]))


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


def _brute_llama(m, path, v):
    e = m.model.embed_tokens.weight[v]
    if path != "embed":
        layer = m.model.layers[int(path.split(".")[1])]
        e = layer.mlp(layer.post_attention_layernorm(e))
    return m.lm_head(m.model.norm(e))


def _brute_gpt2(m, path, v):
    t = m.transformer
    e = t.wte.weight[v] + t.wpe.weight[0]  # position 0 (see docs/ngrams.md)
    if path != "embed":
        block = t.h[int(path.split(".")[1])]
        e = block.mlp(block.ln_2(e))
    return m.lm_head(t.ln_f(e))


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bigram_scores_equal_brute_force(arch, llama, gpt2):
    m, gm = llama if arch == "llama" else gpt2
    brute = _brute_llama if arch == "llama" else _brute_gpt2
    for path in N.bigram_paths(gm):
        ref = brute(m, path, torch.arange(V))
        ev = N.PathEvaluator(gm, path)
        assert torch.allclose(ev.logits(torch.arange(V).view(-1, 1)), ref, atol=1e-5)
        # the Algorithm-1 terms compile to the same thing
        out = N.path_terms(gm, path).compile()(torch.arange(V).view(-1, 1))
        assert torch.allclose(out.stacked[0, :, 0] if hasattr(out, "stacked") else list(out.paths.values())[0][:, 0],
                              ref, atol=1e-5)
        t = N.bigram_table(gm, path, top_k=25, per_context=3, chunk_size=20, progress=False, drop_self=True)
        lp = ref - torch.logsumexp(ref, 1, keepdim=True)
        flat = lp.clone()
        flat[torch.arange(V), torch.arange(V)] = -math.inf
        vals, idx = torch.topk(flat.flatten(), 25)
        assert [(r[1], r[2]) for r in t.top] == [(int(i) // V, int(i) % V) for i in idx]
        assert all(abs(r[4] - lp[r[1], r[2]]) < 1e-5 and abs(r[3] - ref[r[1], r[2]]) < 1e-5 for r in t.top)
        ctx = {(s, k): u for s, k, u, _, _ in t.per_context}
        assert ctx[(5, 1)] == int(flat[5].argmax())  # drop_self applies to per-context rankings too
        ps = N.pair_scores(gm, path, [(3, 7), (9, 1)])
        assert abs(ps[0, 1] - lp[3, 7]) < 1e-5 and abs(ps[1, 0] - ref[9, 1]) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("scale", [50, 400])
def test_log_probabilities_near_one_stay_apart(scale):
    """An unembedding 50× (400×) the embedding: every v→v has P(v|v) ≈ 1 − e^-40 (1 − e^-200, below
    float32's range, as on SmolLM2's `embed` path), where z − logsumexp(z) is exactly 0 in float32
    and the ranking by log-probability a tie. The table's log P equals float64's
    −log1p(Σ_{w≠v} e^{z_w − z_v}) to float32 precision, so its ranking is float64's."""
    m, _ = _llama(seed=3)
    m.lm_head.weight.copy_(scale * m.model.embed_tokens.weight)
    gm = jetfx.trace(m, torch.tensor([[1, 2, 3]]))
    z = _brute_llama(m, "embed", torch.arange(V)).double()
    assert (z.argmax(1) == torch.arange(V)).all()  # the self-transition dominates every row
    others = (z - z.diagonal()[:, None]).exp()
    others.fill_diagonal_(0)
    lp = -others.sum(1).log1p()  # log P(v|v) in float64, without rounding it to 0
    assert (lp < 0).all() and (lp > -6e-8).sum() > V // 2  # most are beyond float32's resolution near 1
    if scale == 400:
        assert (lp > -1e-45).sum() > V // 2  # and beyond float32's range
    zf = z.float()
    assert ((zf - torch.logsumexp(zf, 1, keepdim=True)).diagonal() == 0).sum() > V // 2  # hence ties at 0
    t = N.bigram_table(gm, "embed", top_k=10, per_context=1, chunk_size=16, progress=False)
    order = torch.argsort(lp, descending=True)[:10]
    assert [(r[1], r[2]) for r in t.top] == [(int(v), int(v)) for v in order]
    got = torch.tensor([r[4] for r in t.top], dtype=torch.float64)
    torch.testing.assert_close(got, lp[order], rtol=1e-3, atol=0)
    ctx = torch.tensor([r[4] for r in sorted(t.per_context)], dtype=torch.float64)  # each source's top 1
    torch.testing.assert_close(ctx, lp, rtol=1e-3, atol=0)
    ps = N.pair_scores(gm, "embed", [(5, 5), (7, 7)])[:, 1].double()
    torch.testing.assert_close(ps, lp[[5, 7]], rtol=1e-3, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_heads_sum_to_attention_block(arch, llama, gpt2):
    m, gm = llama if arch == "llama" else gpt2
    block = gm.residual.blocks[0]
    split = analyze(gm, block.name)
    assert split.num_heads == 4 and split.head_dim == 8
    ids = torch.randint(0, V, (3, 5))
    vals = capture(gm, ids, (block.input,) + block_region(gm, block).side_inputs)
    region = block_region(gm, block)
    args = [vals[s] for s in region.side_inputs]
    full = region.module(vals[block.input], *args)
    parts = sum(head_branch(gm, block.name, h).module(vals[block.input], *args) for h in range(4))
    b = bias_of(gm, block.name)
    assert torch.allclose(parts + (0 if b is None else b), full, atol=1e-5)


@torch.no_grad()
def test_trigram_exact_and_pruned(llama):
    m, gm = llama
    path = "layers.0.self_attn:h1"
    # exact scores against the eager model: head 1 of layer 0's attention on (v1, v2), position 1
    attn = m.model.layers[0].self_attn
    ids = torch.tensor([[4, 9], [11, 2]])
    x = m.model.layers[0].input_layernorm(m.model.embed_tokens(ids))
    pos = torch.arange(2)[None].expand(2, 2)
    cos, sin = m.model.rotary_emb(x, pos)
    q = attn.q_proj(x).view(2, 2, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(2, 2, 2, 8).transpose(1, 2)
    v = attn.v_proj(x).view(2, 2, 2, 8).transpose(1, 2)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    h, g = 1, 0  # head 1 uses kv group 1 // (4 // 2) = 0
    s = (q[:, h] @ k[:, g].transpose(-1, -2)) / math.sqrt(8)
    s = s.masked_fill(torch.triu(torch.ones(2, 2, dtype=torch.bool), 1), -math.inf)
    o = torch.softmax(s, -1) @ v[:, g]
    out = o[:, 1] @ attn.o_proj.weight[:, h * 8:(h + 1) * 8].t()
    ref = m.lm_head(m.model.norm(out))
    got = N.PathEvaluator(gm, path).logits(ids)
    assert torch.allclose(got, ref, atol=1e-5)
    pruned = N.trigram_table(gm, path, top_k=30, prune=True, groups=8)
    full = N.trigram_table(gm, path, top_k=30, prune=False)
    assert [r[1:4] for r in pruned.top] == [r[1:4] for r in full.top]
    # exhaustive over a small context set, by hand
    a, b = [1, 2, 3, 4], [5, 6, 7]
    sub = N.trigram_table(gm, path, first=a, second=b, top_k=10)
    ctx = torch.tensor([(x, y) for x in a for y in b])
    z = N.PathEvaluator(gm, path).logits(ctx)
    vals, idx = torch.topk(z.flatten(), 10)
    assert [tuple(r[1:4]) for r in sub.top] == [(*ctx[i // V].tolist(), int(i) % V) for i in idx]
    with pytest.raises(InputError):
        N.trigram_table(gm, path, score="logprob", prune=True)


def test_db_roundtrip_resume_diff(tmp_path, llama):
    m, gm = llama
    db = NgramDB(tmp_path / "ng.sqlite")
    ref = N.bigram_table(gm, "layers.1.mlp", top_k=40, per_context=2, chunk_size=10, progress=False)
    # interrupted after 3 of 7 chunks, then resumed
    rid, t1 = extract(db, gm, "layers.1.mlp", top_k=40, per_context=2, chunk_size=10, progress=False, max_chunks=3)
    assert not t1.complete and t1.chunks_done == 3 and db.run(rid).status == "running"
    rid2, t2 = extract(db, gm, "layers.1.mlp", top_k=40, per_context=2, chunk_size=10, progress=False)
    assert rid2 == rid and t2.complete and db.run(rid).status == "done"
    rows = db.top(rid)
    assert [(r["ids"], r["rank"]) for r in rows] == [([r[1], r[2]], r[0]) for r in ref.top]
    assert all(abs(r["logprob"] - x[4]) < 1e-6 for r, x in zip(rows, ref.top))
    assert len(db.context(rid, 5)) == 2 and rows[0]["text"] == [f"<{rows[0]['ids'][0]}>", f"<{rows[0]['ids'][1]}>"]
    db.close()
    db = NgramDB(tmp_path / "ng.sqlite")  # reopen: persisted
    assert db.find_run(path="layers.1.mlp").id == rid
    # a second model over the same vocabulary: diff
    m2, gm2 = _llama(seed=1)
    rid_b, _ = extract(db, gm2, "layers.1.mlp", name="other", top_k=40, chunk_size=10, progress=False,
                       per_context=2)
    d = db.diff(rid, rid_b)
    assert d["common"] + d["num_leaving"] == 40 and d["common"] + d["num_entering"] == 40
    assert len(db.models()) == 2
    same = db.diff(rid, rid)
    assert same["common"] == 40 and not same["promoted"] and not same["entering"]
    # different vocabularies are refused
    m3, gm3 = _llama(seed=2, vocab=80)
    rid_c, _ = extract(db, gm3, "embed", name="big", top_k=5, chunk_size=40, progress=False)
    with pytest.raises(InputError, match="different vocabularies"):
        db.diff(rid, rid_c)
    db.close()


def test_mass_index(tmp_path, llama):
    m, gm = llama
    pairs = [(1, 2), (1, 3), (4, 5)]
    res = N.mass_index(gm, "embed", pairs=pairs)
    lp = torch.log_softmax(_brute_llama(m, "embed", torch.arange(V)).detach(), 1)
    assert abs(res["mass"] - sum(lp[v, u].exp().item() for v, u in pairs)) < 1e-6
    assert res["sources"] == 2

    class Tok:  # a stand-in tokenizer: token i reads "w{i % 8}"
        def decode(self, ids):
            return f" W{ids[0] % 8}"

    gm.jetfx.tokenizer = Tok()
    try:
        res = N.mass_index(gm, "embed", keywords=["w3", "# comment"])
    finally:
        gm.jetfx.tokenizer = None
    assert res["pairs"] == 8 * 7  # tokens 3, 11, …, 59; self pairs dropped
    with pytest.raises(InputError):
        N.mass_index(gm, "embed")
    assert N.load_keywords(N.default_keywords_file())
    db = NgramDB(":memory:")
    db.add_mass(db.add_model(gm, "tiny"), "pairs", N.mass_index(gm, "embed", pairs=pairs))
    assert db.masses()[0][3] == "pairs"


def test_errors(llama):
    m, gm = llama
    with pytest.raises(InputError):
        N.parse_path(gm, "layers.9.mlp")
    with pytest.raises(InputError):
        N.parse_path(gm, "layers.0.mlp:h1")
    with pytest.raises(InputError):
        N.bigram_table(gm, "embed", score="prob")
    with pytest.raises(InputError):
        N.pair_scores(gm, "embed", [(1, 2, 3)])
    with pytest.raises(InputError):
        N.bigram_table(gm, "embed", sources=[V + 5])


def test_cli_parsers():
    import argparse

    from jetfx.cli_ngrams import add_parsers

    ap = argparse.ArgumentParser()
    add_parsers(ap.add_subparsers())
    a = ap.parse_args(["ngrams", "--path", "layers.3.mlp", "--drop-self", "--top-k", "30"])
    assert a.model == "smollm2-135m" and a.path == ["layers.3.mlp"] and a.drop_self
    assert ap.parse_args(["diff", "1", "2"]).func.__name__ == "run_diff"
    assert ap.parse_args(["mass"]).func.__name__ == "run_mass"


def _near_one_tables_on(device: str):
    """Bigram tables (global and per-context, float64 log-probabilities near 0) on `device` equal the CPU's."""
    m, _ = _llama(seed=3)
    with torch.no_grad():
        m.lm_head.weight.copy_(400 * m.model.embed_tokens.weight)
    gm = jetfx.trace(m, torch.tensor([[1, 2, 3]]))
    want = N.bigram_table(gm, "embed", top_k=20, per_context=2, chunk_size=16, progress=False)
    got = N.bigram_table(gm.to(device), "embed", top_k=20, per_context=2, chunk_size=16, progress=False)
    gm.to("cpu")
    assert [r[:3] for r in got.top] == [r[:3] for r in want.top]
    for rows_a, rows_b in ((got.top, want.top), (got.per_context, want.per_context)):
        a = torch.tensor([r[-1] for r in rows_a], dtype=torch.float64)
        b = torch.tensor([r[-1] for r in rows_b], dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_bigram_tables_after_moving_the_module_equal_the_first():
    _near_one_tables_on("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (checked on a GPU machine)")
def test_bigram_tables_on_cuda_equal_cpu():
    _near_one_tables_on("cuda")
