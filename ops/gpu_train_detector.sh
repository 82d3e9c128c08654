#!/usr/bin/env bash
# One prepared GPU run of the detector: phantom training data → StyleGAN2-style GAN + encoder +
# body-part regression → calibration → ONNX export, all inside one call of at most ~8 minutes.
#
# Run from the repository root on the GPU machine (Python 3.12 + torch CUDA + numpy, scipy, onnx,
# onnxruntime, tqdm, matplotlib present; pydicom, highdicom and pyjpegls brought as wheels in .whl/):
#
#     OUT=/path/to/out bash ops/gpu_train_detector.sh
#
# Writes at most 8 files to $OUT (each < 16 MB): scorer.onnx encoder.onnx generator.onnx
# discriminator.onnx position.onnx model.json weights.pt train.log. train.log is written as the
# run goes, so it comes back even if the run is cut off.
#
# ABLATION=1 also trains the unconditioned ablation (same family, data, seed and budget) in a
# second process on the same GPU, at the same time (the small networks leave the H100 mostly
# idle). To stay within 8 files, OUT then holds scorer.onnx position.onnx model.json weights.pt
# train.log and ablation/{scorer.onnx,model.json,weights.pt}; rebuild the other ONNX files with
# `python -m models.detector export --model DIR` (identical graphs, from weights.pt).
#
# Knobs (environment): TOTAL_S wall-clock target for the whole script (default 450 s);
# MINUTES upper bound of the training budget (default 5.5; lowered automatically when data
# generation took longer than planned); JOBS processes for data (default 14); DEVICE (cuda);
# SIZE (128); FAMILY (stylegan2); BATCH (64); SEED (0); PYTHON (python3); WORK (/tmp/gk_gpu).
# Test the logic on a CPU machine with: WHEELS=none DEVICE=cpu MINUTES=0.5 SIZE=64 SLICES=24 JOBS=2 OUT=/tmp/o bash ops/gpu_train_detector.sh
set -uo pipefail
# One thread per process for numpy/BLAS: the data steps run JOBS processes, and 14 processes with
# 16 BLAS threads each thrash the CPU (the first H100 run spent > 9 min generating data this way).
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

START=$(date +%s)
OUT=${OUT:?set OUT to the folder that comes back}
TOTAL_S=${TOTAL_S:-450}
MINUTES=${MINUTES:-5.5}
JOBS=${JOBS:-14}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-128}
MATRIX=${MATRIX:-512}        # phantom rows/columns: 512 like a real scanner; the model input is SIZE²
FAMILY=${FAMILY:-stylegan2}
BATCH=${BATCH:-64}
SEED=${SEED:-0}
SLICES=${SLICES:-}           # empty: realistic slice counts (the protocol); a number: that many per series
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gk_gpu}
RESERVE_S=${RESERVE_S:-100}  # seconds kept for data loading, calibration and export after training
ABLATION=${ABLATION:-0}

mkdir -p "$OUT" "$WORK"
LOG="$OUT/train.log"
: > "$LOG"
say() { echo "[gpu_train $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

copy_out() {
    local f files="scorer.onnx encoder.onnx generator.onnx discriminator.onnx position.onnx model.json weights.pt"
    if [ "$ABLATION" = 1 ]; then
        files="scorer.onnx position.onnx model.json weights.pt"
        mkdir -p "$OUT/ablation"
        for f in scorer.onnx model.json weights.pt; do
            if [ -f "$WORK/ablation/$f" ]; then cp "$WORK/ablation/$f" "$OUT/ablation/$f"; fi
        done
    fi
    for f in $files; do
        if [ -f "$WORK/model/$f" ]; then cp "$WORK/model/$f" "$OUT/$f"; fi
    done
    say "done; files in OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
}
trap copy_out EXIT

WHEELS=${WHEELS:-.whl}       # folder of wheels to install into /tmp/site (pydicom, highdicom, pyjpegls)
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    say "installing wheels: $(ls "$WHEELS" | tr '\n' ' ')"
    if ! "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl >> "$LOG" 2>&1; then
        say "pip install failed; unpacking the wheels into /tmp/site instead"
        for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" /tmp/site >> "$LOG" 2>&1 || say "could not unpack $w"; done
    fi
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import sys, torch, numpy, scipy, onnx, onnxruntime, pydicom, highdicom; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), 'pydicom', pydicom.__version__, 'highdicom', highdicom.__version__)"
} >> "$LOG" 2>&1 || { say "environment check failed (see above)"; exit 1; }

say "generating phantom train+validation data (matrix $MATRIX, jobs $JOBS${SLICES:+, $SLICES slices})"
rm -rf "$WORK/data" "$WORK/model" "$WORK/ablation" "$WORK/ablation.log"
timeout "${GEN_TIMEOUT_S:-120}" "$PY" -m models.detector phantom-train-set --out "$WORK/data" --matrix "$MATRIX" --jobs "$JOBS" --seed "$SEED" \
    ${SLICES:+--slices "$SLICES"} >> "$LOG" 2>&1 || { say "phantom generation failed"; exit 1; }

ELAPSED=$(( $(date +%s) - START ))
BUDGET=$("$PY" -c "print(round(max(0.2, min($MINUTES, ($TOTAL_S - $ELAPSED - $RESERVE_S) / 60)), 2))")
say "data ready; training budget $BUDGET min ($FAMILY, ${SIZE}px, $DEVICE)"

TRAIN_ARGS=(--data "$WORK/data" --device "$DEVICE" --size "$SIZE" --family "$FAMILY" --minutes "$BUDGET"
            --batch "$BATCH" --seed "$SEED" --no-progress --checkpoint-every 60)
if [ "$ABLATION" = 1 ]; then
    say "also training the unconditioned ablation in parallel (its log: $WORK/ablation.log, appended below)"
    "$PY" -m models.detector train "${TRAIN_ARGS[@]}" --out "$WORK/ablation" --unconditioned --position naive \
        --jobs $(( (JOBS + 1) / 2 )) > "$WORK/ablation.log" 2>&1 &
    ABL_PID=$!
fi
"$PY" -m models.detector train "${TRAIN_ARGS[@]}" --out "$WORK/model" --jobs "$JOBS" >> "$LOG" 2>&1
RC=$?
if [ "$ABLATION" = 1 ]; then
    wait "$ABL_PID"
    say "ablation exited with $?"
    sed 's/^/[ablation] /' "$WORK/ablation.log" | grep -v -i warn >> "$LOG"
fi
say "training exited with $RC"
if [ -f "$WORK/model/model.json" ]; then
    [ "${BENCH:-1}" = 1 ] && "$PY" -m models.detector bench --model "$WORK/model" --device "$DEVICE" --seconds 2 >> "$LOG" 2>&1 || say "bench failed (model is fine)"
fi
exit $RC
