"""Move the ``champion`` alias back to the previous champion, in one command.

    python -m deploy.rollback --config configs/demo.yaml            # mmrec-<the only target>
    python -m deploy.rollback --config configs/demo.yaml --domain films
    python -m deploy.rollback --tracking-uri sqlite:////abs/mlflow.db --model mmrec-films

The pipeline records the champion a promotion replaced (alias ``previous_champion`` and the new
version's tag ``previous_champion``, ``mmrec.promotion.record``); this points ``champion`` back at
it, steps ``previous_champion`` one further back (or removes it) and tags the demoted version
``rolled_back`` / ``rolled_back_to``. A running service (``python -m deploy.serve``) serves the
restored version after its next registry check (``--reload-interval``), without a restart.
``--dry-run`` prints what would move.
"""

from __future__ import annotations

import argparse
import sys

from deploy.registry import MlflowRegistry, RegistryError
from deploy.serve import ServeError, add_target_args, resolve_target


def main(argv: list[str] | None = None) -> int:
    from mmrec.promotion import PromotionError, previous_alias, rollback

    p = argparse.ArgumentParser(prog="python -m deploy.rollback", description=__doc__.split("\n\n")[0])
    add_target_args(p, "target domain (default: the config's only target)", "the alias to move back (default: champion)")
    p.add_argument("--dry-run", action="store_true", help="print what would move and change nothing")
    args = p.parse_args(argv)
    try:
        uri, name, _ = resolve_target(args.config, args.domain, args.model, args.tracking_uri, args.prefix)
        registry = MlflowRegistry(uri)
        if args.dry_run:
            current = registry.alias_version(name, args.alias)
            target = registry.alias_version(name, previous_alias(args.alias))
            print(f"models:/{name}@{args.alias}: version {current} would go back to {target}"
                  if target else f"models:/{name}@{args.alias}: version {current}; nothing to roll back to")
            return 0 if target else 2
        done = rollback(registry, name, args.alias)
    except (ServeError, RegistryError, PromotionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    further = f"{previous_alias(args.alias)} -> version {done.previous}" if done.previous else \
        f"no earlier {args.alias} recorded"
    print(f"models:/{name}@{args.alias}: version {done.from_version} -> {done.to_version} ({further}); "
          f"a running service picks it up at its next registry check", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
