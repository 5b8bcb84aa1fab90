"""Freezing with an explicit BatchNorm policy, after Lightning's ``BaseFinetuning.freeze``: one helper for every model.

A frozen module gets no gradients and stays in inference mode, even after its model is switched to ``.train()``:
models that hold frozen parts call :func:`keep_frozen_in_eval` at the end of their ``train``. For BatchNorm layers that
means the running statistics stay fixed as well, as Keras runs them in inference mode. (timm's ``freeze`` swaps in
``FrozenBatchNorm2d`` instead, which would drop ``num_batches_tracked`` from the saved files and break loading them.)
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

# Set on each frozen module; read back by keep_frozen_in_eval, so a model needs no flag per frozen part.
_FROZEN = "headstart_frozen"


def batch_norms(module: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer inside ``module`` (itself included)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze(modules: nn.Module | Iterable[nn.Module], train_bn: bool) -> None:
    """Stop ``modules`` and everything inside them from training: no gradients, inference mode from now on.

    Args:
        modules: one module or several; their submodules are frozen with them.
        train_bn: leave the BatchNorm layers among them out of the freeze, so that their statistics and affine
            parameters keep training (Lightning's default); False freezes them with the rest.
    """
    for root in [modules] if isinstance(modules, nn.Module) else modules:
        for module in root.modules():
            if train_bn and isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
            setattr(module, _FROZEN, True)
            module.training = False  # this module alone: a BatchNorm left training may sit inside it


def keep_frozen_in_eval(model: nn.Module) -> None:
    """Put every frozen module inside ``model`` back in inference mode; ``model.train`` calls this after switching."""
    for module in model.modules():
        if getattr(module, _FROZEN, False):
            module.training = False  # not .eval(), which would also stop a BatchNorm left training inside it
