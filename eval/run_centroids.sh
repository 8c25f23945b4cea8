#!/usr/bin/env bash
# Two centroids per page (page_summary="centroids", same bytes as min/max): passkey at 4K and 8K on the prompts of
# passkey.jsonl / passkey8k.jsonl (same seeds; dense rerun as the check), then perplexity at 8K.
set -euo pipefail
python -m transformers_quest.evaluation passkey --lengths 4096 --prompts 10 --name passkey_centroids --methods \
  dense "quest:page_summary=centroids,keep_first_page=true" "quest:page_summary=centroids,keep_first_page=false"
python -m transformers_quest.evaluation passkey --lengths 8192 --prompts 10 --name passkey8k_centroids --methods \
  dense "quest:page_summary=centroids,keep_first_page=true" "quest:page_summary=centroids,keep_first_page=false"
python -m transformers_quest.evaluation perplexity --length 8192 --window 256 --budgets 256 1024 \
  --name perplexity_centroids --methods dense "quest:page_summary=centroids,keep_first_page=true"
