"""The device a command runs on, and the autocast that every forward pass on it runs under."""

from __future__ import annotations

import torch


def resolve_device(device: str | None) -> torch.device:
    """`device` as given (`cpu`, `cuda`, `cuda:N`), or CUDA when available and the CPU otherwise;
    raises `ValueError` naming `--device` for a device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device}: not a device (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: only cpu and cuda are supported")
    return dev


def autocast(device: torch.device):
    """bf16 autocast on CUDA (training, evaluation and generation alike); nothing on the CPU,
    where the model runs in its parameters' dtype."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
