"""Offline accuracy evaluation of Quest and its baselines on the real model: passkey retrieval, RULER-style
synthetic tasks and token-by-token perplexity. Run ``python -m transformers_quest.evaluation --help``."""
