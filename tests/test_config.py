"""Configuration: our YAML, GitLab's gitlab.yml, and errors that say what to fix."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from lmtp_gateway.config import SCHEMA, load_config, parse_config, parse_duration, parse_size
from lmtp_gateway.errors import ConfigError, SecretError
from tests.conftest import REPO

GOOD = """
gitlab:
  host: gitlab.example.com
  url: https://gitlab.example.com
incoming_email:
  address: "incoming+%{key}@incoming.example.com"
service_desk_email:
  address: "contact+%{key}@incoming.example.com"
lmtp:
  listen: [unix:/run/lmtp-gateway/lmtp.sock, "127.0.0.1:2424"]
  max_message_size: 25M
  socket_mode: "0660"
  socket_group: postfix
spool:
  path: /var/lib/lmtp-gateway
  retention: 7d
redis:
  url: redis://redis.example.com:6379/0
  timestamp_style: sidekiq8
"""


def test_full_configuration() -> None:
    config = parse_config(GOOD, "gw.yml")
    assert config.gitlab_host == "gitlab.example.com"
    assert list(config.mailboxes) == ["incoming_email", "service_desk_email"]
    assert config.mailboxes["incoming_email"].delivery_method == "maildir"
    assert config.lmtp.listen == ("unix:/run/lmtp-gateway/lmtp.sock", "127.0.0.1:2424")
    assert config.lmtp.max_message_size == 25 * 1024 * 1024
    assert config.lmtp.socket_mode == 0o660
    assert config.spool.retention == 7 * 86400
    assert config.redis.timestamp_style == "sidekiq8"
    assert config.routing.template("service_desk_email") is not None


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "gw.yml")
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "incoming_emial:\n  address: a+%{key}@b",
            "gw.yml: incoming_emial: unknown key (did you mean 'incoming_email'?)",
        ),
        (
            "incoming_email:\n  adress: a+%{key}@b",
            "gw.yml: incoming_email.adress: unknown key (did you mean 'address'?)",
        ),
        (
            "incoming_email:\n  address: a@%{key}.b",
            "gw.yml: incoming_email.address: %{key} must be in the local part",
        ),
        (
            "incoming_email:\n  address: a+%{key}@b\n  port: many",
            "gw.yml: incoming_email.port: expected a whole number, got 'many'",
        ),
        (
            "incoming_email:\n  address: a+%{key}@b\n  ssl: 'yes'",
            "gw.yml: incoming_email.ssl: expected true or false",
        ),
        ("incoming_email:\n  address: a+%{key}@b\n  delivery_method: sidekiqq", "did you mean 'sidekiq'?"),
        (
            "incoming_email:\n  address: a+%{key}@b\nlmtp:\n  max_message_size: huge",
            "gw.yml: lmtp.max_message_size: expected a size",
        ),
        ("incoming_email:\n  enabled: true", "gw.yml: incoming_email.address: missing"),
        ("incoming_email:\n  enabled: false", "no enabled mailbox"),
        ("", "the file is empty"),
        ("incoming_email: [1, 2]", "gw.yml: incoming_email: expected a mapping of keys, got a list"),
        (
            "incoming_email:\n  address: a+%{key}@b\n  delivery_method: webhook",
            "gw.yml: gitlab.url: needed by",
        ),
        ("a: [b", "gw.yml: not valid YAML at line 1"),
        (
            "incoming_email:\n  address: a+%{key}@b\nlmtp:\n  listen: localhost",
            "gw.yml: lmtp.listen: expected HOST:PORT (such as 127.0.0.1:2424) or unix:PATH, got 'localhost'",
        ),
        ("production:\n  gitlab: x", "gw.yml: production.gitlab: expected GitLab's settings (host, port, https…)"),
        (
            "incoming_email:\n  address: a+%{key}@b\ncustom_emails:\n  support@example.org: not-a-key",
            "custom_emails: support@example.org: 'not-a-key' is not a project's Service Desk key",
        ),
    ],
)
def test_errors_name_file_key_and_problem(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_a_secret_is_never_printed() -> None:
    message = error_of("incoming_email:\n  address: a+%{key}@b\n  password: [hunter2-secret]")
    assert "incoming_email.password" in message
    assert "hunter2" not in message


def test_missing_file_says_how_to_give_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yml")


def test_environment_variable_and_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMTP_GATEWAY_CONFIG", raising=False)
    assert load_config().source == "<embedded default>"
    path = tmp_path / "gw.yml"
    path.write_text(GOOD)
    monkeypatch.setenv("LMTP_GATEWAY_CONFIG", str(path))
    assert load_config().gitlab_host == "gitlab.example.com"


GITLAB_YML = """
production: &base
  gitlab:
    host: gitlab.example.com
    port: 443
    https: true
    relative_url_root: /gitlab
    email_from: gitlab@example.com
  incoming_email:
    enabled: true
    address: "incoming+%{key}@incoming.example.com"
    user: "gitlab-incoming@gmail.com"
    password: "[REDACTED]"
    host: "imap.gmail.com"
    port: 993
    ssl: true
    start_tls: false
    mailbox: "inbox"
    idle_timeout: 60
    log_path: "log/mail_room_json.log"
    expunge_deleted: false
    some_future_key: 1
  service_desk_email:
    enabled: false
    address: "contact+%{key}@example.com"
  gitlab_shell:
    path: /home/git/gitlab-shell/
development:
  <<: *base
  gitlab:
    host: localhost
"""


def test_gitlab_yml_production_is_read() -> None:
    config = parse_config(GITLAB_YML, "gitlab.yml")
    assert config.gitlab_host == "gitlab.example.com"
    assert config.gitlab_url == "https://gitlab.example.com/gitlab"
    assert list(config.mailboxes) == ["incoming_email"]  # service desk is disabled
    incoming = config.mailboxes["incoming_email"]
    assert incoming.delivery_method == "sidekiq"  # GitLab's own default
    assert incoming.settings["host"] == "imap.gmail.com"
    assert any("some_future_key" in warning for warning in config.warnings)


def test_gitlab_yml_type_errors_still_reported() -> None:
    broken = GITLAB_YML.replace("port: 993", "port: nine")
    with pytest.raises(ConfigError, match=r"gitlab.yml: incoming_email.port: expected a whole number"):
        parse_config(broken, "gitlab.yml")


@pytest.mark.parametrize(
    ("text", "value"),
    [(26214400, 26214400), ("25M", 26214400), ("25 MiB", 26214400), ("10k", 10240), ("1G", 2**30)],
)
def test_sizes(text: object, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "value"), [("7d", 604800), ("12h", 43200), (3600, 3600), ("2w", 1209600)])
def test_durations(text: object, value: int) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize(("text", "method"), [("off", "off"), ("false", "off"), ("syncfs", "syncfs"), ("yes", "fsync")])
def test_spool_sync_reads_yaml_booleans_as_people_mean_them(text: str, method: str) -> None:
    config = parse_config(f"incoming_email: {{address: 'a+%{{key}}@b'}}\nspool: {{sync: {text}}}\n", "gw.yml")
    assert config.spool.sync == method


def test_commands_that_deliver_nothing_load_without_the_services_secrets(tmp_path: Path) -> None:
    """explain, spool, postfix-config and policy run where the service's environment is not at hand."""
    path = tmp_path / "gw.yml"
    path.write_text(
        "incoming_email:\n  address: a+%{key}@b\n  host: imap.example.org\n  user: u\n"
        "  password_env: NOT_SET_IN_THIS_TEST\n"
    )
    with pytest.raises(SecretError, match="environment variable NOT_SET_IN_THIS_TEST is not set"):
        load_config(path)
    assert load_config(path, secrets=False).mailboxes["incoming_email"].template.text == "a+%{key}@b"


def test_command_line_overrides_are_checked_like_the_keys() -> None:
    config = parse_config("incoming_email:\n  address: a+%{key}@b\n", "gw.yml")
    changed = config.overridden(spool="~/journal", listen=("[::1]:25",), monitoring_listen="off")
    assert changed.spool.path == Path("~/journal").expanduser()
    assert changed.lmtp.listen == ("[::1]:25",) and changed.monitoring.listen == ""
    with pytest.raises(ConfigError, match="--monitoring-listen: expected HOST:PORT"):
        config.overridden(monitoring_listen="unix:/tmp/x")


def test_the_default_journal_is_the_services_when_this_machine_has_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmtp_gateway import config as configuration

    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(configuration, "SYSTEM_SPOOL", tmp_path / "var-lib-lmtp-gateway")
    assert configuration.default_spool_path() == tmp_path / "xdg" / "lmtp-gateway"
    (tmp_path / "var-lib-lmtp-gateway").mkdir()
    assert configuration.default_spool_path() == tmp_path / "var-lib-lmtp-gateway"
    monkeypatch.setenv("STATE_DIRECTORY", "/run/elsewhere")
    assert configuration.default_spool_path() == Path("/run/elsewhere")


# A commented-out key in the example: "# key: value" at any depth, keys as YAML writes them (addresses too).
COMMENTED_KEY = re.compile(r"(?m)^(\s*)# ?(?=\s*(?:- )?[\w.@-]+:(?:\s|$))")


def _missing_keys(schema: Mapping[str, object], data: object, where: str = "") -> list[str]:
    missing = []
    for key, spec in schema.items():
        path = f"{where}{key}"
        if not isinstance(data, dict) or key not in data:
            missing.append(path)
        elif isinstance(spec, Mapping):
            missing += _missing_keys(spec, data[key], f"{path}.")
    return missing


def test_the_example_configuration_shows_every_key_with_a_valid_value() -> None:
    example = REPO / "contrib" / "config" / "gateway.yml"
    config = load_config(example)  # as shipped: it runs without GitLab
    assert config.mailboxes["incoming_email"].delivery_method == "maildir"
    every_key = COMMENTED_KEY.sub(r"\1", example.read_text())
    shown = yaml.safe_load(every_key)
    assert "service_desk_email" in shown  # its keys are incoming_email's, shown there once
    assert _missing_keys({**SCHEMA, "service_desk_email": {}}, shown) == []
    parse_config(every_key, "every key uncommented", secrets=False)  # each example value has the right form


def test_commands_without_secrets_read_a_redis_section_with_a_secret_source() -> None:
    text = 'incoming_email: {address: "in+%{key}@h"}\nredis: {url: "redis://r/0", sentinel_password_env: NOT_SET_X}\n'
    with pytest.raises(SecretError, match="NOT_SET_X"):
        parse_config(text, "gw.yml")
    assert parse_config(text, "gw.yml", secrets=False).redis.sentinel_password is None
