"""The training configuration: every field with its default, and validation before any work.

Config files in ``configs/`` start from ``base_config()`` and change what they need;
``train.py`` locks the config so a misspelt override is an error.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import math
import re
import tokenize
from typing import Any

import ml_collections

# Nothing of rpg_jax is imported at module level: train.py reads this file for ``--help``
# without importing the package (and with it JAX); validate() imports what it checks.

OPTIMIZERS = ("sgd", "adamw")
BACKWARDS = ("gather", "scatter")
TABLES = ("host", "device")
VIT_POOLS = ("cls", "mean")


def base_config() -> ml_collections.ConfigDict:
    """All fields of a training run, with the Fashion-MNIST defaults."""
    c = ml_collections.ConfigDict()
    c.dataset = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | imagenet2012 | synthetic_*
    c.data_dir = ""  # "" = the dataset's default location
    c.synthetic_size = 0  # examples of a synthetic_* dataset (0 = its default)
    # > 0: train on all but the last N examples of the train split and evaluate on those N
    # (a validation set for tuning; the eval/test split is not read)
    c.holdout_examples = 0
    c.worker_count = 0  # grain worker processes for the host pipeline (0 = in-process)
    # ImageNet-style JPEG data: turbo (crop from the header, DCT-domain downscale, uint8 warp)
    # | pil (full Pillow decode, the earlier path) | dali (train on an NVIDIA GPU with DALI)
    c.image_decoder = "turbo"
    c.on_corrupt_image = "error"  # error (names the record) | skip (warn, use the next one)
    c.model = "resnet20"  # resnet18|34|50 | resnet20|32|56|110 | cifar_resnet18 | vit
    c.width = 1.0  # channel multiplier of the model (a ViT's: of vit.dim)
    c.zero_init_residual = False  # zero-init the last BatchNorm scale of each residual block
    c.batch_size = 128  # global, over all devices and hosts
    c.eval_batch_size = 0  # 0 = batch_size
    c.eval_steps = -1  # eval batches per evaluation; -1 = the whole eval split
    c.num_epochs = 10.0  # run length in epochs of the train split
    c.num_train_steps = -1  # -1: derived from num_epochs
    c.seed = 0  # parameter init and data order
    c.optimizer = "sgd"  # sgd | adamw
    c.momentum = 0.9  # SGD momentum (0 = none; unused by adamw)
    c.nesterov = False  # Nesterov momentum (sgd)
    c.learning_rate = 0.1  # peak learning rate (absolute; configs scale it with the batch)
    # constant | cosine | exp_epoch (after the warm-up) | an optax schedule by name, e.g.
    # warmup_cosine_decay_schedule (with lr_schedule_kwargs)
    c.lr_schedule = "cosine"
    # an optax schedule's keyword arguments as JSON; the strings "learning_rate", "num_steps"
    # and "steps_per_epoch" stand for the run's values, e.g. {"peak_value": "learning_rate"}
    c.lr_schedule_kwargs = ""
    c.warmup_epochs = 0.0  # linear warm-up to the peak learning rate, in epochs (built-ins)
    c.lr_decay_epochs = 45.0  # exp_epoch: lr0 * 0.1 ** (epoch // 1 / lr_decay_epochs)
    c.weight_decay = 5e-4  # coupled L2 on every trainable leaf, rings included (as reference)
    # leaves kept out of weight decay: "" (none) | norm_and_bias | a regex on "/"-joined paths
    c.weight_decay_exclude = ""
    c.grad_clip_norm = 0.0  # clip the global gradient norm to this (0 = off)
    c.grad_accum_steps = 1  # k > 1: one update per k batches, of their mean gradient
    c.label_smoothing = 0.0  # target = (1 - s) * onehot + s / classes
    c.ema_decay = 0.0  # > 0: keep an EMA of the trainable parameters (e.g. 0.999)
    c.ema_eval = False  # also evaluate the EMA parameters (eval_ema_* records)
    # ema_eval with BatchNorm: statistics for the EMA weights recomputed over this many train
    # batches before each EMA evaluation (SWA's update_bn); 0 = the live network's statistics
    c.ema_bn_batches = 100
    c.mixup_alpha = 0.0  # Beta(alpha, alpha) mixup of each batch with its reverse (0 = off)
    c.cutmix_alpha = 0.0  # Beta(alpha, alpha) CutMix (0 = off)
    c.mix_prob = 1.0  # probability that a batch is mixed (when mixup or CutMix is on)
    c.mix_switch_prob = 0.5  # with both on: probability of CutMix instead of mixup
    # random erasing (Zhong et al. 2017): erase one random box per example with this
    # probability (0 = off; the paper uses 0.5), area 2-40% of the image, aspect 0.3-3.3
    c.random_erase_prob = 0.0
    c.random_erase_fill = "random"  # "random": uniform random pixels (RE-R); "mean": RE-M
    c.half_precision = False  # bfloat16 compute, float32 params and optimizer state
    c.log_every_steps = 50  # train steps per metrics record (and log line)
    c.eval_every_steps = -1  # -1: once per epoch; 0: only at the end
    c.checkpoint_every_steps = -1  # -1: once per epoch; 0: only at the end
    c.keep_checkpoints = 2  # most recent checkpoints kept
    c.multihost = False  # call jax.distributed.initialize() (TPU pods, multi-node GPU)
    # Comma-separated fields a resumed run may change although they alter the data stream or
    # the trained trajectory (RESUME_OVERRIDABLE below), e.g. "learning_rate,batch_size".
    c.resume_overrides = ""
    # Metric sinks next to metrics.jsonl (process 0) and profiling; all off by default
    c.tensorboard = False  # also write the metrics as TensorBoard events to WORKDIR/tensorboard
    c.wandb = ml_collections.ConfigDict()
    c.wandb.enabled = False  # also log the metrics and the config to a Weights & Biases run
    c.wandb.project = "rpg_jax"  # W&B project
    c.wandb.entity = ""  # W&B team or user; "" = your default entity
    c.wandb.name = ""  # W&B run name; "" = the workdir's basename
    c.wandb.tags = ""  # comma-separated W&B run tags
    c.profile_steps = ""  # "A:B": trace train steps A..B-1 with jax.profiler to WORKDIR/profile

    # model "vit" only; the defaults are ViT-Ti/16
    c.vit = ml_collections.ConfigDict()
    c.vit.dim = 192  # embedding width before the `width` multiplier
    c.vit.depth = 12  # encoder blocks
    c.vit.num_heads = 3  # attention heads (divides the embedding width)
    c.vit.mlp_ratio = 4.0  # MLP hidden width / embedding width
    c.vit.patch_size = 16  # side of the square patches, in pixels
    c.vit.pool = "cls"  # cls (class token) | mean (mean of the patch tokens)

    c.rpg = ml_collections.ConfigDict()
    c.rpg.enabled = True  # generate the selected weights from rings (False = plain model)
    c.rpg.ring_size = 0.1  # fraction (0, 1] of generated weights, or an absolute DoF (> 1)
    c.rpg.groups = "global"  # global | stage | block | layer | JSON {"regex": "ring", ...}
    c.rpg.select = "blocks"  # auto | blocks | convs | kernels | a regex on parameter paths
    c.rpg.mode = "rpg"  # rpg | naive | perm_only | sign_only
    c.rpg.seed = 0  # seed of the index permutations and signs
    # gather: the backward gathers through an inverse table (fastest on CPU; 8 bytes of tables
    # per generated weight) | scatter: forward table only (4 bytes), scatter-add backward
    c.rpg.backward = "gather"
    # host: index tables made on the host and kept on the device (4 or 8 bytes per generated
    # weight) | device: indices and signs computed inside the step from the spec, no tables
    # (bit-identical values, so checkpoints move freely between the two)
    c.rpg.tables = "host"
    # low memory: each generated kernel is made where it is used and again in the backward
    # pass, so kernels and their gradients never all live at once (rpg_jax.remat_kernels;
    # needs rpg.tables=device and rpg.backward=scatter)
    c.rpg.remat = False
    return c


# What a run resuming a checkpoint may change (README: "What resume accepts and refuses").
# Fields that define the saved state: always refused (a ViT's ``vit.*`` fields too).
RESUME_FIXED = (
    "dataset", "model", "width", "zero_init_residual", "optimizer",
    "rpg.enabled", "rpg.ring_size", "rpg.groups", "rpg.select", "rpg.mode", "rpg.seed",
)
# Bookkeeping, or a run length checked against the checkpoint's step: always accepted.
RESUME_FREE = (
    "data_dir", "worker_count", "eval_batch_size", "eval_steps", "num_epochs",
    "num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "multihost", "rpg.backward", "rpg.tables", "rpg.remat", "resume_overrides",
    "tensorboard", "wandb.enabled", "wandb.project", "wandb.entity", "wandb.name", "wandb.tags",
    "profile_steps", "ema_bn_batches",
)
# Every other field changes the data stream (seed, batch_size, synthetic_size, image
# decoding) or the trained trajectory (learning rate, schedule, decay, momentum, precision):
# refused unless named in ``resume_overrides``. A momentum of 0 <-> non-zero changes the
# optimizer state's structure and is always refused.


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf field of ``config`` as a dotted name (``rpg.ring_size``)."""
    names = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            names += field_names(value, f"{prefix}{key}.")
        else:
            names.append(prefix + key)
    return names


def field_value(config: ml_collections.ConfigDict | dict, dotted: str) -> Any:
    """The value of a dotted field (None where the config has no such field)."""
    node: Any = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return None
        node = node[part]
    return node


def describe_fields() -> list[tuple[str, Any, str]]:
    """(dotted name, default, description) of every leaf field of ``base_config()``.

    The description is the trailing ``# comment`` of the field's ``c.FIELD = ...`` line in
    ``base_config``'s source, or else the comment lines right above it: the config's one
    source of truth, also for ``python train.py --help``.
    """
    config = base_config()
    comments = _field_comments(inspect.getsource(base_config))
    order = {name: i for i, name in enumerate(comments)}  # as base_config lists them
    names = sorted(field_names(config), key=lambda n: order.get(n, len(order)))
    return [(name, field_value(config, name), comments.get(name, "")) for name in names]


def _field_comments(source: str) -> dict[str, str]:
    """Maps ``a.b`` to the comment of the statement ``c.a.b = ...`` in ``source``."""
    comments: dict[str, str] = {}
    above: list[str] = []  # the comment lines since the last statement or blank line
    statement: list[tokenize.TokenInfo] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not statement:
            above.append(tok.string.lstrip("#").strip())
        elif tok.type == tokenize.NL and not statement:
            if tok.line.strip() == "":
                above = []
        elif tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            name, trailing = _assigned_field(statement)
            if name:
                comments[name] = trailing or " ".join(above)
            statement, above = [], []
        elif tok.type not in (tokenize.INDENT, tokenize.DEDENT):
            statement.append(tok)
    return comments


def _assigned_field(tokens: list[tokenize.TokenInfo]) -> tuple[str, str]:
    """(``a.b``, trailing comment) of a statement ``c.a.b = value  # comment``, else ("", "")."""
    strings = [t.string for t in tokens]
    if "=" not in strings or strings[:2] != ["c", "."]:
        return "", ""
    target = strings[:strings.index("=")]
    if not all(t == "." for t in target[1::2]) or not all(t.isidentifier() for t in target[::2]):
        return "", ""
    trailing = [t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT]
    return ".".join(target[2::2]), " ".join(trailing)


def is_fixed_on_resume(field: str) -> bool:
    return field in RESUME_FIXED or field.startswith("vit.")


def resume_overrides(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The field names listed in ``config.resume_overrides``."""
    return tuple(n.strip() for n in config.resume_overrides.split(",") if n.strip())


def ring_size(config: ml_collections.ConfigDict) -> int | float:
    """``rpg.ring_size`` as make_spec wants it: values > 1 are an absolute DoF (an int)."""
    value = config.rpg.ring_size
    if isinstance(value, float) and value > 1:
        if not value.is_integer():
            raise ValueError(f"config.rpg.ring_size={value}: above 1 it must be a whole number "
                             "of ring entries")
        return int(value)
    return value


def groups(config: ml_collections.ConfigDict) -> str | dict[str, str]:
    """``rpg.groups`` as make_spec wants it (a JSON object string becomes a mapping)."""
    value = config.rpg.groups
    if value.strip().startswith("{"):
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"config.rpg.groups={value!r} is not valid JSON: {e}") from e
        if not isinstance(mapping, dict):
            _fail("rpg.groups", value, 'a JSON object {"regex": "ring name", ...}')
        for pattern in mapping:
            _check_regex("rpg.groups", value, pattern)
        return {str(k): str(v) for k, v in mapping.items()}
    return value


def _check_regex(field: str, value: Any, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        _fail(field, value, f"valid regular expressions ({pattern!r}: {e})")


def is_vit(config: ml_collections.ConfigDict) -> bool:
    return config.model.strip().lower() == "vit"


def vit_width(config: ml_collections.ConfigDict) -> int:
    """A ViT's embedding width: ``vit.dim * width`` rounded, at least 1."""
    return max(1, int(round(config.vit.dim * config.width)))


def _fail(field: str, value: Any, expected: str) -> None:
    raise ValueError(f"config.{field}={value!r}: expected {expected}")


def _validate_image_decoding(config: ml_collections.ConfigDict) -> None:
    from rpg_jax.data import DECODERS, ON_CORRUPT

    if config.image_decoder not in DECODERS:
        _fail("image_decoder", config.image_decoder, f"one of {DECODERS}")
    if config.on_corrupt_image not in ON_CORRUPT:
        _fail("on_corrupt_image", config.on_corrupt_image, f"one of {ON_CORRUPT}")
    if config.image_decoder == "dali":
        if config.dataset != "imagenet2012":
            _fail("image_decoder", "dali", f"'turbo' or 'pil' for dataset {config.dataset!r} "
                  "(DALI reads the JPEGs of imagenet2012)")
        import importlib.util

        from rpg_jax.data.dali import DALI_INSTALL

        try:
            found = importlib.util.find_spec("nvidia.dali") is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ValueError(f"config.image_decoder='dali': NVIDIA DALI is not installed; "
                             f"{DALI_INSTALL}")


def profile_window(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """``config.profile_steps`` "A:B" as (A, B), or None when it is "" (no profiling)."""
    value = config.profile_steps
    if not isinstance(value, str):
        _fail("profile_steps", value, '"" (off) or "A:B", the train steps A..B-1 to trace')
    if not value.strip():
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
    if not match or int(match[1]) >= int(match[2]):
        _fail("profile_steps", value, '"" (off) or "A:B" with integers 0 <= A < B (the train '
              "steps A..B-1 to trace)")
    return int(match[1]), int(match[2])


def wandb_tags(config: ml_collections.ConfigDict) -> list[str]:
    """The tags listed in ``config.wandb.tags``."""
    return [t.strip() for t in config.wandb.tags.split(",") if t.strip()]


# The optional packages of the metric sinks: (config field, module, pip package).
SINK_PACKAGES = (("tensorboard", "tensorboardX", "tensorboardX"),
                 ("wandb.enabled", "wandb", "wandb"))


def _validate_sinks(config: ml_collections.ConfigDict) -> None:
    for field in ("tensorboard", "wandb.enabled"):
        if not isinstance(field_value(config, field), bool):
            _fail(field, field_value(config, field), "True or False")
    for field in ("wandb.project", "wandb.entity", "wandb.name", "wandb.tags"):
        if not isinstance(field_value(config, field), str):
            _fail(field, field_value(config, field), "a string")
    if config.wandb.enabled and not config.wandb.project.strip():
        _fail("wandb.project", config.wandb.project, "a W&B project name")
    profile_window(config)
    for field, module, package in SINK_PACKAGES:
        if field_value(config, field) and importlib.util.find_spec(module) is None:
            raise ValueError(f"config.{field}=True needs the {package!r} package, which is not "
                             f"installed: pip install {package} (or pip install "
                             "'rpg_jax[logging]'), or leave the field off")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field; cheap, runs before any work starts."""
    for field in field_names(config):
        value = field_value(config, field)
        if isinstance(value, float) and not math.isfinite(value):
            _fail(field, value, "a finite number")
    _validate_data_and_model(config)
    _validate_optimization(config)
    _validate_schedule_and_outputs(config)
    _validate_resume_overrides(config)
    if config.rpg.enabled:
        _validate_rpg(config)


def _check_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(field, value, "a positive int")


def _validate_data_and_model(config: ml_collections.ConfigDict) -> None:
    from rpg_jax.data import DATASET_NAMES
    from rpg_jax.models import MODEL_NAMES

    if config.dataset not in DATASET_NAMES:
        _fail("dataset", config.dataset, f"one of {DATASET_NAMES}")
    _validate_image_decoding(config)
    if config.model.lower() not in MODEL_NAMES:
        _fail("model", config.model, f"one of {MODEL_NAMES}")
    _check_positive_int("batch_size", config.batch_size)
    if config.eval_batch_size < 0:
        _fail("eval_batch_size", config.eval_batch_size, "0 (= batch_size) or a positive int")
    holdout = config.holdout_examples
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
        _fail("holdout_examples", holdout, "a non-negative int (0 = evaluate on the eval split)")
    if config.eval_steps == 0 or config.eval_steps < -1:
        _fail("eval_steps", config.eval_steps, "-1 (the whole eval split) or >= 1")
    if config.width <= 0:
        _fail("width", config.width, "a positive channel multiplier")
    if is_vit(config):
        _validate_vit(config)


def _validate_optimization(config: ml_collections.ConfigDict) -> None:
    """The step count, the optimizer and its schedule, then the recipe knobs."""
    from rpg_jax import optim

    if config.num_train_steps == 0 or config.num_train_steps < -1:
        _fail("num_train_steps", config.num_train_steps, "-1 (from num_epochs) or >= 1")
    if config.num_train_steps == -1 and not config.num_epochs > 0:
        _fail("num_epochs", config.num_epochs, "a positive number")
    if config.optimizer not in OPTIMIZERS:
        _fail("optimizer", config.optimizer, f"one of {OPTIMIZERS}")
    optim.check_schedule(config)
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        _fail("learning_rate", config.learning_rate, "a positive finite number")
    if config.lr_decay_epochs <= 0:
        _fail("lr_decay_epochs", config.lr_decay_epochs, "a positive number of epochs")
    _validate_recipe_knobs(config)


def _validate_recipe_knobs(config: ml_collections.ConfigDict) -> None:
    """Regularisation, mixing, erasing, accumulation, EMA and the weight-decay mask."""
    from rpg_jax import erasing, optim

    for field in ("weight_decay", "warmup_epochs", "momentum", "grad_clip_norm", "mixup_alpha",
                  "cutmix_alpha"):
        if config[field] < 0:
            _fail(field, config[field], "a non-negative number")
    for field in ("label_smoothing", "ema_decay"):
        if not 0 <= config[field] < 1:
            _fail(field, config[field], "a number in [0, 1)")
    for field in ("mix_prob", "mix_switch_prob", "random_erase_prob"):
        if not 0 <= config[field] <= 1:
            _fail(field, config[field], "a probability in [0, 1]")
    if config.random_erase_fill not in erasing.FILLS:
        _fail("random_erase_fill", config.random_erase_fill, f"one of {erasing.FILLS}")
    _check_positive_int("grad_accum_steps", config.grad_accum_steps)
    bn_batches = config.ema_bn_batches
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
        _fail("ema_bn_batches", bn_batches, "a non-negative int (0 = the live statistics)")
    if config.ema_eval and not config.ema_decay > 0:
        _fail("ema_eval", config.ema_eval, "False unless config.ema_decay > 0")
    if config.weight_decay_exclude not in optim.DECAY_EXCLUDE_PRESETS:
        _check_regex("weight_decay_exclude", config.weight_decay_exclude,
                     config.weight_decay_exclude)


def _validate_schedule_and_outputs(config: ml_collections.ConfigDict) -> None:
    """Logging, evaluation and checkpoint intervals, and the metric sinks."""
    if config.log_every_steps <= 0:
        _fail("log_every_steps", config.log_every_steps, "a positive number of steps")
    for field in ("eval_every_steps", "checkpoint_every_steps"):
        if config[field] < -1:
            _fail(field, config[field], "-1 (every epoch), 0 (only at the end) or a step count")
    if config.keep_checkpoints < 1:
        _fail("keep_checkpoints", config.keep_checkpoints, "at least 1")
    _validate_sinks(config)


def _validate_resume_overrides(config: ml_collections.ConfigDict) -> None:
    fields = field_names(config)
    for name in resume_overrides(config):
        if name not in fields:
            why = "not a config field"
        elif is_fixed_on_resume(name):
            why = "always refused: it defines the saved state"
        elif name in RESUME_FREE:
            why = "always accepted: no override needed"
        else:
            continue
        _fail("resume_overrides", config.resume_overrides,
              f"comma-separated config fields a resumed run may change ({name!r} is {why})")


def _validate_rpg(config: ml_collections.ConfigDict) -> None:
    from rpg_jax.index_map import MODES
    from rpg_jax.spec import GROUP_PRESETS, SELECT_PRESETS

    rpg = config.rpg
    if rpg.mode not in MODES:
        _fail("rpg.mode", rpg.mode, f"one of {MODES}")
    size = rpg.ring_size
    if isinstance(size, bool) or not isinstance(size, int | float) or size <= 0:
        _fail("rpg.ring_size", size, "a fraction in (0, 1] or a ring DoF > 1")
    ring_size(config)
    g = groups(config)
    if isinstance(g, str) and g not in GROUP_PRESETS:
        _fail("rpg.groups", g, f"one of {GROUP_PRESETS} or a JSON object")
    if isinstance(rpg.seed, bool) or not isinstance(rpg.seed, int) or rpg.seed < 0:
        _fail("rpg.seed", rpg.seed, "a non-negative int")
    for field, allowed in (("backward", BACKWARDS), ("tables", TABLES)):
        if rpg[field] not in allowed:
            _fail(f"rpg.{field}", rpg[field], f"one of {allowed}")
    if not isinstance(rpg.remat, bool):
        _fail("rpg.remat", rpg.remat, "True or False")
    if rpg.remat and (rpg.tables, rpg.backward) != ("device", "scatter"):
        _fail("rpg.remat", rpg.remat,
              "rpg.tables='device' and rpg.backward='scatter' with it (got "
              f"rpg.tables={rpg.tables!r}, rpg.backward={rpg.backward!r})")
    if not rpg.select:
        _fail("rpg.select", rpg.select, f"one of {SELECT_PRESETS} or a regex")
    if rpg.select not in SELECT_PRESETS:
        _check_regex("rpg.select", rpg.select, rpg.select)


def _validate_vit(config: ml_collections.ConfigDict) -> None:
    v = config.vit
    for field in ("dim", "depth", "num_heads", "patch_size"):
        if isinstance(v[field], bool) or not isinstance(v[field], int) or v[field] <= 0:
            _fail(f"vit.{field}", v[field], "a positive int")
    if not (v.mlp_ratio > 0 and math.isfinite(v.mlp_ratio)):
        _fail("vit.mlp_ratio", v.mlp_ratio, "a positive finite number")
    if v.pool not in VIT_POOLS:
        _fail("vit.pool", v.pool, f"one of {VIT_POOLS}")
    if vit_width(config) % v.num_heads:
        _fail("vit.num_heads", v.num_heads,
              f"a divisor of the embedding width {vit_width(config)} (vit.dim={v.dim} x "
              f"width={config.width})")
    if config.zero_init_residual:
        _fail("zero_init_residual", config.zero_init_residual, "False for a ViT (no BatchNorm)")
