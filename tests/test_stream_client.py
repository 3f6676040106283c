"""The ``stream`` client held sparse at rest: from the mask message to the uploaded scalars.

Library level: a :class:`StreamModel` built from the wire's mask bitmap alone (no dense model)
has the KeptSpace's layout and infers like the dense model; its local SGD between local steps
updates the kept values in place, as the lean engine does and as the server replays. App level
(the real ServerApp and ClientApps in process): the scalars a ``stream`` node uploads equal the
``lean`` node's within the documented tolerance, the node holds no dense weight and no bool
mask, and the replay downlink keeps its kept vector bit-identical to the weights downlink.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from inprocess_grid import InProcessGrid, app_config, server_context

from client_app import client_app as client_module
from client_app.client_app import app as client_app
from client_app.replay import STATE_ARRAYS
from fedzo_flwr import protocol
from fedzo_flwr.models import build_model
from fedzo_flwr.protocol.wire import decode_scalars, encode_mask, split_mask
from fedzo_flwr.pruning import prune
from fedzo_flwr.sparse.mask import apply_mask_
from fedzo_flwr.sparse.packed import pack_bits
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.client import stream_model
from fedzo_flwr.zo.engines import StreamModel
from fedzo_flwr.zo.engines.stream import DELTA_ATOL, DELTA_RTOL
from fedzo_flwr.zo.local import run_local_steps
from fedzo_flwr.zo.reconstruct import ScalarStep, estimate_gradient, replay
from fedzo_flwr.zo.settings import ZOSettings
from server_app.server_app import app as server_app


@pytest.fixture(scope="module")
def cifar(data_dir):
    from fedzo_flwr.data import load_dataset, to_tensor

    data = load_dataset("cifar10", data_dir)

    def batch(start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_tensor(data.x_train[start : start + size], "cifar10")
        return x, torch.tensor(data.y_train[start : start + size], dtype=torch.long)

    return batch


def dense_client(name: str, density: float, seed: int = 1):
    model = build_model(name, seed=seed)
    mask = prune("random", model, name, density, seed=0)
    apply_mask_(model, mask)
    return model, KeptSpace(model, mask), mask


# ------------------------------------------------------------------------------ library


@pytest.mark.parametrize(("name", "density"), [("lenet5", 0.1), ("resnet20", 0.1), ("lenet5", 1)])
def test_stream_model_from_the_mask_message_alone(cifar, name, density):
    model, space, mask = dense_client(name, density)
    wire = encode_mask(mask)
    sparse = stream_model(name, 10, wire)
    # The KeptSpace's layout, read from the bitmap: names, shapes, kept counts.
    assert sparse.layout.names == tuple(space.names)
    assert sparse.layout.shapes == tuple(space.shapes)
    assert sparse.sizes == tuple(space.sizes)
    for name_, idx, bitmap in zip(space.names, space.indices, sparse.layout.bitmaps, strict=True):
        assert (bitmap is None) == (idx is None), name_
        if bitmap is not None:  # the wire's bytes of that tensor, as they are
            assert torch.equal(bitmap, pack_bits(mask[name_])), name_
    # Nothing dense, nothing bool, nothing on the meta device: only kept values and bitmaps.
    assert list(sparse.parameters()) == []
    assert [n for n, _ in sparse.named_buffers()] == ["values"]
    assert torch.equal(sparse.values, torch.zeros(space.dim))
    rest = sparse.at_rest_bytes()
    partial = sum(
        (s.numel() + 7) // 8 for s, i in zip(space.shapes, space.indices) if i is not None
    )
    assert rest == {"values": 4 * space.dim, "bitmaps": partial, "other": 0}
    assert (partial == 0) == (density == 1)
    # Loaded with the kept values, it infers exactly like the dense masked model.
    sparse.load_values_(space.gather(model))
    x, _ = cifar(0, 6)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-6)
        if name == "lenet5":
            assert torch.equal(sparse(x), model(x))


def test_split_mask_validates_like_decode_mask():
    model, _, mask = dense_client("lenet5", 0.1)
    wire = encode_mask(mask)
    assert b"".join(bytes(t.numpy()) for t in split_mask(wire, model).values()) == wire
    with pytest.raises(ValueError, match="bytes"):
        split_mask(wire[:-1], model)
    # lenet5's first conv has 450 weights: 57 bytes, the last 6 bits padding.
    first = model.conv1.weight.numel()
    assert first % 8
    bad = bytearray(wire)
    bad[(first + 7) // 8 - 1] |= 1
    with pytest.raises(ValueError, match="padding"):
        split_mask(bytes(bad), model)
    with pytest.raises(ValueError, match="missing"):
        from fedzo_flwr.sparse.layout import PackedLayout

        PackedLayout.from_bitmaps(model, {})


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
@pytest.mark.parametrize("micro_batch", [0, 4])
def test_local_steps_update_the_kept_values_in_place(cifar, name, micro_batch):
    model, space, mask = dense_client(name, 0.1, seed=2)
    theta0 = space.gather(model)
    sparse = stream_model(name, 10, encode_mask(mask))
    sparse.load_values_(theta0)
    storage = sparse.values.data_ptr()
    settings = ZOSettings(k=6, sigma=1e-3)
    seeds = [11, 12, 13]

    def batch(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cifar(200 + 16 * j, 16)

    lean, _ = run_local_steps(model, space, batch, seeds, settings, 0.05, engine="lean")
    streamed, _ = run_local_steps(
        sparse, sparse.layout, batch, seeds, settings, 0.05, "stream", micro_batch=micro_batch
    )
    for a, b in zip(lean, streamed, strict=True):
        assert a.seed == b.seed
        np.testing.assert_allclose(b.deltas, a.deltas, rtol=DELTA_RTOL, atol=DELTA_ATOL)
    # The kept values moved in place (same storage, nothing dense appeared) ...
    assert sparse.values.data_ptr() == storage and list(sparse.parameters()) == []
    assert not torch.equal(sparse.values, theta0)
    # ... exactly as the server replays the uploaded steps (all but the last) ...
    assert torch.equal(
        sparse.values, replay(theta0.clone(), sparse.sizes, streamed[:-1], settings, 0.05)
    )
    assert torch.equal(
        space.gather(model), replay(theta0.clone(), space.sizes, lean[:-1], settings, 0.05)
    )
    # ... and as the lean engine's trajectory: the same bits where its scalars are the same bits,
    # else apart by exactly what the scalars' rounding moves (SGD is linear in the scalars).
    apart = sum(
        estimate_gradient(sparse.sizes, ScalarStep(a.seed, b.deltas - a.deltas), settings)
        for a, b in zip(lean[:-1], streamed[:-1], strict=True)
    )
    if all(np.array_equal(a.deltas, b.deltas) for a, b in zip(lean, streamed)):
        assert torch.equal(sparse.values, space.gather(model))
    theta = space.gather(model)
    rounding = 4 * torch.finfo(torch.float32).eps * float(theta.abs().max())  # 4 ulps of max |θ|
    assert float((sparse.values - theta + 0.05 * apart).abs().max()) <= rounding
    if name == "lenet5":  # measured: bit-identical on LeNet-5, micro-batched or not
        assert all(np.array_equal(a.deltas, b.deltas) for a, b in zip(lean, streamed))


def test_a_stream_model_runs_the_stream_engine_only(cifar):
    from fedzo_flwr.zo.estimator import loss_differences

    _, _, mask = dense_client("lenet5", 0.1)
    sparse = stream_model("lenet5", 10, encode_mask(mask))
    with pytest.raises(ValueError, match="stream engine only"):
        loss_differences(
            sparse, sparse.layout, *cifar(0, 4), 1, ZOSettings(k=2, sigma=1e-3), "lean"
        )


# ---------------------------------------------------------------------------- the apps


BASE = {"k": 8, "prune-iterations": 2, "prune-repeats": 1, "eval-every": 10}


def uploads(tmp_path, data_dir, name, num_nodes=2, inspect=None, **overrides):
    """Run the real apps: every train reply's ``(seeds, deltas)`` and evaluate reply's metrics.

    Returns ``({(round, node): (seeds, deltas)}, {(round, node): (loss, accuracy)}, results,
    grid)``; ``inspect(grid, node_index, message, reply)`` runs after every message.
    """
    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": name,
            **BASE,
            **overrides,
        }
    )
    sent: dict[tuple[int, int], tuple[list[int], np.ndarray]] = {}
    evaluated: dict[tuple[int, int], tuple[float, float]] = {}
    holder: list[InProcessGrid] = []

    def record(node_index, message, reply):
        key = (message.content.config_records[protocol.CONFIG_KEY][protocol.ROUND_KEY], node_index)
        if message.metadata.message_type == "train" and protocol.ZO_KEY in reply.content:
            zo = reply.content.config_records[protocol.ZO_KEY]
            sent[key] = (list(zo[protocol.STEP_SEEDS_KEY]), decode_scalars(zo[protocol.DELTAS_KEY]))
        if message.metadata.message_type == "evaluate":
            metrics = reply.content.metric_records[protocol.METRICS_KEY]
            evaluated[key] = (metrics["loss"], metrics["accuracy"])
        if inspect is not None:
            inspect(holder[0], node_index, message, reply)
        return reply

    grid = InProcessGrid(client_app, num_nodes, config, intercept=record)
    holder.append(grid)
    client_module._MODELS.clear()
    server_app(grid, server_context(config))
    results = json.loads((tmp_path / name / "results.json").read_text())
    return sent, evaluated, results, grid


def held_model():
    """The one model the ClientApp process holds (all in-process nodes share the cache)."""
    ((model, space),) = client_module._MODELS.values()
    return model, space


def assert_sparse_at_rest(contexts):
    model, space = held_model()
    assert isinstance(model, StreamModel) and space is model.layout
    assert list(model.parameters()) == []  # no dense weight tensor
    assert [n for n, _ in model.named_buffers()] == ["values"]
    assert all(b.dtype == torch.uint8 for b in model.layout.bitmaps if b is not None)
    for context in contexts:  # no bool mask kept by the node either
        for record in context.state.array_records.values():
            assert all(a.numpy().dtype != np.bool_ for a in record.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {"local-steps": 1, "fraction-evaluate": 1.0},
        {"local-steps": 2, "seed-mode": "per-client", "model": "resnet20", "batch-size": 8},
    ],
    ids=["lenet5-1-step-evaluate", "resnet20-2-steps-per-client"],
)
def test_stream_node_uploads_the_lean_nodes_scalars(tmp_path, data_dir, overrides):
    """Every message of a lean run, handled again by stream nodes: the same scalars.

    The ServerApp's messages of a real lean run (first contact with the mask, then the mask
    from the node's state; train and evaluate) go, in their order, to fresh nodes whose run
    config says ``engine = "stream"``: the same weights in, so the replies must agree within the
    stream engine's documented tolerance.
    """
    rounds = {"num-server-rounds": 3, **overrides}
    lean, lean_evaluated, _, grid = uploads(tmp_path, data_dir, "lean", engine="lean", **rounds)
    assert isinstance(held_model()[1], KeptSpace)  # the other engines: dense, as before
    assert len(lean) == 3 * 2 and len(lean_evaluated) == (
        6 if "fraction-evaluate" in overrides else 0
    )
    base_config = grid.contexts[grid.node_ids[0]].run_config
    for micro in (0, 4):
        config = {**base_config, "engine": "stream", "micro-batch": micro}
        contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config=dict(context.node_config),
                state=RecordDict(),
                run_config=config,
            )
            for node_id, context in grid.contexts.items()
        }
        client_module._MODELS.clear()
        trained = evaluated = 0
        for message in grid.sent:
            node_id = message.metadata.dst_node_id
            reply = client_app(message, contexts[node_id])
            assert not reply.has_error(), reply.error.reason
            key = (
                message.content.config_records[protocol.CONFIG_KEY][protocol.ROUND_KEY],
                grid.node_ids.index(node_id),
            )
            if message.metadata.message_type == "evaluate":
                loss, accuracy = lean_evaluated[key]
                metrics = reply.content.metric_records[protocol.METRICS_KEY]
                assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
                assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-3)
                evaluated += 1
                continue
            assert_sparse_at_rest(contexts.values())
            zo = reply.content.config_records[protocol.ZO_KEY]
            seeds, deltas = lean[key]
            assert list(zo[protocol.STEP_SEEDS_KEY]) == seeds
            assert len(deltas) == 8 * overrides["local-steps"]
            streamed = decode_scalars(zo[protocol.DELTAS_KEY])
            np.testing.assert_allclose(streamed, deltas, rtol=DELTA_RTOL, atol=DELTA_ATOL)
            trained += 1
        assert (trained, evaluated) == (len(lean), len(lean_evaluated))


def sent_weights(grid):
    """``{(round, node): kept weights}`` of every train message that carried weights."""
    out = {}
    for message in grid.sent:
        arrays = message.content.array_records.get(protocol.ARRAYS_KEY)
        if message.metadata.message_type == "train" and arrays is not None:
            round_ = message.content.config_records[protocol.CONFIG_KEY][protocol.ROUND_KEY]
            out[round_, message.metadata.dst_node_id] = arrays[protocol.KEPT_KEY].numpy()
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {"optimizer": "sgd", "lr": 0.05},
        {"optimizer": "adam", "seed-mode": "per-client", "local-steps": 2},
    ],
    ids=["sgd", "adam-per-client-2-steps"],
)
def test_replay_downlink_keeps_the_stream_nodes_kept_vector_exact(tmp_path, data_dir, overrides):
    rounds = {
        "engine": "stream",
        "micro-batch": 4,
        "num-server-rounds": 8,
        "optimizer": "sgd",
        **overrides,
    }
    _, _, weights_run, weights_grid = uploads(tmp_path, data_dir, "weights", num_nodes=3, **rounds)
    expected = sent_weights(weights_grid)
    held: dict[tuple[int, int], np.ndarray] = {}
    states: dict[tuple[int, int], np.ndarray] = {}

    def record(grid, node_index, message, reply):
        if message.metadata.message_type != "train":
            return
        assert not reply.has_error(), reply.error.reason
        node_id = grid.node_ids[node_index]
        round_ = message.content.config_records[protocol.CONFIG_KEY][protocol.ROUND_KEY]
        stored = grid.contexts[node_id].state.array_records[STATE_ARRAYS]
        states[round_, node_id] = stored[protocol.KEPT_KEY].numpy().copy()
        assert_sparse_at_rest(grid.contexts.values())
        if overrides.get("local-steps", 1) == 1:  # what the node trained on: its kept vector
            held[round_, node_id] = held_model()[0].values.numpy().copy()

    _, _, replay_run, _ = uploads(
        tmp_path, data_dir, "replay", num_nodes=3, inspect=record, downlink="replay", **rounds
    )
    keys = ("train_loss", "grad_norm", "accuracy", "loss", "clients")
    assert [{k: r.get(k) for k in keys} for r in replay_run["rounds"]] == [
        {k: r.get(k) for k in keys} for r in weights_run["rounds"]
    ]
    assert len(states) == 8 * 3
    for key, kept in states.items():
        assert np.array_equal(kept, expected[key]), key
    assert len(held) == (8 * 3 if overrides.get("local-steps", 1) == 1 else 0)
    for key, values in held.items():
        assert np.array_equal(values, expected[key]), key
    paths = [r["downlink_path"] for r in replay_run["rounds"] if r["round"]]
    assert set(paths[0].values()) == {"weights"}
    assert all(set(p.values()) == {"replay"} for p in paths[1:])
