#!/usr/bin/env bash
# The first page (attention sink) kept without scoring: perplexity at 8K, then passkey at 4K and 8K.
set -euo pipefail
python -m transformers_quest.evaluation --h2o-window 256 perplexity --length 8192 --window 256 --budgets 256 1024 \
  --name perplexity_sink --methods dense oracle "quest:page_summary=minmax,spread=0.5,keep_first_page=false" "quest:page_summary=minmax,keep_first_page=true" \
  "quest:page_summary=minmax,keep_first_page=true,recent_pages=4" "quest:page_summary=minmax,spread=1.0,keep_first_page=true"
python -m transformers_quest.evaluation passkey --lengths 4096 --prompts 10 --name passkey_sink --methods \
  dense "quest:page_summary=minmax,keep_first_page=true" "quest:page_summary=minmax,keep_first_page=true,recent_pages=4"
python -m transformers_quest.evaluation passkey --lengths 8192 --prompts 10 --name passkey8k_sink --methods \
  dense "quest:page_summary=minmax,keep_first_page=true"
