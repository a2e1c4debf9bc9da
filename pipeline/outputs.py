"""The report's other forms: one HTML page with its plots embedded, so that it renders
anywhere, MLflow's sandboxed artifact viewer included (relative image links do not
resolve there); and its numbers, flat, for `dvc metrics show`."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any


def to_html(markdown: str, folder: Path, title: str = "Conv2D ablation report") -> str:
    """`markdown` as one HTML page whose images (relative to `folder`) are embedded, so
    that it renders anywhere, MLflow's sandboxed artifact viewer included."""
    from markdown_it import MarkdownIt

    def embed(match: re.Match) -> str:
        image = folder / match.group(2)
        if not image.is_file():
            return match.group(0)
        data = base64.b64encode(image.read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    body = (
        MarkdownIt("commonmark")
        .enable("table")
        .render(re.sub(r"!\[([^\]]*)\]\(([^)\s:]+\.png)\)", embed, markdown))
    )
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{_CSS}</style></head>\n<body>\n{body}</body></html>\n"
    )


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:14px}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}"
    "img{max-width:100%;display:block;margin:1em 0}"
)


def flat_summary(results: dict[str, Any]) -> dict[str, float]:
    """Numbers only, one level deep: each study's best value, each level's effect against
    its base and whether it is real (1) or not (0), the submission's held-out accuracy."""
    flat: dict[str, float] = {}
    for name, summary in results.items():
        if summary.get("best_value") is not None:
            flat[f"{name}.best"] = round(summary["best_value"], 5)
        for level, row in summary.get("levels", {}).items():
            if row.get("effect") is not None:
                flat[f"{name}.{level}.effect"] = round(row["effect"], 5)
            if row.get("real_effect") is not None:
                flat[f"{name}.{level}.real"] = int(row["real_effect"])
    for name, row in results.get("heldout", {}).items():
        if name.startswith("submission"):
            flat["submission.holdout_accuracy"] = round(row["holdout_accuracy"], 5)
    return flat
