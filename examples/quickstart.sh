#!/usr/bin/env bash
# The README's main job on a fresh machine: tiny checkpoint -> 4-bit GGUF with SPRM head -> step scores.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python tests/fixtures/make_tiny_metastone.py "$work/hf"
edge-metastone convert "$work/hf" -o "$work/tiny-q4_k_m.gguf" --outtype q4_k_m
edge-metastone inspect "$work/tiny-q4_k_m.gguf"
cat > "$work/text.txt" <<'TXT'
<|im_start|>user
What is 12 + 7?<|im_end|>
<|im_start|>assistant
<think>
First, compute 12 + 7 = 19.

Then check: 19 - 7 = 12.

So the sum is 19.

</think>
The answer is 19.
TXT
edge-metastone score --model "$work/tiny-q4_k_m.gguf" --text-file "$work/text.txt"
# k=8 candidates in one batch, each step scored in the same pass (the tiny model is random:
# expect nonsense text, but real scores, selection and timings)
edge-metastone reason --model "$work/tiny-q4_k_m.gguf" --effort medium --max-new-tokens 48 "What is 12 + 7?"
