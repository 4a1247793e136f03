"""The `budgetlora` command: a thin layer of argument parsing over the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from budgetlora.errors import BudgetLoraError, RunInterrupted


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data file (AG News CSV, CSV/TSV/JSONL/parquet, pickle)")
    parser.add_argument("--format", help="override data.format of the run (auto, agnews, csv, tsv, jsonl, parquet, pickle)")
    parser.add_argument("--text-columns", help="comma-separated text columns (default: the run's)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow loading a pickle file (runs code!)")
    parser.add_argument("--device", default="auto")


def _predict_file(args: argparse.Namespace, labeled: bool):
    """Load the run and the data file, and predict it: sharded across ranks under torchrun
    (every rank gets all rows back in file order; rank 0 writes the outputs)."""
    from budgetlora.artifacts import load_run
    from budgetlora.data.dataset import load_text_set
    from budgetlora.data.tokens import tokenize
    from budgetlora.distributed import context_from_env, destroy_process_group, device_for, init_process_group
    from budgetlora.evaluate import predict_logits
    from budgetlora.model import pad_token_id
    from budgetlora.recipe import resolve_device, resolve_precision

    dist = context_from_env()
    device = device_for(dist, resolve_device(args.device))
    run = load_run(args.run, device)
    data_cfg = run.cfg.data
    if args.format:
        data_cfg = dataclasses.replace(data_cfg, format=args.format)
    if args.text_columns:
        data_cfg = dataclasses.replace(data_cfg, text_columns=[c.strip() for c in args.text_columns.split(",")])
    texts, _ = load_text_set(args.data, data_cfg, run.label_names, labeled, args.trust_pickle)
    tokens = tokenize(run.tokenizer, texts.texts, texts.labels, run.cfg.data.max_length)
    init_process_group(dist, device)
    try:
        logits = predict_logits(run.model, tokens, device, pad_token_id(run.tokenizer),
                                resolve_precision(run.cfg.train.precision, device), dist=dist)
    finally:
        destroy_process_group(dist)
    return run, texts, logits, dist.is_main


def cmd_train(args: argparse.Namespace) -> int:
    from budgetlora.config import load_config
    from budgetlora.recipe import resume_run, train_run

    if args.resume:
        if args.config:
            raise BudgetLoraError("give a config to start a run or --resume RUN to continue one, not both "
                                  "(a resumed run uses RUN/config.yaml)")
        if args.name or args.overwrite:
            raise BudgetLoraError("--name and --overwrite do not apply to --resume")
        run_dir = resume_run(Path(args.resume), extend=args.extend, overrides=list(args.set or []),
                             trust_pickle=args.trust_pickle, verbose=not args.quiet)
        print(run_dir)
        return 0
    if args.extend:
        raise BudgetLoraError("--extend only applies to --resume RUN")
    if not args.config:
        raise BudgetLoraError("train needs a config file (or --resume RUN to continue a run)")
    overrides = list(args.set or [])
    if args.name:
        overrides.append(f"name={args.name}")
    cfg = load_config(args.config, overrides)
    run_dir = train_run(cfg, Path(args.out), overwrite=args.overwrite, trust_pickle=args.trust_pickle,
                        verbose=not args.quiet)
    print(run_dir)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from budgetlora.budget import count_trainable, max_rank
    from budgetlora.config import config_from_dict, load_config, parse_override
    from budgetlora.model import build_meta_model

    overrides = list(args.set or [])
    for key, value in (("model", args.model), ("budget", args.budget), ("lora.targets", args.targets)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.config:
        cfg = load_config(args.config, overrides)
    else:
        cfg = config_from_dict({"data": {"train_file": "-"}}, dict(parse_override(o) for o in overrides))
    if cfg.budget is None:
        raise BudgetLoraError("plan needs a budget: --budget N")
    rank, count = max_rank(cfg, args.num_labels, cfg.budget)
    if rank == 0:
        print(f"no rank fits: r=1 on {','.join(cfg.lora.targets)} already needs {count:,} trainable "
              f"parameters (budget {cfg.budget:,})")
        return 1
    planned = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=rank))
    report = count_trainable(build_meta_model(planned, args.num_labels))
    print(f"model {cfg.model}, targets {','.join(cfg.lora.targets)}, budget {cfg.budget:,}: "
          f"largest rank r={rank} -> {count:,} trainable ({cfg.budget - count:,} to spare)")
    print(report.table())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from budgetlora.artifacts import write_json
    from budgetlora.evaluate import classification_metrics, format_metrics

    run, texts, logits, is_main = _predict_file(args, labeled=True)
    if not is_main:
        return 0
    metrics = classification_metrics(texts.labels, logits.argmax(1), run.label_names, logits)
    metrics["data"] = str(Path(args.data).resolve())
    out = Path(args.json) if args.json else Path(args.run) / f"eval-{Path(args.data).stem}.json"
    write_json(out, metrics)
    print(format_metrics(metrics, run.label_names))
    print(f"metrics written to {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from budgetlora.artifacts import write_predictions_csv

    run, texts, logits, is_main = _predict_file(args, labeled=False)
    if not is_main:
        return 0
    write_predictions_csv(Path(args.out), texts.ids, logits.argmax(1), run.label_names if args.names else None)
    print(f"{len(texts):,} predictions written to {args.out}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from budgetlora.artifacts import load_run
    from budgetlora.data.sources import clean_text
    from budgetlora.data.tokens import tokenize
    from budgetlora.evaluate import predict_logits, softmax
    from budgetlora.model import pad_token_id
    from budgetlora.recipe import resolve_device

    device = resolve_device(args.device)
    run = load_run(args.run, device)
    texts = [clean_text(t) if run.cfg.data.clean_text else t for t in args.text]
    if not all(t.strip() for t in texts):
        raise BudgetLoraError("empty text: give the text to classify as an argument")
    tokens = tokenize(run.tokenizer, texts, None, run.cfg.data.max_length, use_cache=False)
    probs = softmax(predict_logits(run.model, tokens, device, pad_token_id(run.tokenizer)))
    results = [{"text": text, "label": run.label_names[int(p.argmax())], "index": int(p.argmax()),
                "probabilities": {n: round(float(v), 4) for n, v in zip(run.label_names, p)}}
               for text, p in zip(args.text, probs)]
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    else:
        for r in results:
            ranked = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])
            print(f"{r['label']}\t" + "  ".join(f"{n}={v:.3f}" for n, v in ranked))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from budgetlora.artifacts import export_merged, load_run

    run = load_run(args.run, torch.device("cpu"))
    out = export_merged(run, Path(args.merged))
    print(f"merged model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="budgetlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a config; writes runs/<name>/")
    p.add_argument("config", nargs="?", help="experiment YAML (see configs/); omit with --resume")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. lora.r=4")
    p.add_argument("--out", default="runs", help="parent directory of the run directory (default: runs)")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--trust-pickle", action="store_true", help="allow pickle data files (runs code!)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its newest checkpoint")
    p.add_argument("--extend", action="store_true",
                   help="with --resume: accept a new train.max_steps/epochs (--set) and rebuild the schedule")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="largest LoRA rank that fits the budget")
    p.add_argument("--config", help="start from this config")
    p.add_argument("--model", help="hub id, local path or 'minilm' (default roberta-base)")
    p.add_argument("--budget", type=int)
    p.add_argument("--targets", help="comma-separated: q,k,v,o,ffn_in,ffn_out,head")
    p.add_argument("--num-labels", type=int, default=4)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="accuracy (95%% CI), macro-F1, per-class metrics, confusion matrix")
    p.add_argument("run")
    _add_data_options(p)
    p.add_argument("--json", help="where to write the metrics JSON (default RUN/eval-<data>.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="label a file: ID,Label CSV")
    p.add_argument("run")
    _add_data_options(p)
    p.add_argument("--out", required=True, help="predictions CSV to write")
    p.add_argument("--names", action="store_true", help="write class names instead of class indices")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("classify", help="classify one or more texts")
    p.add_argument("run")
    p.add_argument("text", nargs="+")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("export", help="write a merged full model (safetensors)")
    p.add_argument("run")
    p.add_argument("--merged", required=True, help="output directory")
    p.set_defaults(func=cmd_export)

    from budgetlora import bench, report, results, sweep

    for module in (results, report, sweep, bench):
        module.add_subcommands(sub)
    return parser


def _report(message: str) -> None:
    # under torchrun every rank meets the same error: rank 0 alone says it, once
    if os.environ.get("RANK", "0") in ("", "0"):
        print(message, file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BudgetLoraError as exc:
        _report(f"budgetlora: error: {exc}")
        return 2
    except RunInterrupted as exc:
        _report(f"budgetlora: {exc}")
        return exc.exit_code
    except OSError as exc:  # disk full, unwritable output: the environment, not a bug to trace
        where = f": {exc.filename}" if exc.filename else ""
        _report(f"budgetlora: error: {exc.strerror or exc}{where}")
        return 2
    except KeyboardInterrupt:
        print("budgetlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
