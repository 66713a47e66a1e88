"""Errors jetfx raises on bad input.

Every error says what was wrong and what to do about it, so that users never have to read a stack
trace from deep inside torch. They all derive from `JetfxError` (itself a `ValueError`, since in
almost every case the caller passed something jetfx cannot work with). `RunInterrupted` is
not an error but a `KeyboardInterrupt`: a resumable n-gram run stopped with its work saved.
"""


class JetfxError(ValueError):
    """Base class of every error jetfx raises on purpose."""


class TraceError(JetfxError):
    """The model could not be exported, or the exported graph does not reproduce it."""


class StructureError(JetfxError):
    """The graph has no residual structure jetfx can expand."""


class ExpansionError(JetfxError):
    """A jet expansion was asked for with invalid arguments (order, centers, weights, paths)."""


class InputError(JetfxError):
    """Tokens or text given to a traced or expanded module are unusable."""


class ExportError(JetfxError):
    """An expanded module could not be exported, or a file is not a valid jetfx export."""


class ExactnessWarning(UserWarning):
    """Σ paths + remainder no longer equals the model's logits to the precision of its dtype."""


class MissingDependencyError(JetfxError, ImportError):
    """An optional program or package is needed for this feature."""


def check_order(k) -> int:
    """Validate a jet order: a non-negative integer (bools are refused)."""
    if isinstance(k, bool) or not isinstance(k, int):
        try:
            import numpy as np  # noqa: PLC0415 - optional, only to accept numpy ints

            if isinstance(k, np.integer):
                k = int(k)
        except ImportError:
            pass
    if isinstance(k, bool) or not isinstance(k, int):
        raise ExpansionError(
            f"the jet order k must be a non-negative integer, got {k!r} ({type(k).__name__}); "
            "use k=0 for plain evaluation (logit-lens style), k=1 for linearization, k=2 and up "
            "for higher-order jets"
        )
    if k < 0:
        raise ExpansionError(
            f"the jet order k must be a non-negative integer, got k={k}; "
            "k=0 is plain evaluation, k=1 linearization"
        )
    return k


class RunInterrupted(KeyboardInterrupt):
    """A run was interrupted (Ctrl-C, SIGTERM, a lost rank); its finished chunks are saved and it resumes.
    `earlier`: how many paths before it in the same job are complete."""

    def __init__(self, run_id: int, path: str, chunks_done: int, num_chunks: int, db_path: str, *,
                 reason: str = "interrupted", earlier: int = 0):
        more = f" ({earlier} earlier path{'s' if earlier != 1 else ''} complete)" if earlier else ""
        super().__init__(f"{reason}; {chunks_done} of {num_chunks} chunks of {path} saved in {db_path}, "
                         f"re-run the same command to resume{more}")
        self.run_id, self.path, self.chunks_done, self.num_chunks = run_id, path, chunks_done, num_chunks
        self.earlier = earlier
