#!/usr/bin/env bash
# Passkey grids (10 prompts per length, question fed token by token): the selector research and issue 2's table.
set -euo pipefail
# 4K: the default passkey method list of the CLI (dense, oracle, the paper's bound per aggregation, spreads, sink, baselines).
python -m transformers_quest.evaluation passkey --lengths 4096 --prompts 10 --name passkey
# 8K: the out-of-sample check of the best 4K variants.
python -m transformers_quest.evaluation --h2o-window 256 passkey --lengths 8192 --prompts 10 --name passkey8k --methods \
  dense oracle quest-paper quest-paper-sum quest-paper-none \
  "quest:page_summary=minmax,spread=0.25,keep_first_page=false" "quest:page_summary=minmax,spread=0.5,keep_first_page=false" "quest:page_summary=minmax,aggregation=sum,spread=0.25,keep_first_page=false" \
  "quest:page_summary=minmax,aggregation=none,spread=0.25,keep_first_page=false" "quest:page_summary=minmax,aggregation=softmax,spread=0.5,keep_first_page=false" "quest:page_summary=minmax,aggregation=softmax,spread=0.25,keep_first_page=false" \
  streaming h2o
