"""stlflow.policy.agents is a folder of the policy layer: it may import stl, datasets and policy (and itself), never
envs, control or the CLI. Every import in agents/*.py is read with ast, module level and inside functions."""

import ast
from pathlib import Path

import stlflow.policy.agents

ALLOWED = {"agents", "stl", "datasets", "policy"}
AGENTS_DIR = Path(stlflow.policy.agents.__file__).parent


def _stlflow_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.append((node.lineno, "stlflow.policy.agents"))  # relative: inside the package
            elif node.module == "stlflow":
                out += [(node.lineno, f"stlflow.{a.name}") for a in node.names]
            elif node.module:
                out.append((node.lineno, node.module))
    return [(line, m) for line, m in out if m == "stlflow" or m.startswith("stlflow.")]


def test_agents_import_only_stl_datasets_policy():
    files = sorted(AGENTS_DIR.glob("*.py"))
    assert {"base.py", "ofql.py", "bc_flow.py", "td3bc.py"} <= {f.name for f in files}
    bad = []
    for f in files:
        for line, module in _stlflow_imports(f):
            parts = module.split(".")
            if len(parts) < 2 or parts[1] not in ALLOWED:
                bad.append(f"{f.name}:{line} imports {module}")
    assert not bad, bad


def test_the_check_sees_a_forbidden_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def g():\n    from stlflow.control.workers import limit_threads\nimport stlflow.envs\n")
    assert sorted(m for _, m in _stlflow_imports(f)) == ["stlflow.control.workers", "stlflow.envs"]
