"""Where the pipeline config is found: argument, $MMREC_CONFIG, the demo default; cwd, then project root."""

from orchestration.paths import CONFIG_ENV, PROJECT_ROOT, config_path


def test_default_is_the_demo_config_of_the_project(monkeypatch, tmp_path):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # not found in the working directory: taken from the project root
    assert config_path() == PROJECT_ROOT / "configs" / "demo.yaml"


def test_environment_variable_then_argument(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("{}")
    monkeypatch.setenv(CONFIG_ENV, "mine.yaml")
    assert config_path() == tmp_path / "mine.yaml"  # relative and present in the working directory
    assert config_path("configs/real.yaml") == PROJECT_ROOT / "configs" / "real.yaml"


def test_user_home_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_path("~/x.yaml") == tmp_path / "x.yaml"
