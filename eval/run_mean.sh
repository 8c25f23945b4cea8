#!/usr/bin/env bash
# The min/max box re-centred on each page's mean key (page_summary="mean", same bytes, same kernel scoring):
# passkey at 4K on the prompts of passkey.jsonl (dense rerun as the check); 8K only for what wins at 4K.
set -euo pipefail
python -m transformers_quest.evaluation passkey --lengths 4096 --prompts 10 --name passkey_mean --methods \
  dense "quest:page_summary=mean" "quest:page_summary=mean,spread=0.25" "quest:page_summary=mean,spread=1.0"
