"""RPG on the models users bring: fans of every kernel kind, the init rule, the default
selection, Flax NNX, and learning on real Fashion-MNIST with the plain model's settings."""

import functools
import json
import math
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rpg_jax
from rpg_jax.data import load_fashion_mnist
from rpg_jax.layers import leaf_fans
from rpg_jax.spec import flatten_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from generic_models import sgd_run  # noqa: E402  (the README table's training loop)

# ------------------------------------------------------------------------ fans


def linen_params(module, x):
    return module.init(jax.random.key(0), x)["params"]


def fans_of(params, **kw):
    spec = rpg_jax.make_spec(params, 1.0, select="kernels", **kw)
    return {leaf.name: (leaf.kind, leaf.fan_in, leaf.fan_out) for leaf in spec.generated}


@pytest.mark.parametrize("kernel_size, x_shape, receptive", [
    ((3,), (1, 9, 5), 3), ((3, 3), (1, 9, 9, 5), 9), ((3, 2, 2), (1, 5, 5, 5, 5), 12)])
def test_conv_fans_1d_2d_3d(kernel_size, x_shape, receptive):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(7, kernel_size, name="c")(x)

    assert fans_of(linen_params(Net(), jnp.ones(x_shape))) == {
        "c/kernel": ("conv", receptive * 5, receptive * 7)}


def test_dense_and_dense_general_fans():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):  # x: (1, 6, 10)
            y = nn.Dense(12, name="dense")(x)                                   # (10, 12)
            y = nn.DenseGeneral((4, 8), axis=-1, name="split_out")(y)           # (12, 4, 8)
            return nn.DenseGeneral(5, axis=(-2, -1), name="merge_in")(y)       # (4, 8, 5)

    params = linen_params(Net(), jnp.ones((1, 6, 10)))
    fans = fans_of(params, in_axes={"split_out": 1, "merge_in": 2})
    assert fans == {"dense/kernel": ("dense", 10, 12),
                    "split_out/kernel": ("dense_general", 12, 32),
                    "merge_in/kernel": ("dense_general", 32, 5)}
    with pytest.raises(ValueError, match=r"in_axes\['merge_in'\]=3 .*merge_in/kernel"):
        fans_of(params, in_axes={"merge_in": 3})


def test_attention_fans_linen_and_nnx():
    mha = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64, name="attn")
    params = {"attn": linen_params(mha, jnp.ones((1, 5, 32)))}
    want = {f"attn/{n}/kernel": ("attention_in", 32, 64) for n in ("query", "key", "value")}
    want["attn/out/kernel"] = ("attention_out", 64, 32)
    assert fans_of(params) == want
    nnx_mha = nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=64,
                                     decode=False, rngs=nnx.Rngs(0))
    assert fans_of(nnx.state(nnx_mha, nnx.Param)) == {
        k.removeprefix("attn/"): v for k, v in want.items()}


def test_other_leaf_kinds():
    assert leaf_fans(("emb", "embedding"), (100, 16)).kind == "embedding"
    assert leaf_fans(("attn", "query", "bias"), (4, 16)).kind == "vector"
    assert leaf_fans(("pos_embedding",), (1, 50, 64)) == leaf_fans(("x",), (1, 50, 64))
    # A 3-d kernel named "out" without attention siblings is a 1-d convolution.
    assert leaf_fans(("out", "kernel"), (3, 4, 5), frozenset({"other"})).kind == "conv"


# ------------------------------------------------------------------------ selection, init rule


class MLP(nn.Module):
    features: tuple[int, ...] = (256, 128, 10)

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


def mlp_params(seed=0):
    return linen_params(MLP(), jnp.ones((1, 28, 28, 1)))


def generated_stds(spec, bank):
    flat = dict(flatten_params(rpg_jax.generate_params(bank, spec)))
    return {leaf.name: float(np.std(flat[leaf.path])) for leaf in spec.generated}


def test_resnets_keep_the_paper_rule_from_arrays_and_shapes():
    model = rpg_jax.models.ResNet18(num_classes=1000)
    x = jnp.zeros((1, 64, 64, 3))
    params = model.init(jax.random.key(3), x, train=False)["params"]
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            x)["params"]
    from_arrays = rpg_jax.make_spec(params, ring_size=2_359_296)
    assert from_arrays == rpg_jax.make_spec(shapes, ring_size=2_359_296)
    assert from_arrays.init == "paper"
    assert {leaf.kind for leaf in from_arrays.generated} == {"conv"}
    for leaf in from_arrays.generated:
        assert leaf.std == pytest.approx(math.sqrt(2 / leaf.fan_out), rel=1e-12)
    for name in [n for n in rpg_jax.models.MODEL_NAMES if "resnet" in n]:
        m = rpg_jax.models.get_model(name, num_classes=10)
        shape = (1, 32, 32, 3)
        s = jax.eval_shape(functools.partial(m.init, train=False), jax.random.key(0),
                           jnp.zeros(shape))["params"]
        assert (rpg_jax.make_spec(s, 0.5).generated
                == rpg_jax.make_spec(s, 0.5, select="blocks", init="paper").generated), name


def test_mlp_default_selection_and_model_rule():
    params = mlp_params()
    spec = rpg_jax.make_spec(params, ring_size=0.1)
    assert [leaf.name for leaf in spec.generated] == ["Dense_1/kernel"]
    assert spec.init == "model"
    # Creation order, not string order: Dense_10 comes after Dense_2.
    wide = linen_params(MLP(features=(8,) * 11 + (10,)), jnp.ones((1, 4)))
    names = [leaf.name for leaf in rpg_jax.make_spec(wide, 0.5).generated]
    assert sorted(names) == sorted(f"Dense_{i}/kernel" for i in range(1, 11))


@pytest.mark.parametrize("select", ["auto", "kernels"])
def test_mlp_generated_std_matches_flax_init(select):
    params = mlp_params()
    spec = rpg_jax.make_spec(params, ring_size=0.1, select=select)
    bank = rpg_jax.init_bank(jax.random.key(1), spec, params)
    got = generated_stds(spec, bank)
    flat = {p: np.asarray(x) for p, x in flatten_params(params)}
    for leaf in spec.generated:
        want = 1 / math.sqrt(leaf.fan_in)  # lecun_normal, Flax's default
        assert float(np.std(flat[leaf.path])) == pytest.approx(want, rel=0.05)
        assert leaf.std == pytest.approx(float(np.std(flat[leaf.path], dtype=np.float64)),
                                         rel=1e-9)
        if leaf.size >= 10_000:
            assert got[leaf.name] == pytest.approx(want, rel=0.05), leaf.name
    # The ring std is the size-weighted RMS of the targets: mean c^2 is 1.
    weights = np.array([leaf.size for leaf in spec.generated])
    scales = np.array([leaf.scale for leaf in spec.generated])
    assert float(np.sum(weights * scales**2) / weights.sum()) == pytest.approx(1.0, rel=1e-9)


def test_shapes_only_model_rule_uses_lecun():
    shapes = jax.eval_shape(lambda: mlp_params())
    spec = rpg_jax.make_spec(shapes, ring_size=0.1, select="kernels")
    assert spec.init == "model"
    for leaf in spec.generated:
        assert leaf.std == pytest.approx(1 / math.sqrt(leaf.fan_in), rel=1e-9)


def test_no_match_error_names_presets_and_paths():
    with pytest.raises(ValueError) as e:
        rpg_jax.make_spec({"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}, 0.5)
    msg = str(e.value)
    assert "'auto'" in msg and "'kernels'" in msg and "Dense_0/kernel" in msg
    with pytest.raises(ValueError, match="init='fan_in'"):
        rpg_jax.make_spec(mlp_params(), 0.5, init="fan_in")


def test_spec_json_records_kinds_and_old_specs_still_load():
    spec = rpg_jax.make_spec(mlp_params(), 0.5, select="kernels")
    again = rpg_jax.RPGSpec.from_json(spec.to_json())
    assert again == spec and again.init == "model"
    leaf = json.loads(spec.to_json())["leaves"][0]
    assert {"kind", "fan_in", "fan_out", "std"} <= set(leaf)
    # A spec written before kinds and stds were recorded: the paper rule, fans derived.
    resnet = rpg_jax.models.ResNet20(num_classes=10)
    s = jax.eval_shape(functools.partial(resnet.init, train=False), jax.random.key(0),
                       jnp.zeros((1, 32, 32, 3)))
    new = rpg_jax.make_spec(s["params"], 0.1)
    old = json.loads(new.to_json())
    del old["init"]
    for r in old["rings"]:
        del r["std"]
    for leaf in old["leaves"]:
        for k in ("kind", "fan_in", "fan_out", "std"):
            del leaf[k]
    assert rpg_jax.RPGSpec.from_dict(old) == new


# ------------------------------------------------------------------------ Flax NNX


class NnxCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(32, rngs=rngs)
        self.linear1 = nnx.Linear(32 * 7 * 7, 128, rngs=rngs)
        self.linear2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.avg_pool(nnx.relu(self.bn(self.conv2(x))), (2, 2), (2, 2))
        return self.linear2(nnx.relu(self.linear1(x.reshape(x.shape[0], -1))))


def test_nnx_presets_update_and_merge():
    model = NnxCNN(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    spec = rpg_jax.make_spec(params, ring_size=0.2)
    assert [leaf.name for leaf in spec.generated] == ["conv2/kernel", "linear1/kernel"]
    for source in (model, nnx.state(model), nnx.split(model)):
        assert rpg_jax.make_spec(source, 0.2) == spec
    abstract = nnx.state(nnx.eval_shape(lambda: NnxCNN(nnx.Rngs(0))), nnx.Param)
    from_shapes = rpg_jax.make_spec(abstract, 0.2)  # stds from lecun_normal, not measured
    assert [(x.path, x.offset, x.fan_in) for x in from_shapes.generated] == [
        (x.path, x.offset, x.fan_in) for x in spec.generated]
    bank = rpg_jax.init_bank(jax.random.key(1), spec, params)
    generated = rpg_jax.generate_params(bank, spec)
    x = jax.random.uniform(jax.random.key(2), (4, 28, 28, 1))
    merged = nnx.merge(graphdef, generated, rest)
    merged.eval()
    nnx.update(model, generated)
    model.eval()
    assert isinstance(model.linear1.kernel, nnx.Param)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(merged(x)))
    np.testing.assert_array_equal(np.asarray(model.linear1.kernel[...]),
                                  np.asarray(generated["linear1"]["kernel"]))


def test_nnx_list_keys_keep_their_type():
    class Stack(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(4)])

        def __call__(self, x):
            for layer in self.layers:
                x = nnx.relu(layer(x))
            return x

    model = Stack(nnx.Rngs(0))
    spec = rpg_jax.make_spec(model, 0.5)
    assert [leaf.path for leaf in spec.generated] == [("layers", 1, "kernel"),
                                                        ("layers", 2, "kernel")]
    assert rpg_jax.RPGSpec.from_json(spec.to_json()) == spec
    bank = rpg_jax.init_bank(jax.random.key(0), spec, model)
    nnx.update(model, rpg_jax.generate_params(bank, spec))
    assert model(jnp.ones((1, 8))).shape == (1, 8)


# ------------------------------------------------------------------------ learning (real data)


@pytest.fixture(scope="module")
def fashion_mnist():
    try:
        data = load_fashion_mnist()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    (x, y), (xt, yt) = data["train"], data["test"]
    norm = lambda a: (a.astype(np.float32) / 255.0 - 0.2860) / 0.3530
    return norm(x), y, norm(xt[:5000]), yt[:5000]


@pytest.mark.parametrize("select", ["auto", "kernels"])
def test_mlp_rpg_trains_with_the_plain_settings(fashion_mnist, select):
    model, params = MLP(), mlp_params()
    spec = rpg_jax.make_spec(params, ring_size=0.1, select=select)
    bank = rpg_jax.init_bank(jax.random.key(1), spec, params)
    tables = rpg_jax.make_tables(spec)
    plain_losses, plain_acc = sgd_run(lambda p, x: model.apply({"params": p}, x), params,
                                      fashion_mnist, 600)
    rpg_losses, rpg_acc = sgd_run(
        lambda b, x: model.apply({"params": rpg_jax.generate_params(b, spec, tables)}, x),
        bank, fashion_mnist, 600)
    assert rpg_losses[0] == pytest.approx(plain_losses[0], rel=0.10)
    assert all(math.isfinite(v) for v in rpg_losses)
    assert plain_acc > 0.80 and rpg_acc > 0.78, (plain_acc, rpg_acc)


def test_nnx_cnn_rpg_recipe_learns(fashion_mnist):
    """The README's NNX recipe: the bank is the trainable state, batch stats ride along."""
    x, y, xt, yt = fashion_mnist
    model = NnxCNN(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.to_pure_dict(rest)  # batch statistics, as a pure dict through jit
    spec = rpg_jax.make_spec(params, ring_size=0.1)
    bank = rpg_jax.init_bank(jax.random.key(1), spec, params)
    tables = rpg_jax.make_tables(spec)
    plain_std = {leaf.name: float(np.std(np.asarray(a)))
                 for leaf, (_, a) in zip(spec.leaves, flatten_params(params), strict=True)
                 if leaf.ring}
    for name, std in generated_stds(spec, bank).items():
        assert std == pytest.approx(plain_std[name], rel=0.05), name
    tx = optax.sgd(0.05, momentum=0.9)
    opt_state = tx.init(bank)

    def loss_fn(bank, rest, images, labels):
        model = nnx.merge(graphdef, rpg_jax.generate_params(bank, spec, tables), rest)
        logits = model(images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])

    @jax.jit
    def train_step(bank, opt_state, rest, images, labels):
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            bank, rest, images, labels)
        updates, opt_state = tx.update(grads, opt_state, bank)
        return optax.apply_updates(bank, updates), opt_state, rest, loss

    plain_loss0 = float(optax.softmax_cross_entropy_with_integer_labels(
        model(x[:128]), y[:128]).mean())
    rpg_loss0, _ = loss_fn(bank, rest, x[:128], y[:128])
    assert float(rpg_loss0) == pytest.approx(plain_loss0, rel=0.10)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(300):
        i = rng.integers(0, len(x), 128)
        bank, opt_state, rest, loss = train_step(bank, opt_state, rest, x[i], y[i])
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses)
    trained = nnx.merge(graphdef, rpg_jax.generate_params(bank, spec, tables), rest)
    trained.eval()
    acc = float(np.mean(np.argmax(trained(xt), -1) == yt))
    assert acc > 0.80, acc
