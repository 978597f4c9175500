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


def test_metric_and_precision_are_checked_when_the_config_loads():
    """A mistyped train.metric failed as a KeyError in a worker after the first epoch (and was
    retried); fp16 on a CPU run failed the same way. Both now stop at load, naming the field and
    what it can be."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.metric=val_auc"])
    assert "train.metric: 'val_auc' is not a validation metric of a binary model" in str(e.value)
    assert "val_roc_auc" in str(e.value) and "val_f1" in str(e.value)
    with pytest.raises(ConfigError, match="val_rmse"):
        load_config(None, ["data.task=regression", "train.metric=val_accuracy"])
    assert load_config(None, ["train.metric=val_loss"]).train.mode == "min"
    with pytest.raises(ConfigError, match="train: precision: fp16 needs a GPU"):
        load_config(None, ["train.precision=fp16"])
    assert load_config(None, ["train.precision=fp16", "train.use_gpu=true"]).train.use_gpu


def test_every_task_metric_can_be_selected():
    import numpy as np

    from dcml.config_sections import TASK_METRICS
    from dcml.train.metrics import task_metrics

    y = np.array([0, 1, 1, 0])
    outputs = {
        "binary": np.array([0.2, 0.7, 0.6, 0.4]),
        "multiclass": np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]]),
        "regression": np.array([0.1, 0.9, 1.2, -0.1]),
    }
    for task, out in outputs.items():
        assert set(TASK_METRICS[task]) == {"loss", *task_metrics(task, y, out)}, task


def test_dcml_submit_refuses_credentials_on_the_job_command_line(capsys):
    """A job's entrypoint is shown in the dashboard and `ray job list`: credentials given with
    --set are refused before anything is submitted (the address answers nothing)."""
    base = ["submit", "configs/breast_cancer.yaml", "--address", "http://127.0.0.1:9"]
    for secret, named in [
        ("storage.storage_options={key: AKIAEXAMPLE, endpoint_url: 'http://s3'}", "key"),
        ("data.storage_options={token: hunter2}", "token"),
        ("serve.auth_token=hunter2", "serve.auth_token_env or serve.auth_token_file"),
    ]:
        assert main([*base, "--set", secret]) == 1
        err = capsys.readouterr().err
        assert named in err and "ray job list" in err
        assert "AKIAEXAMPLE" not in err and "hunter2" not in err


def test_an_empty_token_is_refused():
    with pytest.raises(ConfigError, match="serve.auth_token"):
        load_config(None, ["serve.auth_token=''"])  # would accept a header with no token


def test_an_older_config_with_gate_rounds_still_loads():
    """`data.gate.rounds` is gone (one repair round is all a repair can do): 0 meant check only."""
    assert load_config(None, ["data.gate.rounds=0"]).data.gate.repair == "none"
    assert load_config(None, ["data.gate.rounds=2"]).data.gate.repair == "drop"
    assert "rounds" not in load_config(None, ["data.gate.rounds=1"]).data.gate.model_dump()
    with pytest.raises(ConfigError, match="data.gate: .*rounds .*'two' is not 0 or more"):
        load_config(None, ["data.gate.rounds=two"])


def test_an_address_where_nothing_listens_is_refused_at_once():
    """Ray retries such an address for minutes; dcml names the field after one failed connect."""
    from dcml.cluster import check_reachable

    from .conftest import free_port

    with pytest.raises(RuntimeError, match="cluster.address: no Ray cluster answers at"):
        check_reachable(f"127.0.0.1:{free_port()}", "cluster.address")
    with pytest.raises(RuntimeError, match="RAY_ADDRESS"):
        check_reachable(f"ray://127.0.0.1:{free_port()}", "RAY_ADDRESS")
    check_reachable("auto", "cluster.address")  # Ray's own discovery: not checked here
