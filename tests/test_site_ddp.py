"""A site with several devices: one federated round's local training on 2 CPU processes (gloo, DDP) gives the same
global update as on 1 process with the same effective batch (``histodiff/local_training/site_ddp.py``).

The round is the ClientApp's own call (``client.task.dm_round`` / ``lae_round``: the ranks are started from inside
it, as they are inside a Flower ClientApp process). Both runs start from the same global weights and a fresh site
state, take 3 steps of a batch of 4 tiles (2 per process with 2 devices), and are compared on ``w_local - w_global``.

Tolerance: both runs see the same tiles in the same global batches with the same flips, posterior samples, noise
and timesteps (``sample_keys``), and the 1-process run uses the thread count of one rank (CPU kernels pick their
summation order by thread count; with 2 threads against 1 the LAE's gradients differed by 3e-3 after 3 steps, which
is rounding, not DDP: the 2-process run was measured bit-identical, difference 0.0, to one process with one thread
averaging the two half-batch gradients). What is left is the order in which the batch is summed: DDP adds the two half-batch
gradients after the backward pass where one process sums the whole batch inside its kernels, a relative error of
about 1e-7 (fp32) per gradient. We check two things:

- the gradients: Adam's first moment (the running mean of the gradients, in the state rank 0 saved) agrees to a
  relative L2 error of 2e-3 (measured 1.8e-6 for the DM, 6.6e-4 for the LAE: its random-VGG LPIPS, 13 ReLU
  layers deep, amplifies the batch-size-dependent summation order of the CPU kernels over 3 steps);
- the update ``w_local - w_global``: relative L2 error at most 2e-3 (measured 3.1e-4 DM, 9.8e-4 LAE). For the DM it
  is 170x the gradients' error because Adam divides each gradient by its own magnitude: a parameter whose gradient is zero in exact arithmetic
  still takes an lr-sized step driven by rounding noise, of either sign. Attention key biases are such parameters
  (a key bias shifts all logits of a query alike, which softmax ignores), and so is a bias before a GroupNorm of
  one channel per group (hence ``lae.norm_num_groups=4`` here: two channels per group at 8 channels). The bound is
  still far below what another batch or other draws give: the same round with another seed differs from the first
  by a relative L2 error of about 1 (checked in the same test).

``slow``: each 2-device round starts two fresh interpreters (torch, Lightning, diffusers imports) next to the
test process; on this 2-core machine that is over a minute per phase when it is busy.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from histodiff.config import ConfigError, compose

STEPS, BATCH = 3, 4
TINY = ["profile=tiny", "tiles.image_size=32", f"tiles.batch_size={BATCH}", "train.accelerator=cpu",
        "train.progress=false", "weights.perceptual=random", "lae.block_out_channels=[8,16,16]", "lae.norm_num_groups=4",
        "dm.unet.block_out_channels=[16,32,32]", "dm.warmup_steps=1"]


def _site(tmp_path, name):
    from client.task import Site

    work = tmp_path / name
    return Site(name, "unlabeled", tmp_path / "tiles", work, work / "run")


def _cfg(tmp_path, site, devices, extra=()):
    return compose([*TINY, f"train.devices={devices}", "train.strategy=ddp", f"data={site.data}",
                    f"work_dir={site.work}", f"run_dir={site.state}", *extra])


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    from histodiff.data.phantom_tissue import write_phantom_site

    root = tmp_path_factory.mktemp("ddp")
    write_phantom_site(root / "tiles", per_class=1, size=32, site=0, seed=0, labeled=False)  # 9 tiles
    return root


def _round(tiles, name, devices, phase, extra=()):
    from client import task
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.diffusion.unet import build_unet
    from histodiff.model_files import flat

    site = _site(tiles, name)
    cfg = _cfg(tiles, site, devices, extra)
    torch.manual_seed(0)
    autoencoder = build_autoencoder(cfg.lae)
    dataset = task.load_dataset(cfg)
    threads = torch.get_num_threads()
    if devices == 1:  # the threads of one rank of two (site_ddp): the same CPU kernels in both runs
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    start = time.perf_counter()
    if phase == "dm":
        global_weights = flat("unet", build_unet(cfg))
        result = task.dm_round(cfg, dataset, site, STEPS, global_weights, autoencoder, 0.5)
    else:
        from histodiff.autoencoder.lae_module import LAEModule
        from histodiff.local_training.local_steps import lae_shared_weights

        global_weights = lae_shared_weights(LAEModule(cfg), cfg.lae.share_discriminator)
        result = task.lae_round(cfg, dataset, site, STEPS, global_weights)
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    update = {k: result.weights[k] - global_weights[k] for k in global_weights if global_weights[k].is_floating_point()}
    return result, update, site, seconds


def _relative(one: dict, two: dict) -> float:
    """||two - one|| / ||one|| over all the tensors together (float64)."""
    num = sum(float(((two[k].double() - one[k].double()) ** 2).sum()) for k in one)
    den = sum(float((one[k].double() ** 2).sum()) for k in one)
    return (num / den) ** 0.5


def _first_moments(site, phase) -> dict:
    from histodiff.local_training.trainer_setup import load_state_file

    state = load_state_file(site.state / phase)
    assert state["step"] == STEPS
    opt = state["optimizer"]["optimizer"] if phase == "dm" else state["optimizers"][0]
    return {i: s["exp_avg"] for i, s in opt["state"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["dm", "lae"])
def test_two_devices_give_the_one_device_update(tiles, phase):
    r1, u1, s1, t1 = _round(tiles, f"{phase}-one", 1, phase)
    r2, u2, s2, t2 = _round(tiles, f"{phase}-two", 2, phase)
    _, u3, _, _ = _round(tiles, f"{phase}-seed1", 1, phase, ["seed=1"])
    update, other = _relative(u1, u2), _relative(u1, u3)
    largest = max(float(u.abs().max()) for u in u1.values())
    worst = max(float((u1[k] - u2[k]).abs().max()) for k in u1)
    # rank 0 saved the state (step counter, optimiser state) one process would have saved
    grads = _relative(_first_moments(s1, phase), _first_moments(s2, phase))
    print(f"\n[ddp] {phase}: update rel. L2 diff {update:.2g} (another seed: {other:.2g}), gradient (Adam m) rel. L2 "
          f"diff {grads:.2g}, max |diff| {worst:.2g} of largest update entry {largest:.2g}; "
          f"1 process {t1:.1f} s, 2 processes {t2:.1f} s")
    assert grads <= 2e-3
    assert update <= 2e-3 and other > 0.1
    assert r1.step == r2.step == STEPS and r1.num_examples == r2.num_examples == 9
    # the round's metrics are those of the global batches (mean over the ranks of their equal shares)
    assert r1.metrics.keys() == r2.metrics.keys()
    for k in r1.metrics:
        assert r2.metrics[k] == pytest.approx(r1.metrics[k], rel=1e-4, abs=1e-6), k
    assert [p.name for p in (s2.state / phase).iterdir() if p.name.startswith(".ranks-")] == []


def test_ranks_share_the_global_batches_and_their_draws(tiles):
    """Two ranks' loaders together give exactly one process's batches: the same tiles, keys and flipped pixels."""
    from client import task
    from histodiff.local_training.trainer_setup import step_loader

    site = _site(tiles, "loader")
    dataset = task.load_dataset(_cfg(tiles, site, 1))
    one = list(step_loader(dataset, BATCH, STEPS, seed=7, keyed=True))
    ranks = [list(step_loader(dataset, BATCH, STEPS, seed=7, rank=r, world=2, keyed=True)) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == STEPS
    for step, (x, _, keys) in enumerate(one):
        halves = [ranks[r][step] for r in (0, 1)]
        assert all(h[0].shape[0] == BATCH // 2 for h in halves)
        assert torch.equal(keys, torch.cat([h[2] for h in halves]))
        assert torch.equal(x, torch.cat([h[0] for h in halves]))
    assert len({int(k) for _, _, keys in one for k in keys}) == STEPS * BATCH  # a key per place in the stream
    with pytest.raises(ValueError, match="cannot be split evenly over 3 devices"):
        step_loader(dataset, BATCH, STEPS, seed=7, rank=0, world=3, keyed=True)


def test_keyed_draws_do_not_depend_on_the_batch_split():
    from histodiff.local_training.sample_keys import NOISE, keyed_normal, keyed_randint

    keys = torch.tensor([11, 12, 13, 14])
    whole = keyed_normal(keys, NOISE, (3, 4, 4))
    assert torch.equal(whole, torch.cat([keyed_normal(keys[:2], NOISE, (3, 4, 4)), keyed_normal(keys[2:], NOISE, (3, 4, 4))]))
    assert not torch.equal(whole[0], whole[1])
    assert torch.equal(keyed_randint(keys, 4, 1000), keyed_randint(keys, 4, 1000))


@pytest.mark.parametrize("override, message", [
    ("train.devices=0", "config key 'train.devices' must be auto, a positive number of devices"),
    ("train.devices=two", "config key 'train.devices' must be auto, a positive number of devices"),
    ("train.devices=-1", "config key 'train.devices' must be auto, a positive number of devices"),
    ("train.strategy=ddp_spawn", "config key 'train.strategy' is 'ddp_spawn'; expected one of auto, ddp"),
    ("train.strategy=fsdp", "config key 'train.strategy' is 'fsdp'; expected one of auto, ddp"),
    ("train.devices=3", "config key 'tiles.batch_size' (4) must be a multiple of train.devices (3)"),
])
def test_bad_devices_or_strategy_is_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        compose([*TINY, override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_devices_are_parsed():
    from histodiff.config import parse_devices

    assert parse_devices("auto") == "auto" and parse_devices("2") == 2 and parse_devices("0,2") == [0, 2]
    cfg = compose([*TINY, 'train.devices="0,1"'])
    assert parse_devices(cfg.train.devices) == [0, 1]


# ------------------------------------------------------------------ the site's own setting, and its Kubernetes overlay


def test_site_overrides_set_only_hardware_keys(monkeypatch):
    from client import task

    monkeypatch.setenv(task.SITE_OVERRIDES_ENV, "train.devices=4 train.strategy=ddp")
    assert task.site_overrides() == ["train.devices=4", "train.strategy=ddp"]
    monkeypatch.setenv(task.SITE_OVERRIDES_ENV, "train.devices=4 dm.lr=1")
    with pytest.raises(ValueError, match="'dm.lr=1' is not one of this site's own settings"):
        task.site_overrides()
    monkeypatch.delenv(task.SITE_OVERRIDES_ENV)
    assert task.site_overrides() == []


def _multi_gpu_overlay():
    from tests.test_k8s_manifests import K8S, render

    return render.render(K8S / "multi-gpu-site")


def test_multi_gpu_overlay_validates_and_keeps_the_site_policies():
    """deploy/k8s/multi-gpu-site: the site1 overlay with 4 GPUs. It is not under overlays/ (it is site1, not another
    site), so the manifest tests' per-overlay checks are run on it here, and strict offline validation."""
    import kubernetes_validate

    from tests import test_k8s_manifests as manifests

    objects = _multi_gpu_overlay()
    for obj in objects:
        kubernetes_validate.validate(obj, manifests.K8S_VERSION, strict=True)
    assert {o["kind"] for o in objects} <= manifests.KNOWN_KINDS
    rendered = {"site1": objects}
    manifests.test_overlay_renders_into_its_own_namespace(rendered, "site1")
    manifests.test_pods_run_non_root_read_only_with_limits(rendered, "site1")
    manifests.test_site_pods_request_a_gpu_and_mount_data_read_only(rendered, "site1")
    manifests.test_one_supernode_per_site_with_its_key_and_the_ca(rendered, "site1")


def test_multi_gpu_overlay_trains_on_as_many_devices_as_it_requests(monkeypatch):
    from client import task
    from histodiff.config import parse_devices
    from tests.test_k8s_manifests import render

    deploy = next(o for o in _multi_gpu_overlay() if o["kind"] == "Deployment")
    c = render.pod_spec(deploy)["containers"][0]
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == int(c["resources"]["requests"]["nvidia.com/gpu"]) > 1
    env = {e["name"]: e.get("value") for e in c["env"]}
    monkeypatch.setenv(task.SITE_OVERRIDES_ENV, env[task.SITE_OVERRIDES_ENV])
    profile = env["PROFILE"]
    cfg = compose([f"profile={profile}", *task.site_overrides()])  # batch sizes divisible by the GPU count
    assert parse_devices(cfg.train.devices) == gpus and cfg.train.strategy == "ddp"
