#!/usr/bin/env bash
# Selector research at 4K tokens: aggregations that put a GQA group's heads on one scale, and more spreads.
set -euo pipefail
python -m transformers_quest.evaluation passkey --lengths 4096 --prompts 10 --name passkey_research --methods \
  dense oracle \
  "quest:page_summary=minmax,aggregation=softmax,spread=1.0,keep_first_page=false" "quest:page_summary=minmax,aggregation=softmax,spread=0.5,keep_first_page=false" \
  "quest:page_summary=minmax,aggregation=softmax,spread=0.25,keep_first_page=false" "quest:page_summary=minmax,aggregation=softmax,spread=0,keep_first_page=false" \
  "quest:page_summary=minmax,aggregation=rank,spread=1.0,keep_first_page=false" "quest:page_summary=minmax,aggregation=rank,spread=0.25,keep_first_page=false" "quest:page_summary=minmax,aggregation=rank,spread=0,keep_first_page=false" \
  "quest:page_summary=minmax,spread=0.5,keep_first_page=false" "quest:page_summary=minmax,aggregation=none,spread=0.5,keep_first_page=false" "quest:page_summary=minmax,aggregation=sum,spread=0.25,keep_first_page=false"
