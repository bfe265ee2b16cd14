"""Server-side update rules applied to the weighted mean update of a round: FedAvg/FedProx, FedAdam, FedYogi; EMA.

Sites send updates ``w_local - w_global``; every rule here takes their weighted mean as the pseudo-gradient.
Integer buffers travel as values and replace the global's. FedProx differs from FedAvg only at the sites
(proximal term, ``proximal-mu``); the server averages.
FedAdam/FedYogi follow Reddi et al. 2021 (adaptive federated optimisation), in fp32 torch.
"""

from __future__ import annotations

import torch

from wire.settings import STRATEGIES


def _keep_or_replace(x: torch.Tensor, update: dict[str, torch.Tensor], k: str) -> torch.Tensor:
    """An array the rule does not move: an integer buffer takes the sites' value, an array without update stays."""
    return update[k].clone() if k in update else x


class ServerOptimizer:
    """``step(current, update) -> new global``; FedAvg and FedProx add the mean update."""

    name = "fedavg"

    def step(self, current: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (x + update[k] if x.is_floating_point() and k in update else _keep_or_replace(x, update, k))
                for k, x in current.items()}

    def step_consuming(self, current: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``step``, free to write into ``update``'s tensors (the caller is done with it): FedAvg adds ``current``
        into the update's own fp32 memory, so the server holds no third model-sized buffer; the adaptive rules
        (subclasses) step as usual."""
        if type(self).step is not ServerOptimizer.step:
            return self.step(current, update)

        def add(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            if u.dtype == x.dtype == torch.float32 and u.shape == x.shape and not u.requires_grad:
                return u.add_(x)
            return x + u

        return {k: (add(x, update[k]) if x.is_floating_point() and k in update else _keep_or_replace(x, update, k))
                for k, x in current.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class FedAdam(ServerOptimizer):
    """x += eta * m / (sqrt(v) + tau) with m, v the moments of the pseudo-gradient (the mean update)."""

    name = "fedadam"

    def __init__(self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v.mul_(self.beta2).add_(d2, alpha=1 - self.beta2)

    def step(self, current, update):
        new = {}
        for k, x in current.items():
            if not x.is_floating_point() or k not in update:
                new[k] = _keep_or_replace(x, update, k)
                continue
            delta = update[k]
            m = self.m.setdefault(k, torch.zeros_like(x))
            v = self.v.setdefault(k, torch.zeros_like(x))
            m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
            self.v[k] = self._second_moment(v, delta * delta)
            new[k] = x + self.eta * m / (self.v[k].sqrt() + self.tau)
        return new

    def state_dict(self):
        return {**{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state_dict(self, state):
        self.m = {k[2:]: v.clone() for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: v.clone() for k, v in state.items() if k.startswith("v/")}


class FedYogi(FedAdam):
    """Like FedAdam but v moves additively: v -= (1 - beta2) * d^2 * sign(v - d^2)."""

    name = "fedyogi"

    def _second_moment(self, v, d2):
        return v.sub_((1 - self.beta2) * d2 * torch.sign(v - d2))


def build_server_optimizer(name: str, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99,
                           tau: float = 1e-3) -> ServerOptimizer:
    if name in ("fedavg", "fedprox"):
        opt = ServerOptimizer()
        opt.name = name
        return opt
    if name == "fedadam":
        return FedAdam(eta, beta1, beta2, tau)
    if name == "fedyogi":
        return FedYogi(eta, beta1, beta2, tau)
    raise ValueError(f"strategy {name!r}; expected one of {', '.join(STRATEGIES)}")


class ServerEMA:
    """Exponential moving average of the global weights, one update per round (what is delivered when enabled).

    ``decay`` applies per local step and a round counts ``steps_per_round`` of them, so a round moves the average
    as ``steps_per_round`` steps of a single-site EMA do; with ``warmup`` each step's decay is
    ``min(decay, (1 + s) / (10 + s))`` at global step ``s``, diffusers' ``EMAModel`` rule.
    """

    def __init__(self, decay: float, steps_per_round: int = 1, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"server-ema must be in [0, 1), got {decay}")
        self.decay, self.steps, self.warmup = decay, max(1, int(steps_per_round)), warmup
        self.shadow: dict[str, torch.Tensor] = {}
        self.rounds = 0

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    def round_decay(self, r: int) -> float:
        """The decay applied at round ``r`` (1-based): the product of its steps' decays."""
        if not self.warmup:
            return self.decay ** self.steps
        out = 1.0
        for s in range((r - 1) * self.steps + 1, r * self.steps + 1):
            out *= min(self.decay, (1 + s) / (10 + s))
        return out

    def update(self, weights: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        self.rounds += 1
        decay = self.round_decay(self.rounds)
        for k, w in weights.items():
            if k not in self.shadow or not w.is_floating_point():
                self.shadow[k] = w.clone()
            else:
                self.shadow[k].mul_(decay).add_(w, alpha=1 - decay)

    def weights(self, fallback: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The EMA weights where it has them, ``fallback`` (the raw global model) elsewhere."""
        if not self.enabled:
            return fallback
        return {k: self.shadow.get(k, v) for k, v in fallback.items()}

    def state_dict(self):
        if not self.enabled:
            return {}
        return {**{f"ema/{k}": v for k, v in self.shadow.items()}, "ema-rounds": torch.tensor(self.rounds)}

    def load_state_dict(self, state):
        self.shadow = {k[4:]: v.clone() for k, v in state.items() if k.startswith("ema/")}
        self.rounds = int(state["ema-rounds"]) if "ema-rounds" in state else 0
