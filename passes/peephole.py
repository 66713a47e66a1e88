"""Peephole rewrites of a traced batched jet graph: fewer dispatches, the same numbers.

A block jet at 9 tokens runs tens of small ops whose cost is mostly dispatch (issue 19): every
op the graph does not need is time. make_fx of a vmapped Taylor graph leaves patterns that a
hand-written kernel would not have. Each rewrite here gives bit-identical results (the same
arithmetic on the same values, in the same order), and `BatchedGraph` still checks the traced
graph against vmap before using it:

- `dedupe`: the same pure op on the same arguments twice (the stacked coefficients of a
  normalized stream, fed to the query, key and value projections, are stacked three times);
- `negated_add`: add(a, mul(b, -1)) is sub(a, b) (a - b rounds as a + (-b));
- `scalar_where`: where(m, a, scalar_tensor(c)) takes c as a number (one op fewer);
- `stack_before_copy`: stack/cat of reshaped contiguous copies stacks the uncopied inputs
  (stack writes a contiguous result anyway) and reshapes once;
- `bias_in_place`: a bias added to coefficient 0 of a linear layer's stacked output,
  `cat([unsqueeze(select(T, d, 0) + b), T[d, 1:]])`, becomes `select(T, d, 0).add_(b)` on the
  freshly computed T — no copy of the other coefficients.

Only for graphs run as they are: the in-place add makes the graph unfit for autograd or export
(`BatchedGraph` traces for inference only).
"""

from __future__ import annotations

import torch
from torch import fx

from ._graph import aten

_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _val(node):
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _pure(node: fx.Node) -> bool:
    """A call whose result depends only on its arguments and that writes nothing."""
    t = node.target
    if node.op != "call_function":
        return False
    if isinstance(t, torch._ops.OpOverload):
        return not t._schema.is_mutable and torch.Tag.nondeterministic_seeded not in t.tags
    return t.__name__ == "getitem" and t.__module__ == "_operator"


def _key(x):
    """A hashable form of an argument (nodes by identity, lists by content)."""
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, *(_key(a) for a in x))
    if isinstance(x, dict):
        return ("dict", *sorted((k, _key(v)) for k, v in x.items()))
    if isinstance(x, fx.Node):
        return ("node", id(x))
    if isinstance(x, float) and x != x:  # NaN is not equal to itself; keep such calls apart
        return ("nan", id(x))
    return (type(x).__name__, x)


def _writes_in_place(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
               for n in gm.graph.nodes)


def dedupe(gm: fx.GraphModule) -> int:
    """Merge repeated pure calls with the same arguments into the first; returns how many. Not in a
    graph that writes in place: two equal calls (two `zeros`) may be written differently afterwards."""
    if _writes_in_place(gm):
        return 0
    seen, merged = {}, 0
    for node in list(gm.graph.nodes):
        if not _pure(node):
            continue
        try:
            key = (node.target, _key(node.args), _key(node.kwargs))
            hash(key)
        except TypeError:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            merged += 1
    return merged


def _scalar(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def negated_add(gm: fx.GraphModule) -> int:
    """add(a, mul(b, -1)) → sub(a, b) where the product has no other use."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.add.Tensor or node.kwargs:
            continue
        a, m = node.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(m, fx.Node) and m.target is aten.mul.Tensor
                and len(m.users) == 1 and not m.kwargs and isinstance(m.args[0], fx.Node) and m.args[1] == -1):
            continue
        b = m.args[0]
        va, vb, vn = _val(a), _val(b), _val(node)
        if va is None or vb is None or vn is None or not (va.dtype == vb.dtype == vn.dtype):
            continue
        node.target, node.args = aten.sub.Tensor, (a, b)
        gm.graph.erase_node(m)
        count += 1
    return count


def scalar_where(gm: fx.GraphModule) -> int:
    """where(m, a, scalar_tensor(c)) → where(m, a, c) where the result's dtype is a's."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.where.self:
            continue
        cond, a, s = node.args
        if not (isinstance(s, fx.Node) and s.target is aten.scalar_tensor.default and _scalar(s.args[0])):
            continue
        va, vn = _val(a), _val(node)
        if va is None or vn is None or va.dtype != vn.dtype or va.shape != vn.shape:
            continue
        node.target, node.args = aten.where.ScalarOther, (cond, a, s.args[0])
        if not s.users:
            gm.graph.erase_node(s)
        count += 1
    return count


def stack_before_copy(gm: fx.GraphModule) -> int:
    """stack/cat([reshape(clone(a_i))], d) → reshape(stack/cat([a_i], d)) when the a_i have one
    shape and the dimensions before d are the same in a_i and the reshaped parts (then the
    row-major orders agree: each prefix row holds the parts' elements one after the other)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.stack.default, aten.cat.default):
            continue
        parts = node.args[0]
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        sources = []
        for p in parts:
            c = p.args[0] if isinstance(p, fx.Node) and p.target in _VIEWS and len(p.users) == 1 else None
            if not (isinstance(c, fx.Node) and c.target is aten.clone.default and len(c.users) == 1
                    and c.kwargs.get("memory_format", torch.contiguous_format) == torch.contiguous_format):
                break
            sources.append((p, c, c.args[0]))
        vals = [_val(s) for _, _, s in sources]
        if (len(sources) != len(parts) or len(set(parts)) != len(parts) or any(v is None for v in vals)
                or len({tuple(v.shape) for v in vals}) != 1):
            continue
        vs, vp, vn = _val(sources[0][2]), _val(sources[0][0]), _val(node)
        if vs is None or vp is None or vn is None or d < 0 or tuple(vs.shape[:d]) != tuple(vp.shape[:d]):
            continue
        with gm.graph.inserting_before(node):
            stacked = gm.graph.call_function(node.target, ([s for _, _, s in sources], d))
            reshaped = gm.graph.call_function(aten.view.default, (stacked, list(vn.shape)))
        n = len(parts)
        shape = ((*vs.shape[:d], n, *vs.shape[d:]) if node.target is aten.stack.default
                 else (*vs.shape[:d], n * vs.shape[d], *vs.shape[d + 1:]))
        stacked.meta["val"] = torch.empty(shape, dtype=vs.dtype, device="meta")
        reshaped.meta["val"] = vn
        node.replace_all_uses_with(reshaped)
        gm.graph.erase_node(node)
        for p, c, _ in sources:
            gm.graph.erase_node(p)
            gm.graph.erase_node(c)
        count += 1
    return count


def _fresh(node: fx.Node) -> bool:
    """`node` is a view chain (each link used once) over the output of a non-view computation,
    so writing into it changes nothing any other node reads."""
    while node.op == "call_function" and node.target in _VIEWS:
        src = node.args[0]
        if not isinstance(src, fx.Node) or len(src.users) != 1:
            return False
        node = src
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target in (aten.mm.default, aten.bmm.default, aten.addmm.default, aten.matmul.default))


def bias_in_place(gm: fx.GraphModule) -> int:
    """cat([unsqueeze(add(select(T, d, 0), b), d), slice(T, d, 1, end)], d) → select(T, d, 0).add_(b); T."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.cat.default or len(node.args[0]) != 2:
            continue
        u, s = node.args[0]
        d = node.args[1] if len(node.args) > 1 else 0
        if not (isinstance(u, fx.Node) and isinstance(s, fx.Node) and u.target is aten.unsqueeze.default
                and s.target is aten.slice.Tensor and len(u.users) == 1 and len(s.users) == 1):
            continue
        add = u.args[0]
        if not (isinstance(add, fx.Node) and add.target is aten.add.Tensor and not add.kwargs and len(add.users) == 1):
            continue
        sel, bias = add.args[:2]
        if not (isinstance(sel, fx.Node) and sel.target is aten.select.int and len(sel.users) == 1):
            continue
        t = sel.args[0]
        if s.args[0] is not t or set(t.users) != {sel, s} or not _fresh(t):
            continue
        if not (u.args[1] == d and sel.args[1:] == (d, 0) and tuple(s.args[1:3]) == (d, 1)
                and (len(s.args) < 4 or s.args[3] >= 2**62) and (len(s.args) < 5 or s.args[4] == 1)):
            continue
        vt, vsel, vadd, vn, vb = _val(t), _val(sel), _val(add), _val(node), _val(bias)
        if any(v is None for v in (vt, vsel, vadd, vn)) or d < 0 or vn.shape != vt.shape or vn.dtype != vt.dtype:
            continue
        if vadd.shape != vsel.shape or vadd.dtype != vsel.dtype or (vb is not None and vb.dtype != vsel.dtype):
            continue
        if 0 in vt.stride() or not vt.is_contiguous():
            continue
        add.target = aten.add_.Tensor  # writes into coefficient 0 of the fresh T
        node.replace_all_uses_with(t)
        gm.graph.erase_node(node)
        gm.graph.erase_node(u)
        gm.graph.erase_node(s)
        count += 1
    return count


def peephole(gm: fx.GraphModule) -> fx.GraphModule:
    """All rewrites above, then dead code removed; the counts in `gm.meta['peephole']`."""
    counts = {"dedupe": dedupe(gm), "negated_add": negated_add(gm), "scalar_where": scalar_where(gm),
              "stack_before_copy": stack_before_copy(gm)}
    counts["dedupe"] += dedupe(gm)
    counts["bias_in_place"] = bias_in_place(gm)  # last: no pass above may see an in-place op
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_function" or not _pure(n))
    gm.graph.lint()
    gm.recompile()
    gm.meta["peephole"] = counts
    return gm
