"""``mmrec <stage>``: one command per pipeline stage, plus demo-data generation and statistics.

Every command takes ``--config`` (a YAML file under ``configs/``) and calls the same stage
functions as ``dvc.yaml`` and the Dagster assets (``mmrec.stages``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from mmrec import stages

DEFAULT_CONFIG = "configs/demo.yaml"


def _stats_table(rows: list[tuple[str, dict]]) -> str:
    """Per-domain statistics; with ``after_preprocess`` also the kept users/items/interactions."""
    head = ("domain", "users", "items", "interactions", "text", "image", "text+image", "text only", "image only")
    kept = all("after_preprocess" in s for _, s in rows)
    if kept:
        head += ("kept users", "kept items", "kept inter.")
    lines = [head]
    for name, s in rows:
        row = (
            name, str(s["users"]), str(s["items"]), str(s["interactions"]),
            f"{100 * s['share_text']:.1f}%", f"{100 * s['share_image']:.1f}%", f"{100 * s['share_both']:.1f}%",
            str(s["text_only"]), str(s["image_only"]),
        )
        if kept:
            a = s["after_preprocess"]
            row += (str(a["users"]), str(a["items"]), str(a["interactions"]))
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(lines[0]), fmt(tuple("-" * w for w in widths)), *map(fmt, lines[1:])])


def _run_stage(cfg, stage: str, names: list[str] | None, quiet: bool) -> int:
    rows = []
    for name in stages.stage_domains(cfg, stage, names):
        t0 = time.perf_counter()
        fn = stages.STAGE_FUNCTIONS[stage]
        res = fn(cfg, progress=not quiet) if name is None else fn(cfg, name, progress=not quiet)
        print(f"[{stage}] {res.domain}: wrote {res.path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        rows.append((res.domain, res.metadata))
        if stage == "evaluation":
            print(stages.metrics_table(res.metadata))
            gate = res.metadata["gate"]
            print(f"quality gate ({gate['metric']}, margin {gate['margin']}): {'passed' if gate['passed'] else 'FAILED'}")
        elif stage in ("pretrained_model", "finetuned_model"):
            variants = res.metadata.get("variants") or {"model": res.metadata}
            for v, info in variants.items():
                m = info["valid_metrics"]
                print(f"{res.domain} {v}: best valid NDCG@10 {m.get('NDCG@10', float('nan')):.4f} "
                      f"HR@10 {m.get('HR@10', float('nan')):.4f} at step {info['best_step']} of {info['steps']}")
        elif stage == "item_features":
            for mod, st in res.metadata["modalities"].items():
                print(f"{res.domain} {mod}: {st['computed']} encoded, {st['hits']} from cache, {st['absent']} without {mod}")
    if stage in ("raw_catalog", "validated_catalog"):
        print(_stats_table(rows))
    return 0


def _run_distributed(cfg, stage: str, names: list[str] | None, quiet: bool) -> int:
    """One rank of a torchrun launch (``--nproc``): join the group, run the stage, leave; rank 0
    reports, the others stay quiet."""
    from mmrec import distributed

    distributed.init_from_env(cfg.device())
    try:
        rank = distributed.world()[0]
        if rank == 0:
            _run_stage(cfg, stage, names, quiet)
        else:
            for name in stages.stage_domains(cfg, stage, names):
                fn = stages.STAGE_FUNCTIONS[stage]
                fn(cfg, progress=False) if name is None else fn(cfg, name, progress=False)
    finally:
        distributed.shutdown()
    return 0


def _compare(cfg, args) -> int:
    """``mmrec compare``: RecBole SASRec per seed, then one table per target domain. Not a stage:
    nothing here is reached by ``mmrec <stage>`` (tests/test_dvc.py), so dvc.yaml never depends on it."""
    from mmrec import recbole

    try:
        return _compare_tables(cfg, args, recbole)
    except recbole.RecBoleError as exc:
        print(f"mmrec compare: error: {exc}", file=sys.stderr)
        return 2


def _compare_tables(cfg, args, recbole) -> int:
    from mmrec.compare import paired_gaps

    # no --seed: the config as it is (its own artifacts folder), as `mmrec run` without --seed
    cfgs = {s: cfg.with_seed(s) for s in args.seeds} if args.seeds else {cfg.train("finetune").seed: cfg}
    seeds = list(cfgs)
    kw = {"threads": args.threads or 1, "quiet": args.quiet}
    if args.recbole_python:
        kw["python"] = args.recbole_python
    for name in stages.stage_domains(cfg, "evaluation", args.domain):
        runs = {}
        for seed in seeds:
            t0 = time.perf_counter()
            runs[seed] = recbole.run(cfgs[seed], name, **kw)
            print(f"{name} seed {seed}: RecBole SASRec ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        m = "NDCG@10"
        print(f"## {name}: RecBole 1.2.1 SASRec on mmrec's split, seeds {seeds}")
        print("| seed | epochs | s/epoch | valid NDCG@10 (mmrec protocol) | test HR@10 | test NDCG@10 | "
              "test NDCG@10 (RecBole's own protocol) |")
        print("|---|---|---|---|---|---|---|")
        for seed, r in runs.items():
            rb = r["recbole"]
            print(f"| {seed} | {rb['epochs_trained']} | {rb['seconds_per_epoch']:.2f} | {100 * r['valid'][m]:.2f} | "
                  f"{100 * r['test']['HR@10']:.2f} | {100 * r['test'][m]:.2f} | {100 * rb['test_recbole_protocol']['ndcg@10']:.2f} |")
        try:
            ours = {seed: stages.read_ranks(cfgs[seed], name) for seed in seeds}
        except FileNotFoundError as exc:
            print(f"(no paired comparison: {exc})\n")
            continue
        theirs = {seed: recbole.read_ranks(cfgs[seed], name) for seed in seeds}
        ranks = {n: [ours[s][n] for s in seeds] for n in ours[seeds[0]]}
        ranks[recbole.NAME] = [theirs[s][recbole.NAME] for s in seeds]
        print(f"\nPaired over {len(ranks[recbole.NAME][0])} test users ({cfg.evaluation().history} history), 95 % "
              "bootstrap interval, seeds averaged per user:")
        for ref in [n for n in ranks if n != recbole.NAME]:
            g = paired_gaps({ref: ranks[ref], recbole.NAME: ranks[recbole.NAME]}, ref, m)[0]
            print(f"- {g.line()}")
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmrec", description="ID-free transferable multimodal recommendation pipeline.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seed_help = ("pretraining and fine-tuning seed; unless it is the configured one, artifacts go to "
                 "<artifacts>-seed<N> (runs of several seeds side by side)")

    def add(name: str, help: str, domains: bool = True, seed: bool = True):  # noqa: A002
        sp = sub.add_parser(name, help=help, description=help, aliases=[name.replace("_", "-")] if "_" in name else [])
        sp.add_argument("--config", default=DEFAULT_CONFIG, help=f"pipeline YAML (default {DEFAULT_CONFIG})")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--threads", type=int, help="torch CPU threads (small models run faster on 1; default: "
                        "compute.threads, else torch's)")
        sp.add_argument("--device", help="where torch runs: auto, cpu, cuda or cuda:N (default: compute.device)")
        if domains:
            sp.add_argument("--domain", action="append", help="domain to run (repeatable; default: all)")
        if seed:
            sp.add_argument("--seed", type=int, help=seed_help)
        sp.set_defaults(command=name)
        return sp

    add("demo_data", "Generate the built-in synthetic multi-domain demo data into the raw data folder.", domains=False, seed=False)
    add("raw_catalog", "Import each domain's raw data into the catalog contract.")
    add("validated_catalog", "Validate each raw catalog (Great Expectations) and preprocess it as in the papers.")
    nproc_help = ("run on N processes under torchrun: training with DistributedDataParallel (gloo on CPU, nccl on "
                  "GPU; the same global batch, split across them), item_features as N cache shards and one merge; "
                  "default 1: no process group")
    for sp in (add("item_features", "Compute (or read from the feature cache) the frozen encoder outputs of every item."),
               add("pretrained_model", "Pretrain the recommender on all source domains together.", domains=False),
               add("finetuned_model", "Fine-tune the pretrained model on each target domain, with the configured baselines.")):
        sp.add_argument("--nproc", type=int, default=1, help=nproc_help)
    add("evaluation", "Full-ranking test metrics of the fine-tuned model, its baselines and zero-shot.")
    add("run", "Run every stage in order for the selected domains.")
    add("stats", "Print the statistics recorded by validated_catalog.")
    m = add("metrics", "Print the test metrics tables recorded by evaluation (target domains); with several "
            "--seed, the mean and standard deviation over those runs.", seed=False)
    m.add_argument("--seed", dest="seeds", type=int, action="append", help=seed_help + "; repeat to aggregate runs")
    c = add("compare", "Train RecBole's SASRec on exactly each target domain's split (its own venv, "
            "`make compare` builds it), rank it with mmrec's protocol and print it next to mmrec's models with paired "
            "intervals over users (after `evaluation` for the same seeds).", seed=False)
    c.add_argument("--seed", dest="seeds", type=int, action="append", help=seed_help + "; repeatable")
    c.add_argument("--recbole-python", help="python of RecBole's environment (default .venv-recbole/bin/python)")
    return p


def _without_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        print(f"mmrec {args.command}: error: --nproc must be >= 1, got {nproc}", file=sys.stderr)
        return 2
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # the launcher: torchrun runs this command N times
        from mmrec.launch import launch

        return launch(nproc, ["mmrec", *_without_nproc(argv)])
    from mmrec.config import ConfigError, load_config
    from mmrec.data.catalog import CatalogError
    from mmrec.data.validation import ValidationError

    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the weight-loading bar of transformers
    try:
        cfg = load_config(args.config)
        if args.device is not None:
            cfg = cfg.with_device(args.device)
            cfg.device()  # a GPU this machine does not have fails here, before any stage runs
        threads = args.threads or cfg.compute.threads
        if threads:
            import torch

            torch.set_num_threads(threads)
        if getattr(args, "seed", None) is not None:
            cfg = cfg.with_seed(args.seed)
        if args.command == "demo_data":
            from mmrec.data.synthetic import generate_demo

            if cfg.demo is None:
                raise ConfigError(f"{args.config}: no 'demo' section")
            t0 = time.perf_counter()
            domains = generate_demo(cfg.demo, cfg.demo_path, progress=not args.quiet)
            for name, d in domains.items():
                print(f"{name}: {d.n_users} users, {d.n_items} items, {d.n_interactions} interactions, modalities {d.modality_counts}")
            print(f"wrote {cfg.demo_path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            return 0
        if args.command == "stats":
            names = [cfg.domain(n).name for n in args.domain] if args.domain else [d.name for d in cfg.domains]
            print(_stats_table([(n, stages.read_stats(cfg, n)) for n in names]))
            return 0
        if args.command == "compare":
            return _compare(cfg, args)
        if args.command == "metrics" and args.seeds and len(args.seeds) > 1:
            for name in stages.stage_domains(cfg, "evaluation", args.domain):
                runs = {seed: stages.read_metrics(cfg.with_seed(seed), name) for seed in args.seeds}
                print(stages.metrics_summary_table(runs))
                ranks = {seed: stages.read_ranks(cfg.with_seed(seed), name) for seed in args.seeds}
                print("Paired over users (95 % bootstrap interval; seeds averaged per user):")
                print("\n".join(f"- {line}" for line in stages.paired_gap_lines(ranks)) + "\n")
            return 0
        if args.command == "metrics":
            if args.seeds:
                cfg = cfg.with_seed(args.seeds[0])
            for name in stages.stage_domains(cfg, "evaluation", args.domain):
                res = stages.read_metrics(cfg, name)
                print(stages.metrics_table(res))
                gate = res["gate"]
                print(f"quality gate ({gate['metric']} on the {gate.get('split', 'test')} split vs {gate['against']}, "
                      f"margin {gate['margin']}): {'passed' if gate['passed'] else 'FAILED'}")
                print("\n".join(f"- {line}" for line in stages.paired_gap_lines({0: stages.read_ranks(cfg, name)})) + "\n")
            return 0
        todo = stages.STAGES if args.command == "run" else (args.command,)
        if args.command in ("item_features", "pretrained_model", "finetuned_model") and os.environ.get("WORLD_SIZE", "1") != "1":
            return _run_distributed(cfg, args.command, getattr(args, "domain", None), args.quiet)
        for stage in todo:
            _run_stage(cfg, stage, getattr(args, "domain", None), args.quiet)
        return 0
    except (ConfigError, CatalogError, ValidationError, FileNotFoundError, ValueError) as exc:
        print(f"mmrec {args.command}: error: {exc}", file=sys.stderr)
        return 2

