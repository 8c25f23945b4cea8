#!/usr/bin/env bash
# Passkey at 4K: more dense layers, and smaller selection pages (page_size 8 doubles the metadata bytes).
set -euo pipefail
python -m transformers_quest.evaluation passkey --lengths 4096 --prompts 10 --name passkey_layers_pages --methods \
  dense "quest:page_summary=minmax" "quest:page_summary=minmax,dense_layers=3" "quest:page_summary=minmax,dense_layers=4" "quest:page_summary=minmax,page_size=8" "quest:page_summary=minmax,page_size=8,spread=0.25"
