"""Start the recommendation service (``deploy/service.py``) under uvicorn.

    python -m deploy.serve --config configs/demo.yaml                  # <prefix>-<domain>@champion
    python -m deploy.serve --config configs/demo.yaml --domain films --port 5001 --workers 2
    python -m deploy.serve --tracking-uri sqlite:////abs/mlflow.db --model mmrec-films --alias champion
    python -m deploy.serve --model-dir artifacts/films/finetuned/model  # an exported folder, no registry

In order, before anything heavy: the port is checked (a busy port is an error at once), the model
is found (``models:/<model>@<alias>`` in the pipeline's MLflow registry: by default the sqlite store
under the config's root, what ``make demo`` fills, or ``--tracking-uri``; a missing model or alias
is an error that says how to make one) and its version, run and tags are printed. The registered
model's exported folder is downloaded once into ``<state-dir>/models/v<version>``; then uvicorn
starts ``--workers`` processes, each loading the folder (``mmrec.export.load_model``) and serving
the live catalog kept in ``--state-dir`` (default ``<root>/serving/<model>``, or
``<model-dir>.serving``), which survives restarts and is shared by the workers. Serving from the
registry, every worker asks it where the alias points every ``--reload-interval`` seconds and
swaps in a new version without a restart (``deploy.service``): ``python -m deploy.rollback``
and a promotion by the pipeline reach a running service that way.

Nothing here imports Dagster or torch (``--check`` stops after printing the model).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from deploy.registry import RegistryError, describe, fetch_model

DEFAULT_ALIAS = "champion"
DEFAULT_PREFIX = "mmrec"
DEFAULT_PORT = 5001
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/demo.yaml"
CONFIG_ENV = "MMREC_CONFIG"


class ServeError(RuntimeError):
    """The service cannot start: the message says why and what to do."""


__all__ = ["RegistryError", "ServeError", "config_path", "describe", "fetch_model", "main", "resolve_target"]


def config_path(path: str | None = None) -> Path:
    """The pipeline YAML: ``path``, else ``$MMREC_CONFIG``, else ``configs/demo.yaml``; a relative
    path from the working directory when it exists there, else from the project root."""
    p = Path(os.path.expanduser(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG))
    if not p.is_absolute() and not p.exists():
        p = PROJECT_ROOT / p
    return p.resolve()


def default_tracking_uri(root: Path) -> str:
    """The pipeline's sqlite store under ``root`` (as the orchestration layer writes it)."""
    return f"sqlite:///{Path(root).absolute() / 'mlflow' / 'mlflow.db'}"


def resolve_target(config: str | None, domain: str | None, model: str | None, tracking_uri: str | None,
                   prefix: str = DEFAULT_PREFIX) -> tuple[str, str, Path | None]:
    """(tracking URI, registered model name, pipeline root or None) from a pipeline config and/or
    explicit values."""
    if model and tracking_uri:
        return tracking_uri, model, None
    from mmrec.config import load_config

    cfg = load_config(config_path(config))
    uri = tracking_uri or default_tracking_uri(cfg.root)
    if model:
        return uri, model, Path(cfg.root)
    targets = [d.name for d in cfg.targets]
    if domain is None:
        if len(targets) != 1:
            raise ServeError(f"{cfg.config_path} has target domains {targets}: choose one with --domain")
        domain = targets[0]
    if cfg.domain(domain).role != "target":  # unknown domains fail listing the configured ones
        raise ServeError(f"{domain!r} is a {cfg.domain(domain).role} domain of {cfg.config_path}; "
                         f"models are fine-tuned and registered for the targets {targets}")
    return uri, f"{prefix}-{domain}", Path(cfg.root)


def check_port(host: str, port: int) -> None:
    """Fail at once, before loading anything, when ``host:port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server running "
                             "there? choose another --port)") from None


def parse_limits(pairs: list[str]) -> dict[str, int]:
    from mmrec.serving import Limits

    names = sorted(Limits.__dataclass_fields__)
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in names or not value.isdigit():
            raise ServeError(f"--limit {pair!r}: expected NAME=INTEGER with NAME one of {names}")
        out[name] = int(value)
    Limits(**out)
    return out


def add_target_args(p: argparse.ArgumentParser, domain_help: str, alias_help: str) -> None:
    """The options that name a registered model (shared by serve and rollback)."""
    p.add_argument("--config", help="pipeline YAML (default: $MMREC_CONFIG or configs/demo.yaml)")
    p.add_argument("--domain", help=domain_help)
    p.add_argument("--model", help="registered model name (default: <prefix>-<domain>)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="registered model name prefix (default: mmrec)")
    p.add_argument("--alias", default=DEFAULT_ALIAS, help=alias_help)
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: sqlite store under the config root)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.serve", description=__doc__.split("\n\n")[0])
    add_target_args(p, "target domain whose model to serve (default: the config's only target)",
                    "registry alias to serve (default: champion)")
    p.add_argument("--model-dir", help="serve this exported model folder instead of the registry's")
    p.add_argument("--state-dir", help="live catalog folder (default: <root>/serving/<model>, or <model-dir>.serving)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (they share the catalog)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds of work per request before it is answered 503")
    p.add_argument("--faiss-min-items", type=int, default=200_000,
                   help="exported catalogs this large or larger are searched with faiss (IVF), smaller ones exactly")
    p.add_argument("--nprobe", type=int, default=64, help="faiss lists visited per query")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=N",
                   help="override a request limit (mmrec.serving.Limits), e.g. --limit max_k=50")
    p.add_argument("--reload-interval", type=float, default=30.0, metavar="SECONDS",
                   help="how often each worker asks the registry where the alias points; a new version is "
                        "downloaded, loaded and swapped in while the old one keeps answering (0: never; "
                        "registry models only)")
    p.add_argument("--check", action="store_true", help="only find the model, print it and exit")
    args = p.parse_args(argv)
    try:
        if args.reload_interval < 0:
            raise ServeError(f"--reload-interval must be >= 0 seconds, got {args.reload_interval:g}")
        if not args.check:
            check_port(args.host, args.port)
        limits = parse_limits(args.limit) if args.limit else {}  # mmrec.serving imports torch
        if args.model_dir:
            model_dir = Path(args.model_dir).resolve()
            if not (model_dir / "model.json").is_file():
                raise ServeError(f"{model_dir}: not an exported model folder (no model.json)")
            info = {"name": None, "alias": None, "version": None, "run_id": None, "data_version": None}
            watch = None
            state = Path(args.state_dir or f"{model_dir}.serving")
            print(f"model folder {model_dir}", flush=True)
        else:
            uri, model, root = resolve_target(args.config, args.domain, args.model, args.tracking_uri, args.prefix)
            info = describe(uri, model, args.alias)
            tags = ", ".join(f"{k}={v}" for k, v in sorted(info["tags"].items()))
            print(f"models:/{model}@{args.alias} -> version {info['version']} (run {info['run_id']})\n"
                  f"  store: {uri}\n  tags: {tags}", flush=True)
            state = Path(args.state_dir or (root or Path.cwd()) / "serving" / model)
            if args.check:
                return 0
            model_dir = fetch_model(uri, info, state / "models" / f"v{info['version']}")
            watch = {"tracking_uri": uri, "name": model, "alias": args.alias, "interval_s": args.reload_interval,
                     "models_dir": str((state / "models").resolve())} if args.reload_interval > 0 else None
    except (ServeError, RegistryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        return 0
    settings = {"model_dir": str(model_dir), "state_dir": str(state.resolve()), "limits": limits,
                "faiss_min_items": args.faiss_min_items, "nprobe": args.nprobe, "timeout_s": args.timeout,
                "threads": args.threads, "watch": watch,
                "version": {k: info.get(k) for k in ("name", "alias", "version", "run_id", "data_version", "git_commit")}}
    os.environ["MMREC_SERVE_SETTINGS"] = json.dumps(settings)
    print(f"serving on http://{args.host}:{args.port} ({args.workers} worker(s); /docs, /health, /ready, /version, "
          f"POST /recommend); catalog changes in {settings['state_dir']}", flush=True)
    import uvicorn

    uvicorn.run("deploy.service:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                timeout_keep_alive=5, log_level="info", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
