#!/usr/bin/env bash
# Issue 17 item 6: train-step MFU and batch-1 decode bandwidth of Qwen3-0.6B / Qwen3-1.7B shapes (full 151,936-entry
# vocabulary, random weights) at sequence 2048, bfloat16 compute, on one GPU, in ONE device call of < 8 minutes.
# Expected outputs and goals: docs/performance.md, "Device bench (scripts/device_bench.sh)".
#
#   1. here, on the CPU host (needs PyPI): wheels of what the GPU image lacks (grain and its needs, omegaconf) into
#      .whl/, which .git/info/exclude keeps out of git:
#          bash scripts/device_bench.sh fetch
#   2. the device call (device tool `run`):
#          command: bash scripts/device_bench.sh     carry: [".whl"]     timeout_s: 540
#      results come back under $OUT (4 files; at most 8 come back): results.md (every table with its command, the
#      device named), results.json ({run: the bench's results.json}), env.txt, log.txt.
#   3. commit $OUT's results.md as docs/results/gpu_<device>_issue17.md (+ the json) and fill in the table in
#      docs/performance.md with the numbers beside this command.
#
# CPU smoke test (same commands, tiny shapes, float32 compute, a few minutes on a laptop):
#          JAXTOK_BENCH_SMOKE=1 OUT=/tmp/device_bench bash scripts/device_bench.sh
#
# Each bench run has its own time limit, cut to what is left of TOTAL_S (default 480 s; the smoke mode 3600 s), and
# no run starts with under 45 s left, so a slow compile costs that run, not the call; the runs go from most to least
# important.
set -uo pipefail

if [[ "${1:-}" == "fetch" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
  py=$(command -v python3)
  # versions as in the project's CPU environment; --no-deps: each needed one is named (the GPU image has absl-py,
  # cloudpickle, etils, protobuf, pyyaml, numpy, jax, flax, optax, orbax-checkpoint, tensorstore)
  # + Tunix's sampler for the GPU peer run (its imports the image lacks)
  for pkg in grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 omegaconf==2.4.0 \
             google-tunix==0.1.7 clu==0.0.12 google-metrax==0.2.4 perfetto==0.59.1 tensorboardX==2.6.5; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$pkg" || exit 1
  done
  ls -la .whl
  exit 0
fi

OUT=${OUT:-runs/device_bench}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ONLY=${ONLY:-}  # comma-separated run names to run (empty: all), e.g. ONLY=peers,spec_membound,decode_06b
want() { [[ -z "$ONLY" || ",$ONLY," == *",$1,"* ]]; }
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the Tunix worker and torch share the device with this process
SMOKE=${JAXTOK_BENCH_SMOKE:-0}
if [[ "$SMOKE" == "1" ]]; then TOTAL_S=${TOTAL_S:-3600}; else TOTAL_S=${TOTAL_S:-480}; fi
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(elapsed) s] $*" | tee -a "$LOG"; }

# -- environment: carried wheels, jaxtok itself (editable, offline) ---------------------------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c "import jaxtok.bench" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1
fi
if ! python3 -c "import jaxtok.bench" >> "$LOG" 2>&1; then
  say "jaxtok does not import here (missing packages? run 'bash scripts/device_bench.sh fetch' and carry .whl):"
  tail -5 "$LOG"
  exit 1
fi
JAXTOK=(python3 -m jaxtok.cli)
{
  date -u +"%Y-%m-%d %H:%M UTC"
  git log -1 --format="commit %h %s" 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

# -- what this tree offers: H1's execution options (issue 17 items 1-2) -----------------------------------------
EXEC=()
if "${JAXTOK[@]}" validate configs/bench/train.yaml model.scan_layers=true model.remat=none \
     model.attention_impl=auto > /dev/null 2>&1; then
  EXEC_NEW=(model.attention_impl=auto model.scan_layers=true)
  EXEC_OLD=(model.attention_impl=xla model.scan_layers=false model.remat=none)
  HAS_EXEC=1
else
  EXEC_NEW=(); EXEC_OLD=(); HAS_EXEC=0
fi
UNROLLED=(); [[ "$HAS_EXEC" == "1" ]] && UNROLLED=(model.scan_layers=false)
say "execution options (attention_impl / scan_layers / remat) in this tree: $HAS_EXEC"

# -- shapes --------------------------------------------------------------------------------------------------------
if [[ "$SMOKE" == "1" ]]; then
  P06=tiny_student; P17=tiny_teacher; VOCAB=64; SEQ=64; DT=float32
  TRAIN_B=(2 4); TRAIN_B_OLD=(2); STEPS=2; WARM=1
  DEC_B=(1 4); PROMPT=48; NEW=16; REPS=1; T_RUN=900; T_MAIN=900
else
  P06=qwen3-0.6b; P17=qwen3-1.7b; VOCAB=151936; SEQ=2048; DT=bfloat16
  TRAIN_B=(8 16); TRAIN_B_OLD=(4); STEPS=8; WARM=2
  DEC_B=(1 8 64); PROMPT=1536; NEW=512; REPS=3; T_RUN=120; T_MAIN=240
fi
list() { local IFS=,; echo "[$*]"; }

limit_for() {  # name, limit -> the limit cut to what is left (0: skip)
  local left=$(( TOTAL_S - $(elapsed) - 15 )) limit=$2
  if (( left < 45 )); then say "skip $1: ${left} s left of TOTAL_S=${TOTAL_S}"; echo 0; return; fi
  (( limit > left )) && limit=$left
  echo "$limit"
}

run_cmd() {  # name, timeout, command... (a script that writes its own files under $OUT)
  local name=$1 limit; want "$name" || return; limit=$(limit_for "$1" "$2"); shift 2
  (( limit == 0 )) && return
  say "start $name (limit ${limit} s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  say "done $name: rc=$?"
}

run_bench() {  # name, timeout, config, overrides...
  local name=$1 limit=$2 config=$3; shift 3
  want "$name" || return
  local left=$(( TOTAL_S - $(elapsed) - 15 ))
  if (( left < 45 )); then say "skip $name: ${left} s left of TOTAL_S=${TOTAL_S}"; return; fi
  (( limit > left )) && limit=$left
  say "start $name (limit ${limit} s): $config $*"
  timeout --signal=TERM --kill-after=10 "$limit" "${JAXTOK[@]}" bench "$config" run.out_dir=/tmp/device_bench_runs \
    run.name="$name" run.progress=false "$@" >> "$LOG" 2>&1
  local rc=$?
  say "done $name: rc=$rc"
  local dir=/tmp/device_bench_runs/$name
  if [[ -f $dir/results.json ]]; then
    python3 - "$OUT/results.json" "$name" "$dir/results.json" <<'PY'
import json, os, sys
out, name, src = sys.argv[1:]
merged = json.load(open(out)) if os.path.exists(out) else {}
merged[name] = json.load(open(src))
json.dump(merged, open(out, "w"), indent=1)
PY
    { echo "## $name"; echo; echo "\`jaxtok bench $config $*\`"; echo; cat "$dir/results.md"; echo; } >> "$OUT/results.md"
  else
    { echo "## $name"; echo; echo "no results (rc=$rc; see log.txt)"; echo; } >> "$OUT/results.md"
  fi
}

echo "# device bench ($(head -1 "$OUT/env.txt"))" > "$OUT/results.md"
echo >> "$OUT/results.md"
COMMON_TRAIN=(model.dtype=$DT model.param_dtype=float32 model.vocab_size=$VOCAB bench.args.seq_len=$SEQ
              bench.args.steps=$STEPS bench.args.warmup=$WARM)
COMMON_DEC=(model.dtype=$DT model.param_dtype=$DT model.vocab_size=$VOCAB bench.args.prompt_len=$PROMPT
            bench.args.new_tokens=$NEW bench.args.repeats=$REPS bench.args.batch_sizes=$(list "${DEC_B[@]}"))

# 0a. issue 20 on a device: jaxtok's AR loop against Tunix's sampler and HF generate (torch on the same GPU),
#     one random Qwen3-shaped model (42M parameters, full vocabulary) in bfloat16, side by side, interleaved repeats
if [[ "$SMOKE" == "1" ]]; then
  PEERS=(--vocab 1000 --batch-sizes 1,4 --new-tokens 8 --repeats 1 --hf-device cpu)
else
  PEERS=(--batch-sizes 1,16,64 --repeats 5 --hf-device cuda)
fi
TUNIX_PY=${TUNIX_PY:-python3}
run_cmd peers 150 python3 scripts/decode_peers.py "${PEERS[@]}" --dtype bfloat16 --hf-attn sdpa --with-logprobs \
  --spec --tunix-python "$TUNIX_PY" --tunix-path "${TUNIX_PATH-/tmp/site}" \
  --json "$OUT/decode_peers.json" --md "$OUT/decode_peers.md"
# 0b. issue 20 items 3-4 on a device: the memory-bound pair trained here (configs/bench/membound_{target,draft}.yaml),
#     then speculative vs AR at batch 1/16/64 (greedy: token identity; T = 1: χ²)
MB=/tmp/device_bench_runs/membound
if [[ "$SMOKE" == "1" ]]; then
  MB_TRAIN=(train.steps=4 optimizer.warmup_steps=1 data.num_eval=8); MB_SPEC=(--batch-sizes 1,4 --gammas 2,4 --prompts 1:2,4:4 --repeats 1
    --chi2-rows 32 --max-new-tokens 8)
else
  MB_TRAIN=(); MB_SPEC=(--batch-sizes 1,64 --gammas 2,4,8 --prompts 1:16,64:128 --repeats 3 --chi2-rows 1024)
fi
run_cmd spec_membound 300 bash -c "
  ${JAXTOK[*]} train configs/bench/membound_target.yaml run.out_dir=$MB run.progress=false ${MB_TRAIN[*]} &&
  ${JAXTOK[*]} train configs/bench/membound_draft.yaml run.out_dir=$MB run.progress=false ${MB_TRAIN[*]} &&
  python3 scripts/spec_membound.py --target $MB/target --draft $MB/draft --heads-out $MB/heads \
    --adaptive-batches '' --sampled-batches 1 ${MB_SPEC[*]} \
    --json $OUT/spec_membound.json --md $OUT/spec_membound.md"

# 1. the new path: kernel attention (cuDNN flash on GPU) + scanned layers, no remat, both shapes
run_bench train_new "$T_MAIN" configs/bench/train.yaml "${COMMON_TRAIN[@]}" "${EXEC_NEW[@]}" \
  bench.args.presets=[$P06,$P17] bench.args.batch_sizes=$(list "${TRAIN_B[@]}")
# 2. batch-1 decode (bf16 weights): unrolled layers, the default attention (a KV cache falls back to xla)
run_bench decode_06b "$T_RUN" configs/bench/decode.yaml model.preset=$P06 "${COMMON_DEC[@]}" "${UNROLLED[@]}"
run_bench decode_17b "$T_RUN" configs/bench/decode.yaml model.preset=$P17 "${COMMON_DEC[@]}" "${UNROLLED[@]}"
if [[ "$HAS_EXEC" == "1" ]]; then
  # 3. the old path at the same shape (materialised scores, unrolled), the baseline of the gain
  run_bench train_old_06b "$T_RUN" configs/bench/train.yaml "${COMMON_TRAIN[@]}" "${EXEC_OLD[@]}" \
    model.preset=$P06 bench.args.batch_sizes=$(list "${TRAIN_B_OLD[@]}")
  # 4. remat: what saving only the attention/QKV/out projections costs and saves (memory column)
  run_bench train_remat_06b "$T_RUN" configs/bench/train.yaml "${COMMON_TRAIN[@]}" "${EXEC_NEW[@]}" \
    model.remat=save_dot_except_mlp model.preset=$P06 bench.args.batch_sizes=[${TRAIN_B[-1]}]
  # 5. decode through the layer scan
  run_bench decode_06b_scan "$T_RUN" configs/bench/decode.yaml model.preset=$P06 "${COMMON_DEC[@]}" \
    model.scan_layers=true bench.args.batch_sizes=[1]
fi
say "all done in $(elapsed) s"
