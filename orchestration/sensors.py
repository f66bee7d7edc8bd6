"""A sensor that starts the catalog job (import, validation, features) for each domain whose raw
data changed: new files landed in its source folder, or ``dvc checkout`` / ``dvc pull`` replaced
them with another data version.

A domain's fingerprint is the number, total size and latest modification time of the files under
its ``source.path``; the cursor keeps the last fingerprint seen per domain. The first evaluation
sees every domain as new.
"""

import json
import os
from pathlib import Path
from typing import Optional

import dagster as dg

from orchestration.resources import PipelineResource


def fingerprint(path: Path) -> Optional[str]:
    """``"<files>:<bytes>:<latest mtime ns>"`` of the files under ``path`` (None if there are none)."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [Path(d) / f for d, _, names in os.walk(path) for f in names]
    else:
        return None
    n = size = latest = 0
    for f in files:
        try:
            st = f.stat()
        except FileNotFoundError:  # removed while walking
            continue
        n, size, latest = n + 1, size + st.st_size, max(latest, st.st_mtime_ns)
    return f"{n}:{size}:{latest}" if n else None


def build_raw_data_sensor(job) -> dg.SensorDefinition:
    @dg.sensor(name="raw_data_sensor", job=job, minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="Runs the catalog job for each domain whose raw data folder changed.")
    def raw_data_sensor(context: dg.SensorEvaluationContext, pipeline: PipelineResource) -> dg.SensorResult:
        cfg = pipeline.load()
        keys = set(job.partitions_def.get_partition_keys())
        seen = json.loads(context.cursor) if context.cursor else {}
        now = {d.name: fingerprint(cfg.resolve(d.source.path)) for d in cfg.domains if d.name in keys}
        changed = sorted(name for name, fp in now.items() if fp is not None and seen.get(name) != fp)
        cursor = json.dumps({**seen, **{name: fp for name, fp in now.items() if fp is not None}}, sort_keys=True)
        if not changed:
            return dg.SensorResult(skip_reason=dg.SkipReason("no raw data changed"), cursor=cursor)
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=f"{name}:{now[name]}", partition_key=name,
                                        tags={"mmrec/trigger": "raw_data"}) for name in changed],
            cursor=cursor)

    return raw_data_sensor
