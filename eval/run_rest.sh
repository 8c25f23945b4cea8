#!/usr/bin/env bash
# Perplexity at 8K, RULER-style tasks at 4K, and the needle-rank diagnosis, for the chosen default.
set -euo pipefail
python -m transformers_quest.evaluation --h2o-window 256 perplexity --length 8192 --window 256 --budgets 256 1024 \
  --methods dense oracle "quest:page_summary=minmax,spread=0.5,keep_first_page=false" quest-paper streaming h2o
# One prompt per task first, so that every task has a result early; the second call adds the second prompts.
python -m transformers_quest.evaluation --h2o-window 256 ruler --length 4096 --prompts 1 --budgets 256 1024 \
  --methods dense oracle "quest:page_summary=minmax,spread=0.5,keep_first_page=false" quest-paper streaming h2o
python -m transformers_quest.evaluation diagnose --length 4096 --prompts 5
python -m transformers_quest.evaluation --h2o-window 256 ruler --length 4096 --prompts 2 --budgets 256 1024 \
  --methods dense oracle "quest:page_summary=minmax,spread=0.5,keep_first_page=false" quest-paper streaming h2o
