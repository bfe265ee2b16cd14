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
        dp, mode = privacy_mode(self.overrides)
        if dp and mode == "central" and self.transfer_dtype != "fp32":
            raise ValueError(f"privacy.mode=central needs transfer-dtype fp32 (got {self.transfer_dtype}): "
                             "a rounded update is no longer within the clipping norm")
        if _bool(_override_values(self.overrides).get("privacy.secagg", "false")) and self.min_sites < 2:
            raise ValueError("privacy.secagg=true needs min-sites >= 2: a secure sum of one site is that site's update")
        if dp and mode == "local" and self.strategy == "fedprox":
            raise ValueError("local DP-SGD (privacy.dp=true, mode=local) does not combine with strategy fedprox")

    def planned_dp_steps(self) -> int:
        """DP events a site spends in the whole run: its local steps in every LAE and DM round, + 1 latent-stats release."""
        return (self.lae_rounds + self.dm_rounds) * self.local_steps + 1

    def privacy_overrides(self) -> list[str]:
        """``privacy.planned_steps`` for target-epsilon mode, when DP is on and the overrides leave it unset."""
        dp, _ = privacy_mode(self.overrides)
        if not dp or "privacy.planned_steps" in _override_values(self.overrides):
            return []
        return [f"privacy.planned_steps={self.planned_dp_steps()}"]

    def config_overrides(self) -> list[str]:
        return [f"profile={self.profile}", *shlex.split(self.overrides), *self.privacy_overrides(), f"seed={self.seed}"]


def _override_values(overrides: str) -> dict[str, str]:
    """``key=value`` tokens of an overrides string (the last one of a key wins, as in the config)."""
    values = {}
    for token in shlex.split(overrides or ""):
        if "=" in token:
            key, value = token.split("=", 1)
            values[key.strip().lstrip("+~")] = value.strip()
    return values


def privacy_mode(overrides: str) -> tuple[bool, str]:
    """(privacy.dp, privacy.mode) as the overrides set them (defaults: off, local)."""
    values = _override_values(overrides)
    return _bool(values.get("privacy.dp", "false")), values.get("privacy.mode", "local").strip("'\"")


def site_run_config(run_config) -> dict:
    """The run config a site composes its config from, with the federation's privacy overrides added
    (``privacy.planned_steps`` for target-epsilon mode is a property of the whole schedule, not of one site)."""
    rc = dict(run_config)
    values = {}
    for name in ("lae_rounds", "dm_rounds", "local_steps"):
        key = name.replace("_", "-")
        if key in rc:
            values[name] = int(rc[key])
    extra = Settings(overrides=str(rc.get("overrides", "")), **values).privacy_overrides()
    if extra:
        rc["overrides"] = " ".join([str(rc.get("overrides", "")), *extra]).strip()
    return rc


def _bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)
