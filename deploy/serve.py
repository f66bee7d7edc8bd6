"""Serve a registered mmrec model over HTTP with MLflow's scoring server.

    python -m deploy.serve --config configs/demo.yaml                  # the config's only target
    python -m deploy.serve --config configs/demo.yaml --domain films --port 5001
    python -m deploy.serve --tracking-uri sqlite:////abs/mlflow.db --model mmrec-films --alias champion

The model is ``models:/<model>@<alias>`` in the registry the pipeline wrote: by default the sqlite
store under the config's root (``<root>/mlflow/mlflow.db``, what ``make demo`` fills), or any
``--tracking-uri``. Before starting the server it checks that the alias exists and prints the
version, its run and tags (the quality gate's verdict among them); a missing model is an error
that says how to make one. The server is ``mlflow models serve --env-manager local``: it runs in
this environment (``mmrec`` installed), answers ``GET /ping`` and ``POST /invocations`` with the
payload documented in ``orchestration/mmrec_pyfunc.py``, e.g.

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"history": ["films-i12", "films-i40"]}], "params": {"k": 5}}'

This process is replaced by the server (``exec``), so Ctrl-C and service managers reach it directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_ALIAS = "champion"
DEFAULT_PREFIX = "mmrec"
DEFAULT_PORT = 5001


class ServeError(RuntimeError):
    """The model to serve cannot be found: the message says what to do."""


def resolve_target(config: str | None, domain: str | None, model: str | None, tracking_uri: str | None,
                   prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """(tracking URI, registered model name) from a pipeline config and/or explicit values."""
    if model and tracking_uri:
        return tracking_uri, model
    from mmrec.config import load_config
    from orchestration import mlflow_support as ms
    from orchestration.paths import config_path

    cfg = load_config(config_path(config))
    uri = tracking_uri or ms.default_tracking_uri(cfg.root)
    if model:
        return uri, model
    targets = [d.name for d in cfg.targets]
    if domain is None:
        if len(targets) != 1:
            raise ServeError(f"{cfg.config_path} has target domains {targets}: choose one with --domain")
        domain = targets[0]
    if cfg.domain(domain).role != "target":  # unknown domains fail listing the configured ones
        raise ServeError(f"{domain!r} is a {cfg.domain(domain).role} domain of {cfg.config_path}; "
                         f"models are fine-tuned and registered for the targets {targets}")
    return uri, f"{prefix}-{domain}"


def describe(tracking_uri: str, model: str, alias: str) -> dict:
    """The registered version behind ``model@alias``: version, run id, source and tags."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(model, alias)
    except MlflowException as exc:
        try:
            versions = [m.version for m in client.search_model_versions(f"name='{model}'")]
        except MlflowException:
            versions = []
        listed = ", ".join(str(v) for v in sorted(versions, key=int))
        what = f"versions {listed} exist but none has the alias {alias!r}" if versions else "no such registered model"
        raise ServeError(
            f"cannot serve models:/{model}@{alias} from {tracking_uri}: {what} ({exc.error_code}). "
            "Run the pipeline first (`make demo`, or materialise served_model in the Dagster UI); the "
            "alias is set only when the quality gate passes."
        ) from exc
    return {"name": model, "alias": alias, "version": str(mv.version), "run_id": mv.run_id,
            "source": mv.source, "tags": dict(mv.tags)}


def server_command(model: str, alias: str, host: str, port: int, workers: int, timeout: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{model}@{alias}",
            "--env-manager", "local", "-h", host, "-p", str(port), "-w", str(workers), "-t", str(timeout)]


def server_env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    # MLflow starts the server as `bash -c "exec uvicorn ..."`: this environment's scripts must be on
    # PATH even when it was called as .venv/bin/python without activating the venv
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]])
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri,
                "MLFLOW_DISABLE_TELEMETRY": env.get("MLFLOW_DISABLE_TELEMETRY", "true")})
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="pipeline YAML (default: $MMREC_CONFIG or configs/demo.yaml)")
    p.add_argument("--domain", help="target domain whose model to serve (default: the config's only target)")
    p.add_argument("--model", help="registered model name (default: <prefix>-<domain>)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="registered model name prefix (default: mmrec)")
    p.add_argument("--alias", default=DEFAULT_ALIAS, help="registry alias to serve (default: champion)")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: sqlite store under the config root)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--workers", type=int, default=1, help="server worker processes")
    p.add_argument("--timeout", type=int, default=60, help="seconds per request before the worker is restarted")
    p.add_argument("--check", action="store_true", help="only check that the model exists and print it")
    args = p.parse_args(argv)
    try:
        uri, model = resolve_target(args.config, args.domain, args.model, args.tracking_uri, args.prefix)
        info = describe(uri, model, args.alias)
    except (ServeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tags = ", ".join(f"{k}={v}" for k, v in sorted(info["tags"].items()))
    print(f"models:/{model}@{args.alias} -> version {info['version']} (run {info['run_id']})\n"
          f"  store: {uri}\n  tags: {tags}", flush=True)
    if args.check:
        return 0
    cmd = server_command(model, args.alias, args.host, args.port, args.workers, args.timeout)
    print(f"serving on http://{args.host}:{args.port} (POST /invocations, GET /ping): {' '.join(cmd[1:])}", flush=True)
    os.execve(cmd[0], cmd, server_env(uri))
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
