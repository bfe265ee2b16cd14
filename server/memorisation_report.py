"""The memorisation check of a run in ``privacy.json`` / ``privacy.md``: each site's counts and quantiles, as its
``metrics.jsonl`` line recorded them (``strategies/memorisation_round.py``), and the run's flag."""

from __future__ import annotations

from typing import Any

from histodiff.privacy.memorisation import QUANTILES

NOT_RUN = ("Memorisation check at the sites that trained the DM: not run (memorisation-samples = 0, no DM round, or "
           "the run stopped before it).")


def memorisation_check(lines: list[dict], privacy=None) -> dict[str, Any] | None:
    """The last memorisation check of the run (None when there was none)."""
    found = [line for line in lines if line.get("phase") == "memorisation" and line.get("memorisation")]
    if not found:
        return None
    check = dict(found[-1]["memorisation"])
    check["global_round"] = found[-1].get("global_round")
    # the figures are exact: under DP they are a release outside the accountant, said where they are shown
    check["outside_dp_accounting"] = bool(privacy is not None and privacy.dp)
    return check


def _q(site: dict, space: str, what: str) -> str:
    return " / ".join(f"{site[f'{space}-{what}-{name}']:.3g}" for name in QUANTILES)


def memorisation_markdown(check: dict[str, Any] | None, headline: bool = False) -> list[str]:
    """Lines of ``privacy.md``: with ``headline``, only the flag (or the lack of any check) at the top; else the
    section with every site's figures."""
    if headline:
        if check and check.get("flagged"):
            sites = ", ".join(check["flagged_sites"])
            return [f"**MEMORISATION FLAGGED**: site(s) {sites} report near-copies of their own tiles above "
                    f"memorisation-max-rate {check['max_rate']:g} (section \"Memorisation check\" below). The global "
                    "model reproduces training tiles: do not release it as it is.", ""]
        if check and check.get("verdict") == "unchecked":
            return ["**Memorisation check: no site answered**; the global model was not checked (section "
                    "\"Memorisation check\" below).", ""]
        return []
    if not check:
        return [NOT_RUN]
    qs = "/".join(QUANTILES)
    out = [f"### Memorisation check: {check['verdict']}", "",
           f"Each site that trained the DM drew the same {check['samples']} unguided DDIM samples ({check['ddim_steps']} "
           f"steps, seed {check['seed']}) from the global model (the delivered EMA UNet, the LAE decoder, the scale "
           f"factor) and compared them with its own tiles, each tile in its 8 flips and rotations: nearest and "
           f"second-nearest tile in {check['feature_space']} and in {check['pixel_space']}. A sample is a near-copy "
           f"when d(nearest) < {check['alpha']:.3g} x d(second nearest) (Carlini et al. 2023). The run is flagged "
           f"when a site's near-copy rate (either space) is above memorisation-max-rate {check['max_rate']:g}. Only "
           "these counts and quantiles left the sites; each keeps its per-sample details and a grid of any "
           "near-copies in `<work>/<run>/memorisation/`.", ""]
    if check.get("outside_dp_accounting"):
        out += ["These figures are exact, not noised: they are not covered by the epsilon above.", ""]
    if check["sites"]:
        out += [f"| site | samples | tiles | near-copies feature / pixel / either | rate | feature nn {qs} | "
                f"feature ratio {qs} | pixel RMS nn {qs} | pixel ratio {qs} | verdict |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for node, site in check["sites"].items():
            out.append(f"| {node} | {site['samples']} | {site['tiles']} | {site['near-copies-feature']} / "
                       f"{site['near-copies-pixel']} / {site['near-copies']} | {site['rate']:.3g} | "
                       f"{_q(site, 'feature', 'nn')} | {_q(site, 'feature', 'ratio')} | {_q(site, 'pixel', 'nn')} | "
                       f"{_q(site, 'pixel', 'ratio')} | {'**FLAGGED**' if site['flagged'] else 'ok'} |")
        out.append("")
    for node, why in check.get("failed", {}).items():
        out.append(f"- site {node}: not checked ({why})")
    return out
