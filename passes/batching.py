"""Map a function over a leading batch of centers: `vmap`, or a loop while torch.export traces.

Jets evaluate a region at N centers at once. `torch.func.vmap` does that fastest, but under
torch.export its batching rules ask for concrete sizes (aten.cat's, for one), which specializes the
exported program to the example's batch and length. While exporting, the N centers (a static count)
are mapped by a Python loop instead, which export traces into N copies of the region with dynamic
batch and sequence sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def map_centers(fn: Callable, *batched: torch.Tensor):
    """fn applied to every row of the tensors in `batched` (leading dimensions equal), results stacked.

    `fn` returns a tensor or a tuple of tensors; so does `map_centers`.
    """
    if not torch.compiler.is_exporting():
        return torch.func.vmap(fn)(*batched)
    rows = [fn(*row) for row in zip(*(b.unbind(0) for b in batched))]
    if isinstance(rows[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*rows))
    return torch.stack(rows)
