"""The argument checks every communicator makes before a collective (``comm``, ``nccl``).

Kept apart so that the single-process/MPI engines and the NCCL engine share them without
importing each other.
"""
OPS = ("sum", "mean")


def check_op(op):
    """``op`` names a reduction the communicators implement (ValueError otherwise)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")


def check_buffer(x, what):
    """Collectives work in place on one contiguous block of memory (ValueError otherwise)."""
    if not (x.flags.c_contiguous and x.size > 0):
        raise ValueError(f"{what} needs a non-empty C-contiguous array, got shape "
                         f"{tuple(x.shape)} (contiguous: {bool(x.flags.c_contiguous)})")
