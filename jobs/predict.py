"""Classify images with a running server (see jobs/serve.py).

    python jobs/predict.py cat.png dog.jpg [--url http://127.0.0.1:8000] [--top 3]

Exit codes: 2 for bad input (a missing file, or an image the server refused
with 4xx), 1 when the server cannot be reached or fails (5xx).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from termui.cli import die, job_parser


def parse_args(argv=None) -> argparse.Namespace:
    p = job_parser(__doc__)
    p.add_argument("images", nargs="+", type=Path, help="PNG or JPEG files")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    p.add_argument("--top", type=int, default=3, help="classes shown per image (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    for path in args.images:
        if not path.is_file():
            die(f"{path}: no such file")
    table = Table(title=f"predictions from {args.url}")
    for col in ("image", "class", "probability", "runners-up"):
        table.add_column(col)
    version = ""
    with httpx.Client(base_url=args.url.rstrip("/"), timeout=args.timeout) as client:
        for path in args.images:
            try:
                r = client.post("/v1/predict", content=path.read_bytes(),
                                headers={"Content-Type": "application/octet-stream"})
            except httpx.HTTPError as e:
                die(f"cannot reach {args.url}: {type(e).__name__}: {e}", code=1)
            if r.status_code != 200:
                try:
                    message = r.json()["error"]
                except (ValueError, KeyError, TypeError):
                    message = r.text[:200]
                die(f"{path}: HTTP {r.status_code}: {message}", code=2 if r.status_code < 500 else 1)
            body = r.json()
            version = body["model_version"]
            best, *rest = body["predictions"][: args.top]
            table.add_row(str(path), best["class"], f"{best['probability']:.1%}",
                          ", ".join(f"{p['class']} {p['probability']:.1%}" for p in rest))
    Console().print(table)
    print(f"model {version}")


if __name__ == "__main__":
    main()
