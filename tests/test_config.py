"""Pipeline config: YAML -> typed sections, validation merged per domain, strict keys, paths."""

from __future__ import annotations

import dataclasses as dc
import textwrap
from pathlib import Path

import pytest

from mmrec.config import ConfigError, PipelineConfig, PreprocessConfig, ValidationConfig, load_config
from mmrec.data.synthetic import DemoConfig
from tests.conftest import REPO

SOURCE = {"format": "tabular", "path": "data/x"}


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / "configs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


LIST_FORM = """\
    root: ..
    artifacts: out/arts
    validation:
      on_error: quarantine
      min_text_share: 0.5
    preprocess:
      min_seq_len: 4
      max_seq_len: 7
    domains:
      - name: books
        role: source
        source: {format: tabular, path: data/books, options: {text: [title]}}
      - name: films
        source: {format: movielens, path: /abs/films}
        validation:
          min_text_share: 0.9
          check_images: false
"""

MAPPING_FORM = """\
    root: ..
    domains:
      books:
        role: source
        source: {format: tabular, path: data/books}
      films:
        role: target
        source: {format: tabular, path: data/films}
        validation: {min_image_share: 0.25}
"""


def test_list_form_loads_domains_sections_and_paths(tmp_path):
    path = _write(tmp_path, LIST_FORM)
    cfg = load_config(path)

    assert cfg.config_path == path.resolve()
    assert cfg.root == tmp_path.resolve()  # `..` from configs/
    assert cfg.artifacts == tmp_path.resolve() / "out" / "arts"
    assert cfg.preprocess == PreprocessConfig(min_seq_len=4, max_seq_len=7)
    assert cfg.preprocess.keep_last == 10
    assert [d.name for d in cfg.domains] == ["books", "films"]
    books, films = cfg.domains
    assert (books.role, films.role) == ("source", "target")  # role defaults to target
    assert books.source.format == "tabular"
    assert books.source.options == {"text": ["title"]}
    assert films.source.options == {}
    assert cfg.demo is None and cfg.demo_path is None


def test_top_level_validation_is_merged_with_domain_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, LIST_FORM))
    books, films = cfg.domains
    # books has no section of its own: the top-level one, other fields at their defaults
    assert books.validation == ValidationConfig(on_error="quarantine", min_text_share=0.5)
    # films overrides one top-level key and one default, keeps the other top-level key
    assert films.validation == ValidationConfig(on_error="quarantine", min_text_share=0.9, check_images=False)


def test_mapping_form_uses_keys_as_names(tmp_path):
    cfg = load_config(_write(tmp_path, MAPPING_FORM))
    assert [d.name for d in cfg.domains] == ["books", "films"]
    assert cfg.domain("books").role == "source"
    assert cfg.domain("films").source.path == "data/films"
    assert cfg.domain("films").validation == ValidationConfig(min_image_share=0.25)
    assert cfg.domain("books").validation == ValidationConfig()
    assert cfg.artifacts == tmp_path.resolve() / "artifacts"  # default artifacts folder
    assert cfg.preprocess == PreprocessConfig()


def test_mapping_form_name_must_match_key(tmp_path):
    same = _write(tmp_path, "domains:\n  books: {name: books, source: {format: t, path: p}}\n", "same.yaml")
    assert load_config(same).domains[0].name == "books"
    other = _write(tmp_path, "domains:\n  books: {name: films, source: {format: t, path: p}}\n")
    with pytest.raises(ConfigError, match=r"domains\.books has a different name: 'films'"):
        load_config(other)


def test_mapping_form_spec_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"domains\.books must be a mapping"):
        load_config(_write(tmp_path, "domains:\n  books: [1, 2]\n"))


def test_domains_of_another_type_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="domains must be a list or a mapping"):
        load_config(_write(tmp_path, "domains: books\n"))
    with pytest.raises(ConfigError, match=r"domains\[0\] must be a mapping"):
        load_config(_write(tmp_path, "domains: [books]\n"))


def test_no_domain_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="at least one domain is required"):
        load_config(_write(tmp_path, "root: .\n"))


def test_root_is_relative_to_the_config_folder_and_resolve_uses_it(tmp_path):
    path = _write(tmp_path, "root: ../proj\nartifacts: a\ndomains: [{name: d, source: {format: t, path: p}}]\n")
    cfg = load_config(path)
    proj = (tmp_path / "proj").resolve()
    assert cfg.root == proj
    assert cfg.artifacts == proj / "a"
    assert cfg.resolve("data/x") == proj / "data" / "x"
    assert cfg.resolve("data/../y") == proj / "y"
    assert cfg.resolve("/abs/z") == Path("/abs/z")  # absolute paths are kept
    assert cfg.artifact_path("raw_catalog", "d") == proj / "a" / "raw_catalog" / "d"


def test_root_defaults_to_the_config_folder(tmp_path):
    cfg = load_config(_write(tmp_path, "domains: [{name: d, source: {format: t, path: p}}]\n"))
    assert cfg.root == (tmp_path / "configs").resolve()


def test_relative_config_path_is_resolved(tmp_path, monkeypatch):
    _write(tmp_path, "root: ..\ndomains: [{name: d, source: {format: t, path: p}}]\n")
    monkeypatch.chdir(tmp_path / "configs")
    cfg = load_config("cfg.yaml")
    assert cfg.config_path == (tmp_path / "configs" / "cfg.yaml").resolve()
    assert cfg.root == tmp_path.resolve()


# -- unknown keys, at every level, name the bad key and list the valid ones
UNKNOWN = {
    "top": ("domains: [{name: d, source: {format: t, path: p}}]\nvalidaton: {}\n",
            r"unknown top-level key\(s\) \['validaton'\]; valid keys: \['artifacts', 'compute', 'demo', 'domains', 'evaluation', "
            r"'features', 'finetune', 'model', 'preprocess', 'preset', 'pretrain', 'root', 'transfer', 'validation'\]"),
    "top-validation": ("validation: {on_eror: fail}\ndomains: [{name: d, source: {format: t, path: p}}]\n",
                       r"validation: unknown key\(s\) \['on_eror'\]; valid keys: \[.*'on_error'.*\]"),
    "preprocess": ("preprocess: {max_len: 3}\ndomains: [{name: d, source: {format: t, path: p}}]\n",
                   r"preprocess: unknown key\(s\) \['max_len'\]; valid keys: \['max_seq_len', 'min_seq_len', 'repeats'\]"),
    "domain": ("domains: [{name: d, rol: source, source: {format: t, path: p}}]\n",
               r"domains\[0\] \(d\): unknown key\(s\) \['rol'\]; valid keys: \['name', 'role', 'source', 'user_fraction', 'validation'\]"),
    "domain-mapping": ("domains: {d: {rol: source, source: {format: t, path: p}}}\n",
                       r"domains\[0\] \(d\): unknown key\(s\) \['rol'\]"),
    "source": ("domains: [{name: d, source: {format: t, path: p, opts: {}}}]\n",
               r"domains\[0\] \(d\)\.source: unknown key\(s\) \['opts'\]; valid keys: \['format', 'options', 'path'\]"),
    "domain-validation": ("domains: [{name: d, source: {format: t, path: p}, validation: {min_txt_share: 1}}]\n",
                          r"domains\[0\] \(d\)\.validation: unknown key\(s\) \['min_txt_share'\]; "
                          r"valid keys: \[.*'min_text_share'.*\]"),
    "demo": ("demo: {n_user: 3}\ndomains: [{name: d, source: {format: t, path: p}}]\n",
             r"demo: DemoConfig: unknown key\(s\) \['n_user'\]; valid keys: \[.*'n_users'.*\]"),
}


@pytest.mark.parametrize("case", list(UNKNOWN))
def test_unknown_keys_are_rejected_with_the_valid_keys(tmp_path, case):
    text, pattern = UNKNOWN[case]
    with pytest.raises(ConfigError, match=pattern):
        load_config(_write(tmp_path, text))


# -- bad values
BAD_VALUES = {
    "on_error": ("validation: {on_error: ignore}\n", r"on_error must be 'fail' or 'quarantine', got 'ignore'"),
    "text-share-above-1": ("validation: {min_text_share: 1.5}\n", r"min_text_share must be in \[0, 1\], got 1.5"),
    "image-share-below-0": ("validation: {min_image_share: -0.1}\n", r"min_image_share must be in \[0, 1\], got -0.1"),
    # one length rule (preprocess.min_seq_len): validation has no minimum of its own any more
    "min-user-interactions": ("validation: {min_user_interactions: 3}\n", r"unknown key\(s\) \['min_user_interactions'\]"),
    "max-user-interactions": ("validation: {max_user_interactions: 2}\n", "max_user_interactions must be >= 3"),
    "max-image-pixels": ("validation: {max_image_pixels: 0}\n", "max_image_pixels must be a positive integer or None, got 0"),
    "repeats": ("preprocess: {repeats: dedup}\n", r"repeats must be one of \['keep', 'drop_consecutive', 'drop_all'\]"),
    "sample-rows": ("validation: {sample_rows: 0}\n", "sample_rows must be >= 1"),
    "min_seq_len": ("preprocess: {min_seq_len: 2}\n", r"min_seq_len must be >= 3 .* got 2"),
    "max_seq_len": ("preprocess: {max_seq_len: 0}\n", r"max_seq_len must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_top_level_values_are_rejected(tmp_path, case):
    text, pattern = BAD_VALUES[case]
    with pytest.raises(ConfigError, match=pattern):
        load_config(_write(tmp_path, text + "domains: [{name: d, source: {format: t, path: p}}]\n"))


def test_bad_value_in_a_domain_override_names_the_domain(tmp_path):
    text = """\
        domains:
          - {name: ok, source: {format: t, path: p}}
          - {name: bad, source: {format: t, path: p}, validation: {min_image_share: 2}}
    """
    with pytest.raises(ConfigError, match=r"domains\[1\] \(bad\)\.validation: min_image_share must be in \[0, 1\]"):
        load_config(_write(tmp_path, text))


def test_bad_top_level_value_fails_even_if_every_domain_overrides_it(tmp_path):
    # the top-level section is checked on its own first, so a domain cannot hide a bad default
    text = """\
        validation: {on_error: ignore}
        domains: [{name: d, source: {format: t, path: p}, validation: {on_error: fail}}]
    """
    with pytest.raises(ConfigError, match=r"cfg.yaml: validation: on_error must be"):
        load_config(_write(tmp_path, text))


def test_duplicate_domain_names_are_rejected(tmp_path):
    text = """\
        domains:
          - {name: a, source: {format: t, path: p}}
          - {name: b, source: {format: t, path: p}}
          - {name: a, source: {format: t, path: q}}
    """
    with pytest.raises(ConfigError, match=r"duplicate domain names: \['a'\]"):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize("role", ["pretrain", "Source", ""])
def test_role_must_be_source_or_target(tmp_path, role):
    text = f"domains: [{{name: d, role: '{role}', source: {{format: t, path: p}}}}]\n"
    with pytest.raises(ConfigError, match=rf"role must be 'source' or 'target', got '{role}'"):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize("name", ["", "a b", "a/b", "../x"])
def test_domain_name_must_be_identifier_like(tmp_path, name):
    text = f"domains: [{{name: '{name}', source: {{format: t, path: p}}}}]\n"
    with pytest.raises(ConfigError, match="domain name must be a simple identifier-like name"):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize("source, pattern", [
    (None, r"\.source: .*missing .*'format'"),
    ("{format: t}", r"\.source: .*missing .*'path'"),
    ("{format: '', path: p}", "source.format is required"),
    ("{format: t, path: ''}", "source.path is required"),
])
def test_source_needs_format_and_path(tmp_path, source, pattern):
    spec = "{name: d}" if source is None else f"{{name: d, source: {source}}}"
    with pytest.raises(ConfigError, match=pattern):
        load_config(_write(tmp_path, f"domains: [{spec}]\n"))


def test_unknown_domain_lookup_lists_the_configured_ones(tmp_path):
    cfg = load_config(_write(tmp_path, MAPPING_FORM))
    with pytest.raises(ConfigError, match=r"unknown domain 'music'; configured domains: \['books', 'films'\]"):
        cfg.domain("music")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "domains: [unclosed\n"))


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(_write(tmp_path, text))


def test_demo_section_becomes_a_demo_config_and_path(tmp_path):
    text = """\
        root: ..
        demo:
          path: raw/demo
          seed: 3
          domains: [a, b]
          n_users: [4, 5]
          n_items: 10
        domains: [{name: a, source: {format: tabular, path: raw/demo/a}}]
    """
    cfg = load_config(_write(tmp_path, text))
    assert isinstance(cfg.demo, DemoConfig)
    assert cfg.demo.seed == 3
    assert cfg.demo.domains == ("a", "b")  # YAML lists become tuples
    assert cfg.demo.n_users == (4, 5)
    assert cfg.demo.n_items == 10
    assert cfg.demo.n_categories == DemoConfig().n_categories  # defaults kept
    assert cfg.demo_path == tmp_path.resolve() / "raw" / "demo"


def test_demo_path_defaults_to_data_demo(tmp_path):
    cfg = load_config(_write(tmp_path, "root: ..\ndemo: {seed: 1}\ndomains: [{name: d, source: {format: t, path: p}}]\n"))
    assert cfg.demo == DemoConfig(seed=1)
    assert cfg.demo_path == tmp_path.resolve() / "data" / "demo"


def test_bad_demo_value_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"demo: .*n_users"):
        load_config(_write(tmp_path, "demo: {n_users: 0}\ndomains: [{name: d, source: {format: t, path: p}}]\n"))


def test_pipeline_config_rejects_duplicates_directly():
    from mmrec.config import DomainConfig, SourceConfig

    d = DomainConfig("a", SourceConfig(**SOURCE))
    with pytest.raises(ValueError, match=r"duplicate domain names: \['a'\]"):
        PipelineConfig(root=Path("/r"), domains=(d, d), artifacts=Path("/r/a"))


def test_non_string_domain_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, "domains: {2024: {source: {format: t, path: p}}}\n"))


@pytest.mark.parametrize("section", ["validation: 5", "preprocess: 5", "demo: 5"])
def test_section_of_the_wrong_type_is_a_config_error(tmp_path, section):
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, f"{section}\ndomains: [{{name: d, source: {{format: t, path: p}}}}]\n"))


# -- the configs shipped in the repository
def test_repo_demo_config_loads():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.root == REPO.resolve()
    assert cfg.artifacts == REPO.resolve() / "artifacts" / "demo"
    assert [(d.name, d.role) for d in cfg.domains] == [("books", "source"), ("music", "source"), ("films", "target")]
    assert all(d.source.format == "tabular" for d in cfg.domains)
    assert cfg.domain("films").source.path == "data/demo/films"
    assert cfg.demo is not None and cfg.demo.domains == ("books", "music", "films")
    assert cfg.demo_path == REPO.resolve() / "data" / "demo"
    assert cfg.domain("books").validation.min_text_share == 0.7
    assert cfg.domain("books").validation.min_image_share == 0.6
    assert cfg.preprocess == PreprocessConfig(min_seq_len=5, max_seq_len=20)


def test_repo_real_config_loads():
    cfg = load_config(REPO / "configs" / "real.yaml")
    assert cfg.root == REPO.resolve()
    assert [(d.name, d.role, d.source.format) for d in cfg.domains] == [
        ("amazon_instrument", "source", "ninerec"),
        ("movielens_100k", "target", "movielens"),
    ]
    assert cfg.demo is None
    movies = cfg.domain("movielens_100k")
    assert movies.validation.min_image_share == 0.9
    assert movies.validation.min_text_share == 0.99
    assert movies.validation.check_images is True  # from the top-level section
    assert cfg.domain("amazon_instrument").validation.min_image_share == 0.0
    assert cfg.resolve(movies.source.path) == (REPO.parent / "shared" / "datasets" / "movielens-100k").resolve()


def test_repo_amazon_target_config_swaps_the_roles_and_shares_the_feature_cache():
    amazon, real = load_config(REPO / "configs" / "amazon.yaml"), load_config(REPO / "configs" / "real.yaml")
    assert [(d.name, d.role) for d in amazon.domains] == [("movielens_100k", "source"), ("amazon_instrument", "target")]
    assert amazon.artifacts == REPO.resolve() / "artifacts" / "amazon" != real.artifacts
    # the frozen encoder outputs of both real domains are computed once, whichever config runs first
    assert amazon.features().cache_dir == real.features().cache_dir
    assert amazon.preprocess == real.preprocess
    assert set(amazon.evaluation().baselines) == {"scratch", "sasrec", "id_tower", "zero_shot"}
    assert amazon.train("finetune").epochs == 40 and amazon.train("finetune").patience == 5


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "experiments").glob("*.yaml"))
                         + sorted((REPO / "configs" / "probes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_pipeline_config_loads(path):
    cfg = load_config(path)
    assert cfg.domains and cfg.model() is not None
    for phase in ("pretrain", "finetune"):  # each phase's sections parse (finetune.objective included)
        assert cfg.train(phase).epochs >= 1 and cfg.model(phase).dim == cfg.model().dim


# -- presets and the model stages' sections
def test_preset_is_merged_underneath_recursively(tmp_path):
    (tmp_path / "configs" / "presets").mkdir(parents=True)
    (tmp_path / "configs" / "presets" / "base.yaml").write_text(
        "model: {dim: 32, item_tower: {name: id}, objective: {nicl_enabled: false}}\nevaluation: {ks: [5, 10]}\n")
    path = _write(tmp_path, "preset: presets/base.yaml\nmodel: {max_len: 7}\n"
                            "domains: [{name: d, source: {format: t, path: p}}]\n")
    cfg = load_config(path)
    assert cfg.sections["model"] == {"dim": 32, "max_len": 7, "item_tower": {"name": "id"}, "objective": {"nicl_enabled": False}}
    assert cfg.evaluation().ks == (5, 10)
    assert cfg.features().cache_dir == "artifacts/feature_cache"


def test_preset_errors(tmp_path):
    with pytest.raises(ConfigError, match="absent.yaml"):
        load_config(_write(tmp_path, "preset: absent.yaml\ndomains: [{name: d, source: {format: t, path: p}}]\n"))
    with pytest.raises(ConfigError, match="unknown baseline"):
        load_config(_write(tmp_path, "evaluation: {baselines: [magic]}\ndomains: [{name: d, source: {format: t, path: p}}]\n")).evaluation()


@pytest.mark.parametrize("preset", ["tiny", "cpu", "pmmrec", "transrec"])
def test_presets_parse_into_typed_configs(tmp_path, preset):
    path = _write(tmp_path, f"preset: {REPO}/configs/presets/{preset}.yaml\ndomains: [{{name: d, source: {{format: t, path: p}}}}]\n")
    cfg = load_config(path)
    model = cfg.model()
    assert model.user_encoder.dim == model.dim and model.user_encoder.max_len == model.max_len
    assert cfg.train("pretrain").epochs >= 1 and cfg.train("finetune").lr > 0
    assert cfg.transfer().part == "whole"
    expected = {"tiny": ("fused", "sasrec"), "cpu": ("fused", "sasrec"), "pmmrec": ("fused", "sasrec"), "transrec": ("mom", "transrec")}
    assert (model.item_tower.name, model.user_encoder.name) == expected[preset]
    if preset == "pmmrec":
        assert model.dim == 768 and model.text_encoder.trainable_layers == 2 and model.fusion.name == "merge_attention"
        assert model.objective.nicl.weight == 0.4 and model.image_encoder.token_grid == "all"
    if preset == "transrec":
        assert model.objective.name == "bce" and model.objective.bce_negatives == 5 and model.max_len == 25
        assert model.user_encoder.ffn_dim == 128 and model.text_encoder.pooling == "nrms"
        assert model.objective.bce_positives == 5 and not model.causal and cfg.preprocess.max_seq_len == 29


def test_repo_configs_have_valid_model_sections():
    for name in ("demo", "real"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.model().item_tower.name == "fused" and cfg.evaluation().gate_metric == "NDCG@10"


def test_with_seed_sets_both_phases_and_moves_the_artifacts(tmp_path):
    cfg = load_config(_write(tmp_path, LIST_FORM + "    pretrain: {seed: 0, epochs: 2}\n    finetune: {seed: 0}\n"))
    assert cfg.with_seed(0) is cfg  # the configured seed: the same run, the same folder
    s1 = cfg.with_seed(1)
    assert s1.artifacts == tmp_path / "out" / "arts-seed1"
    assert s1.sections["pretrain"] == {"seed": 1, "epochs": 2} and s1.sections["finetune"] == {"seed": 1}
    assert s1.train("pretrain").seed == 1 and s1.train("finetune").seed == 1
    assert cfg.sections["pretrain"]["seed"] == 0 and cfg.artifacts == tmp_path / "out" / "arts"  # untouched
    assert s1.with_seed(1) is s1


def test_with_seed_moves_the_artifacts_when_a_phase_uses_the_default_seed(tmp_path):
    cfg = load_config(_write(tmp_path, LIST_FORM + "    pretrain: {seed: 3}\n"))  # finetune: default seed
    assert cfg.with_seed(3).artifacts.name == "arts-seed3"


@pytest.mark.parametrize("seed", [-1, 1.5, "1", True])
def test_with_seed_rejects_what_is_not_a_seed(tmp_path, seed):
    cfg = load_config(_write(tmp_path, LIST_FORM))
    with pytest.raises(ConfigError, match="seed must be a non-negative integer"):
        cfg.with_seed(seed)


def test_domain_user_fraction_is_validated(tmp_path):
    cfg = load_config(_write(tmp_path, "domains: [{name: d, source: {format: t, path: p}, user_fraction: 0.25}]\n"))
    assert cfg.domain("d").user_fraction == 0.25
    assert load_config(_write(tmp_path, "domains: [{name: d, source: {format: t, path: p}}]\n")).domain("d").user_fraction == 1.0
    for bad in ("0", "1.5", "-1", "true"):
        with pytest.raises(ConfigError, match="user_fraction must be in"):
            load_config(_write(tmp_path, f"domains: [{{name: d, source: {{format: t, path: p}}, user_fraction: {bad}}}]\n"))


def test_finetune_objective_overrides_the_model_objective_for_fine_tuning_only(tmp_path):
    cfg = load_config(_write(tmp_path, LIST_FORM + "    model: {item_tower: {name: id}, objective: {name: softmax, nicl_enabled: false, nid_weight: 0.2}}\n"
                             "    finetune: {lr: 0.002, scheduler: cosine, objective: {name: full_softmax}}\n"))
    pre, ft = cfg.model(), cfg.model("finetune")
    assert pre.objective.name == "softmax" and cfg.model("pretrain") == pre
    assert ft.objective.name == "full_softmax" and ft.objective.nid_weight == 0.2  # merged, not replaced
    assert ft.item_tower == pre.item_tower and ft.user_encoder == pre.user_encoder  # shapes unchanged
    tc = cfg.train("finetune")
    assert tc.lr == 0.002 and tc.scheduler == "cosine"  # the training loop never sees the objective
    from mmrec import stages

    assert {n: m.objective.name for n, (m, _, _) in stages._variants(cfg).items()}["model"] == "full_softmax"


def test_finetune_item_tower_adds_item_ids_for_fine_tuning_only_and_never_to_id_baselines(tmp_path):
    cfg = load_config(_write(tmp_path, LIST_FORM + "    model: {item_tower: {name: text, dropout: 0.2}, text_encoder: {}, objective: {nicl_enabled: false}}\n"
                             "    finetune: {item_tower: {item_ids: true}}\n"
                             "    evaluation: {baselines: [scratch, sasrec, id_tower]}\n"))
    assert not cfg.model().item_tower.item_ids and cfg.model("pretrain") == cfg.model()
    ft = cfg.model("finetune").item_tower
    assert ft.item_ids and ft.dropout == 0.2 and ft.name == "text"  # merged, not replaced
    assert cfg.train("finetune").epochs >= 1  # the training loop never sees it
    from mmrec import stages

    towers = {n: m.item_tower for n, (m, _, _) in stages._variants(cfg).items()}
    assert towers["model"].item_ids and towers["scratch"].item_ids
    assert towers["sasrec"].name == towers["id_tower"].name == "id"
    assert not towers["sasrec"].item_ids and not towers["id_tower"].item_ids


def test_finetune_user_encoder_dropout_for_fine_tuning_only(tmp_path):
    """The recipe selected on MovieLens validation (user-encoder dropout 0.5 in fine-tuning only): the
    pretrained model keeps its dropout; the fine-tuned model and the content baselines get the new one;
    the standard ID SASRec keeps its own (``evaluation.sasrec.dropout``)."""
    cfg = load_config(_write(tmp_path, LIST_FORM + "    model: {item_tower: {name: text}, text_encoder: {}, objective: {nicl_enabled: false}}\n"
                             "    finetune: {user_encoder: {dropout: 0.5}}\n"
                             "    evaluation: {baselines: [scratch, sasrec, id_tower], sasrec: {dropout: 0.3}}\n"))
    pre, ft = cfg.model(), cfg.model("finetune")
    assert pre.user_encoder.dropout == 0.1 and ft.user_encoder.dropout == 0.5
    assert dc.replace(ft.user_encoder, dropout=0.1) == pre.user_encoder  # merged: every shape unchanged
    from mmrec import stages

    drop = {n: m.user_encoder.dropout for n, (m, _, _) in stages._variants(cfg).items()}
    assert drop["model"] == drop["scratch"] == drop["id_tower"] == 0.5 and drop["sasrec"] == 0.3


def test_the_content_adaptor_never_reaches_the_id_baselines(tmp_path):
    from mmrec import stages

    def variants(adaptor: str, name: str):
        text = LIST_FORM + ("    model: {item_tower: {name: text" + adaptor + "}, text_encoder: {}, objective: {nicl_enabled: false}}\n"
                            "    evaluation: {baselines: [scratch, sasrec, id_tower]}\n")
        return stages._variants(load_config(_write(tmp_path, text, name)))

    linear, moe = variants("", "linear.yaml"), variants(", adaptor: moe, adaptor_experts: 4", "moe.yaml")
    assert moe["model"][0].item_tower.adaptor == moe["scratch"][0].item_tower.adaptor == "moe"
    assert moe["model"][0].to_dict() != linear["model"][0].to_dict()
    for name in ("sasrec", "id_tower"):  # same model, same run key, whatever adaptor the content towers use
        assert moe[name][0].item_tower.adaptor == "linear"
        assert moe[name][0].to_dict() == linear[name][0].to_dict()


@pytest.mark.parametrize("text, match", [
    ("    pretrain: {objective: {name: full_softmax}}\n", "unknown key.*objective"),
    ("    pretrain: {item_tower: {item_ids: true}}\n", "unknown key.*item_tower"),
    ("    finetune: {item_tower: ids}\n", "must be a mapping"),
    ("    finetune: {objective: {name: nope}}\n", "nope"),
    ("    finetune: {objective: full_softmax}\n", "must be a mapping"),
    ("    finetune: {user_encoder: {n_layers: 3}}\n", "user_encoder may set only .'dropout'.*n_layers"),
    ("    pretrain: {user_encoder: {dropout: 0.5}}\n", "unknown key.*user_encoder"),
])
def test_a_phase_objective_fails_loudly_where_it_cannot_apply(tmp_path, text, match):
    cfg = load_config(_write(tmp_path, LIST_FORM + text))
    with pytest.raises((ConfigError, ValueError), match=match):
        cfg.train("pretrain")
        cfg.model("finetune")


def test_probe_configs_differ_from_real_only_in_what_they_probe():
    """configs/probes/: the reference is configs/real.yaml's recipe as it is; each probe changes one thing
    (benchmarks/valid_gap.py compares their runs on validation)."""
    real = load_config(REPO / "configs" / "real.yaml")

    def recipe(cfg):
        return {k: v for k, v in cfg.sections.items() if k != "evaluation"}, cfg.domains, cfg.preprocess

    base = load_config(REPO / "configs" / "probes" / "real-base.yaml")
    assert recipe(base) == recipe(real) and base.artifacts != real.artifacts
    assert base.evaluation().baselines == () or list(base.evaluation().baselines) == []
    moe = load_config(REPO / "configs" / "probes" / "real-moe.yaml")
    assert moe.model().item_tower.adaptor == "moe" and moe.model("finetune").item_tower.adaptor == "moe"
    assert recipe(moe)[1:] == recipe(real)[1:] and moe.model().dim == real.model().dim
    wide = load_config(REPO / "configs" / "probes" / "real-d128.yaml")
    assert wide.model().dim == 128 and wide.model().item_tower == real.model().item_tower
    slow = load_config(REPO / "configs" / "probes" / "real-d128-lr3e-4.yaml")
    assert slow.model() == wide.model() and slow.model("finetune") == wide.model("finetune")
    for phase in ("pretrain", "finetune"):  # only the learning rate differs from the d = 128 probe
        assert slow.train(phase).lr == 3e-4 and real.train(phase).lr == 1e-3
        assert dc.replace(slow.train(phase), lr=real.train(phase).lr) == real.train(phase)
    longer = load_config(REPO / "configs" / "probes" / "real-pretrain-50.yaml")
    assert longer.train("pretrain").epochs == 50 and real.train("pretrain").epochs == 15
    assert longer.train("pretrain").patience == 5 and real.train("pretrain").patience == 2
    assert dc.replace(longer.train("pretrain"), epochs=15, patience=2) == real.train("pretrain")
    assert recipe(longer)[1:] == recipe(real)[1:] and longer.model() == real.model()
    assert longer.train("finetune") == real.train("finetune") and longer.model("finetune") == real.model("finetune")
    assert len({base.artifacts, moe.artifacts, wide.artifacts, slow.artifacts, longer.artifacts, real.artifacts}) == 6
