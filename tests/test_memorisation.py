"""The memorisation check at the sites that trained the DM: a memorising DM is caught, one that memorised other
tiles is not; only counts and quantiles leave a site; malformed figures are refused; the server records the
figures in privacy.json / privacy.md and flags the run; one federated run on the in-process grid does it all.

The memorising DM is the exact minimiser of the DM loss (eq. 3) on a finite training set: eps(z_t, t) =
E[eps | z_t] under the empirical distribution of the training latents. A UNet trained long enough on few tiles
approaches it; DDIM with it returns training latents (Kadkhodaie et al. 2024 call this the memorisation regime).
With a lossless autoencoder (pixel unshuffle) the decoded samples are the training tiles up to DDIM's last step.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.outbox import OutboxViolation, check_outgoing
from histodiff.config import compose
from histodiff.data.phantom_tissue import write_phantom_site
from histodiff.data.tile_dataset import TileFolder, TileOptions
from histodiff.diffusion.noise_schedule import build_ddim
from histodiff.privacy import memorisation
from histodiff.privacy.memorisation import FIGURES, check_memorisation, dihedral, write_local_report
from strategies.checkpoint import read_metrics
from strategies.federation import Federation
from strategies.memorisation_round import check_figures
from strategies.validate import BadReply
from tests.inprocess_grid import InProcessGrid
from wire.codec import from_record, to_record
from wire.contract import MEMORISATION_METRICS

SIZE = 32
ALPHA = 1 / 3
TINY = ("tiles.image_size=16 lae.block_out_channels=[8,8] lae.norm_num_groups=4 lae.layers_per_block=1 "
        "lae.disc_channels=8 lae.disc_layers=1 lae.perceptual_weight=0 weights.perceptual=random "
        "dm.unet.block_out_channels=[16,16] dm.unet.attention_levels=[false,true] dm.unet.norm_num_groups=4")


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class LosslessAE(torch.nn.Module):
    """An autoencoder that loses nothing (pixel unshuffle by 4): a copied latent decodes to the very tile."""

    def encode(self, x):
        z = F.pixel_unshuffle(x, 4)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=z, sample=lambda generator=None: z))

    def decode(self, z):
        return SimpleNamespace(sample=F.pixel_shuffle(z, 4))


class MemorisingDM(torch.nn.Module):
    """The optimal eps-predictor of the empirical distribution of ``latents`` (see the module docstring)."""

    def __init__(self, latents: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("z0", latents.flatten(1))
        self.register_buffer("abar", alphas_cumprod)
        self.config = SimpleNamespace(in_channels=latents.shape[1], sample_size=latents.shape[-1])

    def forward(self, z, t):
        a = self.abar[int(t)]
        zf = z.flatten(1)
        w = (-torch.cdist(zf, a.sqrt() * self.z0) ** 2 / (2 * (1 - a))).softmax(dim=1)
        return SimpleNamespace(sample=((zf - a.sqrt() * (w @ self.z0)) / (1 - a).sqrt()).view_as(z))


def memorising(tiles) -> MemorisingDM:
    """A DM that memorised ``tiles`` in the 8 orientations its training augmentation showed it."""
    x = torch.stack([tiles[i][0] for i in range(len(tiles))])
    return MemorisingDM(LosslessAE().encode(dihedral(x)).latent_dist.mean, build_ddim(compose(["profile=tiny"]).dm)
                        .alphas_cumprod)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("memo")
    write_phantom_site(root / "own", per_class=2, size=SIZE, site=0, seed=0, labeled=False)
    # the same hospital's stain and tissue classes, other tiles: what a model that generalises would produce
    write_phantom_site(root / "unseen", per_class=2, size=SIZE, site=0, seed=999, labeled=False)
    first = sorted((root / "own").rglob("*.png"))[0]
    shutil.copy(first, first.with_name("copy_of_" + first.name))  # a tile the site holds twice
    return {name: TileFolder.open(root / name, TileOptions(SIZE), work_dir=root / f"work-{name}")
            for name in ("own", "unseen")}


def _check(dm, tiles, samples=8):
    return check_memorisation(dm, build_ddim(compose(["profile=tiny"]).dm), LosslessAE(), 1.0, tiles, samples, 10,
                              ALPHA, seed=0, batch_size=16)


def test_a_memorising_dm_is_caught_and_one_that_memorised_other_tiles_is_not(folders, tmp_path):
    own, unseen = folders["own"], folders["unseen"]
    caught = _check(memorising(own), own)
    f = caught.figures
    # every sample is a rotated or flipped training tile: a near-copy in both spaces, far below alpha
    assert f["samples"] == 8 and f["near-copies"] == f["near-copies-feature"] == f["near-copies-pixel"] == 8
    assert f["feature-ratio-q95"] < ALPHA / 1.5 and f["pixel-nn-q95"] < 0.05
    assert f["tiles"] == len(own) - 1  # the tile held twice counts once (else its copies would hide: d1 = d2)
    assert list(f) == list(FIGURES)

    novel = _check(memorising(unseen), own).figures  # realistic tiles of this stain, none of them this site's
    assert novel["near-copies"] == 0 and novel["feature-ratio-q05"] > 0.5 and novel["pixel-nn-q05"] > 0.05

    report = json.loads(write_local_report(caught, tmp_path, str, lambda i: own[i][0]).read_text())
    assert len(report["samples"]) == 8 and report["samples"][0]["pixel"]["near_copy"] is True
    assert (tmp_path / "near_copies.png").is_file()  # sample beside its nearest tile, for the site's own eyes


def test_the_reply_carries_only_counts_and_quantiles():
    figures = {name: (1 if name in ("samples", "tiles") else 0.5) for name in FIGURES}
    check_outgoing(RecordDict({"metrics": MetricRecord({**figures, "site-seconds": 2.0})}), {},
                   metrics=MEMORISATION_METRICS)
    refused = {
        "an index": RecordDict({"metrics": MetricRecord({**figures, "nearest-tile-index": 3})}),
        "a per-sample distance": RecordDict({"metrics": MetricRecord({**figures, "sample-0-d1": 0.1})}),
        "a list": RecordDict({"metrics": MetricRecord({**figures, "samples": [1.0, 2.0]})}),
        "features": RecordDict({"metrics": MetricRecord(figures), "arrays": to_record({"f": torch.zeros(2, 3)})}),
        "an empty array record": RecordDict({"metrics": MetricRecord(figures), "arrays": ArrayRecord()}),
        "a tile path": RecordDict({"metrics": MetricRecord(figures), "config": ConfigRecord({"nn1": "TUM/a.png"})}),
    }
    for what, content in refused.items():
        with pytest.raises(OutboxViolation):
            check_outgoing(content, {}, metrics=MEMORISATION_METRICS)
            pytest.fail(what)


def test_the_settings_and_their_defaults():
    import tomllib

    from wire.settings import Settings, SettingsError

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    defaults = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    s = Settings.from_run_config(defaults)
    assert (s.memorisation_samples, s.memorisation_ddim_steps, s.memorisation_max_rate) == (16, 20, 0.0)
    assert s.memorisation_alpha == pytest.approx(1 / 3, abs=1e-6)
    for key, value in (("memorisation-alpha", 0.0), ("memorisation-max-rate", 1.0), ("memorisation-samples", -1),
                       ("memorisation-ddim-steps", 0), ("memorisation-samples", 10**6)):
        with pytest.raises(SettingsError, match="memorisation"):
            Settings.from_run_config({key: value})
    with pytest.raises(SettingsError, match="memorisation-ddim-steps"):
        Settings(memorisation_ddim_steps=2000).compose()


GOOD = {**{name: 0.0 for name in FIGURES}, "samples": 4, "tiles": 9, "feature-nn-q05": 1.0, "feature-nn-q50": 2.0,
        "feature-nn-q95": 3.0, "feature-ratio-q05": 0.8, "feature-ratio-q50": 0.9, "feature-ratio-q95": 0.95,
        "pixel-nn-q05": 0.1, "pixel-nn-q50": 0.2, "pixel-nn-q95": 0.3, "pixel-ratio-q05": 0.8, "pixel-ratio-q50": 0.9,
        "pixel-ratio-q95": 1.0}
MALFORMED = {
    "missing figure": {"pixel-nn-q50": None},
    "extra figure": {"nearest-index": 3},
    "count not whole": {"near-copies-pixel": 1.5},
    "more near-copies than samples": {"near-copies-pixel": 5, "near-copies": 5},
    "either below a space's count": {"near-copies-feature": 2, "near-copies": 1},
    "either above their sum": {"near-copies-feature": 1, "near-copies": 2},
    "other sample count": {"samples": 3},
    "one tile": {"tiles": 1},
    "more tiles than declared": {"tiles": 10},
    "ratio above one": {"pixel-ratio-q95": 1.5},
    "negative distance": {"feature-nn-q05": -1.0},
    "quantiles out of order": {"feature-nn-q50": 5.0},
    "pixel RMS above one": {"pixel-nn-q95": 2.0},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_figures_are_refused(case):
    assert check_figures(MetricRecord(GOOD), 4, 9, 10**9)["tiles"] == 9
    bad = {k: v for k, v in {**GOOD, **MALFORMED[case]}.items() if v is not None}
    with pytest.raises(BadReply):
        check_figures(MetricRecord(bad), 4, 9, 10**9)


class StubSites:
    """Sites that answer at once, without training: site 10 honestly (once it has the autoencoder again), site 11
    adds an index to its figures (a real site's outbox would stop it; the server refuses it too), site 12 counts
    more near-copies than samples."""

    def __call__(self, message, context):
        node, kind = message.metadata.dst_node_id, message.metadata.message_type
        m = {"labeled": 0, "tiles": 9}
        if kind == "query.latent_stats":
            m = {"latent-sum": 2.0, "latent-sum-sq": 40.0, "latent-count": 100, "num-examples": 9}
        elif kind == "train.dm":
            zeros = {k: torch.zeros_like(v) for k, v in from_record(message.content["arrays"]).items()}
            return Message(RecordDict({"arrays": to_record(zeros), "metrics": MetricRecord({"num-examples": 9})}),
                           reply_to=message)
        elif kind == "query.memorisation":
            if node == 10 and "autoencoder" not in message.content:  # its copy is gone: it is asked again, with it
                raise RuntimeError("site site0 lacks the global autoencoder 1234 of the DM phase (has None)")
            m = {**GOOD, **({"nearest-index": 3} if node == 11 else {"near-copies-pixel": 5} if node == 12 else {})}
        return Message(RecordDict({"metrics": MetricRecord(m)}), reply_to=message)


def test_malformed_replies_leave_their_site_unchecked_and_the_run_goes_on(tmp_path):
    from server.memorisation_report import memorisation_markdown

    rc = {"profile": "tiny", "overrides": TINY, "lae-rounds": 0,
          "dm-rounds": 1, "deliver": False, "min-sites": 2, "local-steps": 1, "wait-timeout": 1.0, "poll": 0.01,
          "run-dir": str(tmp_path / "run"), "labeled-partitions": "", "memorisation-samples": 4}
    grid = InProcessGrid(StubSites(), {n: {} for n in (10, 11, 12)}, rc)
    lines = []
    assert Federation.from_run_config(grid, rc, emit=lines.append).run().status == "done"
    check = read_metrics(tmp_path / "run")[-1]["memorisation"]
    assert check["verdict"] == "ok" and set(check["sites"]) == {"10"} and set(check["failed"]) == {"11", "12"}
    assert "extra ['nearest-index']" in check["failed"]["11"] and "do not fit 4 samples" in check["failed"]["12"]
    asked_10 = [m for m in grid.sent if m.metadata.message_type == "query.memorisation" and m.metadata.dst_node_id == 10]
    assert ["autoencoder" in m.content for m in asked_10] == [False, True]
    assert any(x.startswith("memorisation check ok at 1 of 3 site(s)") and "site 12 not checked" in x for x in lines)
    md = (tmp_path / "run" / "privacy.md").read_text()
    assert "### Memorisation check: ok" in md and "FLAGGED" not in md
    unchecked = {**check, "verdict": "unchecked", "sites": {}, "checked": 0}
    assert memorisation_markdown(unchecked, headline=True)[0].startswith("**Memorisation check: no site answered**")


def test_a_federated_run_flags_the_site_whose_tiles_were_memorised(tmp_path, monkeypatch):
    original = memorisation.check_memorisation

    def at_site0_the_dm_memorised(unet, scheduler, autoencoder, scale_factor, tiles, *args, **kwargs):
        if Path(tiles.index.root).parent.name == "site0":  # sites/site0/phantom-tiles
            unet, autoencoder, scale_factor = memorising(tiles), LosslessAE(), 1.0
        return original(unet, scheduler, autoencoder, scale_factor, tiles, *args, **kwargs)

    monkeypatch.setattr(memorisation, "check_memorisation", at_site0_the_dm_memorised)
    from client.client_app import app

    def sites(message, context):  # site 12 fails in the check (and only there)
        if message.metadata.message_type == "query.memorisation" and message.metadata.dst_node_id == 12:
            raise RuntimeError("out of memory (injected)")
        reply = app(message, context)
        if message.metadata.message_type == "query.memorisation":
            replies.append(reply)
        return reply

    replies, lines = [], []
    rc = {"profile": "tiny", "overrides": f"{TINY} tiles.batch_size=4", "lae-rounds": 1, "dm-rounds": 1, "local-steps": 1, "min-sites": 2,
          "round-timeout": 300.0, "wait-timeout": 1.0, "poll": 0.05, "run-dir": str(tmp_path / "run"),
          "work-root": str(tmp_path / "sites"), "phantom-per-class": 2, "labeled-partitions": "3", "augment": False,
          "memorisation-samples": 4, "memorisation-ddim-steps": 5}
    grid = InProcessGrid(sites, {10 + i: {"partition-id": i, "num-partitions": 4} for i in range(4)}, rc)
    state = Federation.from_run_config(grid, rc, emit=lines.append).run()
    assert state.status == "done", lines
    metrics = read_metrics(tmp_path / "run")
    assert [m["phase"] for m in metrics] == ["lae", "latent-stats", "dm", "memorisation", "deliver"]
    check = metrics[3]["memorisation"]
    assert check["flagged"] and check["flagged_sites"] == ["10"] and check["verdict"] == "FLAGGED"
    assert check["sites"]["10"]["near-copies"] == 4 and check["sites"]["10"]["rate"] == 1.0
    # the honest negative: the real global UNet after one DM step has seen too little to copy anything
    assert check["sites"]["11"]["near-copies"] == 0 and not check["sites"]["11"]["flagged"]
    assert "out of memory (injected)" in check["failed"]["12"]  # reported, not fatal: delivery went on
    assert metrics[4]["sites_answered"] == 1
    # the coordinator's log: the flag line, the progress line and the last line
    assert any(x.startswith("MEMORISATION FLAG: site 10: 4 of 4 samples") for x in lines), lines
    assert any(x.startswith("[fed] memorisation round 1/1") and "memorisation FLAGGED (site 10)" in x for x in lines)
    assert lines[-1].startswith("federated run done") and "MEMORISATION FLAGGED at site(s) 10" in lines[-1]
    # only the unlabeled sites were asked; each reply held nothing but the named counts and quantiles
    asked = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query.memorisation"}
    assert asked == {10, 11, 12} and len(replies) == 2
    for reply in replies:
        assert list(reply.content.keys()) == ["metrics"] and set(reply.content["metrics"]) == set(MEMORISATION_METRICS)
    # privacy.json and privacy.md: every site's figures and the flag at the top
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert report["memorisation_check"]["flagged"] and set(report["memorisation_check"]["sites"]) == {"10", "11"}
    assert report["egress"]["10"]["phases"]["memorisation"] == {"rounds": 1, "arrays": 0, "bytes": 0,
                                                                "statistics": len(FIGURES)}
    md = (tmp_path / "run" / "privacy.md").read_text()
    assert md.splitlines()[2].startswith("**MEMORISATION FLAGGED**: site(s) 10 report near-copies")
    assert "### Memorisation check: FLAGGED" in md and "| 10 | 4 | 18 | 4 / 4 / 4 | 1 |" in md
    assert "- site 12: not checked (error 1: RuntimeError: out of memory (injected))" in md
    # the site keeps its own details; they never left it
    local = tmp_path / "sites" / "site0" / "run" / "memorisation"
    assert (local / "report.json").is_file() and (local / "near_copies.png").is_file()
