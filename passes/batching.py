"""Map a function over a leading batch of centers: `vmap`, or a loop where vmap cannot be used.

Jets evaluate a region at N centers at once. `torch.func.vmap` does that fastest, but

- under torch.export its batching rules ask for concrete sizes (aten.cat's, for one), which
  specializes the exported program to the example's batch and length. While exporting, the N
  centers (a static count) are mapped by a Python loop instead, which export traces into N copies
  of the region with dynamic batch and sequence sizes;
- mixture-of-experts routing has data-dependent shapes (each center routes its own rows), which
  vmap cannot batch. The loop is taken then, and `owner` remembers it so vmap is not tried again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def map_centers(fn: Callable, *batched: torch.Tensor, owner=None):
    """fn applied to every row of the tensors in `batched` (leading dimensions equal), results stacked.

    `fn` returns a tensor or a tuple of tensors; so does `map_centers`. `owner` (a module) records
    in `_jetfx_loop` that vmap failed on it, or starts with it set where routing is known.
    """
    exporting = torch.compiler.is_exporting()
    if not exporting and (owner is None or not owner.__dict__.get("_jetfx_loop", False)):
        try:
            return torch.func.vmap(fn)(*batched)
        except Exception:  # noqa: BLE001 - vmap has no batching rule for some op; the loop needs none
            if owner is not None:
                owner.__dict__["_jetfx_loop"] = True
    rows = [fn(*row) for row in zip(*(b.unbind(0) for b in batched))]
    if isinstance(rows[0], (tuple, list)):
        return type(rows[0])(torch.stack(parts) for parts in zip(*rows))
    return torch.stack(rows)
