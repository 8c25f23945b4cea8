"""``python -m transformers_quest.evaluation {passkey,ruler,perplexity,report} ...``: see ``--help``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .runner import environment, run_passkey, run_perplexity, run_ruler

PASSKEY_METHODS = [
    "dense", "oracle", "quest-paper", "quest-paper-sum", "quest-paper-none",
    "quest:page_summary=minmax,spread=0.25,keep_first_page=false",
    "quest:page_summary=minmax,aggregation=none,spread=0.25,keep_first_page=false",
    "quest:page_summary=minmax,spread=0,keep_first_page=false",
    "quest:page_summary=minmax,aggregation=none,spread=0,keep_first_page=false",
    "quest:page_summary=minmax,spread=1.0,keep_first_page=true", "streaming", "h2o",
]
SHORT_METHODS = ["dense", "oracle", "default", "quest-paper", "streaming", "h2o"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m transformers_quest.evaluation", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("eval/results"), help="folder for JSONL/JSON/markdown/PNG")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--h2o-window", type=int, default=1024, help="prefill queries whose attention seeds H2O (0 = all)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("passkey", help="passkey retrieval, paper template, question fed token by token")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--prompts", type=int, default=10, help="prompts per length, needle depths spread evenly")
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--methods", nargs="+", default=PASSKEY_METHODS)
    p.add_argument("--name", default="passkey", help="results file stem")
    r = sub.add_parser("ruler", help="RULER-style synthetic tasks on a noise haystack")
    r.add_argument("--length", type=int, default=4096)
    r.add_argument("--prompts", type=int, default=3, help="prompts per task")
    r.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    r.add_argument("--methods", nargs="+", default=SHORT_METHODS)
    r.add_argument("--name", default="ruler")
    q = sub.add_parser("perplexity", help="token-by-token perplexity of Hamlet's last WINDOW tokens at LENGTH context")
    q.add_argument("--length", type=int, default=8192)
    q.add_argument("--window", type=int, default=512)
    q.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    q.add_argument("--methods", nargs="+", default=SHORT_METHODS)
    q.add_argument("--name", default="perplexity")
    d = sub.add_parser("diagnose", help="where each page scorer ranks the needle's page, per layer (passkey)")
    d.add_argument("--length", type=int, default=4096)
    d.add_argument("--prompts", type=int, default=5)
    sub.add_parser("report", help="rebuild markdown tables and plots from the JSONL files in --out")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .report import write_report

    if args.command == "diagnose":
        from ..models import load_smollm2
        from .diagnose import diagnose, diagnose_table

        model, tokenizer = load_smollm2("sdpa")
        result = diagnose(model, tokenizer, args.length, args.prompts)
        table = diagnose_table(result, args.length // 16)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"diagnose_{args.length}.md").write_text(
            f"# Needle-page ranks, passkey at {args.length} tokens, {args.prompts} prompts\n\n{table}\n\n"
            f"`python -m transformers_quest.evaluation {' '.join(argv)}`\n"
        )
        (args.out / f"diagnose_{args.length}.json").write_text(json.dumps({"environment": environment(argv), "layers": result}, indent=1) + "\n")
        print(table)
        return
    if args.command != "report":
        from ..models import load_smollm2

        model, tokenizer = load_smollm2("sdpa")
        path = args.out / f"{args.name}.jsonl"
        env_path = args.out / f"{args.name}.env.json"
        args.out.mkdir(parents=True, exist_ok=True)
        env_path.write_text(json.dumps(environment(argv), indent=2) + "\n")
        if args.command == "passkey":
            run_passkey(model, tokenizer, args.lengths, args.prompts, args.budgets, args.methods, path, args.h2o_window)
        elif args.command == "ruler":
            run_ruler(model, tokenizer, args.length, args.prompts, args.budgets, args.methods, path, args.h2o_window)
        else:
            run_perplexity(model, tokenizer, args.length, args.window, args.budgets, args.methods, path, args.h2o_window)
    print(write_report(args.out))


if __name__ == "__main__":
    main()
