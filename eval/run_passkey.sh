#!/usr/bin/env bash
# Passkey grid at 4K and 8K tokens (10 prompts each): the selector research and issue 2's table.
set -euo pipefail
python -m transformers_quest.evaluation passkey --lengths 4096 8192 --prompts 10
