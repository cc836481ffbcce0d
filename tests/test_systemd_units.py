"""The shipped unit files: `systemd-analyze verify` is clean and `security --offline=yes` exposure <= 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, batchd_cmd

UNITS = REPO / "packaging" / "systemd"
SERVICES = ("batch-worker.service", "batch-worker-once.service")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """The units with ExecStart= pointed at this test's installed `batchd`."""
    exe = batchd_cmd()
    if len(exe) != 1:
        pytest.skip("the batchd console script is not installed next to this interpreter")
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/opt/batchd/bin/batchd", exe[0])
        (tmp_path / unit.name).write_text(text)
    return tmp_path


def test_units_exist():
    assert {p.name for p in UNITS.iterdir()} >= {*SERVICES, "batch-worker.timer"}


def test_verify_is_clean(installed: Path):
    names = [*SERVICES, "batch-worker.timer"]
    r = subprocess.run(["systemd-analyze", "verify", *(str(installed / n) for n in names)],
                       capture_output=True, text=True, timeout=120)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if any(n in line for n in names)]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure_at_most_2(installed: Path, unit: str):
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(installed / unit)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    exposure = float(m.group(1))
    print(f"{unit}: exposure {exposure}")
    assert exposure <= 2.0


def test_every_setting_is_explained():
    """Each [Service] setting of the daemon unit sits under a comment (its own or its group's)."""
    lines = (UNITS / "batch-worker.service").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z]\w+=", line):
            j = i - 1
            while j >= 0 and re.match(r"^[A-Z]\w+=", lines[j]):
                j -= 1
            assert j >= 0 and (lines[j].startswith("#") or lines[j].startswith("[")), f"uncommented: {line}"


def test_daemon_unit_settings():
    text = (UNITS / "batch-worker.service").read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=78",
                    "TimeoutStopSec=", "Environment=PYTHONUNBUFFERED=1", "SyslogIdentifier=batchd",
                    "StateDirectory=batchd", "ConfigurationDirectory=batchd",
                    "ExecStart=/opt/batchd/bin/batchd --config /etc/batchd/batchd.toml run\n"):
        assert setting in text, setting
    once = (UNITS / "batch-worker-once.service").read_text()
    assert "Type=oneshot" in once and "run --once" in once
    assert "Unit=batch-worker-once.service" in (UNITS / "batch-worker.timer").read_text()


def test_reload_and_a_setgid_state_folder():
    for name in SERVICES:
        text = (UNITS / name).read_text()
        assert "StateDirectoryMode=2770" in text and "UMask=0007" in text, name
    assert "ExecReload=/bin/kill -HUP $MAINPID" in (UNITS / "batch-worker.service").read_text()


def test_local_backend_drop_in(installed: Path, tmp_path: Path):
    """packaging/systemd/local-backend.conf lifts what PyTorch needs, explains each setting, and verifies clean
    on top of the unit; the base unit alone keeps its exposure (test_security_exposure_at_most_2)."""
    dropin = UNITS / "local-backend.conf"
    text = dropin.read_text()
    settings = [line for line in text.splitlines() if re.match(r"^[A-Z]\w+=", line)]
    assert settings == ["MemoryDenyWriteExecute=no", "ProcSubset=all"]
    lines = text.splitlines()
    for s in settings:
        assert lines[lines.index(s) - 1].startswith("#"), s
    assert "/etc/systemd/system/batch-worker.service.d/local-backend.conf" in text
    assert "packaging/systemd/local-backend.conf" in (REPO / "README.md").read_text()
    # A unit folder with the drop-in beside the unit: what `systemctl` would load.
    d = installed / "batch-worker.service.d"
    d.mkdir()
    (d / "local-backend.conf").write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(installed / "batch-worker.service")],
                       capture_output=True, text=True, timeout=120, cwd=installed)
    assert r.returncode == 0 and "local-backend" not in r.stdout + r.stderr, r.stdout + r.stderr
