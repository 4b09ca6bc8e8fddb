"""Pick the torch device a user asked for, with a clear error when it is not there."""

from __future__ import annotations

from zmdevice.config import check_device
from zmdevice.errors import UserError


def resolve_device(name: str):
    """Map auto/cpu/cuda[:N]/mps to a ``torch.device`` that exists on this machine."""
    import torch

    check_device(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible here; use --device cpu or auto")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UserError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    return torch.device(name)
