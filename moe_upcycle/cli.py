"""``moe-upcycle`` command line: ``convert``, ``train``, ``merge``, ``evaluate`` and ``demo``.

Bad input ends with one ``moe-upcycle: error: ...`` line on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import UpcycleError
from .yaml_config import apply_yaml_defaults, config_path


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from .convert.options import add_option_arguments

    p = sub.add_parser("convert", help="upcycle a dense checkpoint into a sparse MoE checkpoint",
                       description="Upcycle a dense causal LM (local folder or Hub id) into a sparse MoE model.")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="recipe file whose keys are these flags without -- (see configs/); flags override it")
    p.add_argument("source", help="local folder or Hub model id of the dense model")
    p.add_argument("output", help="folder to write the MoE model to (must not exist or be empty)")
    add_option_arguments(p)
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from .convert import upcycle
    from .convert.options import options_from_namespace

    options = options_from_namespace(args)
    result = upcycle(args.source, args.output, options)
    print(f"wrote {result.output} in {result.seconds:.1f}s: {len(result.shards)} shard(s), "
          f"{result.bytes_written / 1e9:.3f} GB")
    print(f"MoE layers {result.moe_layers}; {options.num_experts} experts, top-{options.top_k}; "
          f"parameters {result.total_params:,} total, {result.active_params:,} active per token")
    for note in result.notes:
        print(note)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a small dense Llama locally, upcycle it, verify it and generate")
    p.add_argument("--workdir", default="demo_run", help="folder for the demo's outputs (default demo_run)")
    p.set_defaults(func=lambda args: __import__("moe_upcycle.demo", fromlist=["run"]).run(args.workdir))


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model and save a full model")
    p.add_argument("adapter_dir", help="folder written by `moe-upcycle train --use_lora`")
    p.add_argument("output", help="folder for the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUTPUT")
    p.set_defaults(func=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from .train.merge import merge_to_folder

    out = merge_to_folder(args.adapter_dir, args.output, overwrite=args.overwrite)
    print(f"wrote the merged model to {out}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="perplexity of any causal LM on a validation file")
    p.add_argument("model", help="model folder or Hub id (dense or MoE)")
    p.add_argument("--validation_file", required=True, help=".txt, .json/.jsonl or .parquet file")
    p.add_argument("--text_column", default="text")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--output_json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--trust_remote_code", action="store_true")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .train.evaluate_file import evaluate_file

    result = evaluate_file(args.model, args.validation_file, text_column=args.text_column, block_size=args.block_size,
                           batch_size=args.batch_size, max_eval_samples=args.max_eval_samples,
                           trust_remote_code=args.trust_remote_code, output_json=args.output_json)
    print(f"{args.model}: eval_loss {result['eval_loss']:.4f}  perplexity {result['perplexity']:.2f}  "
          f"({result['tokens']:,} tokens)")
    return 0


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="validate a model or adapter folder and publish it to the Hub")
    p.add_argument("folder", help="converted, merged or fine-tuned model folder, or a LoRA adapter folder")
    p.add_argument("repo_id", help="'namespace/name' on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", default=None, help="branch to push to (created from main if needed)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded and show the card; no network")
    p.set_defaults(func=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from .card import CARD_FILE, render_card
    from .publish import push

    result = push(args.folder, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
                  commit_message=args.commit_message, dry_run=args.dry_run)
    if result.dry_run:
        print(f"would upload {len(result.files)} file(s) to {args.repo_id}:")
        for name in result.files:
            print(f"  {name}")
        card_path = Path(args.folder) / CARD_FILE
        print("\n" + (card_path.read_text() if card_path.is_file() else str(render_card(args.folder, args.repo_id))))
        return 0
    print(f"published {len(result.files)} file(s): {result.url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-upcycle")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands (`moe-upcycle COMMAND --help` for each one's flags)")
    _add_convert(sub)
    sub.add_parser("train", help="fine-tune with the Trainer (flags: `moe-upcycle train --help`)", add_help=False)
    _add_merge(sub)
    _add_evaluate(sub)
    _add_push(sub)
    from .export import add_export_subcommand

    add_export_subcommand(sub)
    _add_demo(sub)
    for subparser in sub.choices.values():
        _accept_both_spellings(subparser)
    parser.description = ("Upcycle dense Transformers models into sparse Mixture-of-Experts models, then fine-tune, "
                          f"evaluate, export and publish them. Commands: {', '.join(sub.choices)}.")
    return parser


def _accept_both_spellings(parser: argparse.ArgumentParser) -> None:
    """Give every ``--long_flag`` its other spelling (``--long-flag``), as ``HfArgumentParser`` does for ``train``."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            if not option.startswith("--"):
                continue
            body = option[2:]
            other = "--" + (body.replace("-", "_") if "-" in body else body.replace("_", "-"))
            if other != option and other not in parser._option_string_actions:
                action.option_strings.append(other)
                parser._option_string_actions[other] = action


def _run_train(argv: Sequence[str]) -> int:
    from .train import run_training

    run_training(argv)
    return 0


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["train"]:  # HfArgumentParser owns the training flags
            return _run_train(argv[1:])
        parser = build_parser()
        if argv[:1] == ["convert"]:  # a recipe file supplies the convert parser's defaults
            config, _ = config_path(argv[1:])
            apply_yaml_defaults(_subparser(parser, "convert"), config)
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except UpcycleError as err:
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"moe-upcycle: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-upcycle: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
