"""The privacy report of a run: ``privacy.json`` and a markdown section for the run report.

Sources, all optional: the server's ledger (``privacy_ledger.json``: each site's reported epsilon per round,
central-DP accounting), the run's ``metrics.jsonl`` (bytes each site sent per round), the sites' own
accountants (``privacy_accountant.json``, readable where the sites' work directories are, e.g. simulation),
the labeled site's ``results.json`` (memorisation guard), and the memorisation check at the sites that trained the
DM (its ``metrics.jsonl`` line; ``memorisation_report.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from histodiff.privacy.accountant import ACCOUNTANT_FILE
from server.memorisation_report import memorisation_check, memorisation_markdown

from wire.contract import STATISTICS  # scalars a site sends besides arrays in each phase


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _metrics_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _egress(lines: list[dict], arrays_per_phase: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per site: rounds answered, arrays and bytes sent, statistics sent, per phase (from metrics.jsonl)."""
    out: dict[str, dict[str, Any]] = {}
    for line in lines:
        phase = line.get("phase")
        for node, nbytes in (line.get("bytes_received_per_site") or {}).items():
            site = out.setdefault(str(node), {"phases": {}})
            ph = site["phases"].setdefault(phase, {"rounds": 0, "arrays": 0, "bytes": 0, "statistics": 0})
            ph["rounds"] += 1
            ph["bytes"] += int(nbytes)
            if nbytes:
                ph["arrays"] += int(arrays_per_phase.get(phase, 0))
            ph["statistics"] += len(STATISTICS.get(phase, []))
    for site in out.values():
        site["arrays"] = sum(p["arrays"] for p in site["phases"].values())
        site["bytes"] = sum(p["bytes"] for p in site["phases"].values())
        site["statistics"] = sum(p["statistics"] for p in site["phases"].values())
    return out


def _secure_rounds(lines: list[dict]) -> dict[str, Any] | None:
    """SecAgg+ per run: rounds aggregated securely, dropouts whose masks were rebuilt, largest quantisation bound."""
    rounds = [line["secagg"] for line in lines if line.get("secagg")]
    if not rounds:
        return None
    return {"rounds": len(rounds), "dropouts_unmasked": sum(len(r.get("dropouts_unmasked", [])) for r in rounds),
            "max_quantisation_bound": max((r.get("quantisation_bound") or 0.0) for r in rounds),
            "max_clipped_fraction": max((r.get("clipped_fraction_max") or 0.0) for r in rounds)}


def _arrays_per_phase(cfg) -> dict[str, int]:
    if cfg is None:
        return {}
    from wire.contract import TRAINING_PHASES, phase_shapes

    return {phase: len(phase_shapes(cfg, phase)) for phase in TRAINING_PHASES}


def find_site_accountants(root: Path) -> dict[str, Path]:
    """``privacy_accountant.json`` files under ``root`` keyed by their site folder (e.g. sites/site0/<run>)."""
    found = {}
    for path in sorted(Path(root).rglob(ACCOUNTANT_FILE)):
        rel = path.parent.relative_to(root)
        found[str(rel.parts[-2] if len(rel.parts) >= 2 else rel)] = path
    return found


def find_labeled_results(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("results.json") if "augment" in p.parts)


def _memorisation(results_paths: Iterable[Path]) -> list[dict[str, Any]]:
    out = []
    for path in results_paths:
        data = _read_json(Path(path)) or {}
        settings = data.get("settings", {})
        out.append({
            "results": str(path),
            "thresholds": {k: data.get("selection", {}).get(k) for k in ("feature_threshold", "pixel_threshold")},
            "candidates": data.get("selection", {}).get("candidates"),
            "dropped_by_setting": {name: entry.get("memorised_dropped") for name, entry in settings.items()},
        })
    return out


def build_privacy_report(run_dir: str | Path, cfg=None, site_accountants: dict[str, Path] | None = None,
                         labeled_results: Iterable[Path] | None = None, site_results: dict[str, dict] | None = None
                         ) -> dict[str, Any]:
    """Everything known about what left each site and what it cost in privacy."""
    run_dir = Path(run_dir)
    ledger = _read_json(run_dir / "privacy_ledger.json") or {}
    lines = _metrics_lines(run_dir)
    if site_accountants is None:
        site_accountants = find_site_accountants(run_dir)
    if labeled_results is None:
        labeled_results = find_labeled_results(run_dir)
    privacy = cfg.privacy if cfg is not None else None

    sites: dict[str, Any] = {}
    for name, path in site_accountants.items():
        acc = _read_json(Path(path)) or {}
        sites[name] = {"source": str(path), "epsilon": acc.get("epsilon"), "delta": acc.get("delta"),
                       "target_epsilon": acc.get("target_epsilon"), "noise_multiplier": acc.get("noise_multiplier"),
                       "max_grad_norm": acc.get("max_grad_norm"), "sample_rate": acc.get("sample_rate"),
                       "steps": acc.get("steps"), "mechanism": acc.get("mechanism"),
                       "rounds": acc.get("rounds", []),
                       "arrays_sent": sum(r.get("arrays", 0) for r in acc.get("rounds", [])),
                       "bytes_sent": sum(r.get("bytes", 0) for r in acc.get("rounds", []))}
    for name, res in (site_results or {}).items():  # LocalResult metrics of a single-site run
        sites.setdefault(name, {}).update({k[3:].replace("-", "_"): v for k, v in res.items() if k.startswith("dp-")})

    if privacy is not None and privacy.secagg and not privacy.dp:
        mechanism = ("no differential privacy; SecAgg+ masks every update and statistic that leaves a site, and "
                     "the server sees their weighted sum exactly")
    elif privacy is None or not privacy.dp:
        mechanism = "none (no differential privacy; weights and statistics leave the sites as trained)"
    elif privacy.mode == "local":
        mechanism = ("local DP-SGD at each site (opacus hooks mode: per-sample clipping, Gaussian noise, Poisson "
                     "sampling; RDP accountant per site, persisted; LAE without the adversarial term)")
    else:
        mechanism = "central DP: update clipping at each site + Gaussian noise on the server aggregate (Flower)"
    report = {
        "run_dir": str(run_dir),
        "mechanism": mechanism,
        "config": ({k: privacy[k] for k in privacy} if privacy is not None else None),
        "secure_aggregation": bool(privacy.secagg) if privacy is not None else False,
        "secure_rounds": _secure_rounds(lines),
        "sites": sites,
        "server_ledger": ledger.get("sites", {}),
        "central": ledger.get("central") or None,
        "egress": _egress(lines, _arrays_per_phase(cfg)),
        "never_leaves": ["tiles", "labels", "per-sample gradients", "optimizer state", "LPIPS network",
                         "site accountant internals (only dp-* scalars are reported)",
                         "the memorisation check's samples, features and nearest-tile indices (only its counts and "
                         "quantiles)"],
        "memorisation_guard": _memorisation(labeled_results),
        "memorisation_check": memorisation_check(lines, privacy),
    }
    return report


def privacy_markdown(report: dict[str, Any]) -> str:
    """The "Privacy" section of the run report (a memorisation flag first, where no one can miss it)."""
    out = ["## Privacy", "", *memorisation_markdown(report.get("memorisation_check"), headline=True),
           f"Mechanism: {report['mechanism']}.",
           f"Secure aggregation (SecAgg+): {'on' if report.get('secure_aggregation') else 'off'}.", ""]
    sec = report.get("secure_rounds")
    if sec:
        out += [f"SecAgg+: {sec['rounds']} rounds aggregated securely (the server received only masked uint32 uploads "
                f"and unmasked only their sum); {sec['dropouts_unmasked']} dropout(s) unmasked from shares; quantisation "
                f"error at most {sec['max_quantisation_bound']:.3g} per value; largest fraction of values clipped by "
                f"the quantisation range: {sec['max_clipped_fraction']:.3g}.", ""]
    cfgp = report.get("config") or {}
    if cfgp.get("dp"):
        out += [f"Clipping: max_grad_norm = {cfgp.get('max_grad_norm')}; noise multiplier = "
                f"{cfgp.get('noise_multiplier') if cfgp.get('noise_multiplier') is not None else 'from target epsilon'}"
                f"; target epsilon = {cfgp.get('target_epsilon')} at delta = {cfgp.get('delta')}.", ""]
    if report["sites"]:
        out += ["| site | epsilon spent | delta | target | noise multiplier | clip C | steps (lae/dm) | arrays sent | MB sent |",
                "|---|---|---|---|---|---|---|---|---|"]
        for name, s in sorted(report["sites"].items()):
            steps = s.get("steps") or {}
            eps = s.get("epsilon")
            out.append(f"| {name} | {eps:.3f} | {s.get('delta')} | {s.get('target_epsilon')} | "
                       f"{(s.get('noise_multiplier') or 0):.3f} | {s.get('max_grad_norm')} | "
                       f"{steps.get('lae', 0)}/{steps.get('dm', 0)} | {s.get('arrays_sent', 0)} | "
                       f"{(s.get('bytes_sent') or 0) / 1e6:.2f} |" if eps is not None else f"| {name} | - |||||||")
        out.append("")
    if report["server_ledger"]:
        with_eps = any("epsilon" in r for site in report["server_ledger"].values() for r in site.get("rounds", []))
        out += [("Epsilon per round as reported to the server:" if with_eps else
                 "Rounds each site took part in (no differential privacy, no epsilon):"), ""]
        for node, s in sorted(report["server_ledger"].items()):
            trail = ", ".join(f"{r['phase']}{r['round']}: {r['epsilon']:.2f}" if "epsilon" in r else
                              f"{r['phase']}{r['round']}: refused" if "refused" in r else
                              f"{r['phase']}{r['round']}: sent" for r in s.get("rounds", []))
            out.append(f"- site {node}{' (exhausted: not scheduled any more)' if s.get('exhausted') else ''}: {trail}")
        out.append("")
    if report.get("central"):
        c = report["central"]
        out += [f"Central DP: epsilon {c.get('epsilon', 0):.3f} at delta {c.get('delta')} after {c.get('releases')} "
                f"releases (noise multiplier {c.get('noise_multiplier')}, clipping {c.get('clipping_norm')}, "
                f"{c.get('accountant')}).", ""]
    if report["egress"]:
        out += ["What left each site (server's record):", "", "| site | phase | rounds | arrays | statistics | MB |",
                "|---|---|---|---|---|---|"]
        for node, s in sorted(report["egress"].items()):
            for phase, p in s["phases"].items():
                out.append(f"| {node} | {phase} | {p['rounds']} | {p['arrays']} | {p['statistics']} | {p['bytes'] / 1e6:.2f} |")
        out.append("")
    out.append("Never leaves a site: " + ", ".join(report["never_leaves"]) + ".")
    out += ["", *memorisation_markdown(report.get("memorisation_check"))]
    for m in report["memorisation_guard"]:
        out += ["", f"Memorisation guard at the labeled site ({m['results']}): thresholds {m['thresholds']}, "
                f"{m['candidates']} candidates; synthetic tiles dropped as too close to a real tile: "
                + ", ".join(f"{k}: {v}" for k, v in m["dropped_by_setting"].items())]
    return "\n".join(out) + "\n"


def write_privacy_report(run_dir: str | Path, cfg=None, **kwargs) -> tuple[Path, Path]:
    """Write ``privacy.json`` and ``privacy.md`` into ``run_dir``."""
    run_dir = Path(run_dir)
    report = build_privacy_report(run_dir, cfg, **kwargs)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "privacy.json").write_text(json.dumps(report, indent=2, default=str))
    (run_dir / "privacy.md").write_text(privacy_markdown(report))
    return run_dir / "privacy.json", run_dir / "privacy.md"


def main(argv: list[str] | None = None) -> int:
    """``python -m server.privacy_report RUN_DIR [overrides...]``"""
    import sys

    from histodiff.config import compose

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m server.privacy_report RUN_DIR [config overrides]", file=sys.stderr)
        return 2
    cfg = compose(args[1:]) if len(args) > 1 else None
    for path in write_privacy_report(args[0], cfg):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
