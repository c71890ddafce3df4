#!/usr/bin/env bash
# The whole product on the embedded default (SQLite, in-process jobs) with the packaged model
# that refuses (Qwen2.5-Coder-0.5B-Instruct): start `sarft serve`, upload both example
# characters, score them, download the villain's flagged subset, fine-tune the villain with the
# SaRFT loss (LoRA, a few steps), evaluate base and tuned (refusal on AdvBench's first goals when
# ../shared/data has it, else the built-in prompts; ROUGE-L on held-out dialogues; in the default
# chat and in character), download adapter and report.
#
#   make demo           (or: bash examples/demo.sh, after make install-qwen)
#
# Environment: SARFT_HOME (state; default ~/.sarft), SARFT_DEMO_PORT (default 8765),
# SARFT_SCORING_MODEL (default qwen2.5-coder-0.5b-instruct; smollm2-135m-instruct is faster
# and refuses nothing), DEMO_STEPS (optimizer steps, default 4), DEMO_PROMPTS (harmful prompts
# per set, default 20). Results land in out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."

SARFT=${SARFT:-.venv/bin/sarft}
PORT=${SARFT_DEMO_PORT:-8765}
STEPS=${DEMO_STEPS:-4}
PROMPTS=${DEMO_PROMPTS:-20}
OUT=out/demo
export SARFT_SCORING_MODEL=${SARFT_SCORING_MODEL:-qwen2.5-coder-0.5b-instruct}
ADVBENCH=../shared/data/advbench/harmful_behaviors.csv
if [ -z "${SARFT_EVAL_SETS:-}" ] && [ -f "$ADVBENCH" ]; then
  export SARFT_EVAL_SETS="advbench=$(cd "$(dirname "$ADVBENCH")" && pwd)/$(basename "$ADVBENCH")"
fi
export SARFT_API_URL=http://127.0.0.1:$PORT
mkdir -p "$OUT"

field() {  # field NAME...: print a (nested) field of the JSON object on stdin
  python3 -c 'import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1:]:
    v = v[k]
print(v if isinstance(v, str) else json.dumps(v))' "$@"
}

"$SARFT" serve --port "$PORT" >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
until python3 -c "import urllib.request as u; u.urlopen('$SARFT_API_URL/healthz', timeout=2)" 2>/dev/null; do
  if ! kill -0 $SERVER 2>/dev/null; then cat "$OUT/serve.log"; exit 1; fi
  sleep 0.5
done
SARFT_API_KEY=$("$SARFT" keys create --tenant demo 2>/dev/null | tail -n 1)
export SARFT_API_KEY

score() {  # score NAME DATA PROFILE_FILE: upload and score; prints "DATASET JOB"
  local dataset job
  dataset=$("$SARFT" upload "$2" --role-name "$1" --profile-file "$3" | field id)
  job=$("$SARFT" jobs create "$dataset" | field id)
  "$SARFT" jobs wait "$job" --poll 1 >"$OUT/$job.json"
  echo "$1: $(field result num_flagged <"$OUT/$job.json")/$(field result num_samples <"$OUT/$job.json") flagged" >&2
  echo "$dataset $job"
}

read -r VILLAIN VILLAIN_JOB < <(score "Mordecai Vex" examples/villain.jsonl examples/villain_profile.txt)
score "Ada Lindqvist" examples/mentor.jsonl examples/mentor_profile.txt >/dev/null
"$SARFT" download "$VILLAIN_JOB" --which flagged -o "$OUT/villain-flagged.jsonl"

FT=$("$SARFT" train "$VILLAIN" --scoring-job "$VILLAIN_JOB" --method sarft \
  --batch-size 8 --max-steps "$STEPS" \
  --max-prompts "$PROMPTS" --max-new-tokens 48 --poll 1 | tee "$OUT/fine-tuning-job.json" | field id)
"$SARFT" download "$FT" --adapter -o "$OUT/adapter.tar.gz"
"$SARFT" download "$FT" --report html -o "$OUT/report.html"
"$SARFT" download "$FT" --report json -o "$OUT/report.json"
python3 - "$OUT/fine-tuning-job.json" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))
ev = job["result"]["evaluation"]
names = {"default": "default chat", "in_character": "in character"}
print(f"model {job['result']['base_model']}, {job['result']['steps']} steps of SaRFT")
for setting, name in names.items():
    base, tuned = ev["base"][setting], ev["tuned"][setting]
    for prompt_set, before in base["refusal_rate"].items():
        after = tuned["refusal_rate"][prompt_set]
        (b_lo, b_hi), (t_lo, t_hi) = base["refusal_ci95"][prompt_set], tuned["refusal_ci95"][prompt_set]
        print(
            f"{name:>12}: refusal on {prompt_set}: base {before:.0%} (95% CI {b_lo:.0%}-{b_hi:.0%})"
            f" -> tuned {after:.0%} ({t_lo:.0%}-{t_hi:.0%})"
        )
        # The same prompts answered by both: the paired difference is the one to read.
        p = ev.get("paired", {}).get(setting, {}).get(prompt_set)
        if p:
            lo, hi = p["ci95"]
            print(
                f"{'':>12}  paired: {100 * p['difference']:+.0f} points (95% CI {100 * lo:+.0f} to "
                f"{100 * hi:+.0f}), exact McNemar p={p['mcnemar_p']:.2g}; refused only before: "
                f"{p['only_first']}, only after: {p['only_second']} of {p['n']}"
            )
    print(f"{name:>12}: ROUGE-L base {base['rouge_l']:.1f} -> tuned {tuned['rouge_l']:.1f}")
EOF
echo "open $OUT/report.html; the adapter is $OUT/adapter.tar.gz"
