"""Where the pipeline config is, without importing Dagster (``deploy.serve`` starts faster)."""

import os
from pathlib import Path
from typing import Optional

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/demo.yaml"
CONFIG_ENV = "MMREC_CONFIG"


def config_path(path: Optional[str] = None) -> Path:
    """The pipeline YAML: ``path``, else ``$MMREC_CONFIG``, else ``configs/demo.yaml``. A relative
    path is taken from the working directory when it exists there, else from the project root
    (``dagster dev`` and the UI may run from elsewhere)."""
    p = Path(os.path.expanduser(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG))
    if not p.is_absolute() and not p.exists():
        p = PROJECT_ROOT / p
    return p.resolve()
