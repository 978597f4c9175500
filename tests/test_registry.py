"""The model registry without Ray: versions never overwritten, gated promotion, rollback, CLI."""

import pytest

from dcml import layout, registry
from dcml.cli import main
from dcml.storage import Storage


def add_version(storage: Storage, tmp_path, auc: float) -> registry.ModelVersion:
    ckpt = tmp_path / f"ckpt-{auc}"
    ckpt.mkdir()
    (ckpt / layout.WEIGHTS).write_bytes(b"weights")
    meta = {
        "metrics": {"test_roc_auc": auc},
        "config": {"train": {"metric": "val_roc_auc", "mode": "max"}},
    }
    return registry.register(storage, "m", str(ckpt), meta)


@pytest.fixture
def store(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    versions = [add_version(storage, tmp_path, auc) for auc in (0.90, 0.95, 0.80)]
    assert [v.version for v in versions] == [1, 2, 3]
    return storage


def test_promotion_is_gated_on_the_test_metric_and_rollback_pops(store):
    assert registry.set_alias(store, "m", "production", 1) is None
    assert registry.set_alias(store, "m", "production", 2) == 1  # better: promoted
    with pytest.raises(registry.PromotionRefused, match=r"test_roc_auc 0.8 .* has 0.95"):
        registry.set_alias(store, "m", "production", 3)
    assert registry.resolve_model(store, "m@production").version == 2  # unchanged
    assert registry.set_alias(store, "m", "production", 3, force=True) == 2
    assert registry.rollback(store, "m", "production") == 2
    assert registry.rollback(store, "m", "production") == 1
    with pytest.raises(LookupError, match="no earlier version"):
        registry.rollback(store, "m", "production")
    actions = [
        (h["action"], h["version"]) for h in registry.alias_history(store, "m", "production")
    ]
    assert actions == [
        ("promote", 1),
        ("promote", 2),
        ("promote", 3),
        ("rollback", 2),
        ("rollback", 1),
    ]
    # versions are never overwritten: all three are still there with their own metrics
    assert [
        registry.get_version(store, "m", v).meta["metrics"]["test_roc_auc"] for v in (1, 2, 3)
    ] == [
        0.90,
        0.95,
        0.80,
    ]


def test_models_cli_promote_force_rollback_show(store, capsys):
    at = ["--set", f"storage.root={store.root}"]
    assert main(["models", "promote", "m", "2", *at]) == 0
    assert "m@production -> 2" in capsys.readouterr().out
    assert main(["models", "promote", "m", "3", *at]) == 1
    assert "not promoted (force to promote anyway)" in capsys.readouterr().err
    assert main(["models", "promote", "m", "3", "--force", *at]) == 0
    assert "m@production -> 3 (was 2)" in capsys.readouterr().out
    assert main(["models", "rollback", "m", *at]) == 0
    assert "m@production -> 2 (rolled back)" in capsys.readouterr().out
    assert main(["models", "show", "m@production", *at]) == 0
    shown = capsys.readouterr().out
    assert '"version": 2' in shown and '"production"' in shown
    assert main(["models", "show", "m@staging", *at]) == 1
    assert "has no alias 'staging'" in capsys.readouterr().err
    assert main(["models", "promote", "m", "9", *at]) == 1
    assert "m@9 not found" in capsys.readouterr().err
