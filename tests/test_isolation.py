"""Each test file starts from the environment the session started with: what an earlier
file's in-process code set in os.environ (mace's import sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD,
scikit-learn KMP_DUPLICATE_LIB_OK, ray.init RAY_AUTH_MODE, mlflow MLFLOW_TRACKING_URI, inductor
its cache folder) must not reach a later file's `matxfer` subprocesses (issue 32 item 15)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

LEAKS = """
import os

def test_in_process_code_sets_a_variable():
    os.environ["MATXFER_LEAK_PROBE"] = "set by an earlier file"
"""

SEES = """
import subprocess, sys

def test_a_later_files_subprocess_does_not_inherit_it():
    out = subprocess.run([sys.executable, "-c",
                          "import os; print(os.environ.get('MATXFER_LEAK_PROBE'))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
"""


def test_an_earlier_files_environment_does_not_reach_a_later_files_subprocesses(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_a_leaks.py").write_text(LEAKS)
    (tmp_path / "test_b_sees.py").write_text(SEES)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p",
                           "no:cacheprovider", "-p", "no:randomly", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-2000:]
