#!/usr/bin/env bash
# `fluxmoe serve` end to end on the GPU machine (after . /tmp/vllm-env.sh and pip install -e .):
# a small Mixtral with a mixed-tier plan, served through vLLM's OpenAI server (the plugin loads
# through its entry point in vLLM's own processes), driven by vLLM's own `vllm bench serve`.
# The model folder gets a word-level tokenizer (no tokenizer files can be downloaded there).
set -u
MODEL=/tmp/mixtral-tiny-tok
PORT=8011
mkdir -p $MODEL && cp models/mixtral-tiny/config.json $MODEL/
python3 - <<'PY'
import json
from tokenizers import Tokenizer, models, pre_tokenizers
vocab = {f"t{i}": i for i in range(32000)}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.save("/tmp/mixtral-tiny-tok/tokenizer.json")
json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0", "bos_token": "t1", "eos_token": "t2",
           "model_max_length": 4096}, open("/tmp/mixtral-tiny-tok/tokenizer_config.json", "w"))
PY
KEY=fluxmoe-check-key
export FLUXMOE_STATS_INTERVAL=2  # a pager log line every 2 s
python3 -m fluxmoe.cli serve --model $MODEL --plan bench/plans/mixtral-tiny-mixed.json --port $PORT --load-format dummy \
    --max-model-len 1024 --max-num-seqs 16 --api-key $KEY > /tmp/serve.log 2>&1 &
SERVER=$!
for i in $(seq 1 90); do curl -sf http://127.0.0.1:$PORT/health > /dev/null && break; sleep 2; done
curl -sf http://127.0.0.1:$PORT/health > /dev/null && echo "server up after ~$((i * 2)) s" || echo "server NOT up after $((i * 2)) s"
OPENAI_API_KEY=$KEY vllm bench serve --backend vllm --base-url http://127.0.0.1:$PORT --model $MODEL --tokenizer $MODEL \
    --dataset-name random --random-input-len 64 --random-output-len 32 --num-prompts 32 --ignore-eos 2>&1 \
    | grep -E "Successful|Failed|throughput|TTFT|TPOT|Benchmark duration|Error|error" | head -20
echo "--- stats endpoint: without the key (expect 401), then with it"
curl -s -o /dev/null -w "%{http_code}\n" http://127.0.0.1:$PORT/v1/fluxmoe/stats
curl -s -H "Authorization: Bearer $KEY" http://127.0.0.1:$PORT/v1/fluxmoe/stats | tee /tmp/stats.json | head -c 1500; echo
echo "--- server log (FluxMoE lines, errors)"
grep -E "FluxMoE|fluxmoe|Error|Traceback|KV cache size" /tmp/serve.log | head -10
grep -E "FluxMoE pager" /tmp/serve.log | tail -3
sed -n 1,8p /tmp/serve.log
kill $SERVER; sleep 2; pkill -f "vllm serve" || true
