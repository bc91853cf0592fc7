"""Manual pages made from the command line itself, so that ``man lmtp-gateway-serve`` can never say other than
``lmtp-gateway serve --help``: one page per command, in the man(7) macros.

The pages ship inside the package (``lmtp_gateway/man``) and ``scripts/install`` links them where man(1) looks;
``python -m lmtp_gateway.manpage DIR`` writes them again after a change to the help texts, and a test checks
that the shipped pages are what this module writes today.
"""

from __future__ import annotations

import inspect
import sys
from importlib.metadata import version
from pathlib import Path

import click

PACKAGE_PAGES = Path(__file__).parent / "man"
NO_REWRAP = "\b"  # click's marker: the paragraph that follows is printed as written

# What the main page says beyond --help: where things are on a host set up by scripts/install.
MAIN_PAGE_EXTRAS = r"""
.SH ENVIRONMENT
.TP
.B LMTP_GATEWAY_CONFIG
The configuration file when \fB\-\-config\fR is not given; without either, the embedded default (LMTP on
127.0.0.1:2424, delivery to a local Maildir).
.TP
.B _LMTP_GATEWAY_COMPLETE
Shell completion: \fBeval "$(_LMTP_GATEWAY_COMPLETE=bash_source lmtp\-gateway)"\fR in \fI~/.bashrc\fR
(zsh_source, fish_source for the other shells).
.SH FILES
.TP
.I /etc/lmtp\-gateway/gateway.yml
The configuration the systemd units read.
.TP
.I /var/lib/lmtp\-gateway
The journal of \fBlmtp\-gateway serve\fR (and of the admin commands run on that host).
.TP
.I /var/lib/lmtp\-gateway\-collect
The journal of \fBlmtp\-gateway collect\fR.
"""


def escape(text: str) -> str:
    """Text as roff prints it: backslashes and hyphens literal, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def _paragraphs(help_text: str) -> list[str]:
    """The help's paragraphs as roff: filled text, or no-fill blocks where click would not rewrap."""
    out = []
    for block in inspect.cleandoc(help_text.split("\f")[0]).split("\n\n"):
        if block.startswith(NO_REWRAP):
            verbatim = block[len(NO_REWRAP) :].strip("\n")
            out.append(f".PP\n.nf\n{escape(verbatim)}\n.fi")
        elif block.strip():
            out.append(f".PP\n{escape(' '.join(line.strip() for line in block.splitlines()))}")
    return out


def _page_name(ctx: click.Context) -> str:
    return ctx.command_path.replace(" ", "-")


def render(ctx: click.Context, package_version: str) -> str:
    """The page of the command `ctx` stands for."""
    command = ctx.command
    name = _page_name(ctx)
    lines = [
        f'.TH "{name.upper()}" "1" "" "lmtp-gateway {package_version}" "lmtp-gateway manual"',
        ".SH NAME",
        f"{escape(name)} \\- {escape(command.get_short_help_str(limit=200))}",
        ".SH SYNOPSIS",
        f".B {escape(ctx.command_path)}",
        escape(" ".join(command.collect_usage_pieces(ctx))),
    ]
    if command.help:
        lines += [".SH DESCRIPTION", *_paragraphs(command.help)]
    options = [p.get_help_record(ctx) for p in command.get_params(ctx) if isinstance(p, click.Option)]
    if any(options):
        lines.append(".SH OPTIONS")
        for record in filter(None, options):
            switches, text = record
            lines += [".TP", f"\\fB{escape(switches)}\\fR", escape(text)]
    subcommands = _subcommands(ctx)
    if subcommands:
        lines.append(".SH COMMANDS")
        for sub in subcommands:
            lines += [".TP", f"\\fB{escape(sub.info_name or '')}\\fR", escape(sub.command.get_short_help_str(200))]
            lines.append(f"See \\fB{escape(_page_name(sub))}\\fR(1).")
    if ctx.parent is None:
        lines.append(MAIN_PAGE_EXTRAS.strip("\n"))
    related = [_page_name(ctx.parent)] if ctx.parent else []
    related += [_page_name(sub) for sub in subcommands]
    if related:
        lines += [".SH SEE ALSO", ",\n".join(f"\\fB{escape(page)}\\fR(1)" for page in related)]
    return "\n".join(lines) + "\n"


def _subcommands(ctx: click.Context) -> list[click.Context]:
    if not isinstance(ctx.command, click.Group):
        return []
    found = []
    for sub_name in ctx.command.list_commands(ctx):
        sub = ctx.command.get_command(ctx, sub_name)
        if sub is not None and not sub.hidden:
            found.append(click.Context(sub, info_name=sub_name, parent=ctx))
    return found


def pages(cli: click.Command, name: str = "lmtp-gateway") -> dict[str, str]:
    """Every page of `cli` and its subcommands: file name (``lmtp-gateway-spool-list.1``) to text."""
    package_version = version("lmtp-gateway")
    found: dict[str, str] = {}

    def walk(ctx: click.Context) -> None:
        found[f"{_page_name(ctx)}.1"] = render(ctx, package_version)
        for sub in _subcommands(ctx):
            walk(sub)

    walk(click.Context(cli, info_name=name))
    return found


def write(directory: Path) -> list[Path]:
    """Write every page into `directory` (made if missing); pages of commands that are gone are removed."""
    from lmtp_gateway.cli import main

    directory.mkdir(parents=True, exist_ok=True)
    wanted = pages(main)
    for stale in directory.glob("lmtp-gateway*.1"):
        if stale.name not in wanted:
            stale.unlink()
    written = []
    for file_name, text in sorted(wanted.items()):
        path = directory / file_name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_PAGES
    for path in write(target):
        print(path)
