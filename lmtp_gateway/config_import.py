"""``config import``: GitLab's ``gitlab.rb`` (Omnibus) or ``gitlab.yml`` turned into the gateway's YAML.

``gitlab.rb`` is Ruby. It is never evaluated: a small reader takes the literal subset Omnibus users write
(``name['key'] = value`` with strings, numbers, true/false/nil, symbols, arrays and hashes, and
``external_url '...'``) and reports every other statement as a warning naming its line, never its value.

Secrets are not copied in plain text unless asked: by default each becomes ``<key>_env: VARIABLE`` (set it with
systemd's ``EnvironmentFile=``); with ``secrets_dir`` each is written to its own 0600 file and referenced with
``<key>_file``; ``include_secrets`` copies them inline.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

from lmtp_gateway.config import MAILBOX_SCHEMA, _from_gitlab_yml, is_gitlab_yml
from lmtp_gateway.errors import ConfigError
from lmtp_gateway.rules import MAILBOX_TYPES

# Omnibus spelling -> gitlab.yml spelling, where they differ.
OMNIBUS_RENAMES = {"email": "user", "mailbox_name": "mailbox", "log_file": "log_path"}
OMNIBUS_IGNORED = {"log_file", "log_path", "auth_token"}  # auth_token: handled as the webhook secret file
OMNIBUS_ETC = "/var/opt/gitlab/gitlab-rails/etc"
OMNIBUS_ENCRYPTED = "/var/opt/gitlab/gitlab-rails/shared/encrypted_settings"
OMNIBUS_REDIS_SOCKET = "/var/opt/gitlab/redis/redis.socket"


class RubyError(ValueError):
    """A statement outside the literal subset."""


# --- a reader for the Ruby literals gitlab.rb uses ---

_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r]+|\\\n)
  | (?P<comment>\#[^\n]*)
  | (?P<newline>\n|;)
  | (?P<sq>'(?:[^'\\]|\\.)*')
  | (?P<dq>"(?:[^"\\]|\\.)*")
  | (?P<number>-?\d[\d_]*(?:\.\d+)?)
  | (?P<arrow>=>)
  | (?P<label>[A-Za-z_]\w*:(?!:))
  | (?P<symbol>:[A-Za-z_]\w*[?!]?)
  | (?P<ident>[A-Za-z_]\w*[?!]?)
  | (?P<punct>[\[\]{}(),=:])
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_KEYWORDS = frozenset(
    {"if", "unless", "else", "elsif", "end", "case", "when", "while", "until", "for", "do", "begin", "rescue"}
    | {"ensure", "def", "class", "module", "return", "require", "require_relative", "load"}
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "s": " ", "e": "\x1b", "a": "\a", "b": "\b", "f": "\f"}


@dataclass
class Token:
    kind: str
    text: str
    line: int
    spaced: bool = False  # after white space: `roles ['a']` is a call, `node['a']` an index


def _tokens(text: str) -> list[Token]:
    result, line, spaced = [], 1, False
    for found in _TOKEN.finditer(text):
        kind, value = found.lastgroup or "other", found.group()
        if kind not in ("space", "comment"):
            result.append(Token(kind, value, line, spaced))
        spaced = kind == "space"
        line += value.count("\n")
    result.append(Token("newline", "", line))
    return result


def _string_value(token: Token) -> str:
    body = token.text[1:-1]
    if token.kind == "sq":
        return re.sub(r"\\([\\'])", r"\1", body)
    if "#{" in body:
        raise RubyError("string interpolation #{...}")
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[1]), body)


class _Reader:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.at = 0

    def peek(self, skip_newlines: bool = False) -> Token:
        if skip_newlines:
            while self.tokens[self.at].kind == "newline" and self.at < len(self.tokens) - 1:
                self.at += 1
        return self.tokens[self.at]

    def take(self, skip_newlines: bool = False) -> Token:
        token = self.peek(skip_newlines)
        self.at = min(self.at + 1, len(self.tokens) - 1)
        return token

    def expect(self, text: str, skip_newlines: bool = False) -> None:
        token = self.take(skip_newlines)
        if token.text != text:
            raise RubyError(f"expected {text!r}, found {token.text or 'end of line'!r}")

    def value(self) -> Any:
        token = self.take(skip_newlines=True)
        if token.kind in ("sq", "dq"):
            return _string_value(token)
        if token.kind == "number":
            number = token.text.replace("_", "")
            return float(number) if "." in number else int(number)
        if token.kind == "symbol":
            return token.text[1:]
        if token.kind == "ident" and token.text in ("true", "false", "nil"):
            return {"true": True, "false": False, "nil": None}[token.text]
        if token.text == "[":
            return self._sequence("]", self.value)
        if token.text == "{":
            return dict(self._sequence("}", self._pair))
        raise RubyError(f"unsupported value {token.text!r}" if token.kind != "ident" else "a method call or variable")

    def _sequence(self, close: str, item: Any) -> list[Any]:
        items: list[Any] = []
        while self.peek(skip_newlines=True).text != close:
            items.append(item())
            if self.peek(skip_newlines=True).text == ",":
                self.take()
            elif self.peek(skip_newlines=True).text != close:
                raise RubyError(f"expected ',' or {close!r}")
        self.take(skip_newlines=True)
        return items

    def _pair(self) -> tuple[str, Any]:
        token = self.peek(skip_newlines=True)
        if token.kind == "label":  # tenant_id: 'x'
            self.take()
            return token.text[:-1], self.value()
        key = self.value()
        if self.peek().text == ":":  # 'tenant_id': 'x' (a symbol key in Ruby)
            self.take()
        else:
            self.expect("=>", skip_newlines=True)
        return str(key), self.value()


@dataclass
class RubyConfig:
    """The assignments of a gitlab.rb: ('gitlab_rails', 'incoming_email_address') -> value."""

    values: dict[tuple[str, ...], Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read_gitlab_rb(text: str, source: str = "gitlab.rb") -> RubyConfig:
    """Read the literal assignments of a gitlab.rb; any other statement becomes a warning and is skipped."""
    reader = _Reader(_tokens(text))
    result = RubyConfig()
    while True:
        start = reader.peek(skip_newlines=True)
        if start.kind == "newline":  # only the end-of-text sentinel is left
            break
        target: list[str] = []
        try:
            name = reader.take()
            if name.kind != "ident" or name.text in _KEYWORDS:
                raise RubyError(f"unexpected {name.text!r}" if name.kind != "ident" else "Ruby code")
            target.append(name.text)
            if reader.peek().text != "[" or reader.peek().spaced:  # a call: external_url 'https://...', roles [...]
                if reader.peek().text == "(":
                    reader.take()
                value = reader.value()
                if reader.peek().text == ")":
                    reader.take()
            else:
                while reader.peek().text == "[":
                    reader.take()
                    key = reader.value()
                    reader.expect("]")
                    target.append(str(key))
                reader.expect("=")
                value = reader.value()
            if reader.peek().kind != "newline":
                raise RubyError(f"unexpected {reader.peek().text!r} after the value")
            result.values[tuple(target)] = value
        except RubyError as error:
            shown = target[0] + "".join(f"['{key}']" for key in target[1:]) if target else start.text
            result.warnings.append(f"{source}:{start.line}: {shown}: skipped, not a plain Ruby literal ({error})")
            _skip_statement(reader)
    return result


def _skip_statement(reader: _Reader) -> None:
    depth = 0
    while True:
        token = reader.take()
        if token.text in ("[", "{", "("):
            depth += 1
        elif token.text in ("]", "}", ")"):
            depth -= 1
        elif token.kind == "newline" and (depth <= 0 or reader.at >= len(reader.tokens) - 1):
            return


# --- the conversion ---

SECRET_PLACES = (((), "password"), (("inbox_options",), "client_secret"))


@dataclass
class Imported:
    """The gateway configuration made from GitLab's, what to tell the admin, and secret files to write."""

    data: dict[str, Any]
    warnings: list[str]
    secret_files: dict[Path, str] = field(default_factory=dict, repr=False)

    @property
    def has_inline_secret(self) -> bool:
        return any(True for _ in _inline_secrets(self.data))


def _inline_secrets(data: dict[str, Any]) -> Iterator[str]:
    for name in MAILBOX_TYPES:
        section = data.get(name) or {}
        if section.get("password") or (section.get("inbox_options") or {}).get("client_secret"):
            yield name
    redis = data.get("redis") or {}
    if redis.get("sentinel_password") or urlsplit(redis.get("url", "")).password:
        yield "redis"


def import_file(path: Path, *, include_secrets: bool = False, secrets_dir: Path | None = None) -> Imported:
    """Read `path` (gitlab.rb, or gitlab.yml when it parses as YAML with a production section) and convert it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {getattr(error, 'strerror', None) or error}") from None
    source = str(path)
    parsed = _yaml_or_none(text)
    if is_gitlab_yml(parsed):
        warnings: list[str] = []
        data = _from_gitlab_yml(parsed, source, warnings)
        data.pop("encrypted_settings_key_file", None)
        for name in MAILBOX_TYPES:
            if name in data:
                data[name] = {k: v for k, v in data[name].items() if k in MAILBOX_SCHEMA and k != "log_path"}
                data[name].setdefault("delivery_method", "sidekiq")  # mail_room's default
        if any(data.get(n, {}).get("delivery_method") == "sidekiq" for n in MAILBOX_TYPES):
            warnings.append(f"{source}: Redis is not in gitlab.yml: set redis.url from GitLab's config/resque.yml")
            data["redis"] = {"url": "redis://127.0.0.1:6379/0"}
    else:
        ruby = read_gitlab_rb(text, source)
        warnings = ruby.warnings
        data = _from_gitlab_rb(ruby.values, source, warnings)
    enabled = [n for n in MAILBOX_TYPES if n in data and data[n].get("enabled", True) is not False]
    if not enabled:
        raise ConfigError(
            f"{source}: neither incoming_email nor service_desk_email is enabled "
            "(gitlab_rails['incoming_email_enabled'] = true and an address)"
        )
    imported = Imported(data, warnings)
    _place_secrets(imported, include_secrets, secrets_dir)
    return imported


def _yaml_or_none(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def _from_gitlab_rb(values: dict[tuple[str, ...], Any], source: str, warnings: list[str]) -> dict[str, Any]:
    rails = {key[1]: value for key, value in values.items() if len(key) == 2 and key[0] == "gitlab_rails"}
    data: dict[str, Any] = {}
    url = values.get(("external_url",))
    if isinstance(url, str) and urlsplit(url).hostname:
        data["gitlab"] = {"host": urlsplit(url).hostname, "url": url.rstrip("/")}
    else:
        warnings.append(f"{source}: no external_url: gitlab.host set to localhost and gitlab.url to http://localhost")
        data["gitlab"] = {"host": "localhost", "url": "http://localhost"}
    for name in MAILBOX_TYPES:
        prefix = f"{name}_"
        section: dict[str, Any] = {}
        for key, value in rails.items():
            if not key.startswith(prefix) or value is None:
                continue
            short = key.removeprefix(prefix)
            if short in OMNIBUS_IGNORED:
                continue
            short = OMNIBUS_RENAMES.get(short, short)
            if short not in MAILBOX_SCHEMA:
                warnings.append(f"{source}: gitlab_rails['{key}']: not a setting the gateway knows; ignored")
                continue
            section[short] = value
        if not section:
            continue
        if section.pop("enabled", False) is not True:
            warnings.append(f"{source}: {name}: gitlab_rails['{name}_enabled'] is not true; not imported")
            continue
        if "address" not in section:
            warnings.append(f"{source}: {name}: enabled but no gitlab_rails['{name}_address']; not imported")
            continue
        if isinstance(section.get("inbox_options"), dict):
            section["inbox_options"] = {str(k): v for k, v in section["inbox_options"].items()}
        section.setdefault("delivery_method", "webhook")  # Omnibus' default since GitLab 15.3
        if section["delivery_method"] == "webhook":
            secret = f"{OMNIBUS_ETC}/gitlab_{name}_secret"
            section.setdefault("secret_file", secret)
            warnings.append(
                f"{source}: {name}.secret_file: {secret} is what Omnibus writes (mode 0644); the gateway refuses a "
                f"world-readable secret: copy it to /etc/lmtp-gateway/ with mode 0600 (or chmod 640 and add the "
                "gateway's user to its group) and point secret_file there"
            )
        is_collector = section.get("inbox_method") == "microsoft_graph" or section.get("host")
        if is_collector and "password" not in section and section.get("inbox_method") != "microsoft_graph":
            warnings.append(
                f"{source}: {name}: no password in gitlab.rb; if it is in GitLab's encrypted settings, add "
                f"encrypted_secret_file: {OMNIBUS_ENCRYPTED}/{name}.yaml.enc and, at the top, "
                "encrypted_settings_key_file: /etc/gitlab/gitlab-secrets.json"
            )
        data[name] = section
    if any(section.get("delivery_method") == "sidekiq" for n, section in data.items() if n in MAILBOX_TYPES):
        data["redis"] = _redis_from_gitlab_rb(values, rails)
    return data


def _redis_from_gitlab_rb(values: dict[tuple[str, ...], Any], rails: dict[str, Any]) -> dict[str, Any]:
    """GitLab's queues Redis: redis_queues_* when set (a separate instance), else the main redis_* settings."""
    instance = rails.get("redis_queues_instance")
    sentinels = rails.get("redis_queues_sentinels") or rails.get("redis_sentinels")
    password = rails.get("redis_queues_password") or rails.get("redis_password")
    if sentinels:
        master = values.get(("redis", "master_name")) or "gitlab-redis"
        password = values.get(("redis", "master_password")) or password
        url = f"redis://{master}/{rails.get('redis_database', 0)}"
    elif isinstance(instance, str):
        url = instance
    elif rails.get("redis_host"):
        scheme = "rediss" if rails.get("redis_ssl") else "redis"
        url = f"{scheme}://{rails['redis_host']}:{rails.get('redis_port', 6379)}/{rails.get('redis_database', 0)}"
    else:
        socket = rails.get("redis_socket") or OMNIBUS_REDIS_SOCKET
        url = f"unix://{socket}?db={rails.get('redis_database', 0)}"
    result: dict[str, Any] = {"url": url}
    if password and not urlsplit(url).password:
        result["password"] = password  # moved into the URL or out of the file by _place_secrets
    if sentinels:
        entries = [entry for entry in sentinels if isinstance(entry, dict)]
        result["sentinels"] = [{"host": entry.get("host"), "port": entry.get("port", 26379)} for entry in entries]
        sentinel_password = rails.get("redis_sentinels_password")
        if sentinel_password:
            result["sentinel_password"] = sentinel_password
    return result


def _env_name(*parts: str) -> str:
    return "_".join(parts).upper()


def _place_secrets(imported: Imported, include_secrets: bool, secrets_dir: Path | None) -> None:
    """Replace each secret by an _env or _file reference unless include_secrets; say where each one went."""
    data = imported.data
    places: list[tuple[dict[str, Any], str, str]] = []  # (holder, key, its dotted name)
    for name in MAILBOX_TYPES:
        section = data.get(name)
        if not section:
            continue
        for where, key in SECRET_PLACES:
            holder = section.get(where[0]) if where else section
            if isinstance(holder, dict) and holder.get(key) not in (None, ""):
                places.append((holder, key, ".".join((name, *where, key))))
    redis = data.get("redis") or {}
    if redis.get("sentinel_password"):
        places.append((redis, "sentinel_password", "redis.sentinel_password"))
    for holder, key, dotted in places:
        value = str(holder[key])
        label = dotted.replace(".inbox_options.", "_").replace(".", "_")
        if include_secrets:
            holder[key] = value
        elif secrets_dir is not None:
            path = secrets_dir / label
            del holder[key]
            holder[f"{key}_file"] = str(path)
            imported.secret_files[path] = value
        else:
            del holder[key]
            holder[f"{key}_env"] = _env_name(label)
            imported.warnings.append(
                f"{dotted}: not copied; give it to the gateway in the environment "
                f"variable {_env_name(label)} (systemd: EnvironmentFile=), or re-run with --secrets-dir DIR"
            )
    if redis:
        _place_redis_password(imported, redis, include_secrets)


def _place_redis_password(imported: Imported, redis: dict[str, Any], include_secrets: bool) -> None:
    """The gateway takes Redis' password only inside redis.url: copy it there only when asked."""
    url = urlsplit(redis["url"])
    password = redis.pop("password", None) or url.password
    if not password:
        return
    host = url.netloc.rpartition("@")[2]
    if include_secrets:
        redis["url"] = url._replace(netloc=f":{quote(str(password), safe='')}@{host}").geturl()
        return
    redis["url"] = url._replace(netloc=host).geturl()
    imported.warnings.append(
        "redis password: not copied (it would sit in redis.url in plain text): add it as "
        "redis://:PASSWORD@host/ yourself, or re-run with --include-secrets"
    )


def render(imported: Imported, source: str) -> str:
    """The YAML text, with a header saying where it came from."""
    header = (
        f"# lmtp-gateway configuration imported from {source} by `lmtp-gateway config import`.\n"
        "# lmtp: and spool: take their defaults (LMTP on 127.0.0.1:2424); see contrib/config/examples/.\n"
    )
    return header + yaml.safe_dump(imported.data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the start (no moment where it is readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
