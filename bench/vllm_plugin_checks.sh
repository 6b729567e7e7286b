#!/usr/bin/env bash
# The GPU checks of the vLLM plugin, one after another (GPU machine, after `. /tmp/vllm-env.sh`
# and `pip install --no-deps -e .`): the executor's GPU tests, the encode time, greedy identity
# against plain vLLM for the small Mixtral and Qwen3-Next shapes, and `fluxmoe serve` driven by
# `vllm bench serve`. Long: start it detached and poll. Results and logs go to $FLUXMOE_RESULTS_DIR
# (default bench/results); a line "STEP <name> rc=<rc> <seconds>s" per step goes to stdout.
set -u
export FLUXMOE_RESULTS_DIR=${FLUXMOE_RESULTS_DIR:-bench/results}
export FLUXMOE_STATS_INTERVAL=${FLUXMOE_STATS_INTERVAL:-5}
mkdir -p "$FLUXMOE_RESULTS_DIR"
step() {  # SKIP="name ..." skips steps
  local name=$1; shift
  case " ${SKIP:-} " in *" $name "*) echo "STEP $name skipped"; return;; esac
  local t=$SECONDS
  "$@" > "$FLUXMOE_RESULTS_DIR/$name.log" 2>&1
  echo "STEP $name rc=$? $((SECONDS - t))s"
}
step gpu_tests python3 -m pytest -q -m gpu tests/test_executor_gpu.py
step encode_time python3 bench/encode_time.py
step identity_mixtral_tiny python3 bench/vllm_identity.py --model models/mixtral-tiny --base bench/plans/mixtral-tiny.json
step serve_check bash bench/vllm_serve_check.sh
step identity_qwen3_next_tiny python3 bench/vllm_identity.py --model models/qwen3-next-tiny --base bench/plans/qwen3-next-tiny.json
echo ALL DONE
