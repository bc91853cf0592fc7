"""The ``lmtp-gateway`` command: a thin layer over the library."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from lmtp_gateway.config import EMBEDDED_SOURCE, ENV_CONFIG, Config, load_config
from lmtp_gateway.errors import GatewayError
from lmtp_gateway.journal import State
from lmtp_gateway.listen import Address
from lmtp_gateway.logs import setup_logging
from lmtp_gateway.rules import MAILBOX_TYPES, Verdict, route

if TYPE_CHECKING:
    from lmtp_gateway.spool import Spool

CONFIG_HELP = f"Gateway YAML or GitLab's gitlab.yml (default: ${ENV_CONFIG}, else the embedded default)."


def _load(config_path: str | None, *, secrets: bool = True, **overrides: Any) -> Config:
    """The configuration with the command line's overrides; `secrets=False` for the commands that deliver
    nothing, so they run where the service's passwords are not at hand."""
    config = load_config(config_path, secrets=secrets).overridden(**overrides)
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)
    return config


class _Commands(click.Group):
    """A configuration, journal, listener or secret problem ends any command with its one line, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GatewayError as error:
            raise click.ClickException(str(error)) from None


config_option = click.option(
    "--config", "config_path", metavar="FILE", envvar=ENV_CONFIG, help=CONFIG_HELP, show_envvar=False
)
spool_option = click.option(
    "--spool",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="The journal's directory (overrides spool.path; e.g. the collector's /var/lib/lmtp-gateway-collect).",
)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lmtp-gateway")
def main() -> None:
    """Incoming mail for self-managed GitLab: LMTP from Postfix in, Sidekiq jobs or webhook calls out.

    \b
    Start with:
      lmtp-gateway explain --config /etc/lmtp-gateway/gateway.yml message.eml

    Each command has its --help and its manual page (man lmtp-gateway-serve).
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
def explain(config_path: str | None, rcpt: str | None, mailbox: str | None, as_json: bool, message: Any) -> None:
    """Why GitLab will (or will not) take MESSAGE: the verdict and every header looked at.

    MESSAGE is a raw .eml file, or - for standard input. Exits 0 for any verdict.

    \b
    Example:
      lmtp-gateway explain --rcpt 'incoming+group-project-42-Tok3n-issue@incoming.example.com' mail.eml
      lmtp-gateway explain --json - < mail.eml
    """
    config = _load(config_path, secrets=False)
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
    if verdict.note:
        lines.append(f"  note:    {verdict.note}")
    return "\n".join(lines)


# --- serve ---


@main.command()
@config_option
@click.option("--listen", multiple=True, metavar="ADDR", help="Override lmtp.listen: HOST:PORT or unix:PATH.")
@spool_option
@click.option(
    "--monitoring-listen",
    metavar="HOST:PORT",
    help="Override monitoring.listen (/metrics, /livez, /readyz; default 127.0.0.1:9425); off to disable.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    metavar="N",
    help="Override lmtp.workers: processes sharing the listeners, each with its own journal shard.",
)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-json/--log-text", default=None, help="Log format (default: JSON unless on a terminal).")
@click.option("--worker-seat", hidden=True, help="Internal: run as a worker of a supervisor (its sockets).")
def serve(
    config_path: str | None,
    listen: tuple[str, ...],
    spool: str | None,
    monitoring_listen: str | None,
    workers: int | None,
    log_level: str,
    log_json: bool | None,
    worker_seat: str | None,
) -> None:
    """Receive mail from Postfix over LMTP and deliver it to GitLab.

    Each message is routed with GitLab's rules at RCPT and DATA time, written and fsynced to the journal
    before the 250, then delivered to the mailbox's sink (sidekiq, webhook or maildir) with retries.
    SIGTERM stops accepting, finishes transactions in progress, flushes the dispatcher and exits 0.

    With more than one worker (lmtp.workers, default one per CPU), a supervisor binds the listeners and runs
    the workers, each a whole gateway with its journal shard under spool.path; it restarts a worker that dies
    and answers /metrics and /readyz for all of them.

    \b
    Example (embedded default: LMTP on 127.0.0.1:2424, Maildir under ~/.local/state/lmtp-gateway):
      lmtp-gateway serve
      lmtp-gateway serve --config /etc/lmtp-gateway/gateway.yml --listen unix:/run/lmtp-gateway/lmtp.sock
      lmtp-gateway serve --monitoring-listen 127.0.0.1:9100     # then: curl -s 127.0.0.1:9100/metrics
      lmtp-gateway serve --workers 1
    """
    from lmtp_gateway.service import Gateway
    from lmtp_gateway.workers import Seat, die_with_parent

    if worker_seat is not None:
        seat = Seat.from_argument(worker_seat)
        die_with_parent(seat.parent)
        setup_logging(log_level, log_json, worker=seat.index)
        config = _load(config_path, spool=spool, listen=listen)
        asyncio.run(Gateway(config, seat=seat).run(on_ready=lambda _: seat.report_ready()))
        return
    setup_logging(log_level, log_json)
    config = _load(config_path, spool=spool, listen=listen, monitoring_listen=monitoring_listen)
    count = workers or config.lmtp.workers
    try:
        if count > 1:
            sys.exit(asyncio.run(_supervise(config, count, log_level, log_json)))
        from lmtp_gateway.journal.shards import merge_orphans

        asyncio.run(merge_orphans(config.spool.path, 1, sync=config.spool.sync))  # from a run with more workers
        gateway = Gateway(config)
        addresses = lambda: gateway.lmtp.addresses  # noqa: E731
        asyncio.run(gateway.run(on_ready=lambda _: _say_ready(config, addresses(), gateway.ops.address, 1)))
    except (OSError, GatewayError) as error:
        raise click.ClickException(f"cannot start: {error}") from None


async def _supervise(config: Config, count: int, log_level: str, log_json: bool | None) -> int:
    from lmtp_gateway.workers import Supervisor

    command = [sys.executable, "-m", "lmtp_gateway", "serve", "--spool", str(config.spool.path)]
    command += ["--log-level", log_level, *([] if log_json is None else ["--log-json" if log_json else "--log-text"])]
    if config.source != EMBEDDED_SOURCE:
        command += ["--config", config.source]
    for spec in config.lmtp.listen:
        command += ["--listen", spec]
    supervisor = Supervisor(config, count, command)

    def ready(running: Supervisor) -> None:
        addresses = [str(Address.parse(spec).bound(s)) for spec, s in running.lmtp_listeners]
        _say_ready(config, addresses, running.ops.address, count)

    return await supervisor.run(on_ready=ready)


def _say_ready(config: Config, addresses: list[str], monitoring: str | None, workers: int) -> None:
    shown = f"; monitoring http://{monitoring}/metrics" if monitoring else ""
    processes = f"; {workers} workers" if workers > 1 else ""
    click.echo(
        f"lmtp-gateway: listening on {', '.join(addresses)}; journal {config.spool.path}{processes}{shown}", err=True
    )


# --- collect ---


@main.command()
@config_option
@click.option("--mailbox", type=click.Choice(MAILBOX_TYPES), help="Collect from this mailbox only.")
@click.option("--once", is_flag=True, help="Drain the mailboxes, deliver what is pending in the journal, exit.")
@spool_option
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-json/--log-text", default=None, help="Log format (default: JSON unless on a terminal).")
def collect(
    config_path: str | None, mailbox: str | None, once: bool, spool: str | None, log_level: str, log_json: bool | None
) -> None:
    """Collect mail from an IMAP mailbox (IDLE) or Microsoft Graph, for set-ups without Postfix.

    Takes GitLab's own keys (user, password, host, port, ssl, start_tls, mailbox, idle_timeout,
    delete_after_delivery, expunge_deleted, inbox_method, inbox_options). A message is fetched without
    being marked read, committed to the journal, and only then marked read (or deleted); it is then
    delivered like LMTP mail. Each mailbox reconnects on its own with backoff. SIGTERM finishes the batch
    in hand and exits 0.

    Exit status with --once: 0 when every mailbox was drained and everything delivered, 1 otherwise
    (what was not delivered stays in the journal for the next run).

    \b
    Example:
      lmtp-gateway collect --config /etc/gitlab/gitlab.yml
      lmtp-gateway collect --config gateway.yml --mailbox service_desk_email --once
    """
    from lmtp_gateway.service import Gateway

    setup_logging(log_level, log_json)
    config = _load(config_path, spool=spool)
    gateway = Gateway(config, listen=False, collect=True, only_mailbox=mailbox)
    names = ", ".join(c.source.name for c in gateway.collectors)
    try:
        if not once:
            click.echo(f"lmtp-gateway: collecting from {names}; journal {config.spool.path}", err=True)
            asyncio.run(gateway.run())
            return
        report = asyncio.run(gateway.collect_once())
    except (OSError, GatewayError) as error:
        raise click.ClickException(f"cannot start: {error}") from None
    for name, count in report.collected.items():
        problem = report.errors.get(name)
        click.echo(f"{name}: {count} collected" + (f"; stopped early: {problem}" if problem else ""))
    click.echo(f"delivered {report.delivered}; {report.pending} left pending in the journal for the next run")
    if report.errors or report.pending:
        sys.exit(1)


# --- check ---

_STYLES = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "bright_black"}


def _nameserver(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from lmtp_gateway.check import make_resolver

    if value is not None:
        try:
            make_resolver(value)
        except (ValueError, OSError) as error:
            raise click.BadParameter(f"expected HOST[:PORT] such as 127.0.0.1:5353 ({error})") from None
    return value


@main.command()
@config_option
@spool_option
@click.option(
    "--nameserver", metavar="HOST[:PORT]", callback=_nameserver, help="Ask this DNS server (default: resolv.conf)."
)
@click.option("--timeout", default=5.0, show_default=True, metavar="SECONDS", help="For each connection or lookup.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: ok, counts, checks[{status, what, fix}].")
def check(config_path: str | None, spool: str | None, nameserver: str | None, timeout: float, as_json: bool) -> None:
    """Check what the gateway depends on and say what to fix: the configuration, the LMTP listener (answers
    LHLO?), Redis and its queue (sidekiq), GitLab's mail_room API and token (webhook), the journal (writable, free
    space), the MX records of the mail domains and whether they are dedicated subdomains.

    One line per finding: ok, warn, fail or skip, what was found, and after a dash what to do. Exits 1 if
    anything failed. The webhook check POSTs an empty message, which GitLab accepts and then discards.

    \b
    Example:
      lmtp-gateway check --config /etc/lmtp-gateway/gateway.yml
      lmtp-gateway check --config /etc/gitlab/gitlab.yml --nameserver 127.0.0.53 --json
    """
    from lmtp_gateway import check as checking

    results = checking.check(config_path, spool=spool, nameserver=nameserver, timeout=timeout)
    if as_json:
        click.echo(json.dumps(checking.as_json(results), ensure_ascii=False))
    else:
        for result in results:
            status = click.style(f"{result.status:<4}", fg=_STYLES[result.status], bold=result.status == "fail")
            click.echo(status + result.line()[4:])
    if any(result.status == "fail" for result in results):
        sys.exit(1)


# --- replay ---


def _spool(config: Config) -> Spool:
    """The journals the configuration names (one per worker), said on standard error: which one is looked at is
    never a guess."""
    from lmtp_gateway.spool import Spool

    spool = Spool(config.spool.path, sync=config.spool.sync)
    if not spool.root.is_dir():
        where = f"spool.path in {config.source}"
        click.echo(f"note: no journal at {spool.root} yet ({where}): nothing received", err=True)
    else:
        shards = f" ({len(spool.journals)} shards, one per worker)" if len(spool.journals) > 1 else ""
        click.echo(f"journal: {spool.root}{shards}", err=True)
    return spool


def _time_option(name: str, help_text: str) -> Callable[[Any], Any]:
    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
        from lmtp_gateway.replay import parse_time

        if value is None:
            return None
        try:
            return parse_time(value)
        except ValueError as error:
            raise click.BadParameter(str(error)) from None

    return click.option(name, metavar="TIME", callback=convert, help=help_text)


def _selection_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--id", "ids", multiple=True, metavar="ID", help="Journal id (or a unique prefix); repeatable."),
        click.option(
            "--state", "states", multiple=True, type=click.Choice([s.value for s in State]), help="Repeatable."
        ),
        click.option("--mailbox", type=click.Choice(MAILBOX_TYPES)),
        _time_option("--since", "Received at or after (ISO time, or 2h / 7d ago)."),
        _time_option("--until", "Received at or before (ISO time, or 30m ago)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _selection(ids: tuple[str, ...], states: tuple[str, ...], mailbox: str | None, since: Any, until: Any) -> Any:
    from lmtp_gateway.spool import Selection

    return Selection(tuple(ids), tuple(State(s) for s in states), mailbox, since, until)


@main.command()
@config_option
@spool_option
@_selection_options
@click.option("--rcpt", metavar="ADDR", help="Envelope recipient for FILES (as if Postfix had passed it).")
@click.option("--from", "mail_from", metavar="ADDR", help="Envelope sender for FILES.")
@click.option("--quarantined", is_flag=True, help="Bring back entries set aside as damaged, once repaired.")
@click.option("--dry-run", is_flag=True, help="Only list what would happen.")
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def replay(
    config_path: str | None,
    spool: str | None,
    ids: tuple[str, ...],
    states: tuple[str, ...],
    mailbox: str | None,
    since: float | None,
    until: float | None,
    rcpt: str | None,
    mail_from: str | None,
    quarantined: bool,
    dry_run: bool,
    files: tuple[Path, ...],
) -> None:
    """Deliver journal entries again, or feed .eml FILES through the rules and journal.

    Entries are selected by --id, --state, --mailbox, --since and --until (all must match). Delivered entries
    are pushed again on purpose (after GitLab lost its jobs); pending and failed ones go through the normal
    dedupe. FILES are routed like mail arriving over LMTP (--rcpt gives the envelope recipient), committed to the
    journal and delivered. --quarantined brings back the entries set aside as damaged (spool list --quarantined)
    once they are whole again. Exits 1 if anything failed, is still deferred, or is damaged.

    \b
    Examples:
      lmtp-gateway replay --state failed --dry-run
      lmtp-gateway replay --since 2026-11-21T08:00 --until 2026-11-21T09:30 --mailbox incoming_email
      lmtp-gateway replay --rcpt 'incoming+group-project-42-Xy9zAuthToken-issue@localhost' saved.eml
      lmtp-gateway replay --quarantined
    """
    from lmtp_gateway import replay as replaying

    setup_logging("warning")
    config = _load(config_path, spool=spool)
    selection = _selection(ids, states, mailbox, since, until)
    selecting = bool(ids or states or mailbox or since is not None or until is not None)
    if not selecting and not files and not quarantined:
        raise click.UsageError(
            "select entries (--id, --state, --mailbox, --since, --until), give .eml FILES, or --quarantined"
        )
    if files and (ids or states):
        raise click.UsageError("FILES are fed in as new mail: do not combine them with --id or --state")
    click.echo(f"journal: {config.spool.path}", err=True)
    lines = asyncio.run(
        replaying.run(
            config,
            selection=selection if selecting and not files else None,
            files=files,
            quarantined=quarantined,
            rcpt=rcpt,
            mail_from=mail_from,
            dry_run=dry_run,
            progress=_Progress,
        )
    )
    for line in lines:
        click.echo(f"{line.what}  {line.action}  {line.detail}".rstrip())
    click.echo(replaying.summary(lines), err=True)
    if any(line.action in ("failed", "deferred", "damaged") for line in lines):
        sys.exit(1)


class _Progress:
    """A progress bar on standard error for long runs on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.bar = click.progressbar(length=total, label=label, file=sys.stderr) if total > 20 else None

    def __enter__(self) -> Callable[[], None]:
        if self.bar is None:
            return lambda: None
        bar = self.bar.__enter__()
        return lambda: bar.update(1)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


# --- policy ---


@main.command()
@config_option
@click.option("--listen", multiple=True, metavar="ADDR", help="HOST:PORT or unix:PATH (default: policy.listen).")
@click.option("--stdio", is_flag=True, help="One session on stdin/stdout, as Postfix's spawn(8) runs it.")
def policy(config_path: str | None, listen: tuple[str, ...], stdio: bool) -> None:
    """Answer Postfix's policy requests: refuse unknown GitLab addresses during RCPT.

    Runs apart from `serve`, so Postfix can still tell good addresses from bad ones while the LMTP daemon is
    down (it then queues the good ones). Either as its own small daemon on policy.listen, or spawned by
    Postfix per connection (--stdio).

    \b
    Examples:
      lmtp-gateway policy --config contrib/config/postfix.yml                 # listens on policy.listen
      lmtp-gateway policy --config /etc/lmtp-gateway/gateway.yml --stdio       # in master.cf, via spawn
    """
    from lmtp_gateway.policy import PolicyServer

    setup_logging("warning" if stdio else "info")
    config = _load(config_path, secrets=False)
    server = PolicyServer(config.routing)
    addresses = listen or config.policy.listen
    if stdio:
        server.serve_stdio()
        return
    if not addresses:
        raise click.UsageError("give --listen ADDR, policy.listen in the configuration, or --stdio")
    asyncio.run(_listen_until_stopped("policy", server, addresses))


async def _listen_until_stopped(name: str, server: Any, addresses: tuple[str, ...]) -> None:
    """A small service (policy, milter) on its addresses until SIGTERM or Ctrl-C."""
    for address in addresses:
        click.echo(f"lmtp-gateway {name}: listening on {await server.listen(address)}", err=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


# --- milter ---


@main.command()
@config_option
@click.option("--listen", multiple=True, metavar="ADDR", help="HOST:PORT or unix:PATH (default: milter.listen).")
def milter(config_path: str | None, listen: tuple[str, ...]) -> None:
    """Refuse, before Postfix queues it, mail GitLab would refuse: no bounce to a sender who may be forged.

    A Postfix milter (smtpd_milters): at the end of DATA it applies GitLab's rules to each GitLab recipient's
    copy, as the gateway will after LMTP. Mail with no key for a dedicated address, or whose first key fits no
    GitLab handler, gets 550 while the sending server is still connected; a refused recipient among others that
    are kept is removed from the message. Runs apart from `serve`, like the policy service.

    \b
    Examples:
      lmtp-gateway milter --config /etc/lmtp-gateway/gateway.yml        # on milter.listen, 127.0.0.1:2426
    """
    from lmtp_gateway.milter import MilterServer

    setup_logging("info")
    config = _load(config_path, secrets=False)
    asyncio.run(_listen_until_stopped("milter", MilterServer(config.routing), listen or config.milter.listen))


# --- postfix-config ---


@main.command("postfix-config")
@config_option
@click.option("--main-cf", "part", flag_value="main", help="Only the main.cf fragment.")
@click.option("--master-cf", "part", flag_value="master", help="Only the master.cf fragment.")
@click.option("--user", default="lmtp-gateway", show_default=True, help="User for the spawned policy service.")
def postfix_config(config_path: str | None, part: str | None, user: str) -> None:
    """Print the Postfix main.cf and master.cf fragments for this configuration.

    Domains come from the address templates, the LMTP next hop from lmtp.listen, message_size_limit from
    lmtp.max_message_size, the policy service from policy.listen and the milter from milter.listen, so Postfix
    and the gateway agree. Without policy.listen, master.cf gets a spawn(8) entry that runs
    `lmtp-gateway policy --stdio` for Postfix.

    Merge the fragments into /etc/postfix/main.cf and master.cf by hand: a parameter main.cf already sets
    (smtpd_recipient_restrictions, smtpd_milters above all) must be merged, not added a second time, or the
    later line silently replaces the earlier one. Then: postfix check && postfix reload.

    \b
    Example:
      lmtp-gateway postfix-config --config contrib/config/postfix.yml
      lmtp-gateway postfix-config --config /etc/lmtp-gateway/gateway.yml --main-cf | less
    """
    from lmtp_gateway.postfix import render

    config = _load(config_path, secrets=False)
    executable = shutil.which("lmtp-gateway") or str(Path(sys.argv[0]).resolve())
    fragment = render(config, executable=executable, user=user)
    if part != "master":
        click.echo(fragment.main_cf, nl=False)
    if part is None:
        click.echo("\n# ===== master.cf =====")
    if part != "main":
        click.echo(fragment.master_cf, nl=False)


# --- spool ---


@main.group()
def spool() -> None:
    """Look into the journal (the spool): list, show and count entries."""


@spool.command("list")
@config_option
@spool_option
@_selection_options
@click.option("--quarantined", is_flag=True, help="The entries set aside as damaged, with what is wrong with each.")
@click.option("--limit", default=50, show_default=True, help="Newest N entries (0: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def spool_list(
    config_path: str | None,
    spool: str | None,
    ids: tuple[str, ...],
    states: tuple[str, ...],
    mailbox: str | None,
    since: float | None,
    until: float | None,
    quarantined: bool,
    limit: int,
    as_json: bool,
) -> None:
    """List journal entries, oldest first.

    \b
    Example:
      lmtp-gateway spool list --state pending --state failed
      lmtp-gateway spool list --quarantined
    """
    from lmtp_gateway.spool import select, set_aside

    journals = _spool(_load(config_path, secrets=False, spool=spool))
    if quarantined:
        for found in set_aside(journals, ids):
            problem = found.problem or f"whole again: lmtp-gateway replay --quarantined --id {found.id}"
            if as_json:
                entry = json.loads(found.entry.to_json()) if found.entry else None
                click.echo(json.dumps({"id": found.id, "problem": found.problem, "entry": entry}, ensure_ascii=False))
            else:
                click.echo(f"{found.id}  {problem}")
        return
    entries = select(journals, _selection(ids, states, mailbox, since, until))
    if limit:
        entries = entries[-limit:]
    if not as_json and entries:
        click.echo(f"{'ID':24}  {'STATE':9}  {'RECEIVED':19}  {'MAILBOX':18}  {'HANDLER':24}  RECIPIENT  TRIES")
    for entry in entries:
        if as_json:
            click.echo(entry.to_json().decode(), nl=False)
            continue
        received = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.received_at))
        problem = f"  {entry.last_error}" if entry.last_error else ""
        click.echo(
            f"{entry.id}  {entry.state.value:9}  {received}  {entry.mailbox or '-':18}  "
            f"{entry.handler or '-':24}  {entry.rcpt or '-'}  {entry.attempts}{problem}"
        )


@spool.command("show")
@config_option
@spool_option
@click.option("--message", "with_message", is_flag=True, help="Also print the stored message.")
@click.option("--json", "as_json", is_flag=True, help="The metadata as stored: JSON, times in seconds since the epoch.")
@click.argument("entry_id")
def spool_show(config_path: str | None, spool: str | None, with_message: bool, as_json: bool, entry_id: str) -> None:
    """Show one entry's metadata, times in ISO 8601 (and, with --message, the message as GitLab gets it).

    ENTRY_ID may be the first characters of an id, as long as they name one entry.

    \b
    Example:
      lmtp-gateway spool show 3f2a9c
    """
    from lmtp_gateway.spool import Selection, fields, select

    journals = _spool(_load(config_path, secrets=False, spool=spool))
    found = select(journals, Selection(ids=(entry_id,)))
    if len(found) != 1:
        raise click.ClickException(f"{entry_id}: {'no entry' if not found else f'{len(found)} entries'} with this id")
    entry = found[0]
    journal = journals.journal_of(entry)
    if as_json:
        click.echo(json.dumps(json.loads(entry.to_json()), indent=1, ensure_ascii=False))
    else:
        shown = [*fields(entry), ("message", str(journal.eml_path(entry)))]
        width = max(len(name) for name, _ in shown)
        for name, text in shown:
            click.echo(f"{name + ':':{width + 1}} {text}")
    if with_message:
        click.echo(journal.read_message(entry).decode("utf-8", "replace"))


@spool.command("stats")
@config_option
@spool_option
@click.option("--json", "as_json", is_flag=True)
def spool_stats(config_path: str | None, spool: str | None, as_json: bool) -> None:
    """Count entries per state in every shard, and how old the oldest one waiting for delivery is.

    \b
    Example:
      lmtp-gateway spool stats --json
    """
    from lmtp_gateway.spool import stats

    counted = stats(_spool(_load(config_path, secrets=False, spool=spool)))
    if as_json:
        click.echo(json.dumps(counted.as_dict()))
        return
    shards = f" ({counted.shards} shards)" if counted.shards > 1 else ""
    click.echo(f"journal: {counted.spool}{shards}")
    for state, count in counted.counts.items():
        click.echo(f"  {state:11} {count}")
    quarantined = "  (lmtp-gateway spool list --quarantined)" if counted.quarantined else ""
    click.echo(f"  {'quarantined':11} {counted.quarantined}{quarantined}")
    age = counted.oldest_pending_seconds
    click.echo(f"  oldest waiting: {f'{age} s' if age is not None else '-'}")


# --- config import ---


@main.group("config")
def config_group() -> None:
    """Make a gateway configuration from GitLab's.

    \b
    Example:
      lmtp-gateway config import /etc/gitlab/gitlab.rb > gateway.yml
    """


@config_group.command("import")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of stdout.")
@click.option("--include-secrets", is_flag=True, help="Copy passwords and client secrets in plain text.")
@click.option(
    "--secrets-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write each secret to its own 0600 file here and refer to it with *_file.",
)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def config_import(output: Path | None, include_secrets: bool, secrets_dir: Path | None, file: Path) -> None:
    """Convert GitLab's gitlab.rb (Omnibus) or gitlab.yml into the gateway's YAML.

    Reads the gitlab_rails['incoming_email_*'] and ['service_desk_email_*'] settings, external_url and the Redis
    settings (for sidekiq delivery). gitlab.rb is never run: statements that are not plain literals are reported
    on stderr and skipped. Secrets are not copied by default: each becomes password_env: VARIABLE (to set in the
    service's environment); --secrets-dir writes them to 0600 files, --include-secrets copies them inline.
    --output writes the file with mode 0600 when it holds a secret.

    \b
    Examples:
      lmtp-gateway config import /etc/gitlab/gitlab.rb
      lmtp-gateway config import /etc/gitlab/gitlab.rb -o /etc/lmtp-gateway/gateway.yml \\
          --secrets-dir /etc/lmtp-gateway/secrets
      lmtp-gateway config import /home/git/gitlab/config/gitlab.yml
    """
    from lmtp_gateway.config_import import import_file, render, write_private

    if include_secrets and secrets_dir:
        raise click.UsageError("give either --include-secrets or --secrets-dir, not both")
    secrets_dir = secrets_dir.resolve() if secrets_dir else None  # the gateway may run from another directory
    imported = import_file(file, include_secrets=include_secrets, secrets_dir=secrets_dir)
    for warning in imported.warnings:
        click.echo(f"warning: {warning}", err=True)
    if secrets_dir is not None and imported.secret_files:
        secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path, value in imported.secret_files.items():
            write_private(path, value + "\n")
            click.echo(f"wrote {path} (mode 0600)", err=True)
    text = render(imported, str(file))
    if output is None:
        click.echo(text, nl=False)
        return
    if imported.has_inline_secret:
        write_private(output, text)
    else:
        output.write_text(text, encoding="utf-8")
    click.echo(f"wrote {output}{' (mode 0600: it holds secrets)' if imported.has_inline_secret else ''}", err=True)


# --- secret ---


@main.group()
def secret() -> None:
    """GitLab-compatible encrypted credentials (user and password of a mailbox).

    The files are GitLab's own: what `gitlab-rake gitlab:incoming_email:secret:edit` writes
    (incoming_email.yaml.enc), with the key from GitLab's encrypted_settings_key_base.

    \b
    Example:
      lmtp-gateway secret show incoming_email.yaml.enc --key-file /etc/gitlab/gitlab-secrets.json
    """


def _key_bases(key_file: str | None, config_path: str | None, generate: bool = False) -> list[str]:
    from lmtp_gateway.secrets import KEY_FILE_KEY, create_key_file, read_key_bases

    if key_file is None and config_path is not None:
        found = load_config(config_path, secrets=False).encrypted_settings_key_file
        if found is None:
            where = "no secrets.yml beside it" if config_path.endswith("gitlab.yml") else f"no {KEY_FILE_KEY}"
            raise click.ClickException(f"{config_path}: {where}; give --key-file")
        key_file = str(found)
    if key_file is None:
        raise click.UsageError("give --key-file KEY (or --config FILE with encrypted_settings_key_file)")
    path = Path(key_file).expanduser()
    if generate:
        create_key_file(path)
        click.echo(f"new key written to {path} (mode 0600); keep a copy: without it the file is lost", err=True)
    return read_key_bases(path)


_key_file_option = click.option(
    "--key-file",
    metavar="KEY",
    help="File with the key: just the key, GitLab's config/secrets.yml or /etc/gitlab/gitlab-secrets.json.",
)
_secret_config_option = click.option(
    "--config", "config_path", metavar="FILE", help="Use this configuration's encrypted_settings_key_file as KEY."
)


@secret.command("edit")
@_key_file_option
@_secret_config_option
@click.option("--generate-key", is_flag=True, help="Create KEY with a new random key first (mode 0600).")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def secret_edit(key_file: str | None, config_path: str | None, generate_key: bool, file: Path) -> None:
    """Edit the encrypted credentials FILE in $EDITOR, else editor or vi (creating it if it does not exist).

    The decrypted text is written to a 0600 file in a private temporary directory, re-encrypted when the editor
    exits and removed in every case. Content that is not a YAML mapping is not saved.

    \b
    Examples:
      EDITOR=vim lmtp-gateway secret edit /etc/lmtp-gateway/incoming_email.yaml.enc --key-file /etc/lmtp-gateway/key
      lmtp-gateway secret edit new.yaml.enc --key-file /etc/lmtp-gateway/key --generate-key
      lmtp-gateway secret edit /var/opt/gitlab/gitlab-rails/shared/encrypted_settings/incoming_email.yaml.enc \\
          --key-file /etc/gitlab/gitlab-secrets.json
    """
    import os

    from lmtp_gateway.secrets import edit_encrypted

    editor = os.environ.get("EDITOR") or os.environ.get("VISUAL") or shutil.which("editor") or shutil.which("vi")
    if not editor:
        raise click.UsageError(f"no editor found: run it as EDITOR=nano lmtp-gateway secret edit {file} ...")
    if not file.parent.is_dir():
        raise click.ClickException(f"{file.parent}: no such directory; create it first")
    key_bases = _key_bases(key_file, config_path, generate=generate_key)
    result = edit_encrypted(file, key_bases, editor)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{file}: {'encrypted and saved' if result.changed else 'unchanged'}", err=True)


@secret.command("show")
@_key_file_option
@_secret_config_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def secret_show(key_file: str | None, config_path: str | None, file: Path) -> None:
    """Print the decrypted content of the encrypted credentials FILE.

    \b
    Example:
      lmtp-gateway secret show /etc/lmtp-gateway/incoming_email.yaml.enc --key-file /etc/lmtp-gateway/key
    """
    from lmtp_gateway.secrets import read_encrypted_text

    if not file.exists():
        raise click.ClickException(f"{file}: no such file; create it with: lmtp-gateway secret edit {file}")
    click.echo(read_encrypted_text(file, _key_bases(key_file, config_path)), nl=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
