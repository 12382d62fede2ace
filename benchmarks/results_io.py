"""Where the benchmark scripts put what they measured: one JSON and one Markdown file per run."""

from __future__ import annotations

import json
from pathlib import Path


def save_results(out_dir: Path, name: str, result: dict, markdown: str) -> Path:
    """Write ``<out_dir>/<name>.json`` and ``.md``; returns the Markdown file's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = out_dir / f"{name}.md"
    md.write_text(markdown)
    return md
