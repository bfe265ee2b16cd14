"""SecAgg+ with Flower's real legacy workflow (in-process simulation): the server's aggregate is the plain mean."""

import shutil
import tempfile

import numpy as np
import pytest

SHAPES = [(8, 3, 3, 3), (8,), (4, 8), (4,)]  # a tiny conv + linear model


def _site_update(pid: int):
    rng = np.random.default_rng(pid)
    return [rng.normal(0, 0.05, s).astype(np.float32) for s in SHAPES], 12 * (pid + 1)


def test_secaggplus_aggregate_equals_plain_weighted_mean(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from flwr.simulation import run_simulation

    from strategies.privacy import legacy_secagg_apps

    # Ray's unix sockets live under RAY_TMPDIR: pytest's tmp_path makes their paths too long (Ray then hangs)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    record: dict = {}
    n, clip, q = 3, 8.0, 2**22
    server, client = legacy_secagg_apps(_site_update, [np.zeros(s, np.float32) for s in SHAPES], n, record,
                                        clipping_range=clip, quantization_range=q)
    try:
        run_simulation(server, client, num_supernodes=n, backend_config={"client_resources": {"num_cpus": 1}})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert record["failures"][1] == 0
    updates = [_site_update(i) for i in range(n)]
    total = sum(w for _, w in updates)
    plain = [sum(w * a[k] for a, w in updates) / total for k in range(len(SHAPES))]
    # one stochastic-rounding step (2 * clip / q) per site, divided by the weights' share of max_weight (1000)
    tol = n * (2 * clip / q) / (total / 1000.0) + 1e-6
    err = max(float(np.abs(a - p).max()) for a, p in zip(record["aggregate"][1], plain))
    assert err < tol, (err, tol)
