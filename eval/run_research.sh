#!/usr/bin/env bash
# Selector research at 4K tokens: aggregations that put a GQA group's heads on one scale, and more spreads.
set -euo pipefail
python -m transformers_quest.evaluation passkey --lengths 4096 --prompts 10 --name passkey_research --methods \
  dense oracle \
  "quest:aggregation=softmax,spread=1.0" "quest:aggregation=softmax,spread=0.5" \
  "quest:aggregation=softmax,spread=0.25" "quest:aggregation=softmax,spread=0" \
  "quest:aggregation=rank,spread=1.0" "quest:aggregation=rank,spread=0.25" "quest:aggregation=rank,spread=0" \
  "quest:spread=0.5" "quest:aggregation=none,spread=0.5" "quest:aggregation=sum,spread=0.25"
