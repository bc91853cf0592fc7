"""The manual pages shipped in the package are the command line's own help, and render cleanly."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import click
import pytest

from lmtp_gateway.cli import main
from lmtp_gateway.manpage import PACKAGE_PAGES, escape, pages, write
from tests.conftest import under_ci


def test_the_shipped_pages_are_what_the_help_says_today(tmp_path: Path) -> None:
    write(tmp_path)
    fresh = {path.name: path.read_text() for path in tmp_path.iterdir()}
    shipped = {path.name: path.read_text() for path in PACKAGE_PAGES.glob("*.1")}
    assert shipped == fresh, "help texts changed: run `python -m lmtp_gateway.manpage` and commit lmtp_gateway/man"


def test_every_command_has_a_page_with_its_options() -> None:
    found = pages(main)
    assert {"lmtp-gateway.1", "lmtp-gateway-serve.1", "lmtp-gateway-spool-show.1"} <= set(found)
    serve = found["lmtp-gateway-serve.1"]
    assert "\\fB\\-\\-config FILE\\fR" in serve and ".SH SEE ALSO\n\\fBlmtp\\-gateway\\fR(1)" in serve


def test_help_text_never_turns_into_roff_requests() -> None:
    @click.command()
    def odd() -> None:
        """A line that ends
        .TH like a request, a 'quote and a back\\slash -- kept.

        \b
        .rm verbatim
        """

    page = pages(odd, "odd")["odd.1"]
    assert "\\&.TH like" not in page  # filled text: joined into one line, the dot is not at its start
    assert "\n\\&.rm verbatim\n" in page and "back\\eslash \\-\\- kept" in page
    assert escape(".x\n'y") == "\\&.x\n\\&'y"


def test_groff_renders_every_page_without_a_warning() -> None:
    groff = shutil.which("groff")
    if groff is None:
        message = "groff is missing: apt-get install groff-base"
        pytest.fail(message) if under_ci() else pytest.skip(message)
    for page in sorted(PACKAGE_PAGES.glob("*.1")):
        done = subprocess.run([groff, "-k", "-Tutf8", "-man", "-ww", "-z", str(page)], capture_output=True, text=True)
        assert (done.returncode, done.stderr) == (0, ""), page.name
