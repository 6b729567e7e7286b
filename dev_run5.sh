#!/usr/bin/env bash
# temporary device driver (not committed)
export FLUXMOE_RESULTS_DIR=/tmp/fluxmoe-results5 FLUXMOE_COMMIT=$1
mkdir -p $FLUXMOE_RESULTS_DIR
. /tmp/vllm-env.sh
echo "== e2e"; python3 bench/e2e.py --setting qwen3_next_small_batch_standin_spread --only fluxmoe_routed,fluxmoe_plan,prefetch_8_4_1 2>&1 | tail -30
echo "== done"
