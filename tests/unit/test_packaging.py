"""House rules that keep serving light: no torch in the serving install or its imports."""

import subprocess
import sys
import tomllib

from tests.helpers import ROOT


def test_serving_dependencies_exclude_torch_and_extras_are_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith(("torch", "timm"))]
    assert {"train", "gpu", "dev"} <= set(project["optional-dependencies"])
    assert project["scripts"]["cxr-triage"] == "cxr_triage.cli:app"


def test_serving_modules_do_not_import_torch() -> None:
    code = (
        "import sys, cxr_triage.serving.app, cxr_triage.cli, cxr_triage.imaging, cxr_triage.engines;"
        "bad = [m for m in ('torch', 'timm', 'cxr_triage.train') if m in sys.modules];"
        "sys.exit(f'imported: {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
