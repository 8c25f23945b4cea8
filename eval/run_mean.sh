#!/usr/bin/env bash
# The min/max box re-centred on each page's mean key (page_summary="mean", same bytes, same kernel scoring):
# passkey at 4K on the prompts of passkey.jsonl (dense rerun as the check); 8K only for what wins at 4K.
set -euo pipefail
python -m transformers_quest.evaluation passkey --lengths 4096 --prompts 10 --name passkey_mean --methods \
  dense "quest:page_summary=mean" "quest:page_summary=mean,spread=0.25" "quest:page_summary=mean,spread=1.0"
# Out of sample: 8K passkey (prompts of passkey8k.jsonl) and 8K perplexity for the 4K winner.
python -m transformers_quest.evaluation passkey --lengths 8192 --prompts 10 --name passkey8k_mean --methods \
  dense "quest:page_summary=mean"
python -m transformers_quest.evaluation perplexity --length 8192 --window 256 --budgets 256 1024 \
  --name perplexity_mean --methods dense "quest:page_summary=mean"
# RULER-style at 4K: the default when this ran (min/max box, first page kept) and the mean box.
python -m transformers_quest.evaluation --h2o-window 256 ruler --length 4096 --prompts 2 --budgets 256 1024 \
  --name ruler_default --methods dense "quest:page_summary=minmax" "quest:page_summary=mean"
