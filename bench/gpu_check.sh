#!/usr/bin/env bash
# The GPU checks of the speed table in one call, for a session that is lent a GPU (one H100/H200,
# CuPy and PyTorch installed, no internet).  Run from the repository root:
#
#   bash bench/gpu_check.sh                 # everything, logs in $OUT (default ./gpu-check)
#   bash bench/gpu_check.sh tests layers    # only some steps
#   bash bench/gpu_check.sh --dry-run       # the same commands on the CPU, tiny sizes (no GPU)
#
# Steps, in order, each with its own time limit so that one hang cannot eat the device budget.
# A device call may last 10 minutes at most, and a task gets about 15 minutes of device time
# with the machine's start included, so run the steps that matter most first (limits in brackets):
#   bash bench/gpu_check.sh env tests fp32 dist       [7.5 min]
#   bash bench/gpu_check.sh layers tf32 model run     [5 min], if time is left
# with OUT pointing at the folder whose files come back (the device tool's $OUT).
# Measured on one H200 on 2026-12-04: start and transfers took about 30 s. The CuPy tests took
# 48 s (219 cases) and bench_vs_pytorch.py on demo,depth8 with three algorithms and no memory
# pass 37 s. The one-rank NCCL check took 3 s and the default run.py 55 s.
#   env     nvidia-smi, library versions                                    -> env.log
#   tests   the CuPy-parametrised test cases (pytest -k gpu) + the sync test -> tests.log
#   layers  bench_layers.py on the GPU: ms, GFLOP/s, GB/s per layer          -> layers.log
#   fp32    bench_vs_pytorch.py, 4 networks, strict float32, with memory     -> vs_fp32.log/.json
#   tf32    bench_vs_pytorch.py, 4 networks, TF32 in both                    -> vs_tf32.log/.json
#   model   bench_model.py, paper network, per-layer shares                -> model_fp32/tf32.log
#   run     run.py on the GPU: demo preset, then depth 8 x1/4 batch 128      -> run_*.log
#   dist    the NCCL path with one rank (mpiexec -n 1): training steps through the
#           gradient all-reduce, with and without sync-BN, and the all-reduce of the
#           paper network's 21,395,560 gradients                              -> dist*.log
# A summary of exit codes and times goes to summary.txt.  Nothing stops at a failed step.
set -u

DRY=0
STEPS=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        env|tests|layers|fp32|tf32|model|run|dist) STEPS+=("$arg") ;;
        *) echo "gpu_check.sh: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done
if [ "${#STEPS[@]}" -eq 0 ]; then
    STEPS=(env tests layers fp32 tf32 model run dist)
fi

OUT="${OUT:-$PWD/gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MINICOMPACT_CACHE="${MINICOMPACT_CACHE:-$OUT/cache}"
# The mpiexec of the mpich wheel, beside this Python (else one on PATH).
MPIEXEC="$(python -c 'import os, sysconfig; p = os.path.join(sysconfig.get_path("scripts"), "mpiexec"); print(p if os.access(p, os.X_OK) else "mpiexec")')"

if [ "$DRY" -eq 1 ]; then
    # The same commands on the CPU at toy sizes: checks the plumbing, not the GPU.
    DEVICE=cpu
    LAYER_ARGS=(--batch 2 --repeats 1 --only "relu 128, 28")
    VS_ARGS=(--nets demo --batch 4 --repeats 1 --warmup 1 --layer-steps 1 --check-batch 2)
    MODEL_ARGS=(--net demo --batch 4 --repeats 1 --warmup 1)
    RUN_ARGS=(--epochs 1 --device cpu --workers 0)
    DIST_STEPS=1; DIST_ARGS=(--repeats 1 --allreduce 1000)
    SCALE=10   # every time limit x10: the CPU is slow
else
    DEVICE=gpu
    LAYER_ARGS=(--batch 64 --repeats 20)
    VS_ARGS=(--nets "paper,quarter,demo,depth8" --repeats 20 --warmup 3 --conv-algo im2col,winograd,auto)
    MODEL_ARGS=(--net paper --repeats 10 --warmup 3)
    RUN_ARGS=(--epochs 2 --device gpu --workers 8 --cache)
    DIST_STEPS=10; DIST_ARGS=(--repeats 10 --allreduce 21395560)
    SCALE=1
fi

echo "== gpu_check.sh ${STEPS[*]} ($( [ "$DRY" -eq 1 ] && echo dry run || echo GPU ), $(date -u))" >> "$OUT/summary.txt"

# run_step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log, record rc and seconds.
run_step() {
    local name="$1" limit=$(($2 * SCALE))
    shift 2
    local start=$SECONDS rc
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "   rc=$rc after $((SECONDS - start)) s (limit $limit s), log $name.log" | tee -a "$OUT/summary.txt"
    tail -n 5 "$OUT/$name.log"
    return 0
}

for step in "${STEPS[@]}"; do
    case "$step" in
        env)
            run_step env 60 bash -c 'nvidia-smi || echo "no nvidia-smi"; python -c "
import platform, numpy, torch
print(\"python\", platform.python_version(), \"numpy\", numpy.__version__, \"torch\", torch.__version__,
      \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), \"torch sees GPU\", torch.cuda.is_available())
try:
    import cupy
    print(\"cupy\", cupy.__version__, \"runtime\", cupy.cuda.runtime.runtimeGetVersion(),
          \"driver\", cupy.cuda.runtime.driverGetVersion(), \"devices\", cupy.cuda.runtime.getDeviceCount())
except Exception as exc:
    print(\"cupy unusable:\", exc)
"'
            ;;
        tests)
            if [ "$DRY" -eq 1 ]; then
                run_step tests 60 python -m pytest -q tests/test_syncs.py tests/test_losses.py
            else
                # The lessons' test needs nbformat, which the device image lacks (2026-12): carry
                # it as wheels (docs/gpu.md) or its 14 GPU cases are left out, said in the log.
                if python -c "import nbformat" 2>/dev/null; then IGNORE=(); else
                    IGNORE=(--ignore=tests/test_lessons.py)
                    echo "   nbformat missing: tests/test_lessons.py left out" | tee -a "$OUT/summary.txt"
                fi
                run_step tests 180 python -m pytest -q -rfE -k "gpu or syncs" "${IGNORE[@]}" tests
            fi
            ;;
        layers)
            run_step layers 60 python bench/bench_layers.py --device "$DEVICE" "${LAYER_ARGS[@]}"
            run_step layers_tf32 30 python bench/bench_layers.py --device "$DEVICE" --precision tf32 \
                --only conv "${LAYER_ARGS[@]}"
            ;;
        fp32)
            run_step vs_fp32 180 python bench/bench_vs_pytorch.py --device "$DEVICE" --precision fp32 \
                "${VS_ARGS[@]}" --json "$OUT/vs_fp32.json"
            ;;
        tf32)
            run_step vs_tf32 90 python bench/bench_vs_pytorch.py --device "$DEVICE" --precision tf32 \
                "${VS_ARGS[@]}" --no-memory --no-check --json "$OUT/vs_tf32.json"
            ;;
        model)
            run_step model_fp32 45 python bench/bench_model.py --device "$DEVICE" --precision fp32 "${MODEL_ARGS[@]}"
            run_step model_tf32 45 python bench/bench_model.py --device "$DEVICE" --precision tf32 "${MODEL_ARGS[@]}"
            ;;
        run)
            # The loader at work: the demo preset (32 px, batch 32), then the depth-8 x1/4
            # network at batch 128, whose logged img/s compares with fp32's depth8 step rate.
            rm -rf "$OUT/run_demo" "$OUT/run_depth8"   # this script's own earlier outputs
            run_step run_demo 90 python run.py --no-progress --out "$OUT/run_demo" "${RUN_ARGS[@]}"
            run_step run_depth8 90 python run.py --no-progress --out "$OUT/run_depth8" --depth 8 \
                --width-mult 0.25 --batch-size 128 --lr 0.04 "${RUN_ARGS[@]}"
            ;;
        dist)
            # Issue 9 on one GPU: one rank runs NCCL's code path of many (communicator set-up,
            # the unique id over MPI, all-reduces on the stream); 21,395,560 floats are the
            # paper network's gradients, whose all-reduce time feeds the 8-GPU estimate.
            run_step dist 90 "$MPIEXEC" -n 1 python bench/bench_data_parallel.py --device "$DEVICE" \
                --steps "$DIST_STEPS" "${DIST_ARGS[@]}"
            run_step dist_sync_bn 60 "$MPIEXEC" -n 1 python bench/bench_data_parallel.py \
                --device "$DEVICE" --steps "$DIST_STEPS" --sync-bn
            ;;
    esac
done
echo "== done; logs in $OUT" | tee -a "$OUT/summary.txt"
