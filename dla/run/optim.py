"""Optimizers and low-precision training of the linear layers, from torchao.

    adamw       torch.optim.AdamW
    adamw8bit   torchao.optim.AdamW8bit: both moments block-quantized to 8 bits (blocks of 256),
                ~4× less optimizer memory; runs on the CPU and the GPU
    float8      torchao.float8.convert_to_float8_training: the matmuls of the blocks' linear
                layers in float8 with dynamic scales (tensorwise or rowwise recipe). Needs a GPU
                of compute capability ≥ 8.9 (H100, Ada); elsewhere it is refused before a run
                writes anything.

torchao is an optional extra (`pip install 'dla[quant]'`), imported only when one of its features
is asked for (`require_torchao`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adamw8bit")
FLOAT8_RECIPES = ("tensorwise", "rowwise")
BETAS, EPS = (0.9, 0.95), 1e-8


# Loggers that report, while torchao is imported, kernels built for other GPUs and registrations
# that torch has since made unnecessary: nothing a user of these features can act on.
_TORCHAO_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


def require_torchao(feature: str) -> None:
    """Import the parts of torchao this package uses, without their import-time log lines;
    raise `ValueError` naming the extra to install when torchao is missing. `feature` names
    what needs it (a flag, or a kind of checkpoint)."""
    loggers = [logging.getLogger(name) for name in _TORCHAO_IMPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        # torchao: an optional dependency, imported here once for every feature that uses it
        import torchao.float8
        import torchao.optim
        import torchao.prototype.safetensors.safetensors_support
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise ValueError(f"{feature} needs torchao, an optional extra: pip install 'dla[quant]'") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases, gates' scalars or `L_h`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    keep = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"--optim must be one of {list(OPTIMIZERS)}, got {name!r}")
    groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS)
    require_torchao("--optim adamw8bit")
    # torchao: an optional dependency, needed only by --optim adamw8bit
    from torchao.optim import AdamW8bit

    return AdamW8bit(groups, lr=lr, betas=BETAS, eps=EPS)


def float8_unavailable(device: torch.device) -> str | None:
    """Why float8 training cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return f"--float8 needs an NVIDIA GPU of compute capability >= 8.9 (H100, Ada); the device is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (f"--float8 needs an NVIDIA GPU of compute capability >= 8.9 (H100, Ada); "
                f"{name} has {major}.{minor}")
    return None


def float8_eligible(module: nn.Module, fqn: str) -> bool:
    """The float8 matmul needs both dimensions divisible by 16; the per-head gate projections
    (`a_proj`, `b_proj`: H outputs) usually are not and stay in bf16. The tied head is
    `F.linear` on the embedding, not an `nn.Linear`, and stays too."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_float8(model: nn.Module, recipe: str) -> nn.Module:
    """Swap the eligible linear layers for torchao's `Float8Linear` in place (weights kept)."""
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"--float8-recipe must be one of {list(FLOAT8_RECIPES)}, got {recipe!r}")
    require_torchao("--float8")
    # torchao: an optional dependency, needed only by --float8
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    return convert_to_float8_training(model, config=config, module_filter_fn=float8_eligible)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate. torchao's optimizers keep it as a tensor (their compiled
    step would otherwise recompile for every new value), so it is filled in place there."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
