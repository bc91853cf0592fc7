"""`config import`: gitlab.rb (a literal-only Ruby reader) and gitlab.yml into a configuration the gateway loads."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmtp_gateway.config import load_config
from lmtp_gateway.config_import import import_file, read_gitlab_rb, render
from lmtp_gateway.errors import ConfigError
from tests.conftest import REPO, lmtp_gateway_command

FIXTURE = REPO / "contrib" / "config" / "examples" / "gitlab.rb"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*lmtp_gateway_command(), *args], capture_output=True, text=True, env=env or dict(os.environ), timeout=60
    )


def test_ruby_literals() -> None:
    ruby = read_gitlab_rb(
        """
external_url "https://gitlab.example.com/"  # trailing comment
gitlab_rails['a'] = 'it\\'s # not a comment'
gitlab_rails['b'] = "tab\\tand \\"quotes\\""
gitlab_rails['c'] = [1, -2, 3.5, nil, true, false, :sym]
gitlab_rails['d'] = { 'x' => 1, y: 'two', 'z': { 'deep' => [
  'multi', # comment inside
  'line',
] } }
node['x']['y'] = 10_000
roles ['redis_sentinel_role', 'redis_master_role']
"""
    )
    assert ruby.warnings == []
    values = ruby.values
    assert values[("external_url",)] == "https://gitlab.example.com/"
    assert values[("gitlab_rails", "a")] == "it's # not a comment"
    assert values[("gitlab_rails", "b")] == 'tab\tand "quotes"'
    assert values[("gitlab_rails", "c")] == [1, -2, 3.5, None, True, False, "sym"]
    assert values[("gitlab_rails", "d")] == {"x": 1, "y": "two", "z": {"deep": ["multi", "line"]}}
    assert values[("node", "x", "y")] == 10000
    assert values[("roles",)] == ["redis_sentinel_role", "redis_master_role"]


def test_unsupported_statements_are_warnings_without_values() -> None:
    ruby = read_gitlab_rb(
        "gitlab_rails['incoming_email_password'] = 'hunter' + 'two'\n"
        "gitlab_rails['x'] = \"#{ENV['HOME']}/secret-value\"\n"
        "if true\n"
        "gitlab_rails['ok'] = 1\n"
        "gitlab_rails['y'] = ENV.fetch('Y') { 'fallback-secret' }\n"
        "gitlab_rails['z'] = 2\n"
    )
    assert ruby.values == {("gitlab_rails", "ok"): 1, ("gitlab_rails", "z"): 2}
    assert [w.split(": ")[0] for w in ruby.warnings] == ["gitlab.rb:1", "gitlab.rb:2", "gitlab.rb:3", "gitlab.rb:5"]
    assert "gitlab_rails['incoming_email_password']" in ruby.warnings[0]
    text = "\n".join(ruby.warnings)
    assert "hunter" not in text and "secret-value" not in text and "fallback-secret" not in text


RUBYISH = st.sampled_from([*"gitlab_rails['x']=\"'{}[],:#=>\n 0123\\", "nil", "true", " => ", "%{key}"])


@given(st.lists(RUBYISH, max_size=60).map("".join))
def test_the_reader_never_fails(text: str) -> None:
    read_gitlab_rb(text)  # whatever it is given, it returns values and warnings


def test_the_gitlab_rb_template_imports_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    imported = import_file(FIXTURE)
    assert any("gitlab.rb:14: gitlab_rails['smtp_password']: skipped" in w for w in imported.warnings)
    assert not any("roles" in w for w in imported.warnings)
    assert not imported.has_inline_secret
    out = tmp_path / "gateway.yml"
    out.write_text(render(imported, str(FIXTURE)))
    with pytest.raises(ConfigError, match="INCOMING_EMAIL_PASSWORD is not set"):
        load_config(out)
    monkeypatch.setenv("INCOMING_EMAIL_PASSWORD", "from-env")
    monkeypatch.setenv("SERVICE_DESK_EMAIL_CLIENT_SECRET", "graph-from-env")
    config = load_config(out)
    incoming = config.mailboxes["incoming_email"]
    assert config.gitlab_host == "gitlab.example.com" and config.gitlab_url == "https://gitlab.example.com"
    assert incoming.template.text == "incoming+%{key}@incoming.example.com"
    assert incoming.delivery_method == "sidekiq"
    assert incoming.settings["user"] == "incoming@incoming.example.com"
    assert incoming.settings["mailbox"] == "inbox" and incoming.settings["port"] == 993
    assert incoming.settings["password"] == "from-env"
    desk = config.mailboxes["service_desk_email"].settings
    assert desk["inbox_method"] == "microsoft_graph" and desk["delete_after_delivery"] is False
    assert desk["inbox_options"] == {
        "tenant_id": "YOUR-TENANT-ID",
        "client_id": "YOUR-CLIENT-ID",
        "poll_interval": 60,
        "client_secret": "graph-from-env",
    }
    assert config.redis.url == "redis://redis.example.com:6379/0"


def test_secrets_dir_and_include_secrets(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    out = tmp_path / "a.yml"
    done = cli("config", "import", str(FIXTURE), "--output", str(out), "--secrets-dir", str(secrets))
    assert done.returncode == 0, done.stderr
    assert "[REDACTED]" not in out.read_text()
    assert oct(secrets.stat().st_mode & 0o777) == "0o700"
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in secrets.iterdir()} == {
        "incoming_email_password": "0o600",
        "service_desk_email_client_secret": "0o600",
    }
    config = load_config(out)
    assert config.mailboxes["incoming_email"].settings["password"] == "[REDACTED]"
    assert config.mailboxes["service_desk_email"].settings["inbox_options"]["client_secret"] == "YOUR-CLIENT-SECRET"

    inline = tmp_path / "b.yml"
    done = cli("config", "import", str(FIXTURE), "-o", str(inline), "--include-secrets")
    assert done.returncode == 0 and "mode 0600" in done.stderr
    assert oct(inline.stat().st_mode & 0o777) == "0o600"
    assert load_config(inline).mailboxes["incoming_email"].settings["password"] == "[REDACTED]"
    assert cli("config", "import", str(FIXTURE), "--include-secrets", "--secrets-dir", str(secrets)).returncode == 2


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_omnibus_defaults_webhook_and_sentinels(tmp_path: Path) -> None:
    rb = write(
        tmp_path,
        "gitlab.rb",
        "external_url 'https://git.example.org'\n"
        "gitlab_rails['incoming_email_enabled'] = true\n"
        "gitlab_rails['incoming_email_address'] = 'incoming+%{key}@git.example.org'\n"
        "gitlab_rails['incoming_email_frobnicate'] = 1\n"
        "gitlab_rails['service_desk_email_enabled'] = true\n"
        "gitlab_rails['service_desk_email_address'] = 'contact+%{key}@git.example.org'\n"
        "gitlab_rails['service_desk_email_delivery_method'] = 'sidekiq'\n"
        "redis['master_name'] = 'gitlab-redis'\n"
        "redis['master_password'] = 'master secret'\n"
        "gitlab_rails['redis_sentinels'] = [\n"
        "  {'host' => '10.0.0.1', 'port' => 26379},\n"
        "  {'host' => '10.0.0.2', 'port' => 26380},\n"
        "]\n"
        "gitlab_rails['redis_sentinels_password'] = 'sentinel secret'\n",
    )
    imported = import_file(rb, include_secrets=True)
    data = imported.data
    assert data["incoming_email"]["delivery_method"] == "webhook"  # Omnibus' default
    assert data["incoming_email"]["secret_file"] == "/var/opt/gitlab/gitlab-rails/etc/gitlab_incoming_email_secret"
    assert any("mode 0644" in w and "chmod" in w for w in imported.warnings)
    assert any("incoming_email_frobnicate" in w for w in imported.warnings)
    assert data["redis"]["url"] == "redis://:master%20secret@gitlab-redis/0"
    assert data["redis"]["sentinels"] == [{"host": "10.0.0.1", "port": 26379}, {"host": "10.0.0.2", "port": 26380}]
    out = write(tmp_path, "gw.yml", render(imported, str(rb)))
    config = load_config(out)
    assert config.redis.sentinel_password == "sentinel secret"
    assert config.redis.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert config.mailboxes["incoming_email"].delivery_method == "webhook"

    safe = import_file(rb)
    assert safe.data["redis"]["url"] == "redis://gitlab-redis/0"
    assert safe.data["redis"]["sentinel_password_env"] == "REDIS_SENTINEL_PASSWORD"
    assert any("redis password: not copied" in w for w in safe.warnings)
    assert "master secret" not in render(safe, "x") + "\n".join(safe.warnings)


def test_disabled_mailboxes_are_an_error(tmp_path: Path) -> None:
    rb = write(tmp_path, "gitlab.rb", "gitlab_rails['incoming_email_address'] = 'incoming+%{key}@x.org'\n")
    with pytest.raises(ConfigError, match="neither incoming_email nor service_desk_email is enabled"):
        import_file(rb)
    done = cli("config", "import", str(rb))
    assert done.returncode == 1 and "incoming_email_enabled'] = true" in done.stderr


def test_gitlab_yml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    yml = write(
        tmp_path,
        "gitlab.yml",
        "production: &base\n"
        "  gitlab:\n    host: gitlab.example.com\n    https: true\n"
        "  incoming_email:\n    enabled: true\n    address: 'incoming+%{key}@gitlab.example.com'\n"
        "    user: incoming\n    password: 'yml secret'\n    host: imap.example.com\n    port: 143\n"
        "    log_path: log/mail_room_json.log\n",
    )
    imported = import_file(yml)
    assert imported.data["incoming_email"]["password_env"] == "INCOMING_EMAIL_PASSWORD"
    assert "log_path" not in imported.data["incoming_email"]
    assert any("config/resque.yml" in w for w in imported.warnings)
    monkeypatch.setenv("INCOMING_EMAIL_PASSWORD", "yml secret")
    config = load_config(write(tmp_path, "gw.yml", render(imported, str(yml))))
    assert config.gitlab_url == "https://gitlab.example.com"
    assert config.mailboxes["incoming_email"].delivery_method == "sidekiq"
    assert config.mailboxes["incoming_email"].settings["password"] == "yml secret"
