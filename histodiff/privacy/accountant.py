"""The site's privacy accountant: one opacus RDP accountant per site, persisted as JSON in its work directory.

Every federated message runs in a fresh process, so the accountant is loaded before and saved after each
local DP training call; epsilon therefore accumulates across rounds, both phases (LAE and DM see the same
tiles) and restarts of the SuperNode. A new accountant per round would report one round's epsilon only.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCOUNTANT_FILE = "privacy_accountant.json"


@functools.lru_cache(maxsize=64)
def _one_step_rdp(noise_multiplier: float, sample_rate: float):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    return analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                orders=RDPAccountant.DEFAULT_ALPHAS)



def secret_generator(device="cpu"):
    """A torch generator seeded from the OS. DP noise and Poisson sampling must not be predictable from the run
    config: its seed comes from the server and is the same at every site."""
    import secrets

    import torch

    return torch.Generator(device=device).manual_seed(secrets.randbits(63))

class PrivacyBudgetExhausted(RuntimeError):
    """A site refuses to train: the next steps would spend more than its target epsilon. One-line message."""


@dataclass
class SiteAccountant:
    """Cumulative (epsilon, delta) of one site; ``history`` is opacus' RDP history [(sigma, q, steps), ...]."""

    target_epsilon: float
    delta: float
    noise_multiplier: float | None = None  # fixed at the first DP step, then kept for the whole run
    sample_rate: float | None = None
    max_grad_norm: float | None = None
    history: list[list[float]] = field(default_factory=list)
    steps: dict[str, int] = field(default_factory=dict)  # DP steps per phase (lae, dm)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # one entry per training call
    path: Path | None = None

    # ------------------------------------------------------------------ persistence

    @classmethod
    def load_or_create(cls, directory: Path, target_epsilon: float, delta: float) -> "SiteAccountant":
        """The site's accountant from ``directory`` (created once, then always loaded)."""
        path = Path(directory) / ACCOUNTANT_FILE
        if path.exists():
            acc = cls.from_dict(json.loads(path.read_text()))
            acc.path = path
            if acc.delta != delta:
                raise ValueError(f"{path} accounts at delta={acc.delta}, the config asks delta={delta}: "
                                 "a site's delta cannot change mid-run")
            acc.target_epsilon = float(target_epsilon)  # a budget may be raised or lowered by the site
            return acc
        return cls(float(target_epsilon), float(delta), path=path)

    def save(self) -> None:
        """Atomic write, so a crash mid-write keeps the previous (never a smaller) spend on disk."""
        if self.path is None:
            raise ValueError("accountant has no path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, self.path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": "DP-SGD (opacus, per-sample clipping + Gaussian noise, Poisson sampling)",
            "accountant": "rdp",
            "target_epsilon": self.target_epsilon, "delta": self.delta,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "max_grad_norm": self.max_grad_norm, "history": self.history, "steps": self.steps,
            "epsilon": self.epsilon(), "rounds": self.rounds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SiteAccountant":
        return cls(float(d["target_epsilon"]), float(d["delta"]), d.get("noise_multiplier"), d.get("sample_rate"),
                   d.get("max_grad_norm"), [list(h) for h in d.get("history", [])], dict(d.get("steps", {})),
                   list(d.get("rounds", [])))

    # ------------------------------------------------------------------ accounting

    def epsilon(self, extra_steps: int = 0) -> float:
        """Epsilon spent at ``delta`` (after ``extra_steps`` more steps at the current noise and sample rate).

        Opacus' RDP analysis (same orders and conversion as its ``RDPAccountant``); RDP is linear in the steps
        of one (sigma, q), so each pair's one-step RDP curve is computed once and scaled.
        """
        history = [(float(s), float(q), int(n)) for s, q, n in self.history]
        if extra_steps:
            history.append((float(self.noise_multiplier), float(self.sample_rate), int(extra_steps)))
        if not history:
            return 0.0
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as analysis

        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp = sum(n * _one_step_rdp(s, q) for s, q, n in history)
        eps, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=self.delta)
        return float(eps)

    @property
    def total_steps(self) -> int:
        return int(sum(h[2] for h in self.history))

    def fix_mechanism(self, sample_rate: float, max_grad_norm: float, noise_multiplier: float | None,
                      planned_steps: int) -> float:
        """Set (once) the noise multiplier: given, or the one that spends ``target_epsilon`` in ``planned_steps``."""
        if self.noise_multiplier is None:
            if noise_multiplier is None:
                if planned_steps <= 0:
                    raise ValueError("target-epsilon mode needs privacy.planned_steps > 0")
                # the plan's last unit is the latent-statistics release, a Gaussian release of the whole
                # data set (sample rate 1): price it as such, or the site would refuse that round
                releases = 1 if planned_steps > 1 else 0
                noise_multiplier = self._sigma_for_target(sample_rate, planned_steps - releases, releases)
            self.noise_multiplier = float(noise_multiplier)
        elif noise_multiplier is not None and not math.isclose(noise_multiplier, self.noise_multiplier):
            raise ValueError(f"privacy.noise_multiplier={noise_multiplier} but this site has trained with "
                             f"{self.noise_multiplier}; keep it fixed for the whole run")
        self.sample_rate, self.max_grad_norm = float(sample_rate), float(max_grad_norm)
        return self.noise_multiplier

    def _sigma_for_target(self, sample_rate: float, steps: int, releases: int) -> float:
        """Smallest noise multiplier whose ``steps`` DP-SGD steps plus ``releases`` full releases fit the target."""
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as analysis

        def spent(sigma: float) -> float:
            rdp = steps * _one_step_rdp(sigma, sample_rate) + releases * _one_step_rdp(sigma, 1.0)
            return float(analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=self.delta)[0])

        lo, hi = 0.0, 1.0
        while spent(hi) > self.target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e4:
                raise ValueError(f"no noise multiplier reaches epsilon {self.target_epsilon:g} in {steps} steps")
        for _ in range(40):  # bisection to well within opacus' own epsilon tolerance
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if spent(mid) > self.target_epsilon else (lo, mid)
        return hi

    def check_budget(self, steps: int, site: str = "site", release: tuple[float, float] | None = None) -> None:
        """Refuse (one line) when ``steps`` more DP steps (or ``release`` = (sigma, q) events) would pass the budget."""
        spent = self.epsilon()
        if release is None:
            after = self.epsilon(steps)
        else:
            saved = list(self.history)
            self.history.append([float(release[0]), float(release[1]), int(steps)])
            after, self.history = self.epsilon(), saved
        if after > self.target_epsilon * (1 + 1e-6):
            raise PrivacyBudgetExhausted(
                f"{site}: privacy budget exhausted: epsilon {spent:.3f} of {self.target_epsilon:g} spent at "
                f"delta {self.delta:g}; {steps} more DP {'steps' if release is None else 'releases'} would reach "
                f"{after:.3f}; refusing to train")

    def record_release(self, phase: str, noise_multiplier: float, count: int = 1) -> None:
        """Compose a Gaussian release of the whole data set (sample rate 1), e.g. the latent statistics."""
        self.history.append([float(noise_multiplier), 1.0, int(count)])
        self.steps[phase] = self.steps.get(phase, 0) + int(count)

    def record_steps(self, phase: str, steps: int) -> None:
        """Compose ``steps`` DP-SGD steps at the fixed noise multiplier and sample rate."""
        if steps <= 0:
            return
        last = self.history[-1] if self.history else None
        if last and math.isclose(last[0], self.noise_multiplier) and math.isclose(last[1], self.sample_rate):
            last[2] = int(last[2]) + int(steps)
        else:
            self.history.append([self.noise_multiplier, self.sample_rate, int(steps)])
        self.steps[phase] = self.steps.get(phase, 0) + int(steps)

    def record_round(self, phase: str, steps: int, **extra: Any) -> dict[str, Any]:
        entry = {"phase": phase, "steps": int(steps), "epsilon": self.epsilon(), "delta": self.delta,
                 "time": time.time(), **extra}
        self.rounds.append(entry)
        return entry

    def metrics(self) -> dict[str, float]:
        """Scalars a site may report to the server (kebab-case, Flower metric style)."""
        return {"dp-epsilon": self.epsilon(), "dp-delta": self.delta, "dp-target-epsilon": self.target_epsilon,
                "dp-noise-multiplier": float(self.noise_multiplier or 0.0),
                "dp-max-grad-norm": float(self.max_grad_norm or 0.0), "dp-sample-rate": float(self.sample_rate or 0.0),
                "dp-steps": float(self.total_steps),
                "dp-exhausted": float(self.exhausted())}

    def exhausted(self) -> bool:
        """Not even one more DP step fits in the budget (what ``remaining_steps() == 0`` means, without the search)."""
        return self.noise_multiplier is not None and self.epsilon(1) > self.target_epsilon

    def remaining_steps(self, limit: int = 10**7) -> int:
        """How many more DP steps fit in the budget (binary search over the RDP bound)."""
        if self.noise_multiplier is None:
            return limit
        if self.exhausted():
            return 0
        lo, hi = 1, 1
        while hi < limit and self.epsilon(hi) <= self.target_epsilon:
            lo, hi = hi, hi * 2
        hi = min(hi, limit)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.epsilon(mid) <= self.target_epsilon:
                lo = mid
            else:
                hi = mid - 1
        return lo
