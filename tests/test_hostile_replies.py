"""A hostile or broken site, through the real round loop: malformed replies (and random structural mutations of
good ones) never crash the server and never change the global model; a robust aggregator resists a poisoner."""

import io
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies.checkpoint import read_metrics
from strategies.federation import Federation
from tests.inprocess_grid import InProcessGrid
from wire.codec import BF16_STYPE, INT8_STYPE, from_record, to_record

OVERRIDES = ("tiles.image_size=16 lae.block_out_channels=[8,8] lae.norm_num_groups=4 lae.layers_per_block=1 "
             "lae.disc_channels=8 lae.disc_layers=1 weights.perceptual=random")
BAD = 13  # the hostile node; 10-12 are honest
TILES = 9


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def honest_update(node: int, weights: dict) -> dict:
    g = torch.Generator().manual_seed(node)
    return {k: (torch.randn(v.shape, generator=g) * 1e-3 if v.is_floating_point() else v) for k, v in weights.items()}


class Sites:
    """A stub ClientApp: honest sites send a fixed small update; node BAD sends what ``mutate`` makes of its own."""

    def __init__(self, mutate=None):
        self.mutate = mutate

    def __call__(self, message: Message, context) -> Message:
        node, kind = message.metadata.dst_node_id, message.metadata.message_type
        if kind == "query.role":
            return Message(RecordDict({"metrics": MetricRecord({"labeled": 0, "tiles": TILES})}), reply_to=message)
        if kind == "query.latent_stats":
            content = RecordDict({"metrics": MetricRecord({"latent-sum": 2.0 * node, "latent-sum-sq": 40.0 * node,
                                                           "latent-count": 100, "num-examples": TILES})})
        else:
            weights = from_record(message.content["arrays"])
            content = RecordDict({"arrays": to_record(honest_update(node, weights)),
                                  "metrics": MetricRecord({"num-examples": TILES, "rec": 0.1})})
        if node == BAD:
            if self.mutate is None:
                return Message(Error(code=1, reason="site failure"), reply_to=message)
            content = self.mutate(content)
            if isinstance(content, Message):
                return content
        return Message(content, reply_to=message)


def _federation(tmp_path, name, mutate, **extra):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # module fixtures come first
    rc = {"profile": "tiny", "overrides": OVERRIDES, "lae-rounds": 1, "dm-rounds": 0, "deliver": False,
          "min-sites": 2, "local-steps": 1, "wait-timeout": 1.0, "poll": 0.01, "run-dir": str(tmp_path / name),
          "labeled-partitions": "", **extra}
    grid = InProcessGrid(Sites(mutate), {n: {} for n in (10, 11, 12, BAD)}, rc)
    fed = Federation.from_run_config(grid, rc, emit=lambda line: None)
    state = fed.run()
    return fed, state, read_metrics(tmp_path / name)


# ---------------------------------------------------------------------------------------------- mutations

FIRST = "autoencoder.encoder.conv_in.weight"  # a floating parameter of the LAE


def _with_array(content, name, array):
    arrays = ArrayRecord({k: v for k, v in content["arrays"].items()})
    arrays[name] = array
    return RecordDict({"arrays": arrays, "metrics": content["metrics"]})


def _with_metrics(content, **values):
    m = {k: v for k, v in content["metrics"].items()}
    m.update(values)
    return RecordDict({**{k: v for k, v in content.items() if k != "metrics"}, "metrics": MetricRecord(m)})


def _tensor_mutation(fn):
    def mutate(content):
        t = from_record(ArrayRecord({FIRST: content["arrays"][FIRST]}))[FIRST]
        return _with_array(content, FIRST, to_record({FIRST: fn(t)})[FIRST])
    return mutate


def _raw(dtype, stype, data_fn, shape_fn=lambda s: s):
    def mutate(content):
        a = content["arrays"][FIRST]
        shape = tuple(int(x) for x in a.shape)
        return _with_array(content, FIRST, Array(dtype=dtype, shape=shape_fn(shape), stype=stype, data=data_fn(a, shape)))
    return mutate


def _drop(key):
    return lambda content: RecordDict({k: v for k, v in content.items() if k != key})


MALFORMED = {
    "nan weights": _tensor_mutation(lambda t: t.fill_(float("nan"))),
    "inf weights": _tensor_mutation(lambda t: t.fill_(float("inf"))),
    "one inf value": _tensor_mutation(lambda t: t.view(-1).index_fill_(0, torch.tensor([0]), float("-inf"))),
    "num-examples inf": lambda c: _with_metrics(c, **{"num-examples": float("inf")}),
    "num-examples 1e30": lambda c: _with_metrics(c, **{"num-examples": 1e30}),
    "num-examples above declared": lambda c: _with_metrics(c, **{"num-examples": TILES + 1}),
    "num-examples zero": lambda c: _with_metrics(c, **{"num-examples": 0}),
    "num-examples negative": lambda c: _with_metrics(c, **{"num-examples": -5}),
    "num-examples fractional": lambda c: _with_metrics(c, **{"num-examples": 2.5}),
    "num-examples missing": lambda c: RecordDict({"arrays": c["arrays"], "metrics": MetricRecord({"rec": 0.1})}),
    "int64 for a float parameter": _raw("int64", "numpy.ndarray", lambda a, s: _npy(np.zeros(s, dtype=np.int64))),
    "payload of one element": _raw("float32", "numpy.ndarray", lambda a, s: _npy(np.ones(1, dtype=np.float32))),
    "payload of another shape": _raw("float32", "numpy.ndarray",
                                     lambda a, s: _npy(np.ones((int(np.prod(s)),), dtype=np.float32))),
    "unicode array": _raw("<U1", "numpy.ndarray", lambda a, s: _npy(np.full(s, "a"))),
    "object dtype array": _raw("object", "numpy.ndarray", lambda a, s: b"\x93NUMPY garbage"),
    "unknown stype": _raw("float32", "my.own.codec", lambda a, s: bytes(4 * int(np.prod(s)))),
    "truncated bf16": _raw("bfloat16", BF16_STYPE, lambda a, s: bytes(2 * int(np.prod(s)) - 2)),
    "truncated int8": _raw("int8", INT8_STYPE, lambda a, s: bytes(int(np.prod(s)))),
    "int8 with nan scale": _raw("int8", INT8_STYPE, lambda a, s: np.full(-(-int(np.prod(s)) // 256), np.nan,
                                                                      dtype="<f4").tobytes() + bytes(int(np.prod(s)))),
    "bf16 nan": _raw("bfloat16", BF16_STYPE,
                     lambda a, s: torch.full(s, float("nan")).to(torch.bfloat16).view(torch.int16).numpy().tobytes()),
    "declared shape wrong": _raw("float32", "numpy.ndarray", lambda a, s: _npy(np.zeros((1, 1), dtype=np.float32)),
                                 lambda s: (1, 1)),
    "metrics as a ConfigRecord": lambda c: RecordDict({"arrays": c["arrays"], "metrics": ConfigRecord({"num-examples": "9"})}),
    "arrays as a MetricRecord": lambda c: RecordDict({"arrays": MetricRecord({"x": 1.0}), "metrics": c["metrics"]}),
    "list-valued metrics": lambda c: _with_metrics(c, rec=[0.1, 0.2]),
    "nan metric": lambda c: _with_metrics(c, rec=float("nan")),
    "no arrays": _drop("arrays"),
    "no metrics": _drop("metrics"),
    "empty reply": lambda c: RecordDict(),
    "extra array": lambda c: _with_array(c, "autoencoder.smuggled", to_record({"x": torch.zeros(3)})["x"]),
    "missing array": lambda c: RecordDict({"arrays": ArrayRecord({k: v for k, v in c["arrays"].items() if k != FIRST}),
                                           "metrics": c["metrics"]}),
    "huge update": lambda c: RecordDict({"arrays": to_record({k: v * 1e6 if v.is_floating_point() else v for k, v in
                                                              from_record(c["arrays"]).items()}),
                                         "metrics": c["metrics"]}),
}


def _random_mutation(seed):
    rng = random.Random(seed)

    def mutate(content):
        name = rng.choice(list(content["arrays"].keys()))
        a = content["arrays"][name]
        shape = tuple(int(x) for x in a.shape)
        choice = rng.randrange(5)
        if choice == 0:  # truncated or padded payload
            cut = rng.randrange(len(a.data))
            data = a.data[:cut] if rng.random() < 0.5 else a.data + bytes(rng.randrange(1, 64))
            bad = Array(dtype=a.dtype, shape=shape, stype=a.stype, data=data)
        elif choice == 1:  # another declared shape
            bad = Array(dtype=a.dtype, shape=shape + (rng.randrange(2, 5),), stype=a.stype, data=a.data)
        elif choice == 2:  # another declared dtype
            bad = Array(dtype=rng.choice(["uint8", "complex64", "float64x", "V8"]), shape=shape, stype=a.stype,
                        data=a.data)
        elif choice == 3:  # another stype
            bad = Array(dtype=a.dtype, shape=shape, stype=rng.choice([BF16_STYPE, INT8_STYPE, "", "pickle"]),
                        data=a.data)
        else:  # random bytes of the right length for another codec
            bad = Array(dtype="int8", shape=shape, stype=INT8_STYPE, data=bytes(rng.randrange(256)
                                                                                for _ in range(len(a.data) // 3)))
        return _with_array(content, name, bad)
    return mutate


STATS = {
    "nan sum": {"latent-sum": float("nan")},
    "inf sum of squares": {"latent-sum-sq": float("inf")},
    "huge moments": {"latent-sum": 1e30, "latent-sum-sq": 1e60},
    "count zero": {"latent-count": 0},
    "count negative": {"latent-count": -100},
    "count inf": {"latent-count": float("inf")},
    "count beyond the tiles": {"latent-count": 10 ** 12},
    "negative sum of squares": {"latent-sum-sq": -1.0},
    "tiles above declared": {"num-examples": 10 ** 6},
}


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The global model after one round when the hostile site simply fails."""
    fed, state, _ = _federation(tmp_path_factory.mktemp("ref"), "ref", None)
    assert state.status == "done"
    return fed.weights


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_reply_leaves_the_site_out_and_the_model_untouched(tmp_path, reference, case):
    fed, state, lines = _federation(tmp_path, "run", MALFORMED[case])
    assert state.status == "done"
    assert str(BAD) in lines[0]["dropped"] and lines[0]["sites_answered"] == 3, lines[0]["dropped"]
    assert _same(fed.weights, reference)


@pytest.mark.parametrize("seed", range(8))
def test_random_structural_mutations_never_crash_or_change_the_model(tmp_path, reference, seed):
    fed, state, lines = _federation(tmp_path, "run", _random_mutation(seed))
    assert state.status == "done" and str(BAD) in lines[0]["dropped"]
    assert _same(fed.weights, reference)


def _stats_run(tmp_path, name, mutate):
    fed, state, lines = _federation(tmp_path, name, mutate, **{"lae-rounds": 0, "dm-rounds": 1, "local-steps": 1})
    return state, lines


@pytest.mark.parametrize("case", sorted(STATS))
def test_bad_latent_statistics_never_reach_the_scale_factor(tmp_path, case):
    ref, _ = _stats_run(tmp_path, "ref", None)
    state, lines = _stats_run(tmp_path, "run", lambda c: _with_metrics(c, **STATS[case]))
    assert ref.scale_factor and state.scale_factor == ref.scale_factor and state.latent_stats == ref.latent_stats
    assert str(BAD) in lines[0]["dropped"]


def test_a_robust_aggregator_bounds_a_poisoner_the_norm_guard_lets_through(tmp_path):
    """norm-bound off and a poisoner that scales its update 1000x: the mean moves far, the median barely."""
    poison = MALFORMED["huge update"]
    mean_fed, _, _ = _federation(tmp_path, "mean", poison, **{"norm-bound": 0.0})
    median_fed, _, _ = _federation(tmp_path, "median", poison, **{"norm-bound": 0.0, "aggregator": "median"})
    ref_fed, _, _ = _federation(tmp_path, "ref", None)
    start = _federation(tmp_path, "zero", None, **{"lae-rounds": 0, "dm-rounds": 0})[0].weights
    moved = {name: float((f.weights[FIRST] - start[FIRST]).norm()) for name, f in
             (("mean", mean_fed), ("median", median_fed), ("honest", ref_fed))}
    assert moved["mean"] > 100 * moved["honest"]
    assert moved["median"] < 3 * moved["honest"]


def test_clip_instead_of_refuse(tmp_path, reference):
    fed, state, lines = _federation(tmp_path, "clip", MALFORMED["huge update"], **{"norm-action": "clip"})
    assert state.status == "done" and lines[0]["sites_answered"] == 4  # kept, scaled down to the bound
    assert not _same(fed.weights, reference)
