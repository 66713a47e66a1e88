"""Devices and dtypes: every feature where the model is (CUDA when there is one), half-precision models,
compiled expansions, and the bookkeeping that makes them work, checked on the CPU (and the meta device).

The CPU has no second real device, so device bookkeeping is checked on `meta` (tensors without
values): an expansion built while the traced graph is on `meta` must hold every constant there, and
lenses must run there without a host round-trip. `every_feature(device)` runs each public feature
with the model and the inputs on `device` and checks that the results stay there; it runs here on
the CPU (float32 and bfloat16) and, on a machine with a GPU, on CUDA against the CPU's numbers.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import VOCAB, hf_model, tokens, traced

import jetfx
from jetfx import lens as L
from jetfx import ngrams as N
from jetfx import paths as P
from jetfx import split as S
from jetfx.errors import ExactnessWarning, TraceError
from jetfx.expanded import exactness_tolerance
from jetfx.functions import jet_dtype
from jetfx.passes import constant_devices

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (torch.cuda.is_available() is "
                                                                  "False); run on a machine with a GPU")
SPLIT = S.total_degree(max=1) & S.within("layers.0.*", "layers.1.mlp")


def _movable(dtype=torch.float32):
    """A copy of the cached traced Llama that a test may move to another device."""
    gm = traced("llama", dtype)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deepcopy of the export's tree specs
        moved = copy.deepcopy(gm)
    moved.residual, moved.jetfx = gm.residual, copy.copy(gm.jetfx)  # not kept by GraphModule.__deepcopy__
    return moved


def _tensors(module: torch.nn.Module):
    return list(module.parameters()) + list(module.buffers())


# ---------------------------------------------------------------------------------------------
# every feature on one device


def every_feature(device, dtype=torch.float32, *, tmp_path, compile_backend: str | None = "inductor", model=None) -> dict:
    """Run every public feature with the model, graph and inputs on `device`; check that results stay
    there. Returns the numbers to compare across devices, on the CPU. `compile_backend=None` leaves
    out compiled execution (tested on its own on the CPU)."""
    dev = torch.device(device)
    on = lambda t: t.device.type == dev.type  # noqa: E731
    model = (hf_model("llama", dtype=dtype) if model is None else model).to(dev)
    ids = tokens().to(dev)
    gm = jetfx.trace(model, ids)  # the model is already on the device
    assert jetfx.functions.device_of(gm).type == dev.type and not constant_devices(gm)
    got = {}
    with torch.no_grad():
        got["model"] = model(ids).logits.float().cpu()
    # expansions: exponential, split, one step of Algorithm 1, the per-block decomposition
    ex = jetfx.expand(gm, 1, paths=P.max_blocks(1))
    assert all(on(t) for t in _tensors(ex)) and not constant_devices(ex)
    with torch.no_grad():
        out = ex(ids)
    assert on(out.stacked) and on(out.remainder) and out.stacked.dtype == jet_dtype(gm)
    assert out.relative_error() <= exactness_tolerance(out.logits.dtype)
    got["expand"] = out.stacked.float().cpu()
    sx = jetfx.expand(gm, 1, split=True, paths=SPLIT)
    assert all(on(t) for t in _tensors(sx))
    with torch.no_grad():
        split = sx(ids)
    assert on(split.stacked)
    got["split"] = split.stacked.float().cpu()
    one = jetfx.jet_expand(gm, "decoder", [jetfx.stream(gm, 0), jetfx.branch(gm, 0), jetfx.branch(gm, 1)], 1)
    with torch.no_grad():
        step = one.compile()(ids)
    assert on(step.stacked)
    got["jet_expand"] = step.stacked.float().cpu()
    parts = jetfx.decompose_resid(gm, ids)
    assert on(parts.parts)
    got["decompose_resid"] = parts.parts.float().cpu()
    # lenses: results stay on the device; pictures and summaries move only what they show
    for k in (0, 1, 2):
        lens = L.iterative_lens(gm, ids, k)
        assert all(on(t) for t in (lens.row_logits, lens.model_logits, lens.cosine, lens.weights, lens.tokens))
        got[f"iterative_{k}"] = lens.row_logits.float().cpu()
    for weights in ("uniform", "optimized"):
        joint = L.joint_lens(gm, ids, 1, weights=weights, steps=30)
        assert on(joint.logits) and on(joint.weights) and on(joint.cosine)
        got[f"joint_{weights}"] = joint.logits.float().cpu()
    files = joint.save(tmp_path / f"lens_{dev.type}")
    assert "<table" in files["html"].read_text() and joint.top(2)[0][0][0][0]
    # interactions, n-grams, mass index
    from jetfx.interactions import interactions

    cross = interactions(gm, ids[:1], progress=False)
    got["interactions"] = torch.tensor([r.size for r in cross.records])
    table = N.bigram_table(gm, "embed", top_k=20, per_context=2, chunk_size=32, progress=False)
    got["bigrams"] = torch.tensor([r[3] for r in table.top])
    tri = N.trigram_table(gm, "layers.0.self_attn:h1", top_k=10, groups=4)
    got["trigrams"] = torch.tensor([r[4] for r in tri.top])
    mass = N.mass_index(gm, "embed", pairs=[(1, 2), (3, 4), (5, 6)])
    got["mass"] = torch.tensor([mass["mass"]])
    assert on(N.pair_scores(gm, "embed", [(1, 2)]))
    # export, and the reloaded module moved to the device
    path = jetfx.export(ex, tmp_path / f"ex_{dev.type}.jetfx.zip")
    loaded = jetfx.load_expanded(path).to(dev)
    with torch.no_grad():
        back = loaded(ids)
    assert on(back.stacked)
    torch.testing.assert_close(back.stacked, out.stacked, rtol=1e-5, atol=1e-5 * float(out.stacked.abs().max()))
    if compile_backend is None:
        return got
    # compiled execution
    assert ex.compile(backend=compile_backend) is ex and ex.compiled
    with torch.no_grad():
        fast = ex(ids)
    ex.compile(False)
    assert on(fast.stacked)
    torch.testing.assert_close(fast.stacked, out.stacked, rtol=1e-4, atol=1e-4 * float(out.stacked.abs().max()))
    return got


def test_every_feature_of_a_bfloat16_model_on_the_cpu(tmp_path):
    """`every_feature` on the CPU, the CUDA tests' reference (float32 features are tested on the CPU
    throughout the suite; here the half-precision model, with export and compilation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExactnessWarning)  # the expansions are exact in the model's precision
        got = every_feature("cpu", torch.bfloat16, tmp_path=tmp_path, compile_backend=None,
                            model=traced("llama", torch.bfloat16)[0])
    assert got["expand"].shape[0] == 5 and got["bigrams"].numel() == 20


def _compare(cuda: dict, cpu: dict, rtol: float):
    for name, want in cpu.items():
        have = cuda[name]
        assert have.shape == want.shape, name
        scale = float(want.abs().max()) or 1.0
        assert float((have - want).abs().max()) <= rtol * scale, name


@CUDA
def test_every_feature_on_cuda(tmp_path):
    """Model, graph and inputs on the GPU: every feature runs there and agrees with the CPU."""
    cpu = every_feature("cpu", tmp_path=tmp_path, compile_backend=None)
    cuda = every_feature("cuda", tmp_path=tmp_path)
    _compare(cuda, cpu, rtol=1e-4)


@CUDA
def test_every_feature_of_a_bfloat16_model_on_cuda(tmp_path):
    cpu = every_feature("cpu", torch.bfloat16, tmp_path=tmp_path, compile_backend=None)
    cuda = every_feature("cuda", torch.bfloat16, tmp_path=tmp_path)
    # bfloat16 kernels of the two devices round differently: compare to a few bfloat16 ulps
    _compare({k: v for k, v in cuda.items() if k not in ("bigrams", "trigrams")},
             {k: v for k, v in cpu.items() if k not in ("bigrams", "trigrams")}, rtol=0.05)


@CUDA
def test_lens_moves_no_vocabulary_sized_tensor_to_the_host():
    """The iterative lens on CUDA: its results are CUDA tensors (before, logits were copied to the host twice)."""
    gm = _movable().to("cuda")
    lens = L.iterative_lens(gm, tokens().cuda(), 1)
    assert lens.row_logits.is_cuda and lens.logits.data_ptr() == lens.row_logits.data_ptr()


# ---------------------------------------------------------------------------------------------
# device bookkeeping on the CPU: the meta device stands in for a GPU


def test_expansion_built_on_another_device_keeps_every_constant_there():
    """The issue's crash (`index is on cpu, different from other tensors on cuda:0`): constants made
    while expanding (indices, jet weights, centers, interpolation points) follow the model's device."""
    gm = _movable()
    center = torch.randn(32)  # a user's center, given on the CPU
    gm.to("meta")
    ids = tokens().to("meta")
    ex = jetfx.expand(gm, 1, paths=P.max_blocks(1))
    sx = jetfx.expand(gm, 2, split=True, paths=SPLIT)
    step = jetfx.jet_expand(gm, "decoder", [jetfx.stream(gm, 0), center], 1).compile()
    for module in (ex, sx, step):
        stray = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type != "meta"]
        assert not stray and not constant_devices(module)
        out = module(ids)
        assert out.stacked.device.type == "meta" and out.stacked.shape[1:] == (2, 6, VOCAB)


def test_expansion_moved_after_expanding_leaves_nothing_behind():
    gm = _movable()
    ex = jetfx.expand(gm, 1, paths=P.max_blocks(1) & P.only_kinds("mlp"))
    sx = jetfx.expand(gm, 1, split=True, paths=SPLIT)
    for module in (ex, sx):
        module.to("meta")
        assert all(t.device.type == "meta" for t in _tensors(module)) and not constant_devices(module)
        assert module(tokens().to("meta")).remainder.device.type == "meta"


def test_lenses_run_where_the_model_is():
    gm = _movable().to("meta")
    ids = tokens().to("meta")
    for lens in (L.iterative_lens(gm, ids, 2), L.joint_lens(gm, ids, 1, weights="uniform"),
                 L.joint_lens(gm, ids, 1, weights="optimized", steps=5)):
        fields = (lens.row_logits, lens.logits, lens.model_logits, lens.weights, lens.cosine, lens.agreement)
        assert all(t.device.type == "meta" for t in fields)
    assert len(lens.loss_curve) == 6  # one transfer at the end (nan on meta: no values)


def test_lens_results_are_the_same_tensors_the_model_made():
    """No copies: the iterative lens's logits are its row logits; pictures reduce before moving."""
    _, gm = traced("llama")
    lens = L.iterative_lens(gm, tokens(), 1)
    assert lens.logits.data_ptr() == lens.row_logits.data_ptr()
    top = lens.top(3)
    assert len(top) == lens.row_logits.shape[0] and len(top[0][0]) == 3
    assert top[0][0][0][2] == pytest.approx(float(lens.row_logits[0, 0, 0].max()))


# ---------------------------------------------------------------------------------------------
# half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_jets_are_computed_in_float32(dtype):
    """A bf16/fp16 model traces (its check allows the dtype's rounding), and its jets are computed in
    float32: the paths agree with float64 jets of the same weights to the model's own rounding
    (about eps of its dtype, from its stream values), and Σ paths + remainder = logits to float32."""
    model, gm = traced("llama", dtype)
    assert gm.jetfx.dtype == dtype and jet_dtype(gm) == torch.float32
    g64 = jetfx.trace(model, tokens(), dtype=torch.float64)  # float64 graph, float64 jets
    assert jet_dtype(g64) == torch.float64
    with torch.no_grad():
        ref = jetfx.expand(g64, 1, paths=P.max_blocks(1))(tokens())
    assert ref.stacked.dtype == torch.float64 and ref.relative_error() < 1e-12
    eps = torch.finfo(dtype).eps

    def errors(out):  # per path: max |path − float64 path| / max |float64 path|
        return (out.stacked.double() - ref.stacked).abs().amax(dim=(1, 2, 3)) / ref.stacked.abs().amax(dim=(1, 2, 3))

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", ExactnessWarning)
        out = jetfx.expand(gm, 1, paths=P.max_blocks(1))(tokens())
    assert out.stacked.dtype == out.remainder.dtype == torch.float32 and out.logits.dtype == dtype
    assert out.relative_error() < 1e-6  # the identity holds in float32, far inside the model's precision
    assert float(errors(out).max()) < 2 * eps
    # the same jets computed in the model's own dtype: the identity only holds to the dtype's rounding,
    # and the paths are further from float64
    gm.jetfx.jet_dtype = dtype
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", ExactnessWarning)
            low = jetfx.expand(gm, 1, paths=P.max_blocks(1))(tokens())
    finally:
        gm.jetfx.jet_dtype = None
    assert low.stacked.dtype == dtype
    assert low.relative_error() > eps / 8
    assert float(errors(low).median()) >= float(errors(out).median())


def test_jet_dtype_is_chosen_at_trace_time_or_later():
    from tiny_models import LinearResNet

    small = LinearResNet()
    assert jet_dtype(jetfx.trace(small, torch.tensor([[1, 2]]), jet_dtype=torch.float64)) == torch.float64
    with pytest.raises(jetfx.errors.InputError, match="jet_dtype"):
        jetfx.trace(small, torch.tensor([[1, 2]]), jet_dtype=torch.int32)
    _, gm = traced("llama", torch.bfloat16)
    gm.jetfx.jet_dtype = torch.float64
    try:
        with torch.no_grad():
            out = jetfx.expand(gm, 1, paths="embed")(tokens())
        lens = L.iterative_lens(gm, tokens(), 1)
    finally:
        gm.jetfx.jet_dtype = None
    assert out.stacked.dtype == torch.float64
    assert lens.row_logits.dtype == torch.bfloat16  # logits in the model's precision, jets in float64


def test_reproduction_check_allows_the_dtype_rounding_only():
    """The check that failed on a bf16 Llama-3-8B (max |Δlogits| = 0.307): judged relative to the dtype."""
    from jetfx.tracing import _check_reproduces, reproduction_tolerance

    assert reproduction_tolerance(torch.float32) == reproduction_tolerance(torch.float64) == 1e-4
    assert reproduction_tolerance(torch.bfloat16) == pytest.approx(0.0884, rel=1e-3)
    eager = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(0)) * 3
    scale = float(eager.abs().max())
    off = eager + 0.03 * scale  # rounding-sized for bf16, a wrong graph for float32
    assert _check_reproduces(torch.nn.Identity(), eager.bfloat16(), off.bfloat16(), True) > 0
    with pytest.raises(TraceError, match="float32 rounding explains"):
        _check_reproduces(torch.nn.Identity(), eager, off, True)
    with pytest.raises(TraceError, match="does not reproduce"):
        _check_reproduces(torch.nn.Identity(), eager.bfloat16(), (eager + 0.5 * scale).bfloat16(), True)


def test_compute_region_casts_weights_as_it_reads_them():
    """Jets of a bf16 block in float32 without a float32 copy of its weights."""
    from jetfx.functions import block_region, compute_region

    _, gm = traced("llama", torch.bfloat16)
    for name in ("layers.0.mlp", "layers.1.self_attn"):
        region = block_region(gm, name)
        fp32 = compute_region(region, torch.float32)
        assert compute_region(region, torch.float32) is fp32 and compute_region(region, torch.bfloat16) is region
        assert {p.dtype for p in fp32.module.parameters()} == {torch.bfloat16}  # the model's own weights, shared
        assert {id(p) for p in fp32.module.parameters()} <= {id(p) for p in gm.parameters()}
        side = [v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for v in jetfx.functions.capture(gm, tokens(), region.side_inputs).values()]
        x = torch.randn(2, 6, 32)
        with torch.no_grad():
            got = fp32.module(x, *side)
            want = jetfx.passes.cast_floating(copy.deepcopy(region.module), torch.float32)(x, *side)  # weights converted
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# compiled execution


def test_compiled_expansion_equals_eager_and_keeps_interventions():
    _, gm = traced("llama")
    ex = jetfx.expand(gm, 1, paths=P.max_blocks(1))
    ids = tokens()
    with torch.no_grad():
        eager = ex(ids)
        assert ex.compile(backend="aot_eager") is ex and ex.compiled
        fast = ex(ids)
        again = ex(tokens(3, 5))  # a new shape compiles again
        torch.testing.assert_close(fast.stacked, eager.stacked)
        torch.testing.assert_close(fast.remainder, eager.remainder)
        assert again.stacked.shape == (len(ex.path_names), 3, 5, VOCAB)
        with ex.ablate("embed"):  # hooks run eagerly: the ablation is never skipped
            assert float(ex(ids)["embed"].abs().max()) == 0.0
        with pytest.raises(jetfx.errors.InputError, match="outside the vocabulary"):
            ex(torch.tensor([[1, VOCAB + 3]]))  # ids are checked before the compiled code runs
        assert ex.compile(False) is ex and not ex.compiled


@pytest.mark.slow
def test_compiled_expansion_with_inductor_equals_eager():
    """torch.compile's default backend (C++ code on a CPU; slow to compile on 2 cores)."""
    from tiny_models import TwoBlockToy

    model = TwoBlockToy()
    ids = torch.randint(0, 13, (2, 4), generator=torch.Generator().manual_seed(0))
    ex = jetfx.expand(jetfx.trace(model, ids), 1)
    with torch.no_grad():
        eager = ex(ids)
        fast = ex.compile(dynamic=False)(ids)
    torch.testing.assert_close(fast.stacked, eager.stacked, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the GPU benchmark, on the CPU


def _bench():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_gpu_runs_on_the_cpu(tmp_path):
    bench = _bench()
    result = bench.main(["--device", "cpu", "--shape", "tiny", "--tokens", "8", "--repeat", "1", "--steps", "5",
                         "--no-compile", "--out", str(tmp_path / "bench.json")])
    feats = result["features"]
    for name in ("forward", "iterative_lens_k1", "iterative_lens_k2", "joint_lens_k1_uniform",
                 "joint_lens_k1_optimized", "expansion_k1", "split_expansion_k1", "bigrams"):
        assert feats[name]["ratio"] > 0 and feats[name]["peak_bytes"] is None, name
    assert set(result["targets"]) == {*bench.TARGETS, "memory"}
    assert all(t["met"] is None for t in result["targets"].values())  # judged on a GPU only
    assert (tmp_path / "bench.json").exists()


@CUDA
def test_bench_gpu_runs_on_cuda(tmp_path):
    """The benchmark's small shape on the GPU, compiled expansion included: every feature, its peak memory."""
    bench = _bench()
    result = bench.main(["--device", "cuda", "--shape", "tiny", "--repeat", "2", "--steps", "20",
                         "--out", str(tmp_path / "bench.json")])
    feats = result["features"]
    assert all(isinstance(f.get("peak_bytes"), int) for f in feats.values())
    assert feats["compiled_expansion_k1"]["max_difference_to_eager"] < 1e-4
    assert all(t["met"] is not None for t in result["targets"].values())
