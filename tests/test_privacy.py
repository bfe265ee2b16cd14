"""Privacy without training: the site accountant, the server ledger, central DP, SecAgg+ arithmetic, the report."""

import json

import numpy as np
import pytest
import torch

from histodiff.privacy import PrivacyBudgetExhausted, SiteAccountant


def _accountant(tmp_path, target=8.0):
    acc = SiteAccountant.load_or_create(tmp_path, target, 1e-5)
    acc.fix_mechanism(sample_rate=0.1, max_grad_norm=1.0, noise_multiplier=1.0, planned_steps=0)
    return acc


def test_accountant_round_trips_and_epsilon_accumulates(tmp_path):
    acc = _accountant(tmp_path)
    seen = [acc.epsilon()]
    for phase in ("lae", "lae", "dm"):
        acc.record_steps(phase, 20)
        acc.record_round(phase, 20)
        acc.save()
        # a new object from disk, as a fresh client process would build it
        acc = SiteAccountant.load_or_create(tmp_path, 8.0, 1e-5)
        seen.append(acc.epsilon())
    assert all(b > a for a, b in zip(seen, seen[1:])), seen
    assert acc.steps == {"lae": 40, "dm": 20} and acc.total_steps == 60
    # same epsilon as one opacus accountant that took all 60 steps in one go
    from opacus.accountants import RDPAccountant

    ref = RDPAccountant()
    for _ in range(60):
        ref.step(noise_multiplier=1.0, sample_rate=0.1)
    assert acc.epsilon() == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    again = SiteAccountant.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert again.epsilon() == acc.epsilon() and again.history == acc.history
    with pytest.raises(ValueError, match="delta"):
        SiteAccountant.load_or_create(tmp_path, 8.0, 1e-6)  # a site's delta cannot change mid-run


def test_site_at_budget_refuses(tmp_path):
    acc = _accountant(tmp_path, target=5.0)
    room = acc.remaining_steps()
    assert room > 0
    acc.check_budget(room)  # exactly the budget is fine
    acc.record_steps("dm", room)
    assert acc.metrics()["dp-exhausted"] == 1.0
    with pytest.raises(PrivacyBudgetExhausted) as err:
        acc.check_budget(1, "site3")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("site3: privacy budget exhausted") and "of 5" in msg


def test_target_epsilon_mode_spends_the_budget_in_planned_steps(tmp_path):
    acc = SiteAccountant.load_or_create(tmp_path, 4.0, 1e-5)
    # the plan: 199 DP-SGD steps and, last, the latent-statistics release of the whole data set
    sigma = acc.fix_mechanism(sample_rate=0.1, max_grad_norm=1.0, noise_multiplier=None, planned_steps=200)
    assert sigma > 0.5
    acc.record_steps("lae", 199)
    acc.check_budget(1, "site0", release=(sigma, 1.0))  # the planned release still fits: no refusal
    acc.record_release("latent-stats", sigma)
    assert 3.95 < acc.epsilon() <= 4.0 * (1 + 1e-6)
    with pytest.raises(ValueError, match="fixed"):
        acc.fix_mechanism(0.1, 1.0, sigma * 2, 0)


def test_ledger_records_per_site_epsilon_and_stops_exhausted_sites(tmp_path):
    from strategies.privacy_ledger import PrivacyLedger, without_privacy_metrics

    ledger = PrivacyLedger(tmp_path)
    ledger.record(11, "lae", 1, {"dp-epsilon": 1.0, "dp-delta": 1e-5, "dp-target-epsilon": 3.0, "rec": 0.5})
    ledger.record(12, "lae", 1, {"dp-epsilon": 2.9, "dp-delta": 1e-5, "dp-target-epsilon": 3.0, "dp-exhausted": 1.0})
    assert ledger.schedulable([11, 12, 13]) == [11, 13]
    reason = "error 1: site13: privacy budget exhausted: epsilon 3.000 of 3 spent at delta 1e-05; refusing"
    assert ledger.record_refusal(13, "dm", 3, reason)
    assert not ledger.record_refusal(11, "dm", 3, "error 1: timeout")
    ledger.save()
    again = PrivacyLedger(tmp_path)  # server resume
    assert again.schedulable([11, 12, 13]) == [11]
    assert again.sites["11"]["rounds"][0]["epsilon"] == 1.0
    assert without_privacy_metrics({"dp-epsilon": 1.0, "rec": 0.5}) == {"rec": 0.5}


def test_central_dp_noise_accounting_and_client_clipping(tmp_path):
    from flwr.serverapp.exception import PrivacyBudgetExhausted as FlowerExhausted

    from client.site_privacy import clip_update
    from strategies.privacy_ledger import CentralDP

    from histodiff.config import compose

    central = compose(["profile=tiny", "privacy.dp=true", "privacy.mode=central", "privacy.noise_multiplier=1.0"])
    update = {"a": torch.full((4, 5), 1.0), "n": torch.tensor(7)}  # w - g; an integer buffer travels as a value
    clipped, m = clip_update(central, update, 0.5)
    assert m["dp-update-norm"] == pytest.approx(np.sqrt(20)) and float(clipped["a"].norm()) == pytest.approx(0.5, rel=1e-5)
    assert m["dp-clipped"] == 1.0 and int(clipped["n"]) == 7  # integer buffers are no part of the clipped norm
    small, m = clip_update(central, {"a": torch.full((4, 5), 0.01)}, 0.5)
    assert m["dp-clipped"] == 0.0 and torch.equal(small["a"], torch.full((4, 5), 0.01))
    assert clip_update(compose(["profile=tiny"]), update, 0.5) == (update, {})  # not in central mode: unchanged

    dp = CentralDP(noise_multiplier=2.0, clipping_norm=0.5, delta=1e-5, target_epsilon=6.0, population_size=3)
    assert dp.config_values() == {"clipping_norm": 0.5}
    mean = {"a": torch.zeros(200, 50)}
    eps = []
    for _ in range(2):
        dp.check_budget(3)
        out = dp.privatize(mean, [1.0, 1.0, 1.0])
        eps.append(dp.summary()["epsilon"])
    assert float(out["a"].std()) == pytest.approx(2.0 * 0.5 / 3, rel=0.05)  # Flower's compute_stdv(2, 0.5, 3)
    assert eps[1] > eps[0] > 0
    # Flower's RdpAccountant agrees with opacus' RDP analysis of the same Gaussian releases (no sampling)
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    reference.history = [(2.0, 1.0, 2)]
    assert eps[1] == pytest.approx(reference.get_privacy_spent(delta=1e-5)[0], rel=1e-6)
    state = dp.state_dict()
    again = CentralDP(2.0, 0.5, 1e-5, 6.0, 3)
    again.load_state_dict(state)
    assert again.summary()["epsilon"] == pytest.approx(eps[1])
    with pytest.raises(FlowerExhausted):
        for _ in range(100):
            again.check_budget(3)
            again.accountant.compose(again._event(3))


def test_privacy_report_from_run_dir(tmp_path):
    from histodiff.config import compose
    from server.privacy_report import write_privacy_report
    from strategies.privacy_ledger import PrivacyLedger

    site = tmp_path / "sites" / "site0" / "run"
    acc = _accountant(site)
    acc.record_steps("lae", 10)
    acc.record_round("lae", 10, arrays=5, bytes=1000)
    acc.save()
    ledger = PrivacyLedger(tmp_path)
    ledger.record(7, "lae", 1, acc.metrics())
    ledger.save()
    lines = [{"phase": "lae", "bytes_received_per_site": {"7": 1000}},
             {"phase": "latent-stats", "bytes_received_per_site": {"7": 0}}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    aug = tmp_path / "sites" / "site3" / "run" / "augment"
    aug.mkdir(parents=True)
    (aug / "results.json").write_text(json.dumps({"selection": {"feature_threshold": 1e-3, "pixel_threshold": 0.02,
                                                                "candidates": 90},
                                                  "settings": {"selective_100": {"memorised_dropped": 2}}}))
    cfg = compose(["profile=tiny", "privacy.dp=true", "privacy.noise_multiplier=1.0"])
    jpath, mpath = write_privacy_report(tmp_path, cfg)
    report = json.loads(jpath.read_text())
    assert report["sites"]["site0"]["epsilon"] == pytest.approx(acc.epsilon())
    assert report["egress"]["7"]["phases"]["lae"]["bytes"] == 1000
    assert report["egress"]["7"]["statistics"] == 4 and report["egress"]["7"]["arrays"] > 0
    assert report["memorisation_guard"][0]["dropped_by_setting"] == {"selective_100": 2}
    text = mpath.read_text()
    assert text.startswith("## Privacy") and "site0" in text and "Memorisation guard" in text


def test_dp_latent_statistics_are_accounted_and_close_to_exact_with_little_noise(tmp_path, phantom_labeled):
    from histodiff.config import compose
    from histodiff.data import TileFolder, TileOptions
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.privacy.dp_latent_stats import dp_latent_stats
    from histodiff.diffusion.latent_stats import compute_latent_stats

    cfg = compose(["profile=tiny", "tiles.image_size=32", "tiles.batch_size=9", "privacy.dp=true",
                   "privacy.noise_multiplier=1e-4", "privacy.target_epsilon=1e12"])
    tiles = TileFolder.open(phantom_labeled, TileOptions(32), work_dir=tmp_path / "work")
    ae = build_autoencoder(cfg.lae)
    exact = compute_latent_stats(ae, tiles, batch_size=9, seed=0)
    noisy, metrics = dp_latent_stats(cfg, ae, tiles, tmp_path, site="site0", seed=0)
    assert noisy.count == exact.count
    assert noisy.std == pytest.approx(exact.std, rel=1e-2) and noisy.mean == pytest.approx(exact.mean, abs=1e-2)
    acc = SiteAccountant.load_or_create(tmp_path, cfg.privacy.target_epsilon, cfg.privacy.delta)
    assert acc.steps == {"latent-stats": 1} and metrics["dp-epsilon"] == acc.epsilon() > 0
