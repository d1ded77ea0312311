#!/usr/bin/env bash
# Greedy decode tokens/s of dlcm vs llama.cpp on the same baseline weights (issue 19, Inference).
# A benchmark, not a test: prints a table, checks nothing.
#
#   scripts/bench_decode_llamacpp.sh [--ckpt RUN] [--dlcm BIN] [--threads "1 2"] [--prompt-len 32]
#                                    [--new-tokens 128] [--rounds 3] [--work DIR]
#
# Without --ckpt it trains configs/baseline-small.json for one step on data/prepared (the weights'
# values do not change the cost of a step). The checkpoint is exported as GGUF f32, f16, bf16 and
# q8_0; then, in rounds that alternate the engines, batch 1 with the same prompt length, new
# tokens and thread count: `dlcm bench decode --ckpt --precision fp32,bf16,int8` (f32 weights,
# and bf16 / per-column int8 weight copies, decode with the K/V caches) and
# bench/llama_decode.mjs (llama.cpp through node-llama-cpp, f32 K/V cache) on each GGUF file.
# Each cell is the median over the rounds; the ratios are dlcm f32 / llama.cpp f32, dlcm bf16 /
# llama.cpp f16 and dlcm int8 / llama.cpp q8_0 (8-bit weights both; q8_0 has a scale per 32
# weights and llama.cpp also rounds the activations to 8 bits, dlcm keeps them FP32).
#
# A third table compares the prompt pass: dlcm's cached prefill (bench decode) against
# llama.cpp's prompt batch (llama_decode.mjs's prompt_tokens_per_s), per weight format.
#
# Per step, both sides count one token in and one greedy argmax out. dlcm's "decode with caches"
# rate is T tokens over T argmaxes and T-1 steps, so it is scaled by (T-1)/T here.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dlcm="$root/build/dlcm"
ckpt="" threads="1 2" plen=32 ntok=128 rounds=3 work=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ckpt) ckpt=$2; shift 2 ;;
    --dlcm) dlcm=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --prompt-len) plen=$2; shift 2 ;;
    --new-tokens) ntok=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    *) echo "bench_decode_llamacpp.sh: unknown argument '$1' (see the header of this script)" >&2; exit 2 ;;
  esac
done
[[ -x "$dlcm" ]] || { echo "no dlcm binary at $dlcm: build it (cmake --build build --target dlcm) or give --dlcm" >&2; exit 2; }
[[ -d "$root/tests/interop/node_modules/node-llama-cpp" ]] ||
  { echo "node-llama-cpp missing: (cd tests/interop && npm ci), docs/interop.md" >&2; exit 2; }
work=${work:-$(mktemp -d /tmp/dlcm-llamadec.XXXXXX)}
mkdir -p "$work"

if [[ -z "$ckpt" ]]; then
  ckpt="$work/run"
  if [[ ! -d "$ckpt/checkpoint" ]]; then
    "$dlcm" train --config "$root/configs/baseline-small.json" --data "$root/data/prepared" --out "$ckpt" \
      --steps 1 --set train.eval_every=0 --no-final-eval --quiet >/dev/null 2>&1 ||
      { echo "training the baseline failed: give --ckpt, or prepare data/prepared (dlcm prepare)" >&2; exit 1; }
  fi
fi
dtypes="f32 f16 bf16 q8_0"
for d in $dtypes; do
  "$dlcm" export --ckpt "$ckpt" --format gguf --out "$work/model-$d.gguf" --dtype "$d" --force >/dev/null 2>&1
done

cpuinfo() { grep -m1 "^$1" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'; }
echo "cpu: $(cpuinfo 'model name') (family $(cpuinfo 'cpu family'), model $(cpuinfo 'model')), $(nproc) cores"
echo "checkpoint: $ckpt"
echo "batch 1, prompt $plen tokens, $ntok new tokens (greedy), $rounds rounds, median"
echo "load before: $(uptime)"

declare -A rates  # "engine threads" -> space-separated rates of the rounds
for ((r = 0; r < rounds; ++r)); do
  for t in $threads; do
    out=$("$dlcm" bench decode --ckpt "$ckpt" --prompt-len "$plen" --new-tokens "$ntok" --repeats 1 \
          --threads "$t" --precision fp32,bf16,int8 2>/dev/null)
    for p in fp32 bf16 int8; do
      v=$(echo "$out" | awk -v T="$ntok" -v P="[$p]" '$1 == P && /decode with caches/ {printf "%.1f", $6 * (T - 1) / T}')
      rates["dlcm-$p $t"]+="$v "
      v=$(echo "$out" | awk -v T="$ntok" -v P="[$p]" '$1 == P && /decode with caches/ {for (i = 1; i < NF; ++i) if ($i == "idle") printf "%.1f", $(i + 1) * (T - 1) / T}')
      rates["dlcm-$p-cpu $t"]+="$v "
      v=$(echo "$out" | awk -v P="[$p]" '$1 == P && /prefill \(cached\)/ {printf "%.1f", $5}')
      rates["dlcm-$p-prefill $t"]+="$v "
    done
    for d in $dtypes; do
      line=$(node "$root/bench/llama_decode.mjs" "$work/model-$d.gguf" "$t" "$plen" "$ntok")
      rates["llama-$d $t"]+="$(echo "$line" | sed 's/.*"tokens_per_s":\([0-9.]*\).*/\1/' | xargs printf '%.1f') "
      rates["cpu-$d $t"]+="$(echo "$line" | sed 's/.*"cpu_per_wall":\([0-9.]*\).*/\1/' | xargs printf '%.2f') "
      rates["llama-$d-prefill $t"]+="$(echo "$line" | sed 's/.*"prompt_tokens_per_s":\([0-9.]*\).*/\1/' | xargs printf '%.1f') "
      # per CPU-second: the rate over the process's CPU time per wall second
      rates["llama-$d-cpu $t"]+="$(echo "$line" | sed 's/.*"tokens_per_s":\([0-9.]*\).*"cpu_per_wall":\([0-9.]*\).*/\1 \2/' | awk '{printf "%.1f", ($2 > 0 ? $1 / $2 : 0)}') "
    done
  done
done
echo "load after:  $(uptime)"

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR] = $1} END {printf "%.2f", NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
printf '\n%-8s %10s %10s %10s %14s %14s %14s %14s %15s %16s %16s %15s\n' threads "dlcm f32" "dlcm bf16" \
  "dlcm int8" "llama.cpp f32" "llama.cpp f16" "llama.cpp bf16" "llama.cpp q8_0" "dlcm/llama f32" \
  "dlcm bf16/l f16" "dlcm int8/l q8_0" "llama cpu/wall"
for t in $threads; do
  dm=$(echo "${rates["dlcm-fp32 $t"]}" | median)
  db=$(echo "${rates["dlcm-bf16 $t"]}" | median)
  di=$(echo "${rates["dlcm-int8 $t"]}" | median)
  lm=() ; for d in $dtypes; do lm+=("$(echo "${rates["llama-$d $t"]}" | median)"); done
  cpu=$(echo "${rates["cpu-f32 $t"]}" | median)
  printf '%-8s %10s %10s %10s %14s %14s %14s %14s %14.2fx %15.2fx %15.2fx %15s\n' "$t" "$dm" "$db" "$di" \
    "${lm[0]}" "${lm[1]}" "${lm[2]}" "${lm[3]}" "$(awk -v a="$dm" -v b="${lm[0]}" 'BEGIN {print a / b}')" \
    "$(awk -v a="$db" -v b="${lm[1]}" 'BEGIN {print a / b}')" \
    "$(awk -v a="$di" -v b="${lm[3]}" 'BEGIN {print a / b}')" "$cpu"
done
echo "tokens/s per sequence (wall). On a loaded machine the engines get unequal shares of a core"
echo "(llama cpu/wall < 1); per CPU-second (dlcm: its busiest thread; llama.cpp: the process):"
printf '%-8s %10s %10s %10s %14s %14s %14s %15s %16s\n' threads "dlcm f32" "dlcm bf16" "dlcm int8" \
  "llama.cpp f32" "llama.cpp f16" "llama.cpp q8_0" "dlcm/llama f32" "dlcm int8/l q8_0"
for t in $threads; do
  c=(); for k in dlcm-fp32 dlcm-bf16 dlcm-int8 llama-f32 llama-f16 llama-q8_0; do c+=("$(echo "${rates["$k-cpu $t"]}" | median)"); done
  printf '%-8s %10s %10s %10s %14s %14s %14s %14.2fx %15.2fx\n' "$t" "${c[@]}" \
    "$(awk -v a="${c[0]}" -v b="${c[3]}" 'BEGIN {print (b > 0 ? a / b : 0)}')" \
    "$(awk -v a="${c[2]}" -v b="${c[5]}" 'BEGIN {print (b > 0 ? a / b : 0)}')"
done
echo "prefill of the $plen-token prompt, tokens/s (dlcm: bench decode's cached prefill, the last"
echo "position's logits; llama.cpp: one prompt batch into an emptied sequence to the first token):"
printf '%-8s %10s %10s %10s %14s %14s %14s %15s %16s %16s\n' threads "dlcm f32" "dlcm bf16" "dlcm int8" \
  "llama.cpp f32" "llama.cpp f16" "llama.cpp q8_0" "dlcm/llama f32" "dlcm bf16/l f16" "dlcm int8/l q8_0"
for t in $threads; do
  c=(); for k in dlcm-fp32 dlcm-bf16 dlcm-int8 llama-f32 llama-f16 llama-q8_0; do c+=("$(echo "${rates["$k-prefill $t"]}" | median)"); done
  printf '%-8s %10s %10s %10s %14s %14s %14s %14.2fx %15.2fx %15.2fx\n' "$t" "${c[@]}" \
    "$(awk -v a="${c[0]}" -v b="${c[3]}" 'BEGIN {print (b > 0 ? a / b : 0)}')" \
    "$(awk -v a="${c[1]}" -v b="${c[4]}" 'BEGIN {print (b > 0 ? a / b : 0)}')" \
    "$(awk -v a="${c[2]}" -v b="${c[5]}" 'BEGIN {print (b > 0 ? a / b : 0)}')"
done
echo "each round (engine threads: rates):"
for k in "${!rates[@]}"; do echo "  $k: ${rates[$k]}"; done | sort
