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


def test_the_loop_the_predictor_and_the_http_app_import_without_ray():
    """What a GPU machine with torch and no Ray runs: the training loop (in one process), the
    predictor and the HTTP app."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import dcml.train.loop, dcml.predictor, dcml.http_app, dcml.registry, dcml.tune\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_no_module_imports_itself_back_through_another():
    """No import circles among dcml's modules (imports at module level and in functions)."""
    import ast

    root = REPO / "platform"
    modules = {".".join(p.relative_to(root).with_suffix("").parts) for p in root.rglob("*.py")}
    modules = {m.removesuffix(".__init__") for m in modules}
    edges = {m: set() for m in modules}

    def runtime_nodes(node):  # imports under `if TYPE_CHECKING:` never run
        yield node
        for child in ast.iter_child_nodes(node):
            if not (isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING"):
                yield from runtime_nodes(child)

    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for node in runtime_nodes(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dcml"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges[name].update(t for t in targets if t in modules and t != name)

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    return path
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for m in sorted(modules) if (c := cycle_from(m))]
    assert not cycles, cycles[0]


def test_no_module_is_over_450_lines():
    """A module past that size does several jobs; split it by job (docs/architecture.md)."""
    long = {
        str(p.relative_to(REPO)): n
        for p in (REPO / "platform" / "dcml").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert not long, long
