"""The repository's shape: the source root, the shipped configs, the CI entry point."""

import platform
import subprocess
import sys

import pytest

from dcml.config import load_config

from .conftest import REPO


def test_platform_folder_is_a_source_root_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()
    assert platform.system()  # the standard library module, not our folder
    # from the repo root too, where Ray puts a job's working dir first on sys.path
    out = subprocess.run(
        [sys.executable, "-c", "import platform, ray; print(platform.system())"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
