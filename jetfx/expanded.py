"""The compiled expansion: an ordinary GraphModule whose output is every path's logits + remainder.

Every path's logits and the remainder pass through an identity module of their own (`ex.hooks`,
a `PathHooks` keyed by path name), so that forward hooks, nnsight and pyvene-style interventions
can read or overwrite one path. The remainder is computed from the paths *before* their hooks:
overwriting a path changes Σ paths + remainder by exactly what was changed, and the model's own
logits (the third output) not at all.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import fx

from .errors import ExactnessWarning, InputError
from .tracing import exactness_tolerance
from .weight_sites import weight_overrides

REMAINDER = "remainder"


@dataclass
class ExpansionOutput:
    """Path logits and the exact remainder: Σ paths + remainder = the model's logits."""

    names: tuple[str, ...]
    stacked: torch.Tensor  # (paths, batch, seq, vocab), in the order of `names`
    remainder: torch.Tensor  # (batch, seq, vocab)
    logits: torch.Tensor  # the model's own logits (batch, seq, vocab)

    @property
    def paths(self) -> dict[str, torch.Tensor]:
        return {n: self.stacked[i] for i, n in enumerate(self.names)}

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.stacked[self.names.index(name)]
        except ValueError:
            raise KeyError(f"no path named {name!r}; paths are {', '.join(self.names[:6])}…") from None

    def total(self) -> torch.Tensor:
        """Σ paths + remainder (equals `logits` up to rounding)."""
        return self.stacked.sum(0) + self.remainder

    def max_error(self) -> float:
        """max |Σ paths + remainder − logits|: the exactness of the rewriting."""
        with torch.no_grad():  # a number, also of outputs that require grad (no autograd warning)
            return float((self.total() - self.logits).abs().max())

    def relative_error(self) -> float:
        """max |Σ paths + remainder − logits| / max(1, max |logits|) (nan if any term is not finite)."""
        with torch.no_grad():
            err = (self.total() - self.logits).abs().max()
            return float(err / self.logits.abs().max().clamp(min=1))

    def check(self) -> float:
        """Warn (ExactnessWarning) when the identity fails beyond the dtype's rounding; returns the relative error.

        The remainder is computed as logits − Σ paths, so the identity only fails by rounding: when the
        path terms are far larger than the logits (high-order jets outside their radius of convergence)
        or not finite. Tolerance: √eps of the dtype (3.5e-4 in float32, 1.5e-8 in float64).
        """
        if self.logits.device.type == "meta":  # no values (device bookkeeping runs on meta)
            return float("nan")
        rel = self.relative_error()  # one device → host transfer per call (`ex.check_exactness = False`: none)
        tol = exactness_tolerance(self.logits.dtype)
        if not rel <= tol:  # also catches nan
            with torch.no_grad():
                biggest = float(self.stacked.abs().amax()) if self.stacked.numel() else 0.0
                scale = float(self.logits.abs().max().clamp(min=1))
            what = (f"the expansion is not exact in {str(self.logits.dtype).replace('torch.', '')}: "
                    f"max |Σ paths + remainder − logits| is {rel:.3g} of the logits' scale (tolerance {tol:.1e}); "
                    f"the path terms reach {biggest:.3g}")
            # rounding loses at most a few eps of the largest term per term summed
            rounding = 1e3 * torch.finfo(self.logits.dtype).eps * max(1.0, biggest / scale) * (len(self.names) + 1)
            if rel != rel or rel <= rounding or biggest != biggest or biggest == float("inf"):
                why = ("so their sum loses the logits to rounding. Use a lower order k, or trace in float64: "
                       "jetfx.trace(model, tokens, dtype=torch.float64)")
            else:
                why = ("which rounding cannot explain: a path or the remainder was changed after the module computed "
                       "them (a hook or an intervention that bypassed ex.hooks), or a rule of the expansion is wrong "
                       "— if nothing changed them, please report it with the model")
            warnings.warn(f"{what}, {why}", ExactnessWarning, stacklevel=3)
        return rel


def hook_keys(names: Iterable[str]) -> dict[str, str]:
    """{path name: attribute name}: path names hold '.', '>' and brackets, which module names cannot."""
    keys: dict[str, str] = {}
    used = {REMAINDER}
    for name in names:
        key = re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_") or "path"
        if key[0].isdigit():
            key = "p_" + key
        base, i = key, 1
        while key in used:
            i += 1
            key = f"{base}_{i}"
        used.add(key)
        keys[name] = key
    return keys


class PathHook(torch.nn.Identity):
    """The hook point of one path's logits (or of the remainder): an identity module."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def extra_repr(self) -> str:
        return repr(self.path)


def restack(stacked: torch.Tensor | None, rows: list, hooked: list) -> torch.Tensor:
    """`torch.stack(hooked)`, without the copy when every hook point returned the very row it was given
    (`rows`: the rows of `stacked`, views, so a change made in place is in `stacked` already): the copy
    would double the peak memory of a many-path output. `stacked=None`: the tensor the rows view, when
    they are its rows 0…N−1 (a reloaded export's outputs). A hook that returns another tensor (an
    intervention, a `detach`) gets the copy. Under torch.compile it always stacks (no object identity
    there); torch.export (non-strict) runs this code in Python, hooks included, and keeps no copy."""
    same = len(rows) == len(hooked) and all(h is r for h, r in zip(hooked, rows))
    if same and rows and (torch.compiler.is_exporting() or not torch.compiler.is_compiling()):
        base = stacked if stacked is not None else _viewed_rows(rows)
        if base is not None:
            return base
    return torch.stack(hooked)


def _viewed_rows(rows: list) -> torch.Tensor | None:
    """The tensor whose rows 0…N−1 are the views `rows`, or None when they are not."""
    base = rows[0]._base
    if base is None or base.dim() == 0 or base.shape[0] != len(rows):
        return None
    for i, row in enumerate(rows):
        if (row._base is not base or row.shape != base.shape[1:] or row.stride() != base.stride()[1:]
                or row.storage_offset() != base.storage_offset() + i * base.stride(0)):
            return None
    return base


class PathHooks(torch.nn.ModuleDict):
    """One `PathHook` per path and one for the remainder, found by path name or attribute name:
    `hooks["layers.3.mlp"]` is `hooks.layers_3_mlp`; `hooks["remainder"]` is the remainder's."""

    def __init__(self, names: Iterable[str]):
        names = tuple(names)
        keys = hook_keys(names)
        super().__init__({**{keys[n]: PathHook(n) for n in names}, REMAINDER: PathHook(REMAINDER)})
        self.by_path = {**keys, REMAINDER: REMAINDER}

    def key(self, path: str) -> str:
        """The attribute name of a path's hook point (what nnsight's `model.hooks.<key>` uses)."""
        if path in self.by_path:
            return self.by_path[path]
        if path in self._modules:
            return path
        shown = ", ".join(list(self.by_path)[:6])
        raise KeyError(f"no path named {path!r}; paths are {shown}{'…' if len(self.by_path) > 6 else ''}")

    def __getitem__(self, path: str) -> PathHook:
        return self._modules[self.key(path)]

    def __contains__(self, path) -> bool:
        return path in self.by_path or path in self._modules

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # a path name ("layers.3.mlp"): getattr(hooks, name) as nnsight does
            by_path = self.__dict__.get("by_path", {})
            if name in by_path:
                return self._modules[by_path[name]]
            raise

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self.by_path)


class Intervention:
    """Forward hooks replacing some paths' logits; `remove()` them, or use as a context manager."""

    def __init__(self, handles):
        self.handles = list(handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class PathInterventions:
    """intervene / ablate / patch on the `hooks` of a module whose call returns an ExpansionOutput."""

    def intervene(self, paths, fn: Callable[[torch.Tensor], torch.Tensor]) -> Intervention:
        """Replace the logits of `paths` (a name or several; "remainder" too) by `fn(logits)`.

        The remainder stays what the unpatched paths left, so Σ paths + remainder changes by exactly
        the replaced difference. Returns an `Intervention`: `with ex.intervene(...): ex(ids)`."""
        names = [paths] if isinstance(paths, str) else list(paths)
        if not names:
            raise InputError("name at least one path to intervene on")
        hooks = [self._hook(n) for n in names]

        def replace(module, args, output):
            new = fn(output)
            if not isinstance(new, torch.Tensor) or new.shape != output.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise InputError(f"the intervention on {module.path!r} returned {got}; it must return a tensor "
                                 f"of the path's shape {tuple(output.shape)}")
            return new.to(output.dtype)

        return Intervention(h.register_forward_hook(replace) for h in hooks)

    def ablate(self, paths, how: str = "zero") -> Intervention:
        """Zero-ablate (`how="zero"`) or mean-ablate over the batch (`how="mean"`) these paths."""
        if how == "zero":
            return self.intervene(paths, torch.zeros_like)
        if how == "mean":
            return self.intervene(paths, lambda x: x.mean(0, keepdim=True).expand_as(x))
        raise InputError(f"unknown ablation {how!r}: use 'zero' or 'mean' (or patch(paths, source) to swap in "
                         "another input's values, intervene(paths, fn) for anything else)")

    def patch(self, paths, source) -> Intervention:
        """Swap in these paths' logits from another input: `source` is an input of this module (tokens,
        text; run once first) or the `ExpansionOutput` of one. (A fixed tensor: `intervene(paths,
        lambda x: value)`.)"""
        names = [paths] if isinstance(paths, str) else list(paths)
        for n in names:
            self._hook(n)
        if isinstance(source, ExpansionOutput):
            values = {n: _value_of(source, n) for n in names}
        else:
            with torch.no_grad():
                out = self(source)
            values = {n: _value_of(out, n) for n in names}

        def fn_for(name):
            def swap(x):
                v = values[name]
                if v.shape != x.shape:
                    raise InputError(f"the patch for {name!r} has shape {tuple(v.shape)} but this input's path has "
                                     f"{tuple(x.shape)}: patch from an input of the same batch size and length")
                return v.to(device=x.device, dtype=x.dtype)
            return swap

        handles = []
        for n in names:
            handles.extend(self.intervene(n, fn_for(n)).handles)
        return Intervention(handles)

    def _hook(self, name: str) -> PathHook:
        try:
            return self.hooks[name]
        except KeyError as e:
            raise InputError(str(e.args[0])) from None


class ExpandedModule(PathInterventions, fx.GraphModule):
    """A jet expansion compiled into one GraphModule.

    `ex(tokens)` returns an `ExpansionOutput`; `ex.forward(tokens)` (what hooks and exporters see)
    returns the plain tuple (stacked path logits, remainder, logits). `ex.hooks[path]` is the hook
    point of one path's logits (`intervene`, `ablate`, `patch` use them). It moves with `.to()` —
    every constant it holds, and the traced module it reads (`ex.source`, whose weights it shares) —,
    runs under `torch.compile` with `ex.compile()`, prints its code with `print(ex.code)`, and keeps
    what it was built from: `ex.path_names`, `ex.structure`, `ex.path_graph`, `ex.terms` (the symbolic
    plan), `ex.k`. The weights are the model's own tensors (`jetfx.trace` copies nothing), so a
    conversion in place — `.double()`, `.half()` — converts the model and every expansion of it too;
    `copy.deepcopy(ex)` first for an expansion of its own.

    Jet weights are buffers, one vector per site (`ex.jet_weights`: {"step1": …, "decoder": …});
    `ex(tokens, weights={...})` runs with other weights (differentiably), `ex.set_jet_weights`
    keeps them (see `jetfx.weights`).

    Each tensor is held once. The model's weights belong to the module's own graph (`model.*`, the
    names its `get_attr` nodes read); `ex.source` is a reference, not a submodule, and the jets'
    regions register the very same tensors under their own names (aliases: `ex.aliases()`), so
    `state_dict()` has one entry per distinct tensor, `load_state_dict` fills the aliases from their
    owner, and `.to()`/`.double()`/`.cuda()` keep every alias and the source tied to the owner.
    """

    path_names: tuple[str, ...]
    weight_sites: tuple = ()
    hooks: PathHooks

    def __call__(self, tokens, *args, weights: dict | None = None, **kwargs):
        from .tracing import as_tokens, check_padding

        if not isinstance(tokens, torch.Tensor):  # text or ids made here: put them where the module is
            from .functions import device_of

            tokens = as_tokens(tokens, getattr(self, "tokenizer", None)).to(device_of(self))
        elif getattr(self, "tokenizer", None) is not None and tokens.device.type != "meta":
            check_padding(tokens, self.tokenizer)
        if weights is not None and weights is not _SWAPPED:  # other weights for this call, run eagerly
            overrides = weight_overrides(self, weights)  # (tensors that require grad stay as they are)
            return torch.func.functional_call(self, overrides, (tokens, *args), {**kwargs, "weights": _SWAPPED},
                                              strict=False)
        compiled, hooked = self.__dict__.get("_jetfx_compiled"), _hooked(self)
        if compiled is not None and weights is None and not args and not kwargs and not hooked:
            raw = compiled(self, tokens)
        else:  # eager: also whenever a hook point is hooked (compiled code would not see new hooks)
            raw = super().__call__(tokens, *args, **kwargs)
        if not isinstance(raw, tuple) or len(raw) != 3:
            raise InputError("the expanded module returned an unexpected value (was its graph edited?)")
        out = ExpansionOutput(self.path_names, *raw)
        # a hooked path may have been changed on purpose (intervene, ablate, patch, nnsight): the
        # identity is the module's, not the intervention's, so it is checked only on plain calls
        if getattr(self, "check_exactness", True) and not hooked and out.logits.device.type != "meta":
            out.check()  # one scalar read per call; set `check_exactness = False` to skip it
        return out

    def aliases(self) -> dict[str, str]:
        """{alias: owner}: the names under which a tensor the module already holds is registered again.

        The owner of a tensor is the name its own graph reads (`model.…`); a jet registers the region's
        weights it differentiates through under its own path (`jets.….model.…`): the same tensor object.
        """
        read = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        named = _named_tensors(self)
        owners: dict[int, str] = {}
        for name, tensor in named:  # a name the graph reads owns its tensor, else the first name
            if id(tensor) not in owners or (name in read and owners[id(tensor)] not in read):
                owners[id(tensor)] = name
        return {name: owners[id(t)] for name, t in named if owners[id(t)] != name}

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """One entry per distinct tensor: aliases (see `aliases`) are left out; `load_state_dict` restores them."""
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for alias in self.aliases():
            out.pop(prefix + alias, None)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # runs before the submodules load: an alias (left out of `state_dict`) gets its owner's value
        for alias, owner in self.aliases().items():
            if prefix + alias not in state_dict and prefix + owner in state_dict:
                state_dict[prefix + alias] = state_dict[prefix + owner]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __deepcopy__(self, memo: dict) -> "ExpandedModule":
        """An independent copy. torch's GraphModule copy keeps only the graph, submodules and tensors;
        the expansion's own attributes (path names, plan, structure, the traced `source`, …) are
        copied here through the same memo, so the copy's source shares its tensors with the copy as the
        original's does with the original. Caches (fit graphs, torch.compile code) are rebuilt on demand."""
        import copy

        caches = {name: self.__dict__.pop(name) for name in _REBUILT_ON_DEMAND if name in self.__dict__}
        try:
            res = super().__deepcopy__(memo)
            for name, value in self.__dict__.items():
                if name not in res.__dict__:
                    res.__dict__[name] = copy.deepcopy(value, memo)
        finally:
            self.__dict__.update(caches)
        if "_jetfx_compiled" in caches:
            res.compile(**caches["_jetfx_compiled"].options)
        return res

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.double()`, `.cuda()`, …: convert each tensor, then tie the aliases and `ex.source` back to
        their owners (a parameter converted in place stays shared; a buffer, or a parameter moved to
        another device type, would not)."""
        if not recurse:
            return super()._apply(fn, recurse)
        aliases = self.aliases()
        owner_of = {id(t): name for name, t in _named_tensors(self) if name not in aliases}
        holders: dict[str, list] = {}  # owner → [(module, name)] that hold its tensor, taken before converting
        for alias, owner in aliases.items():
            holders.setdefault(owner, []).append((self, alias))
        source = self.__dict__.get("source")
        if isinstance(source, torch.nn.Module):
            for name, t in _named_tensors(source):
                if id(t) in owner_of:
                    holders.setdefault(owner_of[id(t)], []).append((source, name))
            source._apply(fn)  # its tensors the expansion does not read move too
        super()._apply(fn, recurse)
        for owner, held in holders.items():
            tensor = _tensor_at(self, owner)
            for module, name in held:
                _set_tensor(module, name, tensor)
        return self

    def compile(self, enabled: bool = True, **options) -> "ExpandedModule":
        """Run this module under `torch.compile` from the next call on; returns the module itself.

        `options` go to `torch.compile` (`mode="max-autotune"`, `dynamic=True`, `backend=…`); the
        first call of each new shape (or device) compiles, later ones run the compiled code. The
        module stays an ordinary GraphModule: `forward`, `.to()`, `export` and the hook points are
        unchanged, and while any hook point is hooked (`intervene`, `ablate`, `patch`, nnsight) calls
        run eagerly, so that interventions are never silently skipped. Token ids are checked before
        the compiled code runs. `ex.compile(False)` goes back to eager execution.

        (Unlike `torch.nn.Module.compile`, which this replaces, it returns the module: chain it,
        `ex = jetfx.expand(gm, 1, paths=…).compile()`.)
        """
        if not enabled:
            self.__dict__.pop("_jetfx_compiled", None)
            return self
        self.__dict__["_jetfx_compiled"] = _CompiledForward(self, options)
        return self

    @property
    def compiled(self) -> bool:
        """Whether calls run under torch.compile (see `compile`)."""
        return "_jetfx_compiled" in self.__dict__

    @property
    def jet_weights(self) -> dict[str, torch.Tensor]:
        """{site: weights} ("step1", …, "decoder"), one per center of the site; see `jetfx.weights`."""
        return {site.name: self.get_buffer(site.target) for site in self.weight_sites}

    def set_jet_weights(self, weights: dict, constraint: str = "simplex") -> None:
        """Keep these weights ({site: tensor or numbers}): a tensor is kept as it is, so when it requires
        grad, gradients of later outputs reach it. Checked against `constraint` ("simplex"/"affine")."""
        for target, value in weight_overrides(self, weights, constraint).items():
            old = self.get_buffer(target)
            if isinstance(value, torch.Tensor) and value.device != old.device:
                raise InputError(f"weights for {target!r} are on {value.device}, the module on {old.device}")
            owner, _, leaf = target.rpartition(".")
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=old.dtype)
            self.get_submodule(owner).register_buffer(leaf, value)

    def symbolic(self, **kw):
        """The expansion as a sympy expression (see jetfx.symbolic.symbolic_view)."""
        from .symbolic import symbolic_view

        return symbolic_view(self, **kw)

    def render(self, path: str | None = None, **kw) -> str:
        """SVG of the path graph with this module's paths highlighted; written to `path` if given."""
        from .pictures import render_path_graph

        graph = getattr(self, "split_graph", None) or self.path_graph  # split expansions: carry + interaction edges
        svg = render_path_graph(graph, selected=self.selected, **kw)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(svg)
        return svg


# `weights=` of the inner call made by `torch.func.functional_call`: the buffers are already swapped
_SWAPPED = object()
# caches an expanded module keeps in its __dict__, not copied by `deepcopy` (the fit's graphs, torch.compile's code)
_REBUILT_ON_DEMAND = ("_jetfx_fit", "_jetfx_compiled", "_jetfx_cache")


class _CompiledForward:
    """`torch.compile` of an expanded module's forward, with the token check run eagerly first (its
    value-dependent test of the ids would break the compiled graph; `check_tokens` is skipped
    while compiling)."""

    def __init__(self, module: fx.GraphModule, options: dict):
        from .tracing import check_tokens

        self.options = dict(options)
        checks = [n for n in module.graph.nodes if n.op == "call_function" and n.target is check_tokens]
        self.limits = tuple(checks[0].args[1:]) if checks else None
        self.forward = torch.compile(module.forward, **self.options)

    def __call__(self, module, tokens):
        if self.limits is not None:
            from .tracing import check_tokens

            check_tokens(tokens, *self.limits)
        return self.forward(tokens)


def _hooked(module: "ExpandedModule") -> bool:
    """Whether a forward hook is set on the module or one of its hook points (then it runs eagerly)."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    # nnsight replaces a module's `forward` on the instance (for as long as it wraps the module)
    # instead of registering hooks
    return any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__
               for m in (module, *module.hooks.values()))


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every (name, tensor) registered in `module`, a tensor registered twice under both names."""
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def _tensor_at(module: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    holder = module.get_submodule(owner)
    return holder._parameters[leaf] if leaf in holder._parameters else holder._buffers[leaf]


def _set_tensor(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Register `tensor` where `name` is registered (a parameter or a buffer, keeping which)."""
    owner, _, leaf = name.rpartition(".")
    holder = module.get_submodule(owner)
    if leaf in holder._parameters:
        holder._parameters[leaf] = tensor
    else:
        holder._buffers[leaf] = tensor


def _value_of(out: ExpansionOutput, name: str) -> torch.Tensor:
    return out.remainder if name == REMAINDER else out[name]
