"""`train`, `plan`, `eval`, `predict`, `classify`, `export`: one run and what is done with it."""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path

from budgetlora.config import DataConfig, help_for
from budgetlora.errors import BudgetLoraError

FORMATS = typing.get_args(typing.get_type_hints(DataConfig)["format"])


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="data file: AG News CSV, CSV, TSV, JSONL, parquet, or pickle (with --trust-pickle)",
    )
    parser.add_argument("--format", choices=FORMATS, help="the file's format (default: the run's data.format)")
    parser.add_argument("--text-columns", metavar="A,B", help="comma-separated text columns (default: the run's)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickle data file: unpickling runs code, so only for files you trust",
    )
    _add_model_options(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument(
        "--backend",
        choices=("auto", "torch", "onnxruntime"),
        default="auto",
        help="auto: onnxruntime for an ONNX export, else PyTorch",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _train_parser(sub)
    _plan_parser(sub)
    _eval_parser(sub)
    _predict_parser(sub)
    _classify_parser(sub)
    _export_parser(sub)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a config; writes runs/<name>/",
        description="Train one config; the run "
        "directory is runs/<name>/ (a rerun gets <name>-2). See docs/run-directory.md.",
    )
    p.add_argument("config", nargs="?", help="experiment YAML (see configs/); omit with --resume")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. lora.r=4")
    p.add_argument("--out", default="runs", help="parent directory of the run directory (default: runs)")
    p.add_argument("--name", help=help_for("name"))
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run of the same name, once the new one has finished",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pickle data files: unpickling runs code, so only for files you trust",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its newest checkpoint")
    p.add_argument(
        "--extend",
        action="store_true",
        help="with --resume: accept a new train.max_steps/epochs (--set) and rebuild the schedule",
    )
    p.set_defaults(func=cmd_train)


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="the largest LoRA rank that fits the budget",
        description="The largest uniform rank whose trainable count fits the budget, from the "
        "architecture alone (offline for roberta-base and local models).",
    )
    p.add_argument("--config", help="start from this config")
    p.add_argument("--model", help=help_for("model"))
    p.add_argument("--budget", type=int, help=help_for("budget"))
    p.add_argument("--targets", help="comma-separated short names: q,k,v,qkv,o,ffn_in,ffn_out,head")
    p.add_argument("--num-labels", type=int, default=4, help="classes of the head (default 4)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=cmd_plan)


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy (95%% CI), macro-F1, per-class metrics, confusion matrix",
        description="Evaluate a run or an export on a labeled data file.",
    )
    p.add_argument("run", help="run directory or export directory")
    _add_data_options(p)
    p.add_argument("--json", help="where to write the metrics JSON (default RUN/eval-<data>.json)")
    p.add_argument(
        "--threshold",
        type=float,
        help="multi-label: one threshold for every label instead of the run's tuned ones (e.g. 0.3)",
    )
    p.set_defaults(func=cmd_eval)


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="label a file: ID,Label CSV",
        description="Write ID,Label for every row (ID: the file's ID/id column, else the row index).",
    )
    p.add_argument("run", help="run directory or export directory")
    _add_data_options(p)
    p.add_argument("--out", required=True, help="predictions CSV to write")
    p.add_argument("--names", action="store_true", help="write class names instead of class indices")
    p.add_argument(
        "--probabilities", action="store_true", help="add a probability column per class (or label): p:<name>"
    )
    p.set_defaults(func=cmd_predict)


def _classify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify texts given on the command line")
    p.add_argument("run", help="run directory or export directory")
    p.add_argument("text", nargs="+", help="one or more texts (for a text-pair model: 'first<TAB>second')")
    p.add_argument("--pair", action="append", help="the second text of each pair, once per text (text-pair models)")
    p.add_argument("--json", action="store_true", help="JSON output (label and every probability)")
    _add_model_options(p)
    p.set_defaults(func=cmd_classify)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="a merged Transformers model or an ONNX model that loads without budgetlora",
        description="Export a run: --merged OUT writes a Transformers model directory "
        "(safetensors, tokenizer, model card); --onnx OUT an ONNX model for ONNX Runtime.",
    )
    p.add_argument("run", help="run directory")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--merged", metavar="OUT", help="directory for the merged Transformers model")
    target.add_argument("--onnx", metavar="OUT", help="directory for the ONNX model")
    p.add_argument("--int8", action="store_true", help="with --onnx: dynamic int8 quantization")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier budgetlora export in OUT")
    p.set_defaults(func=cmd_export)


def cmd_train(args: argparse.Namespace) -> int:
    from budgetlora.config import load_config
    from budgetlora.recipe import train_run
    from budgetlora.resuming import resume_run

    if args.resume:
        if args.config:
            raise BudgetLoraError(
                "give a config to start a run or --resume RUN to continue one, not both "
                "(a resumed run uses RUN/config.yaml)"
            )
        if args.name or args.overwrite:
            raise BudgetLoraError("--name and --overwrite do not apply to --resume")
        print(
            resume_run(
                Path(args.resume).expanduser(),
                extend=args.extend,
                overrides=list(args.set or []),
                trust_pickle=args.trust_pickle,
                verbose=not args.quiet,
            )
        )
        return 0
    if args.extend:
        raise BudgetLoraError("--extend only applies to --resume RUN")
    if not args.config:
        raise BudgetLoraError("train needs a config file (or --resume RUN to continue a run)")
    overrides = list(args.set or []) + ([f"name={args.name}"] if args.name is not None else [])
    cfg = load_config(args.config, overrides)
    print(
        train_run(
            cfg,
            Path(args.out).expanduser(),
            overwrite=args.overwrite,
            trust_pickle=args.trust_pickle,
            verbose=not args.quiet,
        )
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from budgetlora.api import plan
    from budgetlora.config import parse_override

    overrides = dict(parse_override(o) for o in args.set or [])
    targets = None
    if args.targets is not None:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        if not targets:
            raise BudgetLoraError("--targets is empty; give module names, e.g. --targets q,v")
    result = plan(args.model, args.budget, targets, args.num_labels, args.config, **overrides)
    cfg = result.config
    shown = ",".join(cfg.lora.targets + cfg.lora.target_modules)
    if result.rank == 0:
        raise BudgetLoraError(
            f"no rank fits: r=1 on {shown} already needs {result.trainable:,} trainable "
            f"parameters (budget {result.budget:,}); adapt fewer modules or raise --budget"
        )
    print(
        f"model {cfg.model}, targets {shown}, budget {result.budget:,}: largest rank r={result.rank} -> "
        f"{result.trainable:,} trainable ({result.budget - result.trainable:,} to spare)"
    )
    print(result.table())
    return 0


def _load(args: argparse.Namespace, data: Path | None = None):
    from budgetlora.api import load

    run = load(args.run, args.device, args.backend)
    if data is not None:  # refuse an untrusted pickle before the model loads (seconds)
        from budgetlora.inference import check_data_trust

        check_data_trust(run, data, args.format, args.trust_pickle)
    return run


def _columns(args: argparse.Namespace) -> list[str] | None:
    return [c.strip() for c in args.text_columns.split(",") if c.strip()] if args.text_columns else None


def cmd_eval(args: argparse.Namespace) -> int:
    from budgetlora import atomic
    from budgetlora.artifacts.run_dir import check_output_file
    from budgetlora.distributed import context_from_env
    from budgetlora.evaluate.metrics import format_metrics

    data = Path(args.data).expanduser()
    json_out = Path(args.json).expanduser() if args.json else None
    if json_out is not None:
        check_output_file(json_out, data)
        atomic.output_target(json_out)  # a directory or a socket is refused before the model loads
    run = _load(args, data)
    metrics = run.evaluate(
        data,
        trust_pickle=args.trust_pickle,
        format=args.format,
        text_columns=_columns(args),
        quiet=args.quiet,
        threshold=args.threshold,
    )
    if not context_from_env().is_main:
        return 0
    out = json_out or run.path / f"eval-{data.stem}.json"
    atomic.write_output(out, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    print(format_metrics(metrics, run.label_names))
    print(f"metrics written to {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from budgetlora.distributed import context_from_env

    from budgetlora.artifacts.run_dir import check_output_file

    from budgetlora import atomic

    out, data = Path(args.out).expanduser(), Path(args.data).expanduser()
    if out.is_dir():
        raise BudgetLoraError(f"--out {out} is a directory; give the predictions CSV file to write")
    check_output_file(out, data)
    atomic.output_target(out)  # a socket or a dangling link is refused before the model loads
    run = _load(args, data)
    predictions = run.predict(
        data, trust_pickle=args.trust_pickle, format=args.format, text_columns=_columns(args), quiet=args.quiet
    )
    if context_from_env().is_main:
        predictions.to_csv(
            out, names=args.names, probabilities=args.probabilities, separator=run.config.data.label_separator
        )
        print(f"{len(predictions):,} predictions written to {out}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    texts: list = list(args.text)
    if args.pair:
        if len(args.pair) != len(texts):
            raise BudgetLoraError(f"{len(texts)} text(s) but {len(args.pair)} --pair: give one --pair per text")
        texts = list(zip(texts, args.pair, strict=True))
    run = _load(args)
    records = run.predict(texts).records()
    if args.json:
        print(json.dumps(records if len(records) > 1 else records[0], indent=2, ensure_ascii=False))
        return 0
    for record in records:
        if "values" in record:
            answer = "  ".join(f"{n}={v:.4g}" for n, v in record["values"].items())
            print(f"{answer}\t{record['text']}")
            continue
        ranked = sorted(record["probabilities"].items(), key=lambda kv: -kv[1])
        answer = record["label"] if "label" in record else ",".join(record["labels"]) or "(none)"
        print(f"{answer}\t" + "  ".join(f"{n}={v:.3f}" for n, v in ranked) + f"\t{record['text']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from budgetlora.api import load

    if args.int8 and not args.onnx:
        raise BudgetLoraError("--int8 applies to --onnx exports")
    run = load(args.run, "cpu", "torch")
    out = run.export(
        Path(args.onnx or args.merged).expanduser(), onnx=bool(args.onnx), int8=args.int8, overwrite=args.overwrite
    )
    print(f"{'ONNX' if args.onnx else 'merged'} model written to {out}")
    return 0
