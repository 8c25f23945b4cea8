#!/usr/bin/env bash
# Recent pages kept without scoring: perplexity at 8K and passkey at 4K.
set -euo pipefail
python -m transformers_quest.evaluation --h2o-window 256 perplexity --length 8192 --window 256 --budgets 256 1024 \
  --name perplexity_recent --methods dense "quest:page_summary=minmax,spread=0.5,keep_first_page=false" "quest:page_summary=minmax,recent_pages=2,keep_first_page=false" "quest:page_summary=minmax,recent_pages=4,keep_first_page=false" "quest:page_summary=minmax,recent_pages=8,keep_first_page=false" \
  "quest:page_summary=minmax,spread=1.0,recent_pages=4,keep_first_page=false"
python -m transformers_quest.evaluation passkey --lengths 4096 --prompts 10 --name passkey_recent --methods \
  dense "quest:page_summary=minmax,recent_pages=2,keep_first_page=false" "quest:page_summary=minmax,recent_pages=4,keep_first_page=false" "quest:page_summary=minmax,recent_pages=8,keep_first_page=false"
