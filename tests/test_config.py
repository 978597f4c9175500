"""Config validation: defaults, overrides, and errors that name the field."""

import pytest

from dcml.cli import main
from dcml.config import ConfigError, load_config


def test_defaults_and_dotted_overrides(tmp_path):
    cfg = load_config(
        None, ["train.epochs=3", "model.depth=0", "tune.space={model.depth: {grid: [0, 1]}}"]
    )
    assert cfg.train.epochs == 3
    assert cfg.model.depth == 0
    assert cfg.tune.space == {"model.depth": {"grid": [0, 1]}}
    assert cfg.serve.host == "127.0.0.1"  # loopback unless told otherwise


def test_yaml_file_with_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\n  epochs: 7\n  lr: 0.01\n")
    cfg = load_config(path, ["train.epochs=2"])
    assert (cfg.name, cfg.train.epochs, cfg.train.lr) == ("x", 2, 0.01)


def test_unknown_field_names_field_and_allowed_fields():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.epochz=3"])
    msg = str(e.value)
    assert "train.epochz: unknown field" in msg
    assert "did you mean 'epochs'" in msg
    assert "batch_size" in msg  # lists what is allowed


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.epochs=many", "train.optimizer=adagrad", "serve.port=0"])
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "train.epochs" in msg
    assert "train.optimizer" in msg and "'adamw'" in msg  # the allowed values
    assert "serve.port" in msg


def test_section_level_rules():
    with pytest.raises(ConfigError, match="split fractions"):
        load_config(None, ["data.split={train: 0.5, validation: 0.1, test: 0.1}"])
    with pytest.raises(ConfigError, match="tune: space.train.lr: loguniform low must be below"):
        load_config(None, ["tune.space={train.lr: {loguniform: [0.1, 0.01]}}"])


def test_search_space_names_the_field_and_what_is_wrong():
    def problem(space: str, *more: str) -> str:
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"tune.space={space}", *more])
        return str(e.value)

    assert "tune.space.train.lrr: train has no field 'lrr' (did you mean 'lr'?)" in problem(
        "{train.lrr: {choice: [1]}}"
    )
    assert "tune.space.train: is a section" in problem("{train: {choice: [1]}}")
    assert "a sweep varies the model" in problem("{storage.root: {choice: [a, b]}}")
    assert "epoch budget is tune.epochs" in problem("{train.epochs: {choice: [4, 8]}}")
    assert "max_replica" in problem("{}", "serve.autoscaling={max_replica: 3}")  # no typo passes
    assert "space.train.lr: loguniform needs low > 0" in problem("{train.lr: {loguniform: [0, 1]}}")
    assert "give exactly one of loguniform" in problem("{train.lr: {between: [1, 2]}}")
    assert "randint takes integers" in problem("{train.batch_size: {randint: [8.5, 64]}}")
    assert "searcher grid needs choice or grid values, not loguniform" in problem(
        "{train.lr: {loguniform: [0.001, 0.1]}}", "tune.searcher=grid"
    )
    assert "searcher optuna cannot take grid" in problem(
        "{model.depth: {grid: [1, 2]}}", "tune.searcher=optuna"
    )
    assert "PBT copies weights between trials" in problem(
        "{model.depth: {choice: [1, 2]}}", "tune.scheduler=pbt"
    )
    assert "train.cache: PBT trials cache their split" in problem(
        "{train.lr: {uniform: [0.001, 0.01]}}", "tune.scheduler=pbt", "train.cache=none"
    )
    ok = load_config(None, ["tune.space={model.dropout: {uniform: [0, 0.3]}}"])
    assert ok.tune.space == {"model.dropout": {"uniform": [0, 0.3]}}


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["preprocess", "--set", "data.sorce=x"]) == 2
    err = capsys.readouterr().err
    assert "data.sorce: unknown field" in err and "did you mean 'source'" in err
    assert "Traceback" not in err
