"""``moe-upcycle push FOLDER REPO_ID``: validate a model or adapter folder, give it a card, publish it."""

from __future__ import annotations

import argparse
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("push", help="validate a model or adapter folder and publish it to the Hub")
    p.add_argument("folder", help="converted, merged or fine-tuned model folder, or a LoRA adapter folder")
    p.add_argument("repo_id", help="'namespace/name' on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", default=None, help="branch to push to (created from main if needed)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded and show the card; no network")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..card import CARD_FILE, render_card
    from ..publish import push

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
