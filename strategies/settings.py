"""The federation's run config (flat kebab-case keys of ``[tool.flwr.app.config]``) as one typed object."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields

from strategies.arrays import TRANSFER_DTYPES
from strategies.server_opt import STRATEGIES


@dataclass(frozen=True)
class Settings:
    profile: str = "tiny"
    overrides: str = ""
    seed: int = 0
    lae_rounds: int = 2
    dm_rounds: int = 2
    local_steps: int = 10
    min_sites: int = 2
    round_timeout: float = 600.0  # seconds a round waits for replies
    wait_timeout: float = 300.0  # seconds the run waits for min-sites before it stops
    transfer_dtype: str = "fp32"
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    server_lr: float = 0.01
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 0.001
    server_ema: float = 0.0
    run_dir: str = "runs/federated"
    resume: bool = False
    deliver: bool = True
    poll: float = 0.5

    @classmethod
    def from_run_config(cls, run_config) -> "Settings":
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in run_config:
                kind = {"int": int, "float": float, "bool": _bool, "str": str}[f.type]
                values[f.name] = kind(run_config[key])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.transfer_dtype not in TRANSFER_DTYPES:
            raise ValueError(f"transfer-dtype {self.transfer_dtype!r}; expected one of {', '.join(TRANSFER_DTYPES)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if self.min_sites < 1:
            raise ValueError("min-sites must be at least 1")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("strategy fedprox needs proximal-mu > 0")

    def config_overrides(self) -> list[str]:
        return [f"profile={self.profile}", *shlex.split(self.overrides), f"seed={self.seed}"]


def _bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)
