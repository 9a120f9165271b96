"""The jitted train step: no implicit host-device copies, and learning-rate schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import rpg_jax
from rpg_jax import optim, sharding, steps
from rpg_jax.config import base_config


@pytest.mark.parametrize("rpg", [True, False], ids=["rpg", "plain"])
def test_step_makes_no_implicit_transfers(rpg):
    model = rpg_jax.models.ResNet20(num_classes=10, width=0.25)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    spec = rpg_jax.make_spec(variables["params"], 0.5) if rpg else None
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(lambda s: 0.1 * 0.5**s, 0.9))
    trainable = (rpg_jax.init_bank(jax.random.key(1), spec, variables["params"]) if rpg
                 else variables["params"])
    mesh = sharding.data_mesh()
    replicated, sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    state = jax.device_put(steps.init_state(trainable, variables["batch_stats"], tx), replicated)
    tables = rpg_jax.make_tables(spec, replicated) if rpg else {}
    rng = np.random.default_rng(0)
    batches = [jax.device_put({"image": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
                               "label": rng.integers(0, 10, 16).astype(np.int32),
                               "mask": np.ones(16, np.float32)}, sharded) for _ in range(3)]
    train_step = jax.jit(steps.make_train_step(model, tx, spec, (0.5,) * 3, (0.25,) * 3,
                                               lambda s: 0.1 * 0.5**s),
                         donate_argnums=0, out_shardings=(replicated, replicated))
    eval_step = jax.jit(steps.make_eval_step(model, spec, (0.5,) * 3, (0.25,) * 3))
    train_step(jax.tree.map(jnp.copy, state), batches[0], tables)  # compile outside the guard
    eval_step(state, batches[0], tables)
    with jax.transfer_guard("disallow"):
        for batch in batches:
            state, metrics = train_step(state, batch, tables)
            sums = eval_step(state, batch, tables)
        jax.block_until_ready((state, metrics, sums))
    assert int(jax.device_get(state.step)) == 3
    assert float(jax.device_get(sums["count"])) == 16


def test_data_mesh_axis_types_and_devices():
    mesh = sharding.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.axis_types == (AxisType.Auto,)
    assert mesh.devices.size == jax.device_count() == 8
    sub = sharding.data_mesh(jax.devices()[:2], AxisType.Explicit)
    assert sub.axis_types == (AxisType.Explicit,) and list(sub.devices) == jax.devices()[:2]
    assert sharding.batch_sharded(mesh).spec == jax.sharding.PartitionSpec("data")
    assert sharding.replicated(mesh).is_fully_replicated
    with pytest.raises(ValueError, match="empty list"):
        sharding.data_mesh([])
    with pytest.raises(ValueError, match="AxisType.*'auto'"):
        sharding.data_mesh(axis_type="auto")


def test_scatter_backward_step_matches_gather_backward():
    """Forward-only tables (config rpg.backward="scatter") train like the inverse tables."""
    model = rpg_jax.models.ResNet20(num_classes=10, width=0.25)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    spec = rpg_jax.make_spec(variables["params"], 0.2, groups="stage")
    tx = optax.sgd(0.1, 0.9)
    bank = rpg_jax.init_bank(jax.random.key(1), spec, variables["params"])
    step = jax.jit(steps.make_train_step(model, tx, spec, (0.5,) * 3, (0.25,) * 3))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    results = []
    for inverse in (True, False):
        state = steps.init_state(bank, variables["batch_stats"], tx)
        for _ in range(3):
            state, metrics = step(state, batch, rpg_jax.make_tables(spec, inverse=inverse))
        results.append((state, metrics))
    (a, ma), (b, mb) = results
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-5)
    for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert not np.allclose(a.trainable["rings"]["layer1"], bank["rings"]["layer1"])


@pytest.mark.parametrize("clip", [None, 1e-3], ids=["unclipped", "clipped"])
def test_grad_norm_metric_is_the_norm_of_the_gradient_before_clipping(clip):
    """With plain SGD at lr 1 the update is minus the (clipped) gradient, so the logged
    norm equals the norm of the step taken, or exceeds it when clipping bites."""
    model = rpg_jax.models.ResNet20(num_classes=10, width=0.25)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    spec = rpg_jax.make_spec(variables["params"], 0.5)
    tx = optax.sgd(1.0) if clip is None else optax.chain(optax.clip_by_global_norm(clip),
                                                         optax.sgd(1.0))
    bank = rpg_jax.init_bank(jax.random.key(1), spec, variables["params"])
    state = steps.init_state(bank, variables["batch_stats"], tx)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    new, metrics = jax.jit(steps.make_train_step(model, tx, spec, (0.5,) * 3, (0.25,) * 3))(
        state, batch, rpg_jax.make_tables(spec))
    step_norm = float(optax.global_norm(jax.tree.map(jnp.subtract, new.trainable, bank)))
    if clip is None:
        assert float(metrics["grad_norm"]) == pytest.approx(step_norm, rel=1e-5)
    else:
        assert step_norm == pytest.approx(clip, rel=1e-4)
        assert float(metrics["grad_norm"]) > 10 * clip


def test_reference_learning_rate_schedule():
    c = base_config()
    c.learning_rate, c.lr_schedule, c.lr_decay_epochs = 0.1, "exp_epoch", 45.0
    lr = optim.learning_rate_fn(c, steps_per_epoch=10, num_steps=900)
    # lr0 * 0.1 ** (epoch / 45), set once per epoch.
    np.testing.assert_allclose([lr(0), lr(9), lr(10), lr(450), lr(899)],
                               [0.1, 0.1, 0.1 * 0.1 ** (1 / 45), 0.01, 0.1 * 0.1 ** (89 / 45)],
                               rtol=1e-5)
    c.lr_schedule, c.warmup_epochs = "cosine", 1.0
    lr = optim.learning_rate_fn(c, steps_per_epoch=10, num_steps=100)
    np.testing.assert_allclose([lr(0), lr(9), lr(55), lr(100)], [0.01, 0.1, 0.05, 0.0],
                               atol=1e-6)
