"""Ask a running recommendation service (``python -m deploy.serve``) for recommendations.

    python -m deploy.recommend --history films-i12 films-i40 --k 5
    python -m deploy.recommend --url http://127.0.0.1:5001 --history a b --history c --json

Each ``--history`` is one user's items, oldest first; the answer is printed as a table (or as the
server's JSON with ``--json``). Only the standard library is used, so this runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:5001"


def recommend(url: str, histories: list[list[str]], k: int = 10, timeout: float = 60.0) -> list[list[tuple[str, float]]]:
    """Top-``k`` (item id, score) per history from the service at ``url``; an error answer raises a
    RuntimeError with the service's status, code and message."""
    body = json.dumps({"users": [{"history": h} for h in histories], "k": k}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/recommend", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        try:
            err = json.loads(detail)
            detail = f"{err['code']}: {err['message']}"
        except (ValueError, KeyError, TypeError):
            pass
        raise RuntimeError(f"{url} answered {exc.code}: {detail}") from None
    return [[(s["item_id"], s["score"]) for s in r["items"]] for r in out["results"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.recommend", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--history", nargs="*", action="append", required=True, metavar="ITEM",
                   help="one user's item ids, oldest first (repeat for more users)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    try:
        recs = recommend(args.url, args.history, args.k)
    except (RuntimeError, urllib.error.URLError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([[{"item_id": i, "score": s} for i, s in r] for r in recs]))
        return 0
    for n, (hist, rows) in enumerate(zip(args.history, recs), 1):
        print(f"user {n}: history {' '.join(hist) or '(empty)'}")
        for rank, (item, score) in enumerate(rows, 1):
            print(f"  {rank:>3}  {item:<24} {score:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
