"""Classify images with a running server (see jobs/serve.py).

    python jobs/predict.py cat.png dog.jpg [--url http://127.0.0.1:8000] [--top 3]
    RESNET_DIST_API_KEY=... python jobs/predict.py cat.png --url https://classifier.example.com

The API key, when the server requires one, comes from $RESNET_DIST_API_KEY or --api-key-file
(never from the command line, where other users of the machine could read it).

Exit codes: 2 for bad input (a missing file, or an image the server refused
with 4xx), 1 when the server cannot be reached or fails (5xx).
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--api-key-file", type=Path, help="file holding the server's API key (default: $RESNET_DIST_API_KEY)")
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
    try:
        key = args.api_key_file.read_text().strip() if args.api_key_file else os.environ.get("RESNET_DIST_API_KEY", "")
    except (OSError, UnicodeDecodeError) as e:
        die(f"{args.api_key_file}: cannot read the API key ({type(e).__name__})")
    if args.api_key_file and not key:
        die(f"{args.api_key_file}: the API key file is empty")
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=args.url.rstrip("/"), timeout=args.timeout, headers=auth) as client:
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
