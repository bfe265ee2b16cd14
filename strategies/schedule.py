"""The phase schedule lae -> latent-stats -> dm -> memorisation -> deliver -> done, and the server state that
resumes it. ``memorisation`` is the check at the sites that trained the DM (strategies/memorisation_round.py)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

PHASES = ("lae", "latent-stats", "dm", "memorisation", "deliver", "done")
STATE_FILE = "server_state.json"


@dataclass(frozen=True)
class Plan:
    lae_rounds: int
    dm_rounds: int
    deliver: bool = True
    memorisation: bool = False  # one check round after a DM phase (memorisation-samples > 0)

    def rounds(self, phase: str) -> int:
        return {"lae": self.lae_rounds, "latent-stats": 1, "dm": self.dm_rounds,
                "memorisation": 1 if self.memorisation and self.dm_rounds > 0 else 0,
                "deliver": 1 if self.deliver else 0, "done": 0}[phase]


@dataclass
class ServerState:
    phase: str = "lae"
    phase_round: int = 0  # rounds completed in the current phase
    global_round: int = 0  # rounds completed in all
    scale_factor: float | None = None
    latent_stats: dict | None = None  # the combined sum, sum_sq, count
    lae_digest: str | None = None  # hash of the frozen global autoencoder used by the DM phase
    has_lae: list[int] = field(default_factory=list)  # nodes holding that autoencoder
    roles: dict[str, str] = field(default_factory=dict)  # node id -> unlabeled | labeled
    declared: dict[str, int] = field(default_factory=dict)  # node id -> tiles it declared when it joined
    norm_reference: dict[str, float] = field(default_factory=dict)  # phase -> median update norm of its last round
    delivered: dict[str, int] = field(default_factory=dict)  # labeled nodes that took the global model -> bytes
    memorisation: dict = field(default_factory=dict)  # the check's verdict: flagged, flagged_sites, rate, ...
    checkpoint: str | None = None  # folder of the last round's global weights, relative to the run dir
    status: str = "running"  # running | done | stopped
    message: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ServerState":
        return cls(**json.loads(text))


def start_state(plan: Plan) -> ServerState:
    """The state before the first round: the first phase that has rounds."""
    state = ServerState()
    _skip_empty(state, plan)
    return state


def advance(state: ServerState, plan: Plan) -> ServerState:
    """Record one completed round and move to the next phase when this one has all its rounds."""
    state.phase_round += 1
    state.global_round += 1
    _skip_empty(state, plan)
    return state


def _skip_empty(state: ServerState, plan: Plan) -> None:
    while state.phase != "done" and state.phase_round >= plan.rounds(state.phase):
        state.phase = PHASES[PHASES.index(state.phase) + 1]
        state.phase_round = 0
    if state.phase == "done" and state.status == "running":
        state.status = "done"


def save_state(run_dir: Path, state: ServerState) -> None:
    """Atomic write: the state file is the commit point of a round's checkpoint."""
    path = Path(run_dir) / STATE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)


def load_state(run_dir: Path) -> ServerState | None:
    path = Path(run_dir) / STATE_FILE
    return ServerState.from_json(path.read_text()) if path.is_file() else None
