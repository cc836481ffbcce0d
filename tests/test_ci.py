"""CI runs what the README says: the README's test command, verbatim, in .ci/run."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_ci_runs_the_readmes_test_command_verbatim():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    dev = readme[readme.index("## Development"):]
    command = re.search(r"```\n(python3 -m venv[^\n]*)\n```", dev).group(1)
    assert "pytest" in command and "--cov=batchd" in command
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in ci, f".ci/run must run the README's test command verbatim: {command}"
