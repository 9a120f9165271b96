#!/usr/bin/env bash
# RPG vs plain on one NVIDIA GPU: ImageNet ResNet18 and ResNet50 at 224x224, bfloat16
# compute, batch 256, ring 2,359,296: images/s (paired, median of 10 rounds) of the plain step
# and of the RPG step with host tables and the gather backward (default) or the scatter
# backward (rpg.backward="scatter"), and with indices computed on the device (no tables:
# make_tables(spec, where="device"), gather or scatter backward), compile time and the
# compiled step's memory. Writes benchmarks/results/gpu.json (or $OUT/gpu.json);
# then RPG ResNet18 train_and_evaluate runs fed by the host JPEG path and by DALI
# (benchmarks/imagenet_pipeline.py --train_run) into imagenet_train_gpu.json beside it.
# Takes about 4 minutes on an H200 (the train runs: a few more, not yet timed). Target: RPG/plain
# throughput >= 0.98.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! $py -c "import jax, flax, optax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  echo "Installing JAX with CUDA..."
  $py -m pip install -q "jax[cuda12]>=0.10.2" "flax>=0.12.8" "optax>=0.2.8"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # rpg_jax without installing it
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # report what each step needs, not a preallocation
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out_dir=${OUT:-benchmarks/results}
mkdir -p "$out_dir"
kinds=plain,rpg,rpg_scatter,rpg_device,rpg_device_scatter
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for model in resnet18 resnet50; do
  $py benchmarks/train_step.py --model "$model" --image_size 224 --batch_size 256 \
    --half_precision --ring_size 2359296 --pairs 10 --kinds "$kinds" --out "$tmp/$model.json"
done
# The same with XLA's GPU scheduler told that memory is tight (limit = 1% of the card):
# far below the limit it schedules for speed, so the compiled peaks above reflect its
# choices as much as what each program must keep.
for model in resnet18 resnet50; do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_memory_limit_slop_factor=1" \
    $py benchmarks/train_step.py --model "$model" --image_size 224 --batch_size 256 \
    --half_precision --ring_size 2359296 --pairs 3 --kinds "$kinds" \
    --out "$tmp/${model}_slop1.json"
done
# ImageNet input pipeline feeding a full train_and_evaluate of RPG ResNet18 (bf16, batch 256)
# on a synthetic JPEG set in the imagenet2012 array_record layout: the host JPEG path and
# NVIDIA DALI (image_decoder="dali"; skipped, and said so in the JSON, when DALI is missing).
$py -m pip install -q "simplejpeg>=1.7" "opencv-python-headless>=4.8" \
  || echo "could not install the host JPEG path's packages"
$py -m pip install -q nvidia-dali-cuda120 || echo "NVIDIA DALI not installed: its run is skipped"
step_rate=$($py -c "import json; r = json.load(open('$tmp/resnet18.json'))['train_step']
print(r['images_per_sec']['rpg'])" 2>/dev/null || echo "")
$py benchmarks/imagenet_pipeline.py --train_run --data_dir "$tmp/jpegs" --num_train 1536 \
  --num_eval 640 --train_steps 300 ${step_rate:+--step_rate "$step_rate"} \
  --out "$out_dir/imagenet_train_gpu.json"
$py - "$tmp" "$out_dir/gpu.json" <<'PY'
import json, pathlib, statistics, sys
tmp = pathlib.Path(sys.argv[1])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(merged, indent=1) + "\n")
for name, r in merged.items():
    s = r["train_step"]
    ratios = {k: round(statistics.median(v), 3) for k, v in s["ratios"].items()}
    print(f"{name}: step time / plain {ratios}; images/s {s['images_per_sec']}; memory MB "
          f"{ {k: round(v.get('total_mb', 0)) for k, v in s['memory'].items()} }")
PY
