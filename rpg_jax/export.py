"""Self-contained model files: an RPG artifact (rings, free params, batch stats, spec) or
plain materialised Flax params, loadable without the training config or the dataset.

One file, msgpack (``flax.serialization``): ``{"format": 2, "sha256", "body"}`` where
``body`` is the msgpack of ``{"kind", "meta" (JSON: model, dataset description, spec),
"weights", "batch_stats"}`` and ``sha256`` its SHA-256, verified on load (a flipped bit is
an error, not a silently wrong model). Format-1 files (the same dict, unwrapped, without a
checksum) still load. Rings may be stored compressed (pruned and/or quantised, see
``rpg_jax.quantize``); loading expands them to float32.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import serialization

from rpg_jax import data, experiment
from rpg_jax.generator import materialize
from rpg_jax.quantize import CompressedArray
from rpg_jax.spec import RPGSpec
from rpg_jax.trained_model import TrainedModel

EXPORT_FORMAT = 2
READ_FORMATS = (1, 2)
KINDS = ("rpg", "params")
# The config fields a model needs to be rebuilt (everything else is about training).
# ("vit" is missing from configs written before the ViT existed).
MODEL_FIELDS = ("model", "width", "zero_init_residual", "half_precision", "dataset", "vit")


def _meta(ckpt: TrainedModel, spec: RPGSpec | None) -> str:
    config = ckpt.config.to_dict()
    model_cfg = {k: config[k] for k in MODEL_FIELDS if k in config}
    return json.dumps({"config": model_cfg, "info": ckpt.info.to_dict(),
                       "spec": spec.to_dict() if spec is not None else None,
                       "step": ckpt.step})


def _encode_rings(rings: dict[str, Any]) -> dict[str, Any]:
    return {name: (r.to_state() if isinstance(r, CompressedArray) else np.asarray(r))
            for name, r in rings.items()}


def export(ckpt: TrainedModel, path: str, kind: str = "rpg",
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
        weights = {"rings": _encode_rings(rings if rings is not None else ckpt.trainable["rings"]),
                   "free": jax.device_get(ckpt.trainable["free"])}
        spec = ckpt.spec
    else:
        weights = (materialize(ckpt.trainable, ckpt.spec) if ckpt.spec is not None
                   else jax.device_get(ckpt.trainable))
        spec = None
    body = serialization.msgpack_serialize({
        "kind": kind, "meta": _meta(ckpt, spec),
        "weights": weights, "batch_stats": jax.device_get(ckpt.batch_stats)})
    payload = serialization.msgpack_serialize({
        "format": EXPORT_FORMAT, "sha256": hashlib.sha256(body).hexdigest(), "body": body})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(payload)
    return len(payload)


def _restore(path: str, raw: bytes) -> Any:
    try:
        return serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several types on foreign or damaged files
        raise ValueError(f"{path!r} is not an rpg_jax export (or is damaged): "
                         f"{type(e).__name__}: {e}") from e


def _body(path: str, blob: Any) -> dict[str, Any]:
    """The verified content dict of a restored file of either format."""
    found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
    if not isinstance(blob, dict) or found not in READ_FORMATS:
        raise ValueError(f"{path!r}: export format {found!r}, this rpg_jax reads formats "
                         f"{READ_FORMATS}")
    if found == 1:
        logging.warning("%s: a format-1 export has no checksum; it loads unverified", path)
        body = blob
    else:
        raw = blob.get("body")
        if not isinstance(raw, bytes) or not isinstance(blob.get("sha256"), str):
            raise ValueError(f"{path!r}: a format-2 export needs 'body' bytes and a 'sha256'")
        digest = hashlib.sha256(raw).hexdigest()
        if digest != blob["sha256"]:
            raise ValueError(f"{path!r} is damaged: its content's SHA-256 is {digest}, the "
                             f"file records {blob['sha256']}")
        body = _restore(path, raw)
    missing = [k for k in ("kind", "meta", "weights", "batch_stats")
               if not isinstance(body, dict) or k not in body]
    if missing:
        raise ValueError(f"{path!r}: an rpg_jax export needs the fields kind, meta, weights "
                         f"and batch_stats; missing: {missing}")
    if body["kind"] not in KINDS:
        raise ValueError(f"{path!r}: kind={body['kind']!r}, expected one of {KINDS}")
    return body


def load_export(path: str) -> TrainedModel:
    """Loads a file written by ``export`` (either kind) as a ``TrainedModel``.

    Raises ValueError for a foreign file, a missing field, or (format 2) content that does
    not match the stored checksum.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported model at {path!r}")
    with open(path, "rb") as f:
        blob = _body(path, _restore(path, f.read()))
    try:
        meta = json.loads(blob["meta"])
        config = ml_collections.ConfigDict(meta["config"])
        info = data.DatasetInfo.from_dict(meta["info"])
        spec = RPGSpec.from_dict(meta["spec"]) if meta["spec"] is not None else None
        step = int(meta["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path!r}: unreadable meta field ({type(e).__name__}: {e})") from e
    model = experiment.build_model(config, info.num_classes)
    weights = blob["weights"]
    if blob["kind"] == "rpg":
        rings = {name: (CompressedArray.from_state(r).dequantize() if isinstance(r, dict)
                        else np.asarray(r)) for name, r in weights["rings"].items()}
        weights = {"rings": rings, "free": weights["free"]}
    return TrainedModel(trainable=jax.device_put(weights), spec=spec,
                        batch_stats=jax.device_put(blob["batch_stats"]), config=config,
                        step=step, model=model, info=info)
