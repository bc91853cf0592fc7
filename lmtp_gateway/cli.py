"""The ``lmtp-gateway`` command: a thin layer over the library."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from lmtp_gateway.config import ENV_CONFIG, Config, ConfigError, load_config
from lmtp_gateway.rules import MAILBOX_TYPES, Verdict, route

CONFIG_HELP = f"Gateway YAML or GitLab's gitlab.yml (default: ${ENV_CONFIG}, else the embedded default)."


def _load(config_path: str | None) -> Config:
    try:
        config = load_config(config_path)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)
    return config


config_option = click.option(
    "--config", "config_path", metavar="FILE", envvar=ENV_CONFIG, help=CONFIG_HELP, show_envvar=False
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lmtp-gateway")
def main() -> None:
    """Incoming mail for self-managed GitLab: LMTP from Postfix in, Sidekiq jobs or webhook calls out.

    \b
    Start with:
      lmtp-gateway explain --config /etc/lmtp-gateway/config.yml message.eml
    """


@main.command()
@config_option
@click.option("--rcpt", metavar="ADDR", help="Envelope recipient, as Postfix would give it over LMTP.")
@click.option(
    "--mailbox",
    type=click.Choice(MAILBOX_TYPES),
    help="Route as a collector watching this mailbox only (as mail_room does).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (verdict, mailbox, key, …).")
@click.argument("message", type=click.File("rb"))
def explain(
    config_path: str | None, rcpt: str | None, mailbox: str | None, as_json: bool, message: Any
) -> None:
    """Why GitLab will (or will not) take MESSAGE: the verdict and every header looked at.

    MESSAGE is a raw .eml file, or - for standard input. Exits 0 for any verdict.

    \b
    Example:
      lmtp-gateway explain --rcpt 'incoming+group-project-42-Tok3n-issue@incoming.example.com' mail.eml
      lmtp-gateway explain --json - < mail.eml
    """
    config = _load(config_path)
    if mailbox is not None and mailbox not in config.mailboxes:
        raise click.ClickException(f"--mailbox {mailbox}: not configured in {config.source}")
    raw = message.read()
    verdict = route(config.routing, raw, rcpt=rcpt, mailbox=mailbox)
    if as_json:
        click.echo(json.dumps(verdict.as_dict(), ensure_ascii=False))
    else:
        click.echo(render_verdict(verdict, config))


def render_verdict(verdict: Verdict, config: Config) -> str:
    lines = [f"configuration: {config.source}"]
    for name, mailbox in config.mailboxes.items():
        lines.append(f"  {name}: {mailbox.template.text} -> {mailbox.delivery_method}")
    lines.append("looked at:")
    if not verdict.probes:
        lines.append("  (no address needed)")
    width = max((len(p.source) for p in verdict.probes), default=0)
    for probe in verdict.probes:
        lines.append(f"  {probe.source:<{width}}  {probe.value}  ->  {probe.outcome}")
    lines.append(f"verdict: {verdict.verdict.upper()}")
    if verdict.verdict == "deliver":
        lines.append(f"  mailbox: {verdict.mailbox}")
        lines.append(f"  key:     {verdict.key}")
        lines.append(f"  handler: {verdict.handler}")
        lines.append(f"  source:  {verdict.source}")
    lines.append(f"  reason:  {verdict.reason}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
