"""Trace a model into an ATen-level torch.fx GraphModule and find its residual structure.

`trace` runs torch.export (non-strict) with dynamic batch and sequence dimensions, checks that
the exported graph reproduces the model's logits, makes the graph device-agnostic, and runs
residual analysis. Models take token ids (Hugging Face causal LMs, TransformerLens models, any
`forward(tokens) -> logits`) or float tensors (a ViT's pixels, a residual MLP's features: give
example inputs; the decoder is whatever follows the last residual addition). `as_traced` accepts
GraphModules made by `torch.fx.symbolic_trace` or `torch.export` and re-exports them. The
returned GraphModule carries two extra attributes:

- `gm.residual`: the `ResidualStructure` (encoder, blocks, decoder);
- `gm.jetfx`: a `TraceInfo` (model name, vocabulary, context length, tokenizer, …).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from . import passes
from .errors import InputError, JetfxError, StructureError, TraceError
from .structure import ResidualStructure

_INT_DTYPES = {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


@dataclass
class TraceInfo:
    """What jetfx knows about a traced model besides its graph."""

    model_name: str
    architecture: str
    vocab_size: int  # width of the logits
    embedding_size: int | None  # rows of the token embedding (valid token ids are below it)
    max_length: int | None  # longest token sequence the model accepts, when known
    dtype: torch.dtype
    tokenizer: Any = field(default=None, repr=False)
    tied_embeddings: bool | None = None
    max_abs_error: float = 0.0  # |traced - eager| on the check tokens
    token_input: str = "ids"
    specialized_length: int | None = None  # the one sequence length the graph accepts, if export fixed it
    input_kind: str = "tokens"  # "tokens" (integer ids) or "float" (any floating tensors)
    example_inputs: tuple = field(default=(), repr=False)  # ((shape, dtype), …) of float inputs
    jet_dtype: torch.dtype | None = None  # precision of jets (None: float32 for half models, else `dtype`)
    relative_error: float = 0.0  # max_abs_error / max(1, max |logits|): what the check compares


def _logits(out):
    """The logits in a model's output: `.logits`, the first of a tuple, `["logits"]`, or itself."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0] if out else None
    if isinstance(out, dict):
        return out.get("logits")
    return out


class _LogitsOf(torch.nn.Module):
    """forward(ids) -> logits, for Hugging Face causal LMs and plain modules alike."""

    def __init__(self, model: torch.nn.Module, hf: bool):
        super().__init__()
        self.model = model
        self.hf = hf

    def forward(self, ids):
        if self.hf:
            return _logits(self.model(input_ids=ids, use_cache=False))
        return _logits(self.model(ids))


class _OutputOf(torch.nn.Module):
    """forward(*inputs) -> logits for modules of float inputs (the first input feeds the stream)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return _logits(self.model(*inputs))


def _is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _lens_config(model):
    """The config of a TransformerLens model (HookedTransformer, TransformerBridge): it has `cfg`
    with `d_vocab` and `n_ctx`. Duck-typed: transformer_lens need not be installed."""
    cfg = getattr(model, "cfg", None)
    if isinstance(getattr(cfg, "d_vocab", None), int) and isinstance(getattr(cfg, "n_ctx", None), int):
        return cfg
    return None


def _model_name(model, hf: bool) -> str:
    if hf:
        name = getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        return name or type(model).__name__
    cfg = _lens_config(model)
    name = getattr(cfg, "model_name", None)
    return name if isinstance(name, str) and name else type(model).__name__


def _max_length(model, hf: bool) -> int | None:
    if not hf:
        cfg = _lens_config(model)
        return cfg.n_ctx if cfg is not None and cfg.n_ctx > 0 else None
    for key in _CONTEXT_KEYS:
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _embedding_rows(model) -> int | None:
    cfg = _lens_config(model)
    if cfg is not None and cfg.d_vocab > 0:  # TransformerLens embeds with a plain parameter W_E
        return cfg.d_vocab
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
            if isinstance(emb, torch.nn.Embedding):
                return emb.num_embeddings
        except (NotImplementedError, AttributeError):
            pass
    embs = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    return embs[0].num_embeddings if embs else None


class PaddingWarning(UserWarning):
    """A batch looks left-padded: jetfx graphs take no attention mask, so the padding is attended to."""


def _from_encoding(encoding) -> torch.Tensor:
    """input_ids of a tokenizer's output (BatchEncoding or dict), refusing left padding.

    jetfx graphs take no attention mask. For a causal model right padding is harmless: the logits at
    the real tokens do not depend on the tokens after them. Left padding is not: the real tokens
    would attend to the padding.
    """
    ids = encoding["input_ids"]
    ids = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids)
    mask = encoding.get("attention_mask")
    if mask is None:
        return ids
    mask = torch.as_tensor(mask).reshape(ids.shape).bool()
    if ids.dim() == 2 and bool((~mask[:, :-1] & mask[:, 1:]).any()):
        raise InputError("this batch is left-padded (its attention mask has padding before real tokens): jetfx graphs "
                         "take no attention mask, so the real tokens would attend to the padding. Pad on the right "
                         "(tokenizer(texts, padding=True, padding_side='right')): a causal model's logits at the real "
                         "tokens do not depend on the padding after them")
    return ids


def check_padding(ids: torch.Tensor, tokenizer) -> None:
    """Warn when rows of a batch start with the pad token while others do not (left padding)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None or pad == getattr(tokenizer, "bos_token_id", None) or ids.dim() != 2 or ids.shape[0] < 2:
        return
    starts = ids[:, 0] == pad
    if bool(starts.any()) and not bool(starts.all()):
        rows = starts.nonzero().flatten().tolist()
        warnings.warn(f"rows {rows[:5]} of this batch start with the pad token (id {pad}): they look left-padded. "
                      "jetfx graphs take no attention mask, so their real tokens attend to the padding and their "
                      "logits change; pad on the right instead (padding_side='right')", PaddingWarning, stacklevel=3)


def as_tokens(tokens, tokenizer=None, *, vocab_size: int | None = None, max_length: int | None = None) -> torch.Tensor:
    """Turn text, a list of ids, a tensor or a tokenizer's output into a (batch, seq) int64 tensor, with clear
    errors. A tokenizer's output may be padded on the right (causal models ignore what follows a token)."""
    if not isinstance(tokens, (str, list, tuple, torch.Tensor)) and hasattr(tokens, "keys") and "input_ids" in tokens:
        tokens = _from_encoding(tokens)
    if isinstance(tokens, str):
        if tokenizer is None:
            raise InputError("tokens were given as text but no tokenizer is known: pass tokenizer=... "
                             "or token ids as a tensor")
        if not tokens.strip():
            raise InputError("the text is empty: give at least one word to tokenize")
        ids = tokenizer(tokens, return_tensors="pt")["input_ids"]
    elif isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, str) for t in tokens):
        if tokenizer is None:
            raise InputError("tokens were given as texts but no tokenizer is known: pass tokenizer=...")
        rows = [tokenizer(t)["input_ids"] for t in tokens]
        if any(len(r) == 0 for r in rows):
            raise InputError("one of the texts is empty: give at least one word in each")
        if len({len(r) for r in rows}) != 1:
            raise InputError(f"texts of different token lengths ({[len(r) for r in rows]}) cannot form one batch "
                             "without padding; pass tokenizer(texts, padding=True, padding_side='right', "
                             "return_tensors='pt') instead (right padding leaves a causal model's logits at the real "
                             "tokens unchanged), or one text at a time")
        ids = torch.tensor(rows)
    elif isinstance(tokens, (list, tuple)):
        try:
            ids = torch.tensor(tokens)
        except (TypeError, ValueError) as e:
            raise InputError(f"cannot read token ids from {type(tokens).__name__}: {e}") from None
    elif isinstance(tokens, torch.Tensor):
        ids = tokens
    else:
        raise InputError(f"tokens must be text, a list of ids or an integer tensor, got {type(tokens).__name__}")
    if ids.dtype not in _INT_DTYPES:
        raise InputError(f"token ids must be integers, got a tensor of dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise InputError(f"token ids must have shape (seq,) or (batch, seq), got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise InputError(f"no tokens: the id tensor has shape {tuple(ids.shape)}")
    if max_length is not None and ids.shape[1] > max_length:
        raise InputError(f"{ids.shape[1]} tokens are more than the model's context of {max_length}; "
                         "shorten the text")
    if tokenizer is not None and ids.device.type != "meta":
        check_padding(ids, tokenizer)
    if vocab_size is not None and ids.device.type != "meta":  # meta tensors have no values to check
        lo, hi = torch.stack([ids.min(), ids.max()]).tolist()  # one device → host transfer, not two
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, {vocab_size}); "
                             "was the text tokenized with another model's tokenizer?")
    return ids.long()


@torch.fx.node.has_side_effect
def check_tokens(ids, vocab_size, max_length, length=None):
    """Graph-level guard: bad token tensors get a clear error, not an index error deep in torch
    (nor torch's guard assertion when the graph was specialised to one sequence length).
    (Skipped inside torch.compile, whose graphs cannot read values: `ExpandedModule.compile` checks
    the ids before running the compiled code.)"""
    if torch.compiler.is_compiling():
        return
    as_tokens(ids, vocab_size=vocab_size, max_length=max_length)
    if length is not None and ids.shape[-1] != length:
        raise InputError(f"this graph was specialised to sequences of {length} tokens (torch.export could not "
                         f"export the model for dynamic lengths), got {ids.shape[-1]}; trace the model again "
                         "with tokens of the length you want to analyse")


def _export(wrapper: torch.nn.Module, example: torch.Tensor):
    from torch.export import Dim

    return torch.export.export(wrapper, (example,), dynamic_shapes={"ids": {0: Dim.AUTO, 1: Dim.AUTO}}, strict=False)


def _is_dynamic(ep, dims=(0, 1)) -> bool:
    ph = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "ids"]
    if not ph:
        ph = [n for n in ep.graph.nodes if n.op == "placeholder"][-1:]
    v = ph[0].meta.get("val") if ph else None

    def free(size):  # a SymInt export did not replace by a constant
        return isinstance(size, torch.SymInt) and bool(getattr(size.node.expr, "free_symbols", ()))

    return v is not None and all(free(v.shape[d]) for d in dims)


def _export_static_length(wrapper: torch.nn.Module, ids: torch.Tensor):
    """The fallback when torch.export refuses a dynamic sequence length (state-space scans unroll
    over it): the length of `ids` is fixed, the batch stays dynamic where export allows it."""
    from torch.export import Dim

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(wrapper, (ids,), dynamic_shapes={"ids": {0: Dim.AUTO, 1: Dim.STATIC}}, strict=False)
        except Exception:  # noqa: BLE001 - then fully static
            return torch.export.export(wrapper, (ids,), strict=False)


def _summarize(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = " ".join(lines[:3]) if lines else type(e).__name__
    return f"{type(e).__name__}: {text[:600]}"


def _float_inputs(inputs) -> tuple[torch.Tensor, ...] | None:
    """Inputs that are not token ids: a floating tensor, or a tuple of tensors led by one."""
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        return (inputs,)
    if (isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs)
            and inputs[0].is_floating_point()):
        return tuple(inputs)
    return None


def trace(model: torch.nn.Module, inputs=None, *, tokenizer=None, dtype: torch.dtype | None = None,
          jet_dtype: torch.dtype | None = None, check: bool = True) -> fx.GraphModule:
    """Export `model` (inputs → logits) into an ATen GraphModule with residual analysis.

    `model` is a Hugging Face causal LM (called with `use_cache=False`, logits taken), a
    TransformerLens model, or any module whose `forward(tokens)` returns logits; `inputs` (text
    with `tokenizer`, ids, or a tensor) are used to check that the graph reproduces the model.
    A module of float inputs (a ViT, a residual MLP) is traced from example `inputs`: a floating
    tensor or a tuple of tensors whose first one feeds the residual stream. `dtype` converts the
    traced graph (not the model) to another floating precision, casts included (float64 for analysis).
    `jet_dtype` is the precision jets are computed in (default: float32 for a bfloat16/float16 model,
    the model's dtype otherwise; see docs/devices.md); `gm.jetfx.jet_dtype` can be changed later.

    The graph runs where the model's weights are (a model on a GPU is traced there) and moves with
    `gm.to(...)`. The check that the graph reproduces the model allows the rounding of the model's
    own dtype (`reproduction_tolerance`): a bfloat16 graph and model round differently.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"jetfx.trace needs a torch.nn.Module, got {type(model).__name__}")
    jet_dtype = _check_jet_dtype(jet_dtype)
    floats = _float_inputs(inputs)
    if floats is not None:
        gm = _trace_float(model, floats, dtype=dtype, check=check)
        gm.jetfx.jet_dtype = jet_dtype
        return gm
    hf = _is_hf_model(model)
    if tokenizer is None and hasattr(model, "_jetfx_tokenizer"):
        tokenizer = model._jetfx_tokenizer
    if tokenizer is None and _lens_config(model) is not None and callable(getattr(model, "tokenizer", None)):
        tokenizer = model.tokenizer
    embedding_rows = _embedding_rows(model)
    max_length = _max_length(model, hf)
    check_ids = None
    if inputs is not None:
        check_ids = as_tokens(inputs, tokenizer, vocab_size=embedding_rows, max_length=max_length)

    wrapper = _LogitsOf(model, hf)
    was_training = _eval_mode(model)
    try:
        vocab_hi = embedding_rows or 2
        gen = torch.Generator().manual_seed(0)
        ep, last_error = None, None
        for shape in ((2, 7), (3, 11)):
            length = min(shape[1], max_length) if max_length else shape[1]
            example = torch.randint(0, vocab_hi, (shape[0], max(2, length)), generator=gen)
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            example = example.to(device)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    candidate = _export(wrapper, example)
            except Exception as e:  # noqa: BLE001 - any export failure becomes a clear TraceError
                last_error = e
                break
            if _is_dynamic(candidate):
                ep = candidate
                break
            last_error = RuntimeError("export fixed the batch or sequence length to the example's (the forward "
                                      "loops over positions or branches on the length)")
        dynamic_error = last_error
        specialized = None
        if ep is None and last_error is not None:
            # dynamic lengths refused (state-space and hybrid models): specialise to the given tokens
            fixed = check_ids.to(example.device) if check_ids is not None else example
            try:
                candidate = _export_static_length(wrapper, fixed)
            except Exception as e:  # noqa: BLE001 - reported below, after the dynamic attempt's error
                last_error = e
                candidate = None
            if candidate is not None:
                ep, example, specialized = candidate, fixed, int(fixed.shape[1])
                warnings.warn(
                    f"torch.export could not export {type(model).__name__} for dynamic sequence lengths "
                    f"({_summarize(dynamic_error)}); the graph is specialised to {specialized} tokens: "
                    "expansions and lenses accept only that length (trace again for another)", stacklevel=2)
        if ep is None:
            err = TraceError(
                f"torch.export could not export {type(model).__name__} as a function of token ids: "
                f"{_summarize(last_error)}. jetfx needs forward(tokens) -> logits to be exportable with "
                "torch.export(strict=False) and dynamic batch/sequence sizes; data-dependent Python "
                "control flow on token values is the usual cause (a static-length export was tried as well; "
                "a model of float inputs: pass example inputs as a float tensor)"
            )
            err.export_error = last_error
            raise err
        gm = _module_of(ep, model)
        if passes.has_mutations(gm):  # writes into slices of buffers (chunked scans): make data flow explicit
            gm = _module_of(ep.run_decompositions({}), model)
        range_max = _range_max(ep)
        if range_max is not None:
            max_length = min(max_length, range_max) if max_length else range_max

        with torch.no_grad():
            probe = check_ids if check_ids is not None else example
            probe = probe.to(example.device)
            eager = wrapper(probe)
            traced = gm(probe)
        _check_output(model, eager)
        if eager.dim() < 2:
            raise TraceError(f"{type(model).__name__}(tokens) did not return logits of shape (batch, seq, vocab)")
        err = _check_reproduces(model, eager, traced, check)
        vocab_size = eager.shape[-1]
    finally:
        if was_training:
            model.train()  # only reached for modules that could be put in eval mode

    passes.clean(gm)
    passes.make_device_agnostic(gm)
    if dtype is not None:
        passes.cast_floating(gm, dtype)
    try:
        structure = passes.find_residual_structure(gm, strip_prefix="model.")
    except JetfxError:
        raise
    except Exception as e:  # noqa: BLE001 - a graph residual analysis cannot read: said, not a stack trace
        raise StructureError(f"residual analysis of {type(model).__name__} failed: {type(e).__name__}: {e}; "
                             "this is a bug in jetfx, please report it with the model") from e
    _insert_token_check(gm, embedding_rows or vocab_size, max_length, specialized)
    out_dtype = eager.dtype if dtype is None else dtype
    gm.residual = structure
    gm.jetfx = TraceInfo(
        model_name=_model_name(model, hf),
        architecture=type(model).__name__,
        vocab_size=vocab_size,
        embedding_size=embedding_rows,
        max_length=max_length,
        dtype=out_dtype,
        tokenizer=tokenizer,
        tied_embeddings=_tied(model, hf),
        max_abs_error=err,
        token_input=structure.encoder.input,
        specialized_length=specialized,
        jet_dtype=jet_dtype,
        relative_error=_relative(err, eager),
    )
    return gm


def _check_jet_dtype(dtype):
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InputError(f"jet_dtype must be a floating torch.dtype (torch.float32, torch.float64, …), got {dtype!r}")
    return dtype


def _module_of(ep, model) -> fx.GraphModule:
    """`ep.module()`, whose code generation fails on parameters reached through a submodule named
    like a Python keyword (TransformerBridge's `mlp.in`): a TraceError that names it."""
    try:
        return ep.module()
    except SyntaxError as e:
        import keyword

        bad, stack = set(), [model]
        while stack:  # through `_modules`: wrappers like TransformerBridge hide some from named_modules()
            m = stack.pop()
            bad |= {name for name in m._modules if keyword.iskeyword(name)}
            stack.extend(c for c in m._modules.values() if c is not None)
        why = (f"submodules named like Python keywords ({', '.join(repr(b) for b in sorted(bad))}) break the code "
               "torch generates for it. Rename them, or trace the model they wrap") if bad else f"{e.msg} in the code torch generated"
        raise TraceError(f"torch.export exported {type(model).__name__} but could not rebuild a module from the "
                         f"program: {why}") from None


def _eval_mode(model: torch.nn.Module) -> bool:
    """Put `model` in eval mode; True if it was training. (`ExportedProgram.module()` refuses
    `.eval()`: its graph is already fixed, so it is left as it is.)"""
    was_training = model.training
    try:
        model.eval()
    except NotImplementedError:
        return False
    return was_training


def _check_output(model, eager) -> None:
    if not isinstance(eager, torch.Tensor) or not eager.is_floating_point():
        got = "None" if eager is None else type(eager).__name__
        if isinstance(eager, torch.Tensor):
            got = f"a {eager.dtype} tensor"
        raise TraceError(f"{type(model).__name__} returned {got}, not logits: jetfx expands a module whose output "
                         "(or its `.logits`, or the first element of a returned tuple) is a floating tensor")


def exactness_tolerance(dtype: torch.dtype) -> float:
    """Largest relative error of Σ paths + remainder that rounding in `dtype` explains: √eps.

    (Here, below the expanded module, because the trace's own check uses it for half precision.)"""
    return float(torch.finfo(dtype).eps) ** 0.5 if dtype.is_floating_point else 0.0


def reproduction_tolerance(dtype: torch.dtype) -> float:
    """Largest max |traced − eager| / max(1, max |logits|) that rounding in `dtype` explains.

    The exported graph runs the same ops as the model, but not always in the same order or with the
    same fused kernels, so the two round differently: by about eps of the dtype per op, accumulated
    over the layers. 1e-4 in float32 and float64 (as before: a wrong graph misses by O(1)); √eps of
    a half-precision dtype (0.088 in bfloat16, 0.031 in float16), the tolerance jetfx uses for the
    exactness of expansions too (`exactness_tolerance`)."""
    return exactness_tolerance(dtype) if dtype in (torch.float16, torch.bfloat16) else 1e-4


def _relative(err: float, eager: torch.Tensor) -> float:
    if eager.device.type == "meta" or err != err:
        return float("nan")
    return err / max(1.0, float(eager.float().abs().max()))


def _check_reproduces(model, eager, traced, check: bool) -> float:
    if eager.device.type == "meta":  # no values to compare (device bookkeeping checks trace on meta)
        return float("nan")
    err, scale = (t.item() for t in torch.stack([(traced.float() - eager.float()).abs().max(),
                                                    eager.float().abs().max()]).cpu())
    tol = reproduction_tolerance(eager.dtype)
    if check and not err <= tol * max(1.0, scale):  # `not <=`: a nan error fails too
        dtype = str(eager.dtype).replace("torch.", "")
        raise TraceError(f"the exported graph does not reproduce {type(model).__name__}: max |Δlogits| = {err:.3g}, "
                         f"more than the {tol:.1e} × max(1, max |logits| = {scale:.3g}) that {dtype} rounding explains; "
                         "pass check=False to trace anyway")
    return err


def _trace_float(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], *, dtype, check: bool) -> fx.GraphModule:
    """`trace` for modules of float inputs: every dimension exported as Dim.AUTO (the ones tied to
    weights become static), from the example doubled along the batch when its batch is 1."""
    from torch.export import Dim

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = tuple(t.to(device) for t in inputs)
    if any(t.dim() == 0 for t in inputs):
        raise InputError("example inputs need a batch dimension: got a 0-dimensional tensor")
    example = inputs
    if all(t.shape[0] == 1 for t in inputs):  # a batch of 1 would specialize the batch size to 1
        example = tuple(torch.cat([t, t]) for t in inputs)
    wrapper = _OutputOf(model)
    was_training = _eval_mode(model)
    try:
        dims = (tuple({i: Dim.AUTO for i in range(t.dim())} for t in example),)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(wrapper, example, dynamic_shapes=dims, strict=False)
        except Exception as e:  # noqa: BLE001 - any export failure becomes a clear TraceError
            err = TraceError(f"torch.export could not export {type(model).__name__} on inputs of shapes "
                             f"{[tuple(t.shape) for t in example]}: {_summarize(e)}. jetfx needs forward(*inputs) to "
                             "be exportable with torch.export(strict=False)")
            err.export_error = e
            raise err from None
        gm = _module_of(ep, model)
        with torch.no_grad():
            eager = wrapper(*inputs)
            _check_output(model, eager)
            traced = gm(*inputs)
        err = _check_reproduces(model, eager, traced, check)
    finally:
        if was_training:
            model.train()  # only reached for modules that could be put in eval mode
    passes.clean(gm)
    passes.make_device_agnostic(gm)
    if dtype is not None:
        passes.cast_floating(gm, dtype)
    structure = passes.find_residual_structure(gm, strip_prefix="model.")
    gm.residual = structure
    gm.jetfx = TraceInfo(
        model_name=_model_name(model, _is_hf_model(model)),
        architecture=type(model).__name__,
        vocab_size=eager.shape[-1] if eager.dim() else 1,
        embedding_size=None,
        max_length=None,
        dtype=eager.dtype if dtype is None else dtype,
        max_abs_error=err,
        relative_error=_relative(err, eager),
        token_input=structure.encoder.input,
        input_kind="float",
        example_inputs=tuple((tuple(t.shape), t.dtype) for t in inputs),
    )
    return gm


def _tied(model, hf: bool) -> bool | None:
    if not hf:
        return None
    try:
        return model.get_input_embeddings().weight is model.get_output_embeddings().weight
    except AttributeError:
        return None


def _range_max(ep) -> int | None:
    """Largest sequence length the exported graph accepts, when export bounded it."""
    try:
        ph = [n for n in ep.graph.nodes if n.op == "placeholder"][-1]
        sym = ph.meta["val"].shape[1]
        vr = ep.range_constraints.get(sym.node.expr)
        upper = vr.upper if vr is not None else None
        return int(upper) if upper is not None and upper.is_finite else None
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _insert_token_check(gm: fx.GraphModule, vocab_size: int, max_length: int | None, length: int | None = None) -> None:
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(ph):
        gm.graph.call_function(check_tokens, (ph, vocab_size, max_length, length))
    gm.recompile()


def as_traced(module, example_inputs=None) -> fx.GraphModule:
    """`module` ready to expand: as is when `jetfx.trace` made it; a `torch.fx.GraphModule` (from
    `torch.fx.symbolic_trace` or `ExportedProgram.module()`) or a `torch.export.ExportedProgram` is
    re-exported by `trace`, and any other model traced. `example_inputs` are needed for float inputs the graph does not record
    (symbolic_trace graphs carry no shapes); token models are traced from token ids of their own."""
    if isinstance(getattr(module, "residual", None), ResidualStructure) and isinstance(getattr(module, "jetfx", None), TraceInfo):
        return module
    made_here = isinstance(module, torch.export.ExportedProgram)
    if made_here:
        module = module.module()
    if not isinstance(module, torch.nn.Module):
        raise TraceError(f"expected a model, a module made by jetfx.trace, a torch.fx.GraphModule or a torch.export "
                         f"program, got {type(module).__name__}")
    if not isinstance(module, fx.GraphModule):
        return trace(module, example_inputs)
    nodes = list(module.graph.nodes)
    outputs = [n for n in nodes if n.op == "output"]
    returned = outputs[0].args[0] if outputs else None
    if returned is None or (isinstance(returned, (tuple, list, dict)) and not returned):
        raise TraceError("the graph has no output to expand: it returns nothing (add `return logits` to its forward, "
                         "or an output node to the graph)")
    if not any(n.op == "placeholder" for n in nodes):
        raise TraceError("the graph has no input: jetfx expands functions of tokens or of float tensors")
    if _is_exported(module):  # already an ATen graph with module names: analysed as it is
        return _trace_program(copy.deepcopy(module) if not made_here else module, example_inputs)
    if example_inputs is None:
        example_inputs = _example_from_graph(module)
    return trace(module, example_inputs)


def _is_exported(gm: fx.GraphModule) -> bool:
    """Made by torch.export: ATen ops that remember the modules they came from."""
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and "nn_module_stack" in n.meta
               for n in gm.graph.nodes)


def _trace_program(gm: fx.GraphModule, example_inputs=None) -> fx.GraphModule:
    """`trace`'s analysis of a graph torch.export already made (no re-export: its names stay)."""
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    v = ph[0].meta.get("val")
    tokens = isinstance(v, torch.Tensor) and v.dtype in _INT_DTYPES
    if tokens and not all(isinstance(d, torch.SymInt) for d in v.shape[:2]):
        raise TraceError(f"this torch.export program takes token ids of the fixed shape {tuple(v.shape)}: jetfx needs "
                         "dynamic batch and sequence sizes. Export it with dynamic_shapes={'ids': {0: Dim.AUTO, "
                         "1: Dim.AUTO}} (from an example of batch ≥ 2 and length ≥ 2), or give jetfx.trace the model")
    if example_inputs is None:
        example_inputs = _example_from_graph(gm, tokens_too=True)
    example = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with torch.no_grad():
        out = _logits(gm(*example))
    _check_output(gm, out)
    passes.clean(gm)
    passes.make_device_agnostic(gm)
    structure = passes.find_residual_structure(gm)
    rows = _embedding_rows_in_graph(gm, ph[0])
    if tokens:
        _insert_token_check(gm, rows or out.shape[-1], None)
    gm.residual = structure
    gm.jetfx = TraceInfo(
        model_name="ExportedProgram", architecture="ExportedProgram", vocab_size=out.shape[-1] if out.dim() else 1,
        embedding_size=rows if tokens else None, max_length=None, dtype=out.dtype, token_input=structure.encoder.input,
        input_kind="tokens" if tokens else "float",
        example_inputs=() if tokens else tuple((tuple(t.shape), t.dtype) for t in example),
    )
    return gm


def _embedding_rows_in_graph(gm: fx.GraphModule, ids: fx.Node) -> int | None:
    for n in ids.users:
        if n.op == "call_function" and n.target is torch.ops.aten.embedding.default:
            weight = n.args[0]
            if isinstance(weight, fx.Node) and isinstance(weight.meta.get("val"), torch.Tensor):
                return int(weight.meta["val"].shape[0])
    return None


def _example_from_graph(gm: fx.GraphModule, tokens_too: bool = False):
    """Example float inputs from the placeholders' recorded shapes; None for token inputs (zeros
    of the recorded shape with `tokens_too`)."""
    inputs = []
    for ph in (n for n in gm.graph.nodes if n.op == "placeholder"):
        v = ph.meta.get("val", ph.meta.get("tensor_meta"))
        if v is None or not hasattr(v, "shape"):
            inputs.append(None)
            continue
        shape = [int(d.node.hint) if isinstance(d, torch.SymInt) and d.node.hint is not None else
                 (2 if isinstance(d, torch.SymInt) else int(d)) for d in v.shape]
        inputs.append((shape, v.dtype))
    if inputs and inputs[0] is not None and inputs[0][1] in _INT_DTYPES and not tokens_too:
        return None
    if inputs and all(i is not None for i in inputs):
        return tuple(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype) if dtype.is_floating_point
                     else torch.zeros(shape, dtype=dtype) for shape, dtype in inputs)
    if _reads_an_embedding(gm):
        return None
    raise TraceError("this graph records no input shapes (torch.fx.symbolic_trace keeps none) and does not start with "
                     "an embedding of token ids: pass example_inputs=… (a float tensor of the input's shape)")


def _reads_an_embedding(gm: fx.GraphModule) -> bool:
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.Embedding):
            return True
        if n.op == "call_function" and "embedding" in str(n.target):
            return True
    return False


def residual_of(gm: fx.GraphModule) -> ResidualStructure:
    """The residual structure of a traced module, with a clear error for untraced ones."""
    structure = getattr(gm, "residual", None)
    if not isinstance(structure, ResidualStructure):
        raise TraceError("this GraphModule was not made by jetfx.trace (it has no `.residual`); "
                         "call jetfx.trace(model, tokens) first")
    return structure


def info_of(gm: fx.GraphModule) -> TraceInfo:
    info = getattr(gm, "jetfx", None)
    if not isinstance(info, TraceInfo):
        raise TraceError("this GraphModule was not made by jetfx.trace (it has no `.jetfx`); "
                         "call jetfx.trace(model, tokens) first")
    return info
