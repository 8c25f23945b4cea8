"""Dense vs Quest decoding on the real SmolLM2-135M-Instruct, on the CPU: a passkey hidden in a long haystack.

    python examples/generate.py --context-tokens 3000 --budget 256
"""

from __future__ import annotations

import argparse
import time

import transformers_quest  # noqa: F401  (registers attn_implementation="quest")
from transformers_quest import QuestCache
from transformers_quest.models import load_smollm2

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer, context_tokens: int, passkey: int, depth: float) -> dict:
    """The paper's passkey template, the needle at ``depth`` (0 = start, 1 = end) of about ``context_tokens``."""
    repeats = max(1, context_tokens // len(tokenizer(FILLER)["input_ids"]))
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    cut = int(repeats * depth)
    text = FILLER * cut + needle + FILLER * (repeats - cut) + "What is the pass key? The pass key is"
    return tokenizer(text, return_tensors="pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context-tokens", type=int, default=3000, help="haystack length in tokens")
    parser.add_argument("--budget", type=int, default=256, help="Quest token budget per decode step")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--passkey", type=int, default=68142)
    parser.add_argument("--depth", type=float, default=0.4, help="where the needle sits, 0..1")
    args = parser.parse_args()

    model, tokenizer = load_smollm2(attn_implementation="quest")
    inputs = passkey_prompt(tokenizer, args.context_tokens, args.passkey, args.depth)
    prompt_len = inputs["input_ids"].shape[1]
    print(f"prompt: {prompt_len} tokens, passkey {args.passkey} at depth {args.depth:.0%}")

    runs = {}
    for name in ("dense", "quest"):
        model.set_attn_implementation("sdpa" if name == "dense" else "quest")
        cache = QuestCache(budget=args.budget) if name == "quest" else None
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, past_key_values=cache)
        seconds = time.perf_counter() - start
        answer = tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True).strip()
        read = cache.stats.read_fraction if cache is not None else 1.0
        runs[name] = (answer, read, seconds)

    print(f"\n| attention | answer | correct | KV cache read per decode step | time |")
    print("|---|---|---|---|---|")
    for name, (answer, read, seconds) in runs.items():
        label = "dense (SDPA)" if name == "dense" else f"Quest, budget {args.budget}"
        correct = "yes" if str(args.passkey) in answer else "no"
        print(f"| {label} | {answer!r} | {correct} | {read:.1%} | {seconds:.1f} s |")
    print("\nKV read counts every layer's decode-step reads (the first 2 layers stay dense) plus Quest's page metadata.")


if __name__ == "__main__":
    main()
