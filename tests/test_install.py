"""The README's quick start on this machine's own Python, from a clean copy of the source: scripts/install makes
the virtual environment and links the command, and the command works (Debian's and Ubuntu's Python refuse a plain
`pip install`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, under_ci

SYSTEM_PYTHON = Path("/usr/bin/python3")


def clean_copy(destination: Path) -> Path:
    """What a clone holds: the tracked files and the new ones, nothing ignored (no .venv, no caches)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def test_the_quick_starts_install_with_the_system_python(tmp_path: Path) -> None:
    if not SYSTEM_PYTHON.exists():
        if under_ci():
            pytest.fail(f"{SYSTEM_PYTHON} is missing: apt-get install python3")
        pytest.skip(f"{SYSTEM_PYTHON} is missing: apt-get install python3")
    source = clean_copy(tmp_path / "lmtp-gateway")
    prefix, bin_dir = tmp_path / "opt", tmp_path / "bin"
    done = subprocess.run(
        [str(source / "scripts" / "install"), "--python", str(SYSTEM_PYTHON), "--prefix", str(prefix),
         "--bin-dir", str(bin_dir), "--man-dir", str(tmp_path / "man1"), "--no-systemd"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    command = bin_dir / "lmtp-gateway"
    assert command.resolve() == (prefix / "bin" / "lmtp-gateway").resolve()
    assert (prefix / "bin" / "python").resolve().parent == SYSTEM_PYTHON.resolve().parent  # the system's Python
    explained = subprocess.run([str(command), "explain", "--json", str(source / "lmtp_gateway/examples/reply.eml")],
                               capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert explained.returncode == 0 and '"verdict": "deliver"' in explained.stdout
    pages = sorted(page.name for page in (tmp_path / "man1").iterdir())
    assert "lmtp-gateway.1" in pages and "lmtp-gateway-spool-list.1" in pages
    assert (tmp_path / "man1" / "lmtp-gateway-serve.1").read_text().startswith('.TH "LMTP-GATEWAY-SERVE" "1"')
    helped = subprocess.run([str(source / "scripts" / "install"), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--no-systemd" in helped.stdout
