"""jetfx compiler passes: each takes a GraphModule and returns one, or annotates `node.meta`.

Import as `jetfx.passes` (this folder is installed under that name, never as a top-level
`passes` package).
"""

from .cleanup import clean, drop_eval_dropout, drop_metadata_asserts, has_mutations
from .dependence import value_dependent
from .device import constant_devices, make_device_agnostic
from .dtype import cast_floating, compute_in
from .residual import find_residual_structure

__all__ = [
    "cast_floating",
    "clean",
    "compute_in",
    "constant_devices",
    "drop_eval_dropout",
    "drop_metadata_asserts",
    "find_residual_structure",
    "has_mutations",
    "make_device_agnostic",
    "value_dependent",
]
