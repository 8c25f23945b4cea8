#!/usr/bin/env bash
# Recent pages kept without scoring: perplexity at 8K and passkey at 4K.
set -euo pipefail
python -m transformers_quest.evaluation --h2o-window 256 perplexity --length 8192 --window 256 --budgets 256 1024 \
  --name perplexity_recent --methods dense default "quest:recent_pages=2" "quest:recent_pages=4" "quest:recent_pages=8" \
  "quest:spread=1.0,recent_pages=4"
python -m transformers_quest.evaluation passkey --lengths 4096 --prompts 10 --name passkey_recent --methods \
  dense "quest:recent_pages=2" "quest:recent_pages=4" "quest:recent_pages=8"
