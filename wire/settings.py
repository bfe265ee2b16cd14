"""The run config (flat kebab-case keys of ``[tool.flwr.app.config]``) as one typed object, read once by the server
and by every site; checked against the composed model config, not against the override string.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields

# the wire dtypes of wire/codec.py; here, so that reading settings never imports torch (the launchers check the
# run config before anything starts, and stay small: server.run, client.run)
TRANSFER_DTYPES = ("fp32", "bf16", "fp16", "int8")

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
AGGREGATORS = ("mean", "median", "trimmed-mean")
NORM_ACTIONS = ("refuse", "clip")


class SettingsError(ValueError):
    """A run-config value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Settings:
    profile: str = "tiny"
    overrides: str = ""  # Hydra overrides of the model config, for every site and the server
    seed: int = 0
    lae_rounds: int = 2
    dm_rounds: int = 2
    local_steps: int = 10  # local steps per round of both phases, unless the phase sets its own
    lae_local_steps: int = 0  # 0: local-steps (an LAE step costs 7-10x a DM step)
    dm_local_steps: int = 0  # 0: local-steps
    min_sites: int = 2
    round_timeout: float = 600.0  # seconds a round waits for replies
    wait_timeout: float = 300.0  # seconds the run waits for min-sites before it stops
    # training and latent-statistics messages out at once (0: all): sites sharing one machine or GPU node train in
    # waves, within round-timeout; the aggregate is the same
    max_parallel_sites: int = 0
    transfer_dtype: str = "fp32"  # fp32 | bf16 | fp16 | int8 (updates up, deltas down; error feedback)
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    server_lr: float = 0.01
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 0.001
    server_ema: str = "auto"  # EMA of the global UNet per DM round: auto (dm.ema_decay ** dm local steps) | off | decay
    dp_population: int = 1000  # central DP: the population the accountant assumes
    aggregator: str = "mean"  # mean (streaming, tile-weighted) | median | trimmed-mean (robust, one site one vote)
    trim_fraction: float = 0.2  # trimmed-mean: the fraction cut at each end, per coordinate
    norm_bound: float = 10.0  # an update above this x the reference norm is refused or clipped (0: off)
    norm_action: str = "refuse"  # refuse | clip
    max_examples: int = 1_000_000_000  # the largest num-examples (FedAvg weight) a site may claim
    run_dir: str = "runs/federated"
    run_name: str = ""  # a site's state folder for this run (default: the run dir's name)
    resume: bool = False
    deliver: bool = True
    augment: bool = True  # the labeled site runs its pipeline on delivery
    deliver_poll: float = 10.0  # seconds between status queries to a labeled site running its pipeline
    deliver_timeout: float = 7 * 24 * 3600.0  # seconds the server follows the labeled sites' pipelines
    # after the DM phase every unlabeled site samples the global model and compares with its own tiles
    memorisation_samples: int = 16  # unguided DDIM samples per site (the same at every site); 0: no check
    memorisation_ddim_steps: int = 20
    memorisation_alpha: float = 1 / 3  # near-copy: d(nearest tile) < alpha x d(second-nearest tile)
    memorisation_max_rate: float = 0.0  # the run is flagged when a site's near-copy rate is above this
    poll: float = 0.5
    sites_root: str = ""  # simulation: real folders sites-root/siteN (and siteN-test for labeled sites)
    work_root: str = ""  # simulation: the sites' work folders (default run-dir/sites)
    labeled_partitions: str = "last"  # simulation: partition ids of the labeled sites (last: the highest)
    phantom_per_class: int = 4  # simulation without sites-root: phantom tiles per class and site

    @classmethod
    def from_run_config(cls, run_config) -> "Settings":
        """Every known key parsed to its type (unknown keys are Flower's or the user's and are ignored)."""
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in run_config:
                continue
            raw = run_config[key]
            try:
                values[f.name] = {"int": _int, "float": float, "bool": _bool, "str": str}[f.type](raw)
            except (TypeError, ValueError):
                raise SettingsError(f"run-config key '{key}' = {raw!r}: expected {f.type}") from None
        settings = cls(**values)
        settings.check()
        return settings

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """What can be checked without the model config."""
        if self.transfer_dtype not in TRANSFER_DTYPES:
            raise SettingsError(f"run-config key 'transfer-dtype' = {self.transfer_dtype!r}; "
                                f"expected one of {', '.join(TRANSFER_DTYPES)}")
        if self.strategy not in STRATEGIES:
            raise SettingsError(f"run-config key 'strategy' = {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        for key in ("lae_rounds", "dm_rounds", "lae_local_steps", "dm_local_steps", "phantom_per_class",
                    "max_parallel_sites"):
            if getattr(self, key) < 0:
                raise SettingsError(f"run-config key '{key.replace('_', '-')}' must be >= 0")
        for key in ("local_steps", "min_sites", "dp_population"):
            if getattr(self, key) < 1:
                raise SettingsError(f"run-config key '{key.replace('_', '-')}' must be at least 1")
        for key in ("round_timeout", "wait_timeout", "poll", "deliver_poll", "deliver_timeout"):
            if not getattr(self, key) > 0:
                raise SettingsError(f"run-config key '{key.replace('_', '-')}' must be positive")
        for key, allowed in (("aggregator", AGGREGATORS), ("norm_action", NORM_ACTIONS)):
            if getattr(self, key) not in allowed:
                raise SettingsError(f"run-config key '{key.replace('_', '-')}' = {getattr(self, key)!r}; "
                                    f"expected one of {', '.join(allowed)}")
        if not 0 <= self.trim_fraction < 0.5 or self.norm_bound < 0 or self.max_examples < 1:
            raise SettingsError("run-config keys: trim-fraction must be in [0, 0.5), norm-bound >= 0, max-examples >= 1")
        from histodiff.privacy import MEMORISATION_MAX_SAMPLES as MAX_SAMPLES

        if not (0 <= self.memorisation_samples <= MAX_SAMPLES and self.memorisation_ddim_steps >= 1
                and 0 < self.memorisation_alpha <= 1 and 0 <= self.memorisation_max_rate < 1):
            raise SettingsError(f"run-config keys: memorisation-samples must be in [0, {MAX_SAMPLES}], "
                                "memorisation-ddim-steps >= 1, memorisation-alpha in (0, 1], "
                                "memorisation-max-rate in [0, 1)")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise SettingsError("strategy fedprox needs run-config key 'proximal-mu' > 0")
        self.ema_decay(0.0)  # raises on a bad server-ema
        try:
            shlex.split(self.overrides)
        except ValueError as exc:
            raise SettingsError(f"run-config key 'overrides' does not parse: {exc}") from None

    def check_model_config(self, cfg) -> None:
        """What depends on the composed config (privacy mode, secure aggregation)."""
        p = cfg.privacy
        if p.dp and p.mode == "central" and self.transfer_dtype != "fp32":
            raise SettingsError(f"privacy.mode=central needs transfer-dtype fp32 (got {self.transfer_dtype}): "
                                "a rounded update is no longer within the clipping norm")
        if p.secagg and self.min_sites < 2:
            raise SettingsError("privacy.secagg=true needs min-sites >= 2: a secure sum of one site is that site's update")
        if p.secagg and self.aggregator != "mean":
            raise SettingsError(f"aggregator {self.aggregator} needs each site's update; under privacy.secagg=true the "
                                "server sees only their sum: use aggregator=mean")
        if p.dp and p.mode == "central" and self.aggregator != "mean":
            raise SettingsError("central DP calibrates its noise to the mean of clipped updates: use aggregator=mean")
        if self.memorisation_samples and self.memorisation_ddim_steps > cfg.dm.num_train_timesteps:
            raise SettingsError(f"run-config key 'memorisation-ddim-steps' = {self.memorisation_ddim_steps}: at most "
                                f"dm.num_train_timesteps ({cfg.dm.num_train_timesteps})")
        if p.dp and p.mode == "local" and self.strategy == "fedprox":
            raise SettingsError("local DP-SGD (privacy.dp=true, mode=local) does not combine with strategy fedprox")

    def compose(self, extra: list[str] | tuple[str, ...] = ()):
        """The model config of this run (server side; a site adds its own paths as ``extra``), checked."""
        from histodiff.config import compose

        cfg = compose([*self.config_overrides(), *extra])
        self.check_model_config(cfg)
        return cfg

    # ------------------------------------------------------------------ derived values

    def steps(self, phase: str) -> int:
        """Local steps per round of ``phase`` (lae or dm)."""
        own = self.lae_local_steps if phase == "lae" else self.dm_local_steps
        return own or self.local_steps

    def ema_rule(self, dm_step_decay: float) -> tuple[float, int, bool]:
        """The server EMA of the UNet as (decay per step, steps per DM round, warm-up). ``auto``: the single-site
        rule (``dm.ema_decay`` per local step, diffusers' warm-up), so a round of k local steps moves the average
        as k single-site steps do; a number: that decay per round; ``off``: no EMA."""
        text = str(self.server_ema).strip().lower()
        if text == "auto":
            return float(dm_step_decay), self.steps("dm"), True
        if text in ("off", "0", "0.0", "none"):
            return 0.0, 1, False
        try:
            decay = float(text)
        except ValueError:
            raise SettingsError(f"run-config key 'server-ema' = {self.server_ema!r}: auto, off or a decay in [0, 1)") from None
        if not 0.0 <= decay < 1.0:
            raise SettingsError(f"run-config key 'server-ema' = {decay}: a decay must be in [0, 1)")
        return decay, 1, False

    def ema_decay(self, dm_step_decay: float) -> float:
        """The steady-state decay per DM round (``dm.ema_decay ** dm-local-steps`` under ``auto``)."""
        decay, steps, _ = self.ema_rule(dm_step_decay)
        return decay ** steps

    def planned_dp_steps(self) -> int:
        """DP events a site spends in the whole run: its local steps in every LAE and DM round, + 1 latent-stats release."""
        return self.lae_rounds * self.steps("lae") + self.dm_rounds * self.steps("dm") + 1

    def privacy_overrides(self) -> list[str]:
        """``privacy.planned_steps`` for target-epsilon mode when the overrides leave it unset (harmless when DP
        is off: nothing reads it then)."""
        if "privacy.planned_steps" in _override_keys(self.overrides):
            return []
        return [f"privacy.planned_steps={self.planned_dp_steps()}"]

    def config_overrides(self) -> list[str]:
        return [f"profile={self.profile}", *shlex.split(self.overrides), *self.privacy_overrides(), f"seed={self.seed}"]


def _override_keys(overrides: str) -> set[str]:
    return {t.split("=", 1)[0].strip().lstrip("+~") for t in shlex.split(overrides or "") if "=" in t}


def _int(v) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(v)
    return int(v)


def _bool(v) -> bool:
    if isinstance(v, str):
        text = v.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(v)
    return bool(v)
