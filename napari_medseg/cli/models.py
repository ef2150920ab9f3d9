"""The ``napari-medseg models`` subcommand: built-in and installed models with their cards."""

from __future__ import annotations

import argparse
import json
from typing import Any

from napari_medseg.cli._common import number


def add_parser(sub: Any) -> None:
    """Add ``models`` (list) and ``models pull SOURCE`` to the subcommands."""
    p = sub.add_parser(
        "models",
        help="list built-in and installed models with their cards; 'models pull' installs one",
        description="Without a subcommand: list the built-in and installed models, each with its "
        "headline held-out score and how it was measured; 'demo' marks models trained on fewer "
        "than 5 subjects. 'models pull SOURCE' installs a model from the MONAI Model Zoo, "
        "TotalSegmentator, a URL or a file.",
    )
    p.add_argument("--json", action="store_true", help="print the cards as a JSON list")
    p.set_defaults(func=_models)
    msub = p.add_subparsers(dest="models_command", metavar="{pull}")
    q = msub.add_parser(
        "pull",
        help="download and install a model",
        description="Install a model into the user models folder ($MEDSEG_MODELS_DIR or the "
        "platform's data folder). SOURCE is a MONAI Model Zoo bundle name (e.g. "
        "spleen_ct_segmentation, or name@version), a TotalSegmentator task (total, total_mr, "
        "body, lung_vessels, ...: its nnU-Net v2 weights; 'total' installs five models), an "
        "http(s) URL or a local .zip/.tar.gz of a model folder, MONAI bundle or nnU-Net v2 "
        "results folder, or a local model folder. The archive is checked (--sha256), extracted "
        "safely (no absolute paths, '..' or links) and installed atomically.",
    )
    q.add_argument("source", help="bundle name, TotalSegmentator task, URL, archive or folder")
    q.add_argument("--name", help="registry name for the installed model")
    q.add_argument("--sha256", help="expected sha256 (hex) of the archive")
    q.add_argument("--overwrite", action="store_true", help="replace an installed model")
    q.add_argument(
        "--timeout",
        type=number(float, 0, lo_open=True),
        default=60.0,
        help="network timeout in seconds",
    )
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_pull)


def _pull(args: argparse.Namespace) -> int:
    import sys

    from napari_medseg.models.pull import pull_model
    from napari_medseg.progress import TextProgress, run_sync

    if args.timeout <= 0:
        from napari_medseg.errors import MedsegError

        raise MedsegError("--timeout must be a positive number of seconds")
    models = run_sync(
        pull_model(
            args.source,
            name=args.name,
            sha256=args.sha256,
            overwrite=args.overwrite,
            timeout=args.timeout,
        ),
        TextProgress(quiet=args.quiet),
    )
    for m in models:
        print(f"installed {m.name} at {m.path}", file=sys.stderr)
    return 0


def _evaluation_note(card: dict) -> str:
    """How the headline score was measured, and 'demo' for models of fewer than 5 subjects."""
    ev = card.get("evaluation") or {}
    parts = []
    if isinstance(ev, dict) and ev.get("split"):
        parts.append(str(ev["split"]))
    if is_demo(card):
        parts.insert(0, "demo")
    return f" [{'; '.join(parts)}]" if parts else ""


def is_demo(card: dict) -> bool:
    """True for a model trained on fewer than 5 subjects (``ModelCard.is_demo``)."""
    return bool(card.get("demo"))


def _score_line(metrics: dict) -> str:
    """The card's headline held-out score: Dice, box F1, or Dice after 3 clicks."""
    dice = metrics.get("val_dice_mean")
    if isinstance(dice, float):
        return f"  held-out Dice {dice:.3f}"
    f1 = metrics.get("val_f1_iou50")
    if isinstance(f1, float):
        return f"  held-out box F1 {f1:.3f}"
    clicks = metrics.get("held_out_clicks")
    if isinstance(clicks, dict) and clicks:
        parts = [
            f"{name} {v['dice'][3]:.2f}"
            for name, v in clicks.items()
            if isinstance(v, dict) and len(v.get("dice", [])) > 3
        ]
        return "  held-out Dice after 3 clicks: " + ", ".join(parts) if parts else ""
    return ""


def _models(args: argparse.Namespace) -> int:
    from napari_medseg.models.registry import list_models

    cards = list_models()
    if args.json:
        print(json.dumps(cards, indent=2, default=str))
        return 0
    if not cards:
        print("no models installed")
        return 0
    for c in cards:
        classes = ", ".join(x["name"] for x in c.get("classes", [])[1:])
        score = _score_line(c.get("metrics") or {})
        if score:
            score += _evaluation_note(c)
        elif is_demo(c):
            score = "  [demo]"
        where = "built-in" if c.get("builtin") else c.get("source", "")
        print(
            f"{c['name']:<22} {c.get('task', '?'):<13} {c.get('dims')}D "
            f"{c.get('modality', '?'):<11} [{classes}]{score}  ({where})"
        )
    return 0
