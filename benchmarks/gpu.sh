#!/usr/bin/env bash
# Step efficiency on a GPU machine: loop overhead, MFU and scaling at GPU sizes
# (ViT-B/16 and the others in bf16, batch 256), then MFU against the chip's bf16 peak,
# both as measured here (a large bf16 jnp.dot) and as NVIDIA's datasheet gives it.
#
#   bash benchmarks/gpu.sh [--install] [--results_dir=DIR]
#
# --install   first `pip install -e ".[cuda]"` into the Python used (nothing else);
#             without it the environment must already have jax with CUDA.
# PYTHON      the interpreter (default: .venv/bin/python if present, else python3).
# Results: DIR/{loop_overhead,mfu,scaling}.json and scaling.png (default benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/.."

install=0
results_dir="benchmarks/results"
for arg in "$@"; do
  case "$arg" in
    --install) install=1 ;;
    --results_dir=*) results_dir="${arg#--results_dir=}" ;;
    *) echo "unknown argument: $arg (use --install, --results_dir=DIR)" >&2; exit 2 ;;
  esac
done
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [[ "$install" == 1 ]]; then
  "$PYTHON" -m pip install -q -e ".[cuda]"
fi

if ! "$PYTHON" -c 'import sys, jax; sys.exit(jax.default_backend() != "gpu")'; then
  echo "JAX sees no GPU (backend: $("$PYTHON" -c 'import jax; print(jax.default_backend())'))." \
       "Install the CUDA wheels (--install) or run on a GPU machine." >&2
  exit 1
fi
"$PYTHON" -c 'import jax; print("devices:", [d.device_kind for d in jax.devices()])'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true

# GPU sizes in every module (mfu.on_gpu); one process per module, as `make bench` runs them.
status=0
VITCLS_BENCH_GPU=1 "$PYTHON" -m benchmarks.run --only=loop_overhead,mfu,scaling \
  --results_dir="$results_dir" || status=$?

# MFU against the measured and the datasheet bf16 peak.
"$PYTHON" - "$results_dir/mfu.json" <<'EOF' || status=$?
import json, sys
from benchmarks import mfu

with open(sys.argv[1]) as f:
  result = json.load(f)
fig = result["figures"]
kind = fig["device_kind"]
sheet = mfu.datasheet_peak(kind)
dtype = next(iter(fig["models"].values()))["peak"]["dtype"]
print(f"\nchip: {kind}; measured {dtype} matmul peak {fig['peak_flops_per_s'] / 1e12:.1f} TFLOP/s"
      f"; datasheet {'%.0f TFLOP/s' % (sheet / 1e12) if sheet else 'not in the table'}")
print("| model | batch | dtype | img/s | TFLOP/s achieved | MFU vs measured | MFU vs datasheet |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name, m in fig["models"].items():
  achieved = m["achieved_flops_per_s"]
  vs_sheet = f"{achieved / sheet:.1%}" if sheet else "-"
  print(f"| {name} | {m['batch']} | {m['dtype']} | {m['img_per_s']['median']:,.0f} | "
        f"{achieved / 1e12:.0f} | {m['mfu']['median']:.1%} | {vs_sheet} |")
print("\nDense bf16 tensor-core peaks (NVIDIA datasheets, without sparsity), TFLOP/s:")
for key, tflops in mfu.DATASHEET_BF16_TFLOPS:
  print(f"  {key:10s} {tflops:6.0f}")
EOF
exit "$status"
