"""The index map computed by XLA (rpg_jax.device_map): bit-identical to the host tables."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rpg_jax
from rpg_jax import device_map
from rpg_jax.index_map import _derive_key, _Feistel, ring_tables

GOLDEN_LAYOUT = (576, 1152, 2304, 128, 36_864)


def device_tables(sizes, n, seed, mode, name="r"):
    forward = device_map.forward_slice(sizes, n, seed=seed, ring_name=name, mode=mode)
    inverse = device_map.inverse_table(sizes, n, seed=seed, ring_name=name, mode=mode)
    return np.asarray(forward), np.asarray(inverse)


def assert_same_as_host(sizes, n, seed, mode, name="r"):
    forward, inverse = ring_tables(tuple(sizes), n, seed=seed, ring_name=name, mode=mode)
    d_forward, d_inverse = device_tables(tuple(sizes), n, seed, mode, name)
    np.testing.assert_array_equal(d_forward, forward)
    assert d_inverse.shape == inverse.shape
    np.testing.assert_array_equal(d_inverse, inverse)
    start = 0
    for layer, size in enumerate(sizes):
        piece = device_map.forward_slice(tuple(sizes), n, seed=seed, ring_name=name, mode=mode,
                                         layer=layer)
        np.testing.assert_array_equal(np.asarray(piece), forward[start : start + size])
        start += size


@settings(max_examples=10, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
    fraction=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**31),
    mode=st.sampled_from(rpg_jax.MODES),
)
def test_tables_match_host_tables(sizes, fraction, seed, mode):
    total = sum(sizes)
    assert_same_as_host(sizes, max(1, min(total, round(fraction * total))), seed, mode)


@pytest.mark.parametrize("mode, digest", [("rpg", "4e4e45520b13185a17f607637b48fe4b"),
                                          ("naive", "58adf57939e336ebe62e57be2e4fd765")])
def test_golden_tables_through_the_device_path(mode, digest):
    forward = device_map.forward_slice(GOLDEN_LAYOUT, 4099, seed=2024, ring_name="ring",
                                       mode=mode)
    assert hashlib.sha256(np.asarray(forward).astype("<i4").tobytes()).hexdigest()[:32] == digest


@pytest.mark.parametrize("mode", rpg_jax.MODES)
def test_inverse_rows_from_a_traced_first_entry(mode):
    sizes, n = (700, 300, 33), 97
    _, inverse = ring_tables(sizes, n, seed=4, ring_name="r", mode=mode)
    rows = jax.jit(lambda first: device_map.inverse_rows(sizes, n, seed=4, ring_name="r",
                                                         mode=mode, first=first, count=40))
    np.testing.assert_array_equal(np.asarray(rows(10)), inverse[10:50])
    tail = np.asarray(rows(80))  # 17 real rows, then padding
    np.testing.assert_array_equal(tail[:17], inverse[80:])
    assert np.all(tail[17:] == sum(sizes))


@pytest.mark.parametrize("length", [2, 3, 5, 1000, 4096, 4097, 70_001])
def test_inverse_permutation_undoes_the_forward_one(length):
    key = _derive_key(7, length)
    t = jnp.arange(length, dtype=jnp.uint32)
    y = device_map.permute(t, length, key)
    np.testing.assert_array_equal(np.asarray(y), _Feistel(length, key)(np.arange(length)))
    np.testing.assert_array_equal(np.asarray(device_map.permute(y, length, key, inverse=True)),
                                  np.arange(length))


@pytest.mark.parametrize("cap", [None, 1], ids=["packed", "overflow"])
def test_packed_stragglers_and_their_overflow_are_exact(monkeypatch, cap):
    """Large buffers pack their stragglers into a small one after a few passes; if more are
    left than it holds (forced here with a 1-slot buffer), the last loop finishes them."""
    monkeypatch.setattr(device_map, "_SMALL", 64)
    if cap is not None:
        monkeypatch.setattr(device_map, "_cap", lambda size, fraction: cap)
    for sizes, n in [((9000, 3000, 123), 4000), ((5000,), 5000), ((40_000,), 977)]:
        assert_same_as_host(sizes, n, seed=11, mode="rpg")


@pytest.mark.slow
def test_resnet18_ring_through_the_device_path():
    """The pinned ImageNet ResNet18 forward table (11,157,504 positions), computed in jit."""
    model = rpg_jax.models.ResNet18(num_classes=1000)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    spec = rpg_jax.make_spec(shapes, ring_size=2_359_296, seed=0)
    sizes = tuple(leaf.size for leaf in spec.generated)
    forward = jax.jit(lambda: device_map.forward_slice(sizes, 2_359_296, seed=0,
                                                       ring_name="ring"))()
    digest = hashlib.sha256(np.asarray(forward).astype("<i4").tobytes()).hexdigest()[:32]
    assert digest == "c17d2ab3812a4dc58384e99b85f61495"


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="mode='shuffle'"):
        device_map.forward_slice((10,), 5, seed=0, ring_name="r", mode="shuffle")
    with pytest.raises(ValueError, match="ring size 11 must be in"):
        device_map.inverse_table((10,), 11, seed=0, ring_name="r")
