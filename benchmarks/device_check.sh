#!/usr/bin/env bash
# The GPU checks of shiftbench in one command, on a machine with one CUDA GPU and no package index (what a GPU
# session of this project gets); its steps are capped at 375 s in all, so that a 15-minute device budget leaves
# time to rerun it:
#   1. tests/test_device.py: the 19 corruptions, the metrics and one small run on CUDA against the CPU;
#   2. benchmarks/speed.py --device cuda --batch 8: images/s per corruption at 1208x1920 (issue 3's goal);
#   3. a reduced demo sweep on CUDA: wall time split and the share outside model forwards (issue 6);
#   4. two conditions of it again with --overlap true (the metric worker thread on CUDA): its results.csv
#      rows must equal step 3's (overlap_cuda.txt says "identical" or lists what differs).
# Python packages that machine lacks travel as wheels in .whl/ (`make device-wheels` fetches them here);
# the command there is `bash benchmarks/device_check.sh`, with .whl carried. Everything it measures is
# written under $OUT (default runs/device_check): env.txt, pytest.txt, speed_cuda.md, run_cuda.txt,
# run_cuda_summary.json and overlap_cuda.txt. NCCL needs one GPU per process, so torchrun over NCCL needs a machine of 2+ GPUs.
# DEVICE=cpu SPEED_ARGS="--size 256x384 --corruptions fog" runs the same steps on the CPU (a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/device_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
run_dir=$(mktemp -d)
overlap_dir=$(mktemp -d)
trap 'rm -rf "$run_dir" "$overlap_dir"' EXIT  # what matters is copied to $out
if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! $py -c 'import kornia, corruptions, shiftbench.cli' 2>"$out/import_error.txt"; then
    echo "device_check: $py cannot import shiftbench ($(tail -n 1 "$out/import_error.txt")); carry .whl/ from" \
         "\`make device-wheels\` (kornia, kornia_rs, imagecorruptions) or install them" | tee "$out/env.txt"
    exit 2
fi
rm -f "$out/import_error.txt"
{ nvidia-smi -L; $py -c 'import torch, torchvision, kornia; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "kornia", kornia.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else "(no CUDA device)")'
} 2>&1 | tee "$out/env.txt"
status=0
SHIFTBENCH_TEST_DEVICE=$device timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_metrics.py -k "device or gpu" \
    2>&1 | tee "$out/pytest.txt" || status=1
timeout 120 $py benchmarks/speed.py --device "$device" --batch 8 ${SPEED_ARGS:-} 2>&1 | tee "$out/speed_cuda.md" || status=1
timeout 90 $py -m shiftbench run suites/demo.yaml --device "$device" --out "$run_dir" --force --quiet --limit 16 \
    --corruptions fog,glass_blur,jpeg_compression,spatter --severities 1,5 2>&1 | tee "$out/run_cuda.txt" \
    || status=1
cp "$run_dir/summary.json" "$out/run_cuda_summary.json" || status=1
{ timeout 45 $py -m shiftbench run suites/demo.yaml --device "$device" --out "$overlap_dir" --force --quiet --limit 16 \
      --corruptions fog --severities 1,5 --overlap true \
  && $py - "$run_dir/results.csv" "$overlap_dir/results.csv" <<'PY'
import sys
import pandas as pd
full, part = (pd.read_csv(f) for f in sys.argv[1:])
keys = ["split", "model", "estimator", "corruption", "severity"]
both = full.merge(part, on=keys, suffixes=("", "_overlap"))
cols = [c for c in part.columns if c not in keys]
diff = [c for c in cols if not both[c].astype(str).equals(both[c + "_overlap"].astype(str))]
print(f"{len(both)} of {len(part)} rows matched;", "identical" if not diff and len(both) == len(part) else f"differ: {diff}")
PY
} 2>&1 | tee "$out/overlap_cuda.txt" || status=1
exit $status
