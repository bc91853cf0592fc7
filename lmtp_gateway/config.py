"""Configuration: the gateway's YAML, or GitLab's own ``gitlab.yml``, checked key by key.

Section and key names are GitLab's, so an admin can paste the ``incoming_email:`` and ``service_desk_email:``
blocks of ``gitlab.yml`` unchanged. Every error names the file, the dotted key and what is wrong, and never
shows the value of a secret.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from lmtp_gateway.errors import ConfigError, TemplateError
from lmtp_gateway.listen import Address
from lmtp_gateway.rules import (
    INCOMING_EMAIL,
    MAILBOX_TYPES,
    SERVICE_DESK_EMAIL,
    AddressTemplate,
    RoutingTable,
    classify_key,
)
from lmtp_gateway.secrets import KEY_FILE_KEY, resolve_secrets

ENV_CONFIG = "LMTP_GATEWAY_CONFIG"
DEFAULT_LISTEN = "127.0.0.1:2424"
DEFAULT_MILTER_LISTEN = "127.0.0.1:2426"  # TCP: Debian's smtpd runs chrooted, a UNIX socket would have to be inside
DEFAULT_MONITORING_LISTEN = "127.0.0.1:9425"  # serve's /metrics, /livez, /readyz
DEFAULT_COLLECT_MONITORING_LISTEN = "127.0.0.1:9426"  # the same for collect, so both can run on one host
DEFAULT_MAX_MESSAGE_SIZE = 25 * 1024 * 1024
DEFAULT_RETENTION = 7 * 86400
DEFAULT_WEBHOOK_TIMEOUT = 90  # GitLab's Puma worker_timeout is 60 s: a POST GitLab is still working on is not cut
DELIVERY_METHODS = ("sidekiq", "webhook", "maildir")
TIMESTAMP_STYLES = ("sidekiq7", "sidekiq8")
SYNC_METHODS = ("fsync", "syncfs", "off")


# --- value checkers: each takes (value) and returns the converted value or raises ValueError(message) ---


def _string(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a string, got {_kind(value)}")
    return str(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        raise ValueError(f"expected a whole number, got {_kind(value)}")
    return value


def _positive(value: Any) -> int:
    number = _integer(value)
    if number < 1:
        raise ValueError(f"expected a whole number of at least 1, got {number}")
    return number


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {_kind(value)}")


_SIZE = re.compile(r"(?i)\s*(\d+)\s*([kmg]?)(?:i?b)?\s*")
_DURATION = re.compile(r"(?i)\s*(\d+)\s*([smhdw]?)\s*")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(value: Any) -> int:
    """Bytes from ``26214400``, ``25M``, ``25MB`` or ``25 MiB`` (binary units, as Postfix counts)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    found = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if not found or int(found[1]) == 0:
        raise ValueError(f"expected a size such as 25M or 26214400, got {_kind(value)}")
    return int(found[1]) * _UNITS[found[2].lower()]


def parse_duration(value: Any) -> int:
    """Seconds from ``604800``, ``7d``, ``12h``, ``30m`` or ``2w``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    found = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if not found:
        raise ValueError(f"expected a duration such as 7d, 12h or 3600, got {_kind(value)}")
    return int(found[1]) * _SECONDS[found[2].lower()]


def _workers(value: Any) -> int:
    """lmtp.workers: a number of processes, or "auto" for one per CPU."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        return _positive(value)
    except ValueError:
        raise ValueError(f"expected auto or a number of worker processes (1 or more), got {_kind(value)}") from None


def _file_mode(value: Any) -> int:
    text = f"{value:o}" if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(text, str) and re.fullmatch(r"0?[0-7]{3}", text.strip()):
        return int(text, 8)
    raise ValueError(f"expected an octal mode such as '0660', got {_kind(value)}")


def _addresses(value: Any) -> tuple[str, ...]:
    """One or more listeners: HOST:PORT or unix:PATH (listen.Address)."""
    items = value if isinstance(value, list) else [value]
    return tuple(str(Address.parse(_string(item))) for item in items)


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            hint = _did_you_mean(str(value), choices)
            raise ValueError(f"expected one of {', '.join(choices)}, got {_kind(value)}{hint}")
        return str(value)

    return check


def _sync_method(value: Any) -> str:
    """fsync | syncfs | off; YAML reads a bare off/no/false as false (and on/yes/true as true)."""
    if isinstance(value, bool):
        return "fsync" if value else "off"
    return _choice(*SYNC_METHODS)(value)


def _http_listen(value: Any) -> str:
    """HOST:PORT for the monitoring listener, or "" when it is off ("off", "" or YAML's bare off/false)."""
    if value is False or value is None or (isinstance(value, str) and value.strip().lower() in ("", "off")):
        return ""
    try:
        address = Address.parse(_string(value))
    except ValueError:
        address = None
    if address is None or address.is_unix:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9425, or off; got {_kind(value)}")
    return str(address)


def _custom_emails(value: Any) -> dict[str, str]:
    """Service Desk custom email addresses (GitLab 16.4+), each with its project's Service Desk key."""
    if not isinstance(value, dict):
        raise ValueError("expected address: project key pairs, such as support@example.com: group-project-42-issue-")
    result = {}
    for address, key in value.items():
        address, key = _string(address), _string(key)
        if "@" not in address:
            raise ValueError(f"{address!r} is not an email address")
        if not key.endswith("-issue-") or classify_key(key) != "service_desk":
            raise ValueError(
                f"{address}: {key!r} is not a project's Service Desk key (such as group-project-42-issue-: the key in "
                "the project's Service Desk address)"
            )
        result[address] = key
    return result


def _sentinels(value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of {host: ..., port: ...} entries")
    result = []
    for entry in value:
        if not isinstance(entry, dict) or "host" not in entry:
            raise ValueError("each sentinel needs host (and optionally port, default 26379)")
        result.append((_string(entry["host"]), _integer(entry.get("port", 26379))))
    return tuple(result)


def _replicas_to_wait(value: Any) -> int | str:
    """redis.replicas_to_wait: "auto" or how many replicas must hold a job before it counts as delivered."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = _integer(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"expected auto or a whole number of replicas (0: never wait), got {_kind(value)}")
    return number


_WAIT_TIMEOUT = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*")
MAX_REPLICA_WAIT = 60.0


def _replica_wait_timeout(value: Any) -> float:
    """Seconds from ``2``, ``2s``, ``500ms`` or ``0.5``: from 1ms (WAIT counts in milliseconds, and 0 would wait
    for ever) to a minute (a delivery worker waits meanwhile)."""
    found = None if isinstance(value, bool) else _WAIT_TIMEOUT.fullmatch(str(value))
    seconds = float(found[1]) / (1000 if (found[2] or "").lower() == "ms" else 1) if found else 0.0
    if not 0.001 <= seconds <= MAX_REPLICA_WAIT:
        raise ValueError(f"expected a time from 1ms to 60s, such as 2s or 500ms; got {_kind(value)}")
    return seconds


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- the schema ---

Checker = Callable[[Any], Any]
Schema = Mapping[str, "Checker | Mapping[str, Any]"]

SECRET_KEYS = frozenset({"password", "client_secret", "sentinel_password"})


def _with_secret_sources(schema: dict[str, Any]) -> dict[str, Any]:
    """Each secret key may also be given as <key>_file (a private file) or <key>_env (a variable); see secrets.py."""
    extra = {f"{key}{suffix}": _string for key in schema if key in SECRET_KEYS for suffix in ("_file", "_env")}
    return {**schema, **extra}


INBOX_OPTIONS: Schema = _with_secret_sources(
    {
        "tenant_id": _string,
        "client_id": _string,
        "client_secret": _string,
        "poll_interval": _integer,
        "azure_ad_endpoint": _string,
        "graph_endpoint": _string,
        "scope": _string,  # ours: the token scope for IMAP XOAUTH2 (default Exchange Online's)
    }
)

MAILBOX_SCHEMA: Schema = _with_secret_sources(
    {
        "enabled": _boolean,
        "address": _string,
        "user": _string,
        "password": _string,
        "host": _string,
        "port": _integer,
        "ssl": _boolean,
        "start_tls": _boolean,
        "ssl_verify": _boolean,  # ours: false only for a test server with a self-signed certificate
        "ssl_ca_file": _string,  # ours: a private CA for the IMAP server's certificate
        "mailbox": _string,
        "idle_timeout": _integer,
        "delete_after_delivery": _boolean,
        "expunge_deleted": _boolean,
        "inbox_method": _choice("imap", "microsoft_graph"),
        "inbox_options": INBOX_OPTIONS,
        "delivery_method": _choice(*DELIVERY_METHODS),
        "secret_file": _string,
        "encrypted_secret_file": _string,
        "maildir_path": _string,  # delivery_method: maildir only; default <spool.path>/maildir/<mailbox>
        "log_path": _string,  # gitlab.yml carries it for mail_room; accepted and unused
    }
)

SCHEMA: Schema = {
    "gitlab": {"host": _string, "url": _string, "webhook_timeout": parse_duration},
    "incoming_email": MAILBOX_SCHEMA,
    "service_desk_email": MAILBOX_SCHEMA,
    "lmtp": {
        "listen": _addresses,
        "max_message_size": parse_size,
        "max_recipients": _positive,
        "max_transaction_bytes": parse_size,
        "socket_mode": _file_mode,
        "socket_group": _string,
        "hostname": _string,
        "workers": _workers,
    },
    "redis": _with_secret_sources(
        {
            "url": _string,
            "sentinels": _sentinels,
            "sentinel_password": _string,
            "queue": _string,
            "namespace": _string,
            "timestamp_style": _choice(*TIMESTAMP_STYLES),
            "replicas_to_wait": _replicas_to_wait,
            "replica_wait_timeout": _replica_wait_timeout,
        }
    ),
    "policy": {"listen": _addresses},
    "milter": {"listen": _addresses},
    "spool": {"path": _string, "retention": parse_duration, "sync": _sync_method},
    "encrypted_settings_key_file": _string,  # GitLab's encrypted_settings_key_base, for encrypted_secret_file
    "monitoring": {"listen": _http_listen, "collect_listen": _http_listen},
    "custom_emails": _custom_emails,
}


def _check(data: Any, schema: Schema, where: str, source: str, strict: bool) -> dict[str, Any]:
    """Validate `data` against `schema`; unknown keys are errors when `strict` (our own file)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'}: expected a mapping of keys, got {_kind(data)}")
    result: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        spec = schema.get(key)
        if spec is None:
            if strict:
                hint = _did_you_mean(str(key), schema)
                raise ConfigError(f"{source}: {path}: unknown key{hint}")
            continue
        if isinstance(spec, Mapping):
            result[key] = _check(value, spec, path, source, strict)
            continue
        try:
            result[key] = spec(value)
        except ValueError as error:
            message = "has the wrong type or format (value hidden: it is a secret)" if key in SECRET_KEYS else error
            raise ConfigError(f"{source}: {path}: {message}") from None
    return result


# --- the typed result ---


@dataclass(frozen=True)
class MailboxConfig:
    """One GitLab mailbox type: where its mail is addressed and how it reaches GitLab."""

    name: str
    template: AddressTemplate
    delivery_method: str
    secret_file: Path | None = None
    # The collector keys as given, with secrets resolved (settings["password"], settings["inbox_options"]
    # ["client_secret"], settings["user"] from an encrypted file); kept out of repr so no secret is ever printed.
    settings: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class LmtpConfig:
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_recipients: int = 50  # per transaction, as Postfix's lmtp_destination_recipient_limit; more get 452
    max_transaction_bytes: int = 100 * 1024 * 1024  # message size × recipients per transaction; past it, 452
    socket_mode: int = 0o660
    socket_group: str | None = None
    hostname: str | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # serve's processes, one journal shard each


@dataclass(frozen=True)
class PolicyConfig:
    listen: tuple[str, ...] = ()  # Postfix policy service: HOST:PORT or unix:PATH; off unless given


@dataclass(frozen=True)
class MilterConfig:
    listen: tuple[str, ...] = (DEFAULT_MILTER_LISTEN,)  # where Postfix's smtpd_milters reaches `lmtp-gateway milter`


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_password: str | None = field(default=None, repr=False)
    queue: str = "default"
    namespace: str = ""  # "resque:gitlab" for GitLab releases that still namespaced Sidekiq
    timestamp_style: str = "sidekiq7"
    # How many replicas must hold a job (Redis WAIT) before it counts as delivered; with fewer connected, none is
    # written. "auto": with sentinels every replica Sentinel sees up (it may promote any of them), without them
    # one when the master has a replica; 0: never wait.
    replicas_to_wait: int | str = "auto"
    replica_wait_timeout: float = 2.0  # seconds for the replicas' acknowledgement; late, the push is retried


@dataclass(frozen=True)
class SpoolConfig:
    path: Path
    retention: int = DEFAULT_RETENTION
    sync: str = "fsync"  # fsync | syncfs | off (throwaway set-ups only)


@dataclass(frozen=True)
class MonitoringConfig:
    """The HTTP listener for /metrics, /livez and /readyz; "" turns it off."""

    listen: str = DEFAULT_MONITORING_LISTEN  # for serve
    collect_listen: str = DEFAULT_COLLECT_MONITORING_LISTEN  # for collect


@dataclass(frozen=True)
class Config:
    source: str
    gitlab_host: str
    gitlab_url: str | None
    mailboxes: Mapping[str, MailboxConfig]
    lmtp: LmtpConfig
    policy: PolicyConfig
    redis: RedisConfig
    spool: SpoolConfig
    warnings: tuple[str, ...] = ()
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    milter: MilterConfig = field(default_factory=MilterConfig)
    redis_given: bool = False  # a redis: section, so Redis is there even for webhook or maildir delivery
    custom_emails: Mapping[str, str] = field(default_factory=dict)  # Service Desk custom email → project key
    webhook_timeout: int = 90  # seconds for GitLab's answer to a webhook POST: above GitLab's own 60 s
    encrypted_settings_key_file: Path | None = None  # GitLab's encrypted_settings_key_base (secrets.yml)

    def overridden(
        self, *, spool: str | None = None, listen: tuple[str, ...] = (), monitoring_listen: str | None = None
    ) -> Config:
        """This configuration with what the command line gives instead (checked as the keys are)."""
        config = self
        if spool:
            config = replace(config, spool=replace(config.spool, path=Path(spool).expanduser()))
        try:
            if listen:
                config = replace(config, lmtp=replace(config.lmtp, listen=_addresses(list(listen))))
            if monitoring_listen is not None:
                config = replace(config, monitoring=replace(config.monitoring, listen=_http_listen(monitoring_listen)))
        except ValueError as error:
            option = "--listen" if listen else "--monitoring-listen"
            raise ConfigError(f"{option}: {error}") from None
        return config

    @property
    def uses_redis(self) -> bool:
        """Sidekiq delivery needs it; collectors arbitrate there whenever it is given."""
        return self.redis_given or any(m.delivery_method == "sidekiq" for m in self.mailboxes.values())

    @functools.cached_property
    def routing(self) -> RoutingTable:
        mailboxes = tuple((m.name, m.template) for m in self.mailboxes.values())
        return RoutingTable(self.gitlab_host, mailboxes, self.custom_emails)


_REDIS_FIELDS = frozenset(f.name for f in dataclasses.fields(RedisConfig))

SYSTEM_SPOOL = Path("/var/lib/lmtp-gateway")  # the systemd unit's StateDirectory=lmtp-gateway


def default_spool_path() -> Path:
    """systemd's StateDirectory when run as a unit; else the service's journal when this machine has one (an
    admin's `spool list` as root looks where the service writes); else the XDG state directory."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if SYSTEM_SPOOL.is_dir() and os.access(SYSTEM_SPOOL, os.R_OK | os.X_OK):
        return SYSTEM_SPOOL
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state_home) / "lmtp-gateway"


EMBEDDED_SOURCE = "<embedded default>"

# Used when no file is given: LMTP on loopback, delivery to a local Maildir, no GitLab needed.
EMBEDDED_DEFAULT = """\
gitlab:
  host: localhost
incoming_email:
  address: "incoming+%{key}@localhost"
  delivery_method: maildir
service_desk_email:
  address: "contact+%{key}@localhost"
  delivery_method: maildir
"""


def is_gitlab_yml(data: Any) -> bool:
    """gitlab.yml has environment sections (``production:``, ``development:``…) at the top."""
    return isinstance(data, dict) and "production" in data and "gitlab" not in data


def load_config(path: str | os.PathLike[str] | None = None, *, secrets: bool = True) -> Config:
    """Load `path`, else $LMTP_GATEWAY_CONFIG, else the embedded default. `secrets=False` leaves passwords and
    client secrets unread: for the commands that deliver nothing and log in nowhere (explain, spool,
    postfix-config, policy), which then run where the service's secrets are not at hand."""
    chosen = path if path is not None else os.environ.get(ENV_CONFIG) or None
    if chosen is None:
        return parse_config(EMBEDDED_DEFAULT, EMBEDDED_SOURCE)
    source = str(chosen)
    try:
        text = Path(chosen).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file (give --config FILE or set {ENV_CONFIG})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{source}: cannot read: {error}") from None
    return parse_config(text, source, secrets=secrets)


def parse_config(text: str, source: str, *, secrets: bool = True) -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    warnings: list[str] = []
    if is_gitlab_yml(data):
        data = _from_gitlab_yml(data, source, warnings)
        strict = False
        default_delivery = "sidekiq"  # what GitLab itself does when delivery_method is unset
    else:
        strict = True
        default_delivery = "maildir"
    if data is None:
        raise ConfigError(f"{source}: the file is empty; see contrib/config/ for examples")
    checked = _check(data, SCHEMA, "", source, strict)
    return _build(checked, source, default_delivery, tuple(warnings), secrets)


def _from_gitlab_yml(data: dict[str, Any], source: str, warnings: list[str]) -> dict[str, Any]:
    production = data.get("production")
    if not isinstance(production, dict):
        raise ConfigError(f"{source}: production: expected the production environment's settings")
    gitlab = production.get("gitlab") or {}
    if not isinstance(gitlab, dict):
        raise ConfigError(
            f"{source}: production.gitlab: expected GitLab's settings (host, port, https…), got {_kind(gitlab)}"
        )
    result: dict[str, Any] = {"gitlab": {"host": gitlab.get("host", "localhost")}}
    if gitlab.get("host"):
        scheme = "https" if gitlab.get("https") else "http"
        port = gitlab.get("port")
        default_port = 443 if scheme == "https" else 80
        netloc = gitlab["host"] if port in (None, default_port) else f"{gitlab['host']}:{port}"
        relative = gitlab.get("relative_url_root") or ""
        result["gitlab"]["url"] = f"{scheme}://{netloc}{relative}"
    for name in MAILBOX_TYPES:
        section = production.get(name)
        if isinstance(section, dict):
            unknown = sorted(set(section) - set(MAILBOX_SCHEMA))
            if unknown:
                warnings.append(f"{source}: production.{name}: ignoring keys {', '.join(unknown)}")
            result[name] = section
    # GitLab's mail_room reads encrypted_settings_key_base from config/secrets.yml beside gitlab.yml; so do we.
    secrets_yml = Path(source).parent / "secrets.yml"
    if secrets_yml.is_file():
        result["encrypted_settings_key_file"] = str(secrets_yml)
    return result


def _build(
    data: dict[str, Any], source: str, default_delivery: str, warnings: tuple[str, ...], secrets: bool
) -> Config:
    key_file = data.get(KEY_FILE_KEY)
    data = resolve_secrets(data, source, MAILBOX_TYPES) if secrets else data
    gitlab = data.get("gitlab", {})
    mailboxes: dict[str, MailboxConfig] = {}
    for name in MAILBOX_TYPES:
        section = data.get(name)
        if section is None or section.get("enabled", True) is False:
            continue
        if "address" not in section:
            raise ConfigError(f'{source}: {name}.address: missing (e.g. "incoming+%{{key}}@incoming.example.com")')
        try:
            template = AddressTemplate.parse(section["address"])
        except TemplateError as error:
            raise ConfigError(f"{source}: {name}.address: {error}") from None
        secret = section.get("secret_file")
        mailbox = MailboxConfig(
            name=name,
            template=template,
            delivery_method=section.get("delivery_method", default_delivery),
            secret_file=Path(secret).expanduser() if secret else None,
            settings=section,
        )
        if mailbox.delivery_method == "webhook":
            if not gitlab.get("url"):
                raise ConfigError(f"{source}: gitlab.url: needed by {name}.delivery_method: webhook")
            if mailbox.secret_file is None:
                raise ConfigError(
                    f"{source}: {name}.secret_file: needed by delivery_method: webhook "
                    "(GitLab's .gitlab_mailroom_secret)"
                )
        mailboxes[name] = mailbox
    if not mailboxes:
        raise ConfigError(
            f"{source}: incoming_email: no enabled mailbox; give incoming_email.address "
            "and/or service_desk_email.address"
        )
    incoming = mailboxes.get(INCOMING_EMAIL)
    if SERVICE_DESK_EMAIL in mailboxes and incoming is not None and not incoming.template.has_key:
        warnings += (
            f"{source}: service_desk_email: GitLab's Service Desk works only with an incoming_email address that "
            "has %{key}; with the dedicated address of incoming_email, GitLab finds no project for Service Desk mail",
        )
    spool = data.get("spool", {})
    return Config(
        source=source,
        gitlab_host=gitlab.get("host", "localhost"),
        gitlab_url=gitlab.get("url"),
        webhook_timeout=gitlab.get("webhook_timeout", DEFAULT_WEBHOOK_TIMEOUT),
        mailboxes=mailboxes,
        lmtp=LmtpConfig(**data.get("lmtp", {})),
        policy=PolicyConfig(**data.get("policy", {})),
        # Left unresolved (secrets=False), sentinel_password_file / _env are no RedisConfig field: nothing reads them.
        redis=RedisConfig(**{k: v for k, v in data.get("redis", {}).items() if k in _REDIS_FIELDS}),
        spool=SpoolConfig(
            path=Path(spool["path"]).expanduser() if "path" in spool else default_spool_path(),
            retention=spool.get("retention", DEFAULT_RETENTION),
            sync=spool.get("sync", "fsync"),
        ),
        warnings=warnings,
        monitoring=MonitoringConfig(**data.get("monitoring", {})),
        milter=MilterConfig(**data.get("milter", {})),
        redis_given="redis" in data,
        custom_emails=data.get("custom_emails", {}),
        encrypted_settings_key_file=Path(key_file).expanduser() if key_file else None,
    )
