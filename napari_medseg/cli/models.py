"""The ``napari-medseg models`` subcommand: built-in and installed models with their cards."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="list built-in and installed models with their cards")
    p.add_argument("--json", action="store_true", help="print the cards as a JSON list")
    p.set_defaults(func=_models)


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
        where = "built-in" if c.get("builtin") else c.get("source", "")
        print(
            f"{c['name']:<22} {c.get('task', '?'):<13} {c.get('dims')}D "
            f"{c.get('modality', '?'):<11} [{classes}]{score}  ({where})"
        )
    return 0
