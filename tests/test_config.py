"""Config loading: bases, overrides, types, and every error message."""

import textwrap

import pytest

from xmodaler_accel.config import ConfigError, load_config, save_config


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def recipe(tmp_path):
    return write(
        tmp_path / "recipe.yaml",
        """
        output_dir: out/recipe
        train: {max_steps: 500, batch_size: 16}
        optim: {lr: 0.0005}
        model: {d_model: 128, layers: 2, tied: true}
        scst: {samples_per_image: 5, baseline: greedy}
        """,
    )


def test_root_file_over_defaults_with_attribute_access(recipe):
    cfg = load_config(recipe)
    assert cfg.train.max_steps == 500
    assert cfg.train.grad_accum is None  # from the defaults: the launcher's, else 1 (setup)
    assert cfg.model.d_model == 128 and cfg.model.weights == ""
    assert cfg.scst.baseline == "greedy"


def test_base_chain_several_levels_relative_paths(tmp_path, recipe):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "deep").mkdir()
    write(tmp_path / "exp" / "mid.yaml", "_base_: ../recipe.yaml\ntrain: {max_steps: 800}\n")
    child = write(
        tmp_path / "exp" / "deep" / "child.yaml",
        "_base_: ../mid.yaml\noptim: {lr: 0.001}\nmodel: {layers: 6}\n",
    )
    cfg = load_config(child)
    assert (cfg.train.max_steps, cfg.train.batch_size) == (800, 16)
    assert (cfg.optim.lr, cfg.model.layers, cfg.model.d_model) == (0.001, 6, 128)


def test_later_base_wins(tmp_path, recipe):
    write(tmp_path / "b.yaml", "_base_: recipe.yaml\ntrain: {max_steps: 7}\n")
    write(tmp_path / "c.yaml", "_base_: recipe.yaml\ntrain: {max_steps: 9}\n")
    cfg = load_config(write(tmp_path / "d.yaml", "_base_: [b.yaml, c.yaml]\n"))
    assert cfg.train.max_steps == 9


def test_dotted_overrides_typed_by_existing_value(recipe):
    cfg = load_config(
        recipe,
        [
            "train.max_steps=100",
            "optim.lr=1e-4",
            "model.tied=false",
            "optim.betas=[0.8,0.9]",
            "output_dir=123",
            "optim.weight_decay=1",
        ],
    )
    assert cfg.train.max_steps == 100 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == 1e-4
    assert cfg.model.tied is False
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.output_dir == "123"  # strings stay strings
    assert cfg.optim.weight_decay == 1.0 and isinstance(cfg.optim.weight_decay, float)


def test_unknown_override_names_key_and_suggests(recipe):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.max_step'; did you mean 'train.max_steps'"
    ):
        load_config(recipe, ["train.max_step=3"])


def test_unknown_key_in_child_file_names_file_and_suggests(tmp_path, recipe):
    child = write(tmp_path / "child.yaml", "_base_: recipe.yaml\ntrain: {bacth_size: 3}\n")
    with pytest.raises(
        ConfigError,
        match=r"child.yaml: unknown config key 'train.bacth_size'; did you mean 'train.batch_size'",
    ):
        load_config(child)


def test_unknown_key_in_core_section_of_root_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "checkpoint: {evry: 5}\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'checkpoint.evry'; did you mean 'checkpoint.every'"
    ):
        load_config(bad)


def test_top_level_typo_in_root_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "trian: {max_steps: 5}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'"):
        load_config(bad)


def test_wrong_type_names_key_expected_and_got(recipe, tmp_path):
    with pytest.raises(
        ConfigError, match=r"config key 'train.max_steps': expected int, got str \('many'\)"
    ):
        load_config(recipe, ["train.max_steps=many"])
    bad = write(tmp_path / "bad.yaml", "_base_: recipe.yaml\nmodel: {tied: 3}\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: config key 'model.tied': expected bool, got int \(3\)"
    ):
        load_config(bad)


def test_missing_config_file_names_path(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nothere.yaml"):
        load_config(tmp_path / "nothere.yaml")


def test_missing_base_names_path(tmp_path):
    child = write(tmp_path / "child.yaml", "_base_: gone/base.yaml\n")
    with pytest.raises(ConfigError, match=r"child.yaml: _base_ file not found: .*gone/base.yaml"):
        load_config(child)


def test_base_cycle_is_reported_with_chain(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(
        ConfigError, match=r"cycle in _base_ includes: .*a.yaml -> .*b.yaml -> .*a.yaml"
    ):
        load_config(tmp_path / "a.yaml")


def test_override_without_equals_sign(recipe):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(recipe, ["train.max_steps"])


def test_resolved_config_reruns_as_is(tmp_path, recipe):
    cfg = load_config(recipe, ["train.max_steps=42", "model.layers=3"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert "_base_" not in (tmp_path / "run" / "config.yaml").read_text()
