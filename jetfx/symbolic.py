"""The symbolic view: a jet expansion as a sympy expression over non-commutative symbols.

Linear blocks become matrices A_b, the encoder output η(z) the symbol E, a decoder without a
normalization the matrix U; non-linear blocks, decoders and their jets stay symbolic functions
(γ_b(x), J^k γ_b(x_i)(y)). Weights are symbols w{s}_{i} (step s, center i) and ω_{i} (decoder).
For a linear network the jet of a block is exact: J^k A(x)(y) = A·y for k ≥ 1 and A·x for k = 0,
so after the simplex substitution w_last = 1 − Σ others the terms sum to the expanded product
U(I + A_L)…(I + A_1)E — the paper's equation 5 — which `SymbolicExpansion.check_linear()` verifies.

Stream values are named symbols h_1 … h_L with their definitions h_s = h_{s-1} + Σ γ_b(h_{s-1})
kept aside (`definitions`): written out, h_L is a tree that doubles at every step (2^60 leaves on
SmolLM2), while with names every term prints in time linear in the depth. `total()` and
`check_linear()` substitute the definitions (exponential: for small networks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from .errors import ExpansionError
from .terms import Branch, Concat, Constant, Jet, Logits, Remainder, Scaled, Select, Stream, Terms


def _nc(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, commutative=False)


@dataclass
class SymbolicExpansion:
    """Per-path sympy expressions; `expr` is their sum plus the remainder symbol δ."""

    terms: dict[str, sympy.Expr]
    weights: list[tuple[sympy.Symbol, ...]]  # one tuple per expansion site (simplex groups)
    streams: dict[int, sympy.Expr]  # h_s: the symbol E for s = 0, the symbol h_s after
    logits: sympy.Expr  # the model's own logits, symbolically (U h_L or υ(h_L))
    definitions: dict = field(default_factory=dict)  # h_s symbol -> h_{s-1} + Σ_b γ_b(h_{s-1})
    remainder: sympy.Symbol = field(default_factory=lambda: _nc("δ"))

    def substitute_streams(self, expr: sympy.Expr) -> sympy.Expr:
        """`expr` with every stream symbol h_s written out down to E (size doubles per step)."""
        for sym in reversed(list(self.definitions)):
            expr = expr.xreplace({sym: self.definitions[sym]})
        return expr

    @property
    def expr(self) -> sympy.Expr:
        return sympy.Add(*self.terms.values()) + self.remainder

    def simplex(self) -> dict:
        """The substitution w_last = 1 − Σ others, for every group of weights."""
        sub = {}
        for group in self.weights:
            if len(group) > 1:
                sub[group[-1]] = 1 - sympy.Add(*group[:-1])
            elif group:
                sub[group[0]] = sympy.Integer(1)
        return sub

    def total(self, simplex: bool = True) -> sympy.Expr:
        """Σ terms (without δ), expanded, optionally under the simplex constraint."""
        s = self.substitute_streams(sympy.Add(*self.terms.values()))
        if simplex:
            s = s.subs(self.simplex())
        return sympy.expand(s)

    def check_linear(self) -> sympy.Expr:
        """Σ terms − U(I+A_L)…(I+A_1)E after the simplex substitution (0 for a linear network, k ≥ 1)."""
        return sympy.expand(self.total(simplex=True) - sympy.expand(self.substitute_streams(self.logits)))

    def __str__(self) -> str:
        defs = [f"{sym} = {sympy.sstr(e)}" for sym, e in self.definitions.items()]
        terms = [f"{name}: {sympy.sstr(e)}" for name, e in self.terms.items()]
        return "\n".join(defs + terms) + f"\n+ {self.remainder}"

    def __repr__(self) -> str:
        return (f"SymbolicExpansion({len(self.terms)} terms over streams h_1…h_{len(self.definitions)}; "
                "print() it for the terms)")


class _View:
    def __init__(self, structure):
        self.structure = structure
        self.block_syms = {}
        self.funcs = {}
        self.E = _nc("E")
        self.memo: dict[int, list[sympy.Expr]] = {}
        self.weights: list[tuple[sympy.Symbol, ...]] = []
        dec = structure.decoder
        self.decoder_linear = not dec.has_norm and dec.unembedding is not None
        self.U = _nc("U")
        h = {0: self.E}
        self.definitions = {}
        for step in structure.steps:
            name = _nc(f"h_{step.index + 1}")
            self.definitions[name] = h[step.index] + sympy.Add(*[self.apply(b, h[step.index]) for b in step.blocks])
            h[step.index + 1] = name
        self.h = h
        L = len(structure.steps)
        self.logits = self.decode(h[L])

    def func(self, name: str):
        if name not in self.funcs:
            self.funcs[name] = sympy.Function(name, commutative=False)
        return self.funcs[name]

    def apply(self, block, x):
        if block.linear:
            return _nc(f"A_{block.name}") * x
        return self.func(f"γ_{block.name}")(x)

    def decode(self, x):
        return self.U * x if self.decoder_linear else self.func("υ")(x)

    def jet(self, block, k: int, center, variate):
        linear = self.decoder_linear if block is None else block.linear
        if linear:  # a linear map's jet is exact
            x = center if k == 0 else variate
            return self.decode(x) if block is None else _nc(f"A_{block.name}") * x
        if k == 0:
            return self.decode(center) if block is None else self.apply(block, center)
        name = "υ" if block is None else f"γ_{block.name}"
        return self.func(f"J{k}_{name}")(center, variate)

    def lower(self, t: Terms) -> list[sympy.Expr]:
        key = id(t)
        if key in self.memo:
            return self.memo[key]
        if isinstance(t, Stream):
            out = [self.h[t.index]]
        elif isinstance(t, Branch):
            out = [self.apply(t.block, self.h[t.block.step])]
        elif isinstance(t, Logits):
            out = [self.logits]
        elif isinstance(t, Constant):
            out = [_nc(n) for n in t.labels]
        elif isinstance(t, Concat):
            out = [e for p in t.parts for e in self.lower(p)]
        elif isinstance(t, Select):
            src = self.lower(t.source)
            out = [src[i] for i in t.indices]
        elif isinstance(t, Scaled):
            syms = self._symbols(t.weight_symbols, t.weights)
            out = [w * e for w, e in zip(syms, self.lower(t.source))]
        elif isinstance(t, Jet):
            centers = self.lower(t.centers)
            syms = self._symbols(t.weight_symbols, t.weights)
            variate = self.h[len(self.structure.steps)] if t.site == "decoder" else self.h[t.site]
            out = [syms[i] * self.jet(t.functions[j], t.k, centers[i], variate) for i, j in t.pairs]
        elif isinstance(t, Remainder):
            out = [_nc("δ")]
        else:  # pragma: no cover - every Terms class is handled above
            raise ExpansionError(f"no symbolic form for {type(t).__name__}")
        self.memo[key] = out
        return out

    def _symbols(self, names, values):
        syms = tuple(sympy.Symbol(n) for n in names) if names else tuple(sympy.nsimplify(v) for v in values)
        if names and syms not in self.weights:
            self.weights.append(syms)
        return syms


def symbolic_view(expanded, *, weights: str = "symbols") -> SymbolicExpansion:
    """The compiled expansion `expanded` (an ExpandedModule) as sympy expressions.

    `weights="symbols"` keeps the jet weights as symbols; `"values"` puts in their numbers.
    """
    if weights not in ("symbols", "values"):
        raise ExpansionError("weights must be 'symbols' or 'values'")
    terms = expanded.terms
    view = _View(expanded.structure)
    if weights == "values":
        view._symbols = lambda names, values: tuple(sympy.nsimplify(v) for v in values)  # noqa: E731
    exprs = view.lower(terms)
    named: dict[str, sympy.Expr] = {}
    for name, e in zip(terms.names, exprs):
        named[name] = named.get(name, 0) + e
    return SymbolicExpansion(named, view.weights, view.h, view.logits, view.definitions)
