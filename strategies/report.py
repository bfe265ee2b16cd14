"""What a round leaves behind for people: its ``metrics.jsonl`` line and its one progress line on the console."""

from __future__ import annotations

import time

from strategies.collect import Collected

MB = 1e6


def round_line(phase: str, phase_round: int, rounds: int, global_round: int, start: float, got: Collected,
               losses: dict, stages: dict | None = None, per_site: dict | None = None) -> dict:
    """One ``metrics.jsonl`` line. ``stages``: seconds per stage of the round (the federation adds ``checkpoint``);
    ``per_site``: each answering site's own metrics (``losses`` is their tile-weighted mean)."""
    line = {
        "phase": phase, "round": phase_round, "rounds": rounds, "global_round": global_round,
        "sites_asked": len(got.asked), "sites_answered": len(got.answered),
        "dropped": {str(k): v for k, v in got.dropped.items()}, "losses": losses,
        "bytes_sent": int(sum(got.sent.values())), "bytes_received": int(sum(got.received.values())),
        "bytes_sent_per_site": {str(k): int(v) for k, v in got.sent.items()},
        "bytes_received_per_site": {str(k): int(v) for k, v in got.received.items()},
        "seconds": round(time.time() - start, 3), "time": time.time(),
        "stages": {k: round(float(v), 3) for k, v in (stages or {}).items()},
        "timeline": got.timeline(),
    }
    if per_site:
        line["losses_per_site"] = {str(k): v for k, v in per_site.items()}
    return line


def progress_line(line: dict) -> str:
    losses = " ".join(f"{k}={v:.4g}" for k, v in line.get("losses", {}).items() if "seconds" not in k and k != "lr")
    extra = f" scale_factor={line['scale_factor']:.5g}" if "scale_factor" in line else ""
    spent = [s["epsilon"] for s in (line.get("privacy") or {}).values() if s.get("epsilon") is not None]
    if spent:
        extra += f" max-site-epsilon={max(spent):.3g}"
    if line.get("privacy_central"):
        extra += f" central-epsilon={line['privacy_central'].get('epsilon', 0.0):.3g}"
    if line.get("memorisation"):
        from strategies.memorisation_round import short

        extra += f" {short(line['memorisation'])}"
    if line.get("labeled_sites"):
        extra += f" labeled-site pipeline: {_pipelines(line['labeled_sites'])}"
    return (f"[fed] {line['phase']} round {line['round']}/{line['rounds']} (global {line['global_round']}): "
            f"{line['sites_answered']}/{line['sites_asked']} sites{extra} {losses} | "
            f"sent {line['bytes_sent'] / MB:.2f} MB received {line['bytes_received'] / MB:.2f} MB | "
            f"{line['seconds']:.1f} s").replace("  ", " ")


def _pipelines(results: dict) -> str:
    return ", ".join(f"site {node} {r.get('status', 'done')}" for node, r in results.items())
