"""``lmtp-gateway check``: is everything the gateway needs in place, and if not, what to change.

The counterpart of ``gitlab-rake gitlab:incoming_email:check``. Every check is an async function that takes the
``Context`` and returns ``Result`` lines (ok / warn / fail / skip, what was found, a one-line fix); ``CHECKS``
lists them in the order they print and they run concurrently. Adding a check is writing one more such function
and appending it to ``CHECKS``. The CLI only prints what ``run_checks`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.resolver
import httpx

from lmtp_gateway.collect import build_source, describe, is_collected
from lmtp_gateway.config import Config, MailboxConfig, load_config
from lmtp_gateway.errors import ConfigError, SecretError, os_error_text
from lmtp_gateway.journal import Journal
from lmtp_gateway.listen import Address
from lmtp_gateway.logs import redact_urls
from lmtp_gateway.sinks import SidekiqSink, WebhookSink, read_webhook_key, redis_client
from lmtp_gateway.spool import Spool

Status = Literal["ok", "warn", "fail", "skip"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail", "skip")
LOW_SPACE = 1024**3  # warn below this much free space for the journal
NOT_RUNNING = "is `lmtp-gateway serve` running? Start it (systemctl start lmtp-gateway), or fix lmtp.listen"


@dataclass(frozen=True)
class Result:
    status: Status
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4}  {self.what}" + (f"  — {self.fix}" if self.fix else "")


@dataclass
class Context:
    config: Config
    resolver: dns.asyncresolver.Resolver | None  # None: no resolver configuration on this host
    timeout: float = 5.0


Check = Callable[[Context], Awaitable[list[Result]]]


# --- configuration ---


async def check_configuration(context: Context) -> list[Result]:
    config = context.config
    routes = ", ".join(f"{name} → {mailbox.delivery_method}" for name, mailbox in config.mailboxes.items())
    if config.source.startswith("<"):
        results = [
            Result(
                "warn",
                f"configuration: none given, using the embedded default ({routes})",
                "give --config FILE (or set LMTP_GATEWAY_CONFIG) to check the configuration serve uses",
            )
        ]
    else:
        results = [Result("ok", f"configuration {config.source} is valid ({routes})")]
    for warning in config.warnings:
        results.append(Result("warn", f"configuration: {warning}", "remove or correct those keys"))
    return results


# --- LMTP ---


async def check_lmtp(context: Context) -> list[Result]:
    if all(is_collected(mailbox) for mailbox in context.config.mailboxes.values()):
        return [Result("skip", "LMTP: every mailbox is collected (IMAP or Graph); serve is not needed")]
    return [await _check_lmtp_listener(spec, context.timeout) for spec in context.config.lmtp.listen]


async def _check_lmtp_listener(spec: str, timeout: float) -> Result:
    if spec.endswith(":0"):
        return Result("skip", f"LMTP {spec}: port 0 is chosen at start-up, nothing to connect to")
    try:
        reply = await asyncio.wait_for(_lhlo(spec), timeout)
    except TimeoutError:
        return Result("fail", f"LMTP {spec}: no answer within {timeout:g}s", NOT_RUNNING)
    except PermissionError:
        return Result("fail", f"LMTP {spec}: permission denied", "run check as root or in lmtp.socket_group")
    except OSError as error:
        return Result("fail", f"LMTP {spec}: {os_error_text(error).lower()}", NOT_RUNNING)
    if not reply.startswith("250"):
        return Result("fail", f"LMTP {spec}: answers LHLO with {reply!r}", "is this port really lmtp-gateway's?")
    return Result("ok", f"LMTP {spec} answers LHLO")


async def _lhlo(spec: str) -> str:
    reader, writer = await Address.parse(spec).connect()
    try:
        greeting = await _reply(reader)
        if not greeting.startswith("220"):
            return greeting
        writer.write(b"LHLO lmtp-gateway-check\r\n")
        answer = await _reply(reader)
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await _reply(reader)
        return answer
    finally:
        writer.close()


async def _reply(reader: asyncio.StreamReader) -> str:
    """One (possibly multi-line) SMTP reply; its last line."""
    while True:
        line = (await reader.readuntil(b"\n")).decode("utf-8", "replace").rstrip()
        if line[3:4] != "-":
            return line


# --- sinks ---


def _mailboxes(config: Config, method: str) -> list[MailboxConfig]:
    return [mailbox for mailbox in config.mailboxes.values() if mailbox.delivery_method == method]


def redis_description(config: Config) -> str:
    """Where GitLab's Redis is, without its password."""
    url = urlsplit(config.redis.url)
    if not config.redis.sentinels:
        return redact_urls(config.redis.url)
    sentinels = ",".join(f"{host}:{port}" for host, port in config.redis.sentinels)
    return f"sentinels {sentinels} (master {url.hostname})"


async def check_redis(context: Context) -> list[Result]:
    config = context.config
    users = _mailboxes(config, "sidekiq")
    if not config.uses_redis:
        return [Result("skip", "Redis: no mailbox delivers with sidekiq, and no redis: section for arbitration")]
    client = redis_client(config.redis)
    try:
        mailbox = users[0] if users else next(iter(config.mailboxes.values()))
        sink = SidekiqSink(mailbox.name, config.redis, client, config.spool.retention)
        # Arbitration alone writes claim keys, never the queue: probe what it needs, nothing more.
        problem = await asyncio.wait_for(sink.probe(queue=bool(users)), context.timeout)
    except TimeoutError:
        problem = f"no answer within {context.timeout:g}s"
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    where = redis_description(config)
    if problem:
        fix = (
            "bring the master's replicas back (or let Sentinel finish its failover), or lower redis.replicas_to_wait"
            if "replicas" in problem
            else "start Redis, or set redis.url (or redis.sentinels) to GitLab's Redis for queues"
        )
        return [Result("fail", f"Redis {where}: {problem}", fix)]
    if not users:
        return [Result("ok", f"Redis {where}: reachable and writable (collector arbitration)")]
    return [Result("ok", f"Redis {where}: reachable, {sink.queue_key} writable")]


async def check_webhook(context: Context) -> list[Result]:
    """GitLab accepts the token: POST an empty message. Every POST GitLab authenticates queues a job, so the one
    sent is the most harmless there is: GitLab's worker finds it blank and, with no sender to tell, does
    nothing. A 401 means the secret or the mailbox is wrong; any other answer proves the token was accepted."""
    users = _mailboxes(context.config, "webhook")
    if not users:
        return [Result("skip", "webhook: no mailbox delivers with webhook")]
    async with httpx.AsyncClient(timeout=context.timeout) as client:
        return [await _check_one_webhook(context.config, mailbox, client) for mailbox in users]


async def _check_one_webhook(config: Config, mailbox: MailboxConfig, client: httpx.AsyncClient) -> Result:
    assert config.gitlab_url and mailbox.secret_file  # required for webhook when the configuration was loaded
    try:
        key = read_webhook_key(mailbox.secret_file)
    except ConfigError as error:
        return Result("fail", f"webhook {mailbox.name}: {error}", f"fix {mailbox.name}.secret_file")
    sink = WebhookSink(mailbox.name, config.gitlab_url, key, client)
    try:
        status = (await sink.post(b"")).status_code
    except httpx.HTTPError as error:
        return Result(
            "fail",
            f"webhook {mailbox.name}: cannot reach {sink.url}: {type(error).__name__}",
            "check gitlab.url and that this host can reach GitLab",
        )
    if status in (200, 400):
        return Result("ok", f"webhook {mailbox.name}: GitLab accepts the token at {sink.url} ({status})")
    if status == 401:
        return Result(
            "fail",
            f"webhook {mailbox.name}: GitLab answered 401 at {sink.url}",
            f"{mailbox.secret_file} must hold GitLab's .gitlab_mailroom_secret, and {mailbox.name} must be enabled "
            "in GitLab with delivery_method: webhook",
        )
    if status == 404:
        return Result(
            "fail",
            f"webhook {mailbox.name}: GitLab answered 404 at {sink.url}",
            "check gitlab.url (including a relative URL root)",
        )
    return Result(
        "fail",
        f"webhook {mailbox.name}: GitLab answered HTTP {status} at {sink.url}",
        "is GitLab up? see its production_json.log",
    )


# --- journal ---


async def check_journal(context: Context) -> list[Result]:
    config = context.config
    journal = Journal(config.spool.path)
    root = config.spool.path
    if not root.is_dir():
        return [
            Result(
                "warn",
                f"journal {root} does not exist yet",
                "serve creates it at start; its user must be allowed to (systemd: StateDirectory=)",
            )
        ]
    problem = await asyncio.to_thread(journal.probe, config.lmtp.max_message_size)
    if problem:
        return [
            Result(
                "fail",
                problem,
                "free space or fix the mount and permissions of spool.path; serve answers 452 until it can write",
            )
        ]
    shards = Spool(root).journals  # one journal per worker
    quarantined = [(shard, entry_id) for shard in shards for entry_id in shard.quarantined()]
    places = ", ".join(sorted({str(shard.quarantine) for shard, _ in quarantined}))
    set_aside = (
        [
            Result(
                "warn",
                f"journal {root}: {len(quarantined)} damaged entries set aside in {places}",
                "lmtp-gateway spool list --quarantined says what is wrong with each; repair them, then "
                "lmtp-gateway replay --quarantined",
            )
        ]
        if quarantined
        else []
    )
    free = await asyncio.to_thread(journal.free_bytes)
    if free < LOW_SPACE:
        return [
            Result(
                "warn",
                f"journal {root} writable, but only {free // 2**20} MiB free",
                "free space there: when a message no longer fits, serve answers 452 and Postfix keeps the mail",
            ),
            *set_aside,
        ]
    return [Result("ok", f"journal {root} writable, {free / 2**30:.1f} GiB free"), *set_aside]


# --- DNS ---


def mail_domains(config: Config) -> dict[str, list[str]]:
    """Each domain the configured addresses are in, with the mailboxes using it."""
    domains: dict[str, list[str]] = {}
    for name, mailbox in config.mailboxes.items():
        domain = mailbox.template.text.rpartition("@")[2].lower().rstrip(".")
        domains.setdefault(domain, []).append(name)
    return domains


def _local_name(domain: str) -> bool:
    return "." not in domain or domain == "localhost" or domain.endswith(".localhost")


def is_local_address(address: str) -> bool:
    """Is `address` one of this machine's? Only a local address can be bound to."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except (OSError, ValueError):
        return False
    return True


def local_names(config: Config) -> set[str]:
    names = {socket.gethostname(), socket.getfqdn(), config.lmtp.hostname or ""}
    return {name.lower().rstrip(".") for name in names if name}


async def _addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    found: list[str] = []
    for kind in ("A", "AAAA"):
        with contextlib.suppress(dns.exception.DNSException):
            found += [record.to_text() for record in await resolver.resolve(host, kind)]
    return found


async def check_dns(context: Context) -> list[Result]:
    results = []
    for domain in mail_domains(context.config):
        if _local_name(domain):
            results.append(Result("skip", f"DNS {domain}: a local name, nothing to look up"))
        elif context.resolver is None:
            results.append(Result("warn", f"DNS {domain}: no resolver configured", "use --nameserver HOST"))
        else:
            results.append(await _check_mx(context, context.resolver, domain))
    return results


async def _check_mx(context: Context, resolver: dns.asyncresolver.Resolver, domain: str) -> Result:
    here = local_names(context.config)
    try:
        answer = await resolver.resolve(domain, "MX")
        hosts = [str(record.exchange).rstrip(".").lower() for record in sorted(answer, key=lambda r: r.preference)]
    except dns.resolver.NXDOMAIN:
        return Result(
            "fail",
            f"DNS {domain}: no such domain",
            f"create {domain} with an MX record pointing at this host (or at a relay that forwards to it)",
        )
    except dns.resolver.NoAnswer:
        hosts = []
    except dns.exception.DNSException as error:
        return Result("warn", f"DNS {domain}: lookup failed: {error}", "check the resolver, or give --nameserver HOST")
    if hosts == [""]:
        return Result("fail", f"DNS {domain}: null MX, the domain refuses all mail", f"publish a real MX for {domain}")
    if not hosts:
        addresses = await _addresses(resolver, domain)
        if any(is_local_address(address) for address in addresses):
            return Result(
                "warn",
                f"DNS {domain}: no MX record; mail falls back to its address record, which is this host",
                f"add an MX record for {domain} pointing at this host",
            )
        return Result("fail", f"DNS {domain}: no MX record", f"add an MX record for {domain} pointing at this host")
    seen = []
    for host in hosts:
        addresses = await _addresses(resolver, host)
        seen.append(f"{host} ({', '.join(addresses) or 'no address'})")
        if host in here or any(is_local_address(address) for address in addresses):
            return Result("ok", f"DNS {domain}: MX {seen[-1]} points at this host")
    return Result(
        "warn",
        f"DNS {domain}: MX points at {'; '.join(seen)}, not at this host",
        f"point the MX of {domain} at this host, or make sure {hosts[0]} relays {domain} to it",
    )


def main_domain_reason(domain: str, gitlab_host: str) -> str | None:
    """Why `domain` looks like the organisation's main mail domain rather than one dedicated to GitLab.

    The rule: the domain is gitlab.host's parent domain or above it (gitlab.example.com → example.com), or it has
    only two labels (example.com) and so is no subdomain at all. Without the public suffix list this cannot tell
    example.co.uk from a subdomain; the first part of the rule still catches it when gitlab.host lives there."""
    if _local_name(domain):
        return None
    labels = gitlab_host.lower().rstrip(".").split(".")
    parent = ".".join(labels[1:]) if len(labels) >= 3 else None
    if parent and (parent == domain or parent.endswith("." + domain)):
        return f"it is {'the parent' if parent == domain else 'an ancestor'} of gitlab.host {gitlab_host}"
    if domain.count(".") == 1:
        return "it has no subdomain label"
    return None


async def check_dedicated_domain(context: Context) -> list[Result]:
    results = []
    for domain, mailboxes in mail_domains(context.config).items():
        reason = main_domain_reason(domain, context.config.gitlab_host)
        names = " and ".join(mailboxes)
        if reason is None:
            if not _local_name(domain):
                results.append(Result("ok", f"{names}: {domain} is a subdomain, not the main mail domain"))
            continue
        suggestion = f"incoming.{context.config.gitlab_host}" if "." in context.config.gitlab_host else "a subdomain"
        results.append(
            Result(
                "warn",
                f"{names}: {domain} looks like the organisation's main mail domain ({reason})",
                f"use a subdomain only GitLab receives mail for, such as {suggestion}: anyone who can receive mail "
                f"at {domain} (every GitLab user can, through these addresses) passes 'prove you own an address at "
                f"{domain}' checks",
            )
        )
    return results


async def check_collectors(context: Context) -> list[Result]:
    """Log in to each collected mailbox and open its folder, as `collect` will (its state is not touched)."""
    mailboxes = [m for m in context.config.mailboxes.values() if is_collected(m)]
    if not mailboxes:
        return [Result("skip", "collectors: no mailbox is collected over IMAP or Microsoft Graph")]
    return list(await asyncio.gather(*(_check_collector(context, mailbox) for mailbox in mailboxes)))


async def _check_collector(context: Context, mailbox: MailboxConfig) -> Result:
    with tempfile.TemporaryDirectory() as scratch:
        try:
            source = build_source(context.config, mailbox, Path(scratch))
        except ConfigError as error:
            return Result("fail", f"{mailbox.name}: {error}", "complete the collector keys: contrib/config/examples")
        try:
            await asyncio.wait_for(source.connect(), context.timeout * 2)
        except TimeoutError:
            return Result("fail", f"{source.name}: no answer within {context.timeout * 2:g}s", CHECK_NETWORK)
        except Exception as error:  # every way a login can fail is reported, none raised
            return Result("fail", f"{source.name}: {describe(error)}", _collector_fix(error))
        finally:
            with contextlib.suppress(Exception):
                await source.close()
    return Result("ok", f"{source.name}: logged in, folder opened")


CHECK_NETWORK = "check host, port and firewall (and ssl / start_tls)"


def _collector_fix(error: BaseException) -> str:
    text = str(error)
    if "certificate" in text:
        return "give ssl_ca_file for a private CA (ssl_verify: false only for a test server)"
    if "refused" in text and ("LOGIN" in text or "XOAUTH2" in text or "token" in text):
        return "check user and password (or inbox_options.client_id / client_secret / tenant_id)"
    if "select" in text:
        return "check mailbox: the folder must exist"
    return CHECK_NETWORK


CHECKS: list[Check] = [
    check_configuration,
    check_lmtp,
    check_redis,
    check_webhook,
    check_journal,
    check_collectors,
    check_dns,
    check_dedicated_domain,
]


# --- running them ---


def make_resolver(nameserver: str | None, timeout: float = 5.0) -> dns.asyncresolver.Resolver | None:
    """The system's resolver, or HOST[:PORT] (an address or a name; [v6]:port) given by --nameserver."""
    if nameserver is None:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            return None
    else:
        host, port = _host_port(nameserver)
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [socket.getaddrinfo(host, port, proto=socket.IPPROTO_UDP)[0][4][0]]
        resolver.port = port
    resolver.lifetime = timeout
    return resolver


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.lstrip(":") or 53)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, 53


async def run_checks(
    config: Config, *, nameserver: str | None = None, timeout: float = 5.0, checks: list[Check] | None = None
) -> list[Result]:
    context = Context(config, make_resolver(nameserver, timeout), timeout)
    groups = await asyncio.gather(*(check(context) for check in checks or CHECKS))
    return [replace(r, what=redact_urls(r.what), fix=redact_urls(r.fix)) for group in groups for r in group]


def check(
    config_path: str | None, *, spool: str | None = None, nameserver: str | None = None, timeout: float = 5.0
) -> list[Result]:
    """Load the configuration and run every check (a configuration that does not load is the only result)."""
    try:
        config = load_config(config_path).overridden(spool=spool)
    except SecretError as error:
        fix = (
            "the file names it right, it is not at hand here: run check in the service's environment (systemd: "
            "its Environment= or EnvironmentFile=), or name the secret with a *_file readable by check"
        )
        return [Result("fail", f"configuration: {error}", fix)]
    except ConfigError as error:
        return [Result("fail", f"configuration: {error}", "correct the file and run check again")]
    return asyncio.run(run_checks(config, nameserver=nameserver, timeout=timeout))


def as_json(results: list[Result]) -> dict[str, object]:
    return {
        "ok": not any(result.status == "fail" for result in results),
        "counts": {status: sum(result.status == status for result in results) for status in STATUSES},
        "checks": [asdict(result) for result in results],
    }
