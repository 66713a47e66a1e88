"""Trace a model into an ATen-level torch.fx GraphModule and find its residual structure.

`trace` runs torch.export (non-strict) with dynamic batch and sequence dimensions, checks that
the exported graph reproduces the model's logits, makes the graph device-agnostic, and runs
residual analysis. The returned GraphModule carries two extra attributes:

- `gm.residual`: the `ResidualStructure` (encoder, blocks, decoder);
- `gm.jetfx`: a `TraceInfo` (model name, vocabulary, context length, tokenizer, …).
"""

from __future__ import annotations

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


class _LogitsOf(torch.nn.Module):
    """forward(ids) -> logits, for Hugging Face causal LMs and plain modules alike."""

    def __init__(self, model: torch.nn.Module, hf: bool):
        super().__init__()
        self.model = model
        self.hf = hf

    def forward(self, ids):
        if self.hf:
            out = self.model(input_ids=ids, use_cache=False)
        else:
            out = self.model(ids)
        if hasattr(out, "logits"):
            return out.logits
        if isinstance(out, (tuple, list)):
            return out[0]
        if isinstance(out, dict):
            return out["logits"]
        return out


def _is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _model_name(model, hf: bool) -> str:
    if hf:
        name = getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        return name or type(model).__name__
    return type(model).__name__


def _max_length(model, hf: bool) -> int | None:
    if not hf:
        return None
    for key in _CONTEXT_KEYS:
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _embedding_rows(model) -> int | None:
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


def as_tokens(tokens, tokenizer=None, *, vocab_size: int | None = None, max_length: int | None = None) -> torch.Tensor:
    """Turn text, a list of ids or a tensor into a (batch, seq) int64 tensor, with clear errors."""
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
            raise InputError("texts of different token lengths cannot form one batch (jetfx uses no "
                             f"padding mask); their lengths are {[len(r) for r in rows]}")
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
    if vocab_size is not None and ids.device.type != "meta":  # meta tensors have no values to check
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, {vocab_size}); "
                             "was the text tokenized with another model's tokenizer?")
    return ids.long()


@torch.fx.node.has_side_effect
def check_tokens(ids, vocab_size, max_length, length=None):
    """Graph-level guard: bad token tensors get a clear error, not an index error deep in torch
    (nor torch's guard assertion when the graph was specialised to one sequence length)."""
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


def trace(model: torch.nn.Module, tokens=None, *, tokenizer=None, dtype: torch.dtype | None = None,
          check: bool = True) -> fx.GraphModule:
    """Export `model` (tokens → logits) into an ATen GraphModule with residual analysis.

    `model` is a Hugging Face causal LM (called with `use_cache=False`, logits taken) or any
    module whose `forward(tokens)` returns logits. `tokens` (text with `tokenizer`, ids, or a
    tensor) are used to check that the graph reproduces the model. `dtype` converts the traced
    graph (not the model) to another floating precision, casts included (float64 for analysis).
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"jetfx.trace needs a torch.nn.Module, got {type(model).__name__}")
    hf = _is_hf_model(model)
    if tokenizer is None and hasattr(model, "_jetfx_tokenizer"):
        tokenizer = model._jetfx_tokenizer
    embedding_rows = _embedding_rows(model)
    max_length = _max_length(model, hf)
    check_ids = None
    if tokens is not None:
        check_ids = as_tokens(tokens, tokenizer, vocab_size=embedding_rows, max_length=max_length)

    wrapper = _LogitsOf(model, hf)
    was_training = model.training
    model.eval()
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
                "control flow on token values is the usual cause (a static-length export was tried as well)"
            )
            err.export_error = last_error
            raise err
        gm = ep.module()
        if passes.has_mutations(gm):  # writes into slices of buffers (chunked scans): make data flow explicit
            gm = ep.run_decompositions({}).module()
        range_max = _range_max(ep)
        if range_max is not None:
            max_length = min(max_length, range_max) if max_length else range_max

        with torch.no_grad():
            probe = check_ids if check_ids is not None else example
            probe = probe.to(example.device)
            eager = wrapper(probe)
            traced = gm(probe)
        if not isinstance(eager, torch.Tensor) or eager.dim() < 2:
            raise TraceError(f"{type(model).__name__}(tokens) did not return logits of shape (batch, seq, vocab)")
        err = float((traced.float() - eager.float()).abs().max())
        scale = float(eager.float().abs().max()) or 1.0
        if check and err > 1e-4 * max(1.0, scale):
            raise TraceError(f"the exported graph does not reproduce {type(model).__name__}: max |Δlogits| = {err:.3g}")
        vocab_size = eager.shape[-1]
    finally:
        if was_training:
            model.train()

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
