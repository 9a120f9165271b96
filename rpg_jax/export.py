"""Self-contained model files: an RPG artifact (rings, free params, batch stats, spec) or
plain materialised Flax params, loadable without the training config or the dataset.

One file, msgpack (``flax.serialization``): ``{"format", "kind", "meta" (JSON: model,
dataset description, spec), "weights", "batch_stats"}``. Rings may be stored compressed
(pruned and/or quantised, see ``rpg_jax.compress``); loading expands them to float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import serialization

from rpg_jax import data, experiment
from rpg_jax.checkpoints import Checkpoint
from rpg_jax.compress import CompressedArray
from rpg_jax.generator import materialize
from rpg_jax.spec import RPGSpec

EXPORT_FORMAT = 1
KINDS = ("rpg", "params")
# The config fields a model needs to be rebuilt (everything else is about training).
# ("vit" is missing from configs written before the ViT existed).
MODEL_FIELDS = ("model", "width", "zero_init_residual", "half_precision", "dataset", "vit")


def _meta(ckpt: Checkpoint, spec: RPGSpec | None) -> str:
    config = ckpt.config.to_dict()
    model_cfg = {k: config[k] for k in MODEL_FIELDS if k in config}
    return json.dumps({"config": model_cfg, "info": dataclasses.asdict(ckpt.info),
                       "spec": spec.to_dict() if spec is not None else None,
                       "step": ckpt.step})


def _encode_rings(rings: dict[str, Any]) -> dict[str, Any]:
    return {name: (r.to_state() if isinstance(r, CompressedArray) else np.asarray(r))
            for name, r in rings.items()}


def export(ckpt: Checkpoint, path: str, kind: str = "rpg",
           rings: dict[str, Any] | None = None) -> int:
    """Writes ``ckpt`` to ``path`` and returns the file size in bytes.

    ``kind="rpg"``: the compact artifact (rings, free params, batch stats, spec); ``rings``
    may replace the checkpoint's rings, e.g. with ``CompressedArray``s. ``kind="params"``:
    plain materialised params for serving (no spec, no generator needed).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if kind == "rpg" and ckpt.spec is None:
        raise ValueError("kind='rpg' needs an RPG checkpoint; this one is a plain model")
    if rings is not None and kind != "rpg":
        raise ValueError("rings= only applies to kind='rpg'")
    if kind == "rpg":
        weights = {"rings": _encode_rings(rings if rings is not None else ckpt.bank["rings"]),
                   "free": jax.device_get(ckpt.bank["free"])}
        spec = ckpt.spec
    else:
        weights = (materialize(ckpt.bank, ckpt.spec) if ckpt.spec is not None
                   else jax.device_get(ckpt.bank))
        spec = None
    payload = serialization.msgpack_serialize({
        "format": EXPORT_FORMAT, "kind": kind, "meta": _meta(ckpt, spec),
        "weights": weights, "batch_stats": jax.device_get(ckpt.batch_stats)})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(payload)
    return len(payload)


def load_export(path: str) -> Checkpoint:
    """Loads a file written by ``export`` (either kind) as a ``Checkpoint``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported model at {path!r}")
    with open(path, "rb") as f:
        try:
            blob = serialization.msgpack_restore(f.read())
        except Exception as e:  # msgpack raises several types on foreign files
            raise ValueError(f"{path!r} is not an rpg_jax export: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path!r}: export format {found!r}, this rpg_jax reads format "
                         f"{EXPORT_FORMAT}")
    meta = json.loads(blob["meta"])
    config = ml_collections.ConfigDict(meta["config"])
    info = data.DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in meta["info"].items()})
    model = experiment.build_model(config, info.num_classes)
    spec = RPGSpec.from_dict(meta["spec"]) if meta["spec"] is not None else None
    weights = blob["weights"]
    if blob["kind"] == "rpg":
        rings = {name: (CompressedArray.from_state(r).dequantize() if isinstance(r, dict)
                        else np.asarray(r)) for name, r in weights["rings"].items()}
        weights = {"rings": rings, "free": weights["free"]}
    return Checkpoint(bank=jax.device_put(weights), spec=spec,
                      batch_stats=jax.device_put(blob["batch_stats"]), config=config,
                      step=int(meta["step"]), model=model, info=info)
