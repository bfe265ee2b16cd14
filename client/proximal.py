"""FedProx at a site: adds mu * (w - w_global) to every shared parameter's gradient before each optimiser step.

The local-step functions take extra Lightning callbacks; this is one.
"""

from __future__ import annotations

import lightning as L
import torch


class ProximalTerm(L.Callback):
    """Gradient of (mu / 2) * ||w - w_global||^2 for the parameters under ``prefixes`` (the shared ones)."""

    def __init__(self, mu: float, prefixes: tuple[str, ...]):
        self.mu, self.prefixes = float(mu), tuple(p + "." for p in prefixes)
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        # the global weights were loaded into the module just before fit: they are the anchor
        self.pairs = [(p, p.detach().clone()) for name, p in pl_module.named_parameters()
                      if p.requires_grad and name.startswith(self.prefixes)]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for p, anchor in self.pairs:
                if p.grad is not None and id(p) in in_opt:
                    p.grad.add_(p.detach() - anchor.to(p.device), alpha=self.mu)


def proximal_callbacks(mu: float, prefixes: tuple[str, ...]) -> list[L.Callback]:
    """The callbacks to hand to the local-step functions (none when FedProx is off)."""
    return [ProximalTerm(mu, prefixes)] if mu > 0 else []
