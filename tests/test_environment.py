"""The pinned stack imports and works together; `pip check` misses the two real conflicts
(torchvision vs the CPU torch wheel, and the ANTLR runtime DVC and Dagster disagree on)."""

import importlib.metadata as md
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_pinned_torch_and_torchvision_work_together():
    import torch
    import torchvision

    assert torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")
    # the symptom of the broken combination is `operator torchvision::nms does not exist`
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_timm_and_transformers_build_models_offline():
    import timm
    import transformers

    m = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    assert m.num_features == 1280
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    assert transformers.AutoModel.from_config(cfg).config.hidden_size == 16


@pytest.mark.parametrize("module", ["great_expectations", "dagster", "dagster_webserver", "mlflow", "dvc.api", "polars", "lmdb"])
def test_stack_imports(module):
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, check=True, capture_output=True)


def test_antlr_runtime_is_dvc_s_and_dagster_selections_are_object_based():
    # DVC (hydra/omegaconf) pins antlr4 4.9; Dagster's *string* selections need 4.13 and crash under
    # 4.9 (dagster issue #27487). We keep DVC's pin: orchestration builds selections from objects.
    assert md.version("antlr4-python3-runtime").startswith("4.9.")
    code = (
        "import dagster as dg\n"
        "@dg.asset\ndef a(): return 1\n"
        "@dg.asset\ndef b(a): return a + 1\n"
        "job = dg.define_asset_job('j', selection=dg.AssetSelection.assets(a, b))\n"
        "defs = dg.Definitions(assets=[a, b], jobs=[job])\n"
        "res = defs.resolve_job_def('j').execute_in_process()\n"
        "assert res.success and res.output_for_node('b') == 2\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)


def test_pip_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
