"""Weekly retraining: every target domain's fine-tuning, evaluation and registration.

The cron expression comes from ``$MMREC_RETRAIN_CRON`` (default Monday 03:00 UTC). A rerun on
unchanged data and config resumes the finished training runs (the stages key them by a hash of
config and inputs), so it costs little and registers the same model again.
"""

import os
from typing import Optional

import dagster as dg

RETRAIN_CRON_ENV = "MMREC_RETRAIN_CRON"
DEFAULT_RETRAIN_CRON = "0 3 * * 1"


def retrain_cron(cron: Optional[str] = None) -> str:
    return cron or os.environ.get(RETRAIN_CRON_ENV) or DEFAULT_RETRAIN_CRON


def build_retraining_schedule(job, cron: Optional[str] = None) -> dg.ScheduleDefinition:
    """One run of ``job`` per target partition at every tick of ``cron``."""

    @dg.schedule(name="retraining_schedule", cron_schedule=retrain_cron(cron), job=job,
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=f"Retrain, evaluate and register every target domain (cron from ${RETRAIN_CRON_ENV}).")
    def retraining_schedule(context: dg.ScheduleEvaluationContext):
        when = context.scheduled_execution_time
        stamp = when.isoformat() if when is not None else "now"
        return [dg.RunRequest(run_key=f"{domain}@{stamp}", partition_key=domain, tags={"mmrec/trigger": "schedule"})
                for domain in job.partitions_def.get_partition_keys()]

    return retraining_schedule
