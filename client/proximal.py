"""FedProx at a site: adds mu * (w - w_global) to every shared parameter's gradient before each optimiser step.

The shared parameters are those of the phase's parts in the wire contract (``wire.contract.PHASE_PARTS``), found
as the Lightning module's attributes of the same names. The local-step functions take extra callbacks; this is one.
"""

from __future__ import annotations

import lightning as L
import torch

from wire.contract import PHASE_PARTS


class ProximalTerm(L.Callback):
    """Gradient of (mu / 2) * ||w - w_global||^2 for the parameters of ``parts`` (the shared models)."""

    def __init__(self, mu: float, parts: tuple[str, ...]):
        self.mu, self.parts = float(mu), tuple(parts)
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        # the global weights were loaded into the module just before fit: they are the anchor
        self.pairs = [(p, p.detach().clone()) for part in self.parts for p in getattr(pl_module, part).parameters()
                      if p.requires_grad]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for p, anchor in self.pairs:
                if p.grad is not None and id(p) in in_opt:
                    p.grad.add_(p.detach() - anchor.to(p.device), alpha=self.mu)


def proximal_callbacks(mu: float, phase: str, shared_discriminator: bool = True) -> list[L.Callback]:
    """The callbacks to hand to the local-step functions of ``phase`` (none when FedProx is off)."""
    parts = tuple(p for p in PHASE_PARTS[phase] if p != "discriminator" or shared_discriminator)
    return [ProximalTerm(mu, parts)] if mu > 0 else []
