"""Secrets from files, environment variables and GitLab's encrypted credentials; `secret edit|show`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from lmtp_gateway.config import load_config, parse_config
from lmtp_gateway.errors import ConfigError
from lmtp_gateway.secrets import (
    decrypt,
    derive_key,
    encrypt,
    marshal_string,
    read_key_bases,
    unmarshal_string,
)
from tests.conftest import lmtp_gateway_command, under_ci
from tests.servers import require_binary

# Produced by ActiveSupport 6.1.7 (Debian's ruby-activesupport, Ruby 3.1) running what Gitlab::EncryptedConfiguration
# does: KeyGenerator.new(KEY_BASE).generate_key("GitLabEncryptedConfigSalt", 32), then
# MessageEncryptor.new(key, cipher: "aes-256-gcm").encrypt_and_sign(VECTOR_TEXT).
KEY_BASE = "0123456789abcdef0123456789abcdef"
VECTOR_TEXT = "user: 'incoming-email@mail.example.com'\npassword: 'examplepassword'\n"
VECTOR = (
    b"ztwVdY8IunMZKZsAIQz33gbJ85wwp4AJE9+4c+3y9YxhJdNmAiu2F1J93vC3IkMkXbri2xKVZoFpRyYUOaWQMbzdjHEzLBYwIjLg5stR"
    b"--treIGYN2TO0quR3S--RtzJF+S/BNVlVqVhsa0vdQ=="
)

# What GitLab's class does, in Ruby, for the live cross-check both ways.
RUBY = """
require 'active_support'
require 'active_support/message_encryptor'
require 'active_support/key_generator'
key = ActiveSupport::KeyGenerator.new(ARGV[0]).generate_key("GitLabEncryptedConfigSalt",
  ActiveSupport::MessageEncryptor.key_len("aes-256-gcm"))
box = ActiveSupport::MessageEncryptor.new(key, cipher: "aes-256-gcm")
input = STDIN.read
print(ARGV[1] == "encrypt" ? box.encrypt_and_sign(input) : box.decrypt_and_verify(input))
"""


def private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_reads_gitlab_rails_output() -> None:
    assert decrypt(VECTOR, derive_key(KEY_BASE)) == VECTOR_TEXT


def test_round_trip_and_marshal() -> None:
    key = derive_key(KEY_BASE)
    text = "user: ünïcode@example.com\npassword: '" + "x" * 300 + "'\n"  # > 255 bytes: a two-byte Marshal length
    assert decrypt(encrypt(text, key), key) == text
    assert marshal_string("foo") == b'\x04\x08I"\x08foo\x06:\x06ET'  # Marshal.dump("foo") in Ruby
    assert unmarshal_string(b'\x04\x08"\x08foo') == "foo"  # a binary (ASCII-8BIT) string has no encoding ivar
    with pytest.raises(InvalidTag):
        decrypt(encrypt("a: 1\n", key), derive_key("another key base, long enough"))
    with pytest.raises(ValueError, match="ciphertext--iv--tag"):
        decrypt(b"not encrypted", key)


def ruby_activesupport() -> str:
    ruby = require_binary("ruby", "ruby-activesupport")
    if subprocess.run([ruby, "-ractive_support", "-e", ""], capture_output=True).returncode != 0:
        if under_ci():
            raise RuntimeError("ActiveSupport missing under CI: install Debian package ruby-activesupport")
        pytest.skip("ActiveSupport not found: apt-get install ruby-activesupport")
    return ruby


def test_compatible_with_activesupport_both_ways(tmp_path: Path) -> None:
    ruby = ruby_activesupport()
    script = tmp_path / "gitlab_encrypted.rb"
    script.write_text(RUBY)
    text = "user: 'gitlab-incoming@example.com'\npassword: 'pässword with: colons'\n"
    ours = encrypt(text, derive_key(KEY_BASE))
    done = subprocess.run([ruby, str(script), KEY_BASE, "decrypt"], input=ours, capture_output=True, check=True)
    assert done.stdout.decode() == text
    theirs = subprocess.run([ruby, str(script), KEY_BASE, "encrypt"], input=text.encode(), capture_output=True)
    assert decrypt(theirs.stdout, derive_key(KEY_BASE)) == text


def test_key_file_forms(tmp_path: Path) -> None:
    assert read_key_bases(private(tmp_path / "key", KEY_BASE + "\n")) == [KEY_BASE]
    secrets_yml = private(
        tmp_path / "secrets.yml",
        f"production:\n  db_key_base: abc\n  encrypted_settings_key_base: {KEY_BASE}\n"
        f"  rotated_encrypted_settings_key_base: [{'f' * 32}]\n",
    )
    assert read_key_bases(secrets_yml) == [KEY_BASE, "f" * 32]
    omnibus_json = f'{{"gitlab_rails": {{"encrypted_settings_key_base": "{KEY_BASE}"}}}}'
    omnibus = private(tmp_path / "gitlab-secrets.json", omnibus_json)
    assert read_key_bases(omnibus) == [KEY_BASE]
    with pytest.raises(ConfigError, match="world-readable; fix with: chmod 600"):
        read_key_bases(private(tmp_path / "open", KEY_BASE, mode=0o644))
    with pytest.raises(ConfigError, match="too short"):
        read_key_bases(private(tmp_path / "short", "abc"))
    with pytest.raises(ConfigError, match="no encrypted_settings_key_base"):
        read_key_bases(private(tmp_path / "other.yml", "production:\n  db_key_base: x\n"))


MAILBOX = """
incoming_email:
  address: "incoming+%{key}@incoming.example.com"
  host: imap.example.com
"""


def test_password_file_env_and_plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    password = private(tmp_path / "password", "s3cret\n")
    client_secret = private(tmp_path / "client", "graph-secret")
    monkeypatch.setenv("SENTINEL_PASSWORD", "sentinel-secret")
    config = parse_config(
        MAILBOX
        + f"  password_file: {password}\n  inbox_options:\n    client_secret_file: {client_secret}\n"
        + "redis:\n  sentinels: [{host: 127.0.0.1}]\n  sentinel_password_env: SENTINEL_PASSWORD\n",
        "gw.yml",
    )
    settings = config.mailboxes["incoming_email"].settings
    assert settings["password"] == "s3cret"
    assert "password_file" not in settings
    assert settings["inbox_options"]["client_secret"] == "graph-secret"
    assert config.redis.sentinel_password == "sentinel-secret"
    assert "s3cret" not in repr(config) and "graph-secret" not in repr(config) and "sentinel-secret" not in repr(config)
    plain = parse_config(MAILBOX + "  password: plain-one\n", "gw.yml")
    assert plain.mailboxes["incoming_email"].settings["password"] == "plain-one"
    assert "plain-one" not in repr(plain)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "  password_env: NO_SUCH_VARIABLE_HERE\n",
            "gw.yml: incoming_email.password_env: environment variable NO_SUCH_VARIABLE_HERE is not set",
        ),
        (
            "  password: a\n  password_file: /x\n",
            "gw.yml: incoming_email.password: give only one of password, password_file",
        ),
        ("  password_file: /nonexistent/pw\n", "/nonexistent/pw: cannot read secret file"),
        ("  inbox_options:\n    client_secret_fil: x\n", "did you mean 'client_secret_file'?"),
        ("  encrypted_secret_file: /x.enc\n", "encrypted_secret_file: needs encrypted_settings_key_file"),
    ],
)
def test_errors_name_the_key(extra: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(MAILBOX + extra, "gw.yml")
    assert expected in str(caught.value)


def test_world_readable_password_file_refused(tmp_path: Path) -> None:
    path = private(tmp_path / "password", "top-secret-value", mode=0o644)
    with pytest.raises(ConfigError) as caught:
        parse_config(MAILBOX + f"  password_file: {path}\n", "gw.yml")
    assert f"chmod 600 {path}" in str(caught.value) and "top-secret-value" not in str(caught.value)


def test_encrypted_credentials_fill_user_and_password(tmp_path: Path) -> None:
    key = private(tmp_path / "key", KEY_BASE)
    enc = tmp_path / "incoming_email.yaml.enc"
    enc.write_bytes(VECTOR)
    config = parse_config(
        MAILBOX + f"  user: old\n  password: old\n  encrypted_secret_file: {enc}\nencrypted_settings_key_file: {key}\n",
        "gw.yml",
    )
    settings = config.mailboxes["incoming_email"].settings
    assert (settings["user"], settings["password"]) == ("incoming-email@mail.example.com", "examplepassword")
    wrong = private(tmp_path / "wrong", "a different key base, long enough")
    with pytest.raises(ConfigError, match="cannot decrypt: wrong key"):
        parse_config(MAILBOX + f"  encrypted_secret_file: {enc}\nencrypted_settings_key_file: {wrong}\n", "gw.yml")


def test_gitlab_yml_uses_secrets_yml_beside_it(tmp_path: Path) -> None:
    """As GitLab's mail_room does: config/secrets.yml next to config/gitlab.yml holds the key base."""
    enc = tmp_path / "incoming_email.yaml.enc"
    enc.write_bytes(VECTOR)
    private(tmp_path / "secrets.yml", f"production:\n  encrypted_settings_key_base: {KEY_BASE}\n")
    gitlab_yml = tmp_path / "gitlab.yml"
    gitlab_yml.write_text(
        "production:\n  gitlab:\n    host: gitlab.example.com\n  incoming_email:\n    enabled: true\n"
        f'    address: "incoming+%{{key}}@example.com"\n    encrypted_secret_file: {enc}\n'
    )
    settings = load_config(gitlab_yml).mailboxes["incoming_email"].settings
    assert settings["password"] == "examplepassword"
    # and `secret show --config gitlab.yml` finds the key where GitLab keeps it
    shown = run_cli("secret", "show", str(enc), "--config", str(gitlab_yml))
    assert shown.returncode == 0 and "examplepassword" in shown.stdout


def test_secret_config_expands_a_home_directory(tmp_path: Path) -> None:
    key = private(tmp_path / "key", KEY_BASE)
    enc = tmp_path / "incoming_email.yaml.enc"
    enc.write_bytes(VECTOR)
    config = tmp_path / "gw.yml"
    config.write_text(MAILBOX + "encrypted_settings_key_file: ~/key\n")
    shown = run_cli("secret", "show", str(enc), "--config", str(config), env={**os.environ, "HOME": str(tmp_path)})
    assert shown.returncode == 0 and "examplepassword" in shown.stdout
    assert key.exists()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [*lmtp_gateway_command(), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env or dict(os.environ), timeout=60)


def editor_script(tmp_path: Path, body: str) -> str:
    """A stand-in for $EDITOR: a shell script run with the plaintext file as $1."""
    script = tmp_path / "editor.sh"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o700)
    return str(script)


def test_secret_edit_creates_and_show_prints(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    editor = editor_script(
        tmp_path,
        f'stat -c "%a" "$1" > {seen}; stat -c "%a" "$(dirname "$1")" >> {seen}; echo "$1" >> {seen}\n'
        'printf "user: me@example.com\\npassword: \'pw-4711-plaintext-marker\'\\n" > "$1"\n',
    )
    enc, key = tmp_path / "incoming_email.yaml.enc", tmp_path / "key"
    with_editor = {**os.environ, "EDITOR": editor}
    done = run_cli("secret", "edit", str(enc), "--key-file", str(key), "--generate-key", env=with_editor)
    assert done.returncode == 0, done.stderr
    assert "encrypted and saved" in done.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600" and oct(enc.stat().st_mode & 0o777) == "0o600"
    file_mode, dir_mode, plaintext = seen.read_text().split("\n")[:3]
    assert (file_mode, dir_mode) == ("600", "700")
    assert not Path(plaintext).exists() and not Path(plaintext).parent.exists()
    assert b"pw-4711-plaintext-marker" not in enc.read_bytes() and b"password:" not in enc.read_bytes()
    shown = run_cli("secret", "show", str(enc), "--key-file", str(key))
    assert shown.returncode == 0 and shown.stdout == "user: me@example.com\npassword: 'pw-4711-plaintext-marker'\n"
    # The same file through a configuration that names the key.
    config = tmp_path / "gw.yml"
    config.write_text(MAILBOX + f"  encrypted_secret_file: {enc}\nencrypted_settings_key_file: {key}\n")
    assert load_config(config).mailboxes["incoming_email"].settings["password"] == "pw-4711-plaintext-marker"
    assert run_cli("secret", "show", str(enc), "--config", str(config)).stdout == shown.stdout


def test_secret_edit_failures_keep_the_file_and_remove_the_plaintext(tmp_path: Path) -> None:
    key = private(tmp_path / "key", KEY_BASE)
    enc = tmp_path / "incoming_email.yaml.enc"
    enc.write_bytes(VECTOR)
    trail = tmp_path / "trail"
    failing = editor_script(tmp_path, f'echo "$1" > {trail}; echo "password: changed" > "$1"; exit 3\n')
    done = run_cli("secret", "edit", str(enc), "--key-file", str(key), env={**os.environ, "EDITOR": failing})
    assert done.returncode == 1 and "exited with 3; nothing saved" in done.stderr
    assert enc.read_bytes() == VECTOR
    assert not Path(trail.read_text().strip()).exists()
    invalid = editor_script(tmp_path, 'echo "- just a list" > "$1"\n')
    done = run_cli("secret", "edit", str(enc), "--key-file", str(key), env={**os.environ, "EDITOR": invalid})
    assert done.returncode == 1 and "must be a YAML mapping" in done.stderr and enc.read_bytes() == VECTOR
    unchanged = editor_script(tmp_path, "true\n")
    done = run_cli("secret", "edit", str(enc), "--key-file", str(key), env={**os.environ, "EDITOR": unchanged})
    assert done.returncode == 0 and "unchanged" in done.stderr and enc.read_bytes() == VECTOR
    wrong = private(tmp_path / "wrong", "a different key base, long enough")
    done = run_cli("secret", "show", str(enc), "--key-file", str(wrong))
    assert done.returncode == 1 and "wrong key" in done.stderr
    with_true = {**os.environ, "EDITOR": "true"}
    # without $EDITOR, Debian's `editor` (then vi) is used, as git and crontab do; with none of them, it says so
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "editor").symlink_to(editor_script(tmp_path, "true\n"))
    only_editor = {k: v for k, v in os.environ.items() if k not in ("EDITOR", "VISUAL")} | {"PATH": str(bin_dir)}
    done = run_cli("secret", "edit", str(enc), "--key-file", str(key), env=only_editor)
    assert done.returncode == 0 and "unchanged" in done.stderr
    (bin_dir / "editor").unlink()
    done = run_cli("secret", "edit", str(enc), "--key-file", str(key), env=only_editor)
    assert done.returncode == 2 and "no editor found: run it as EDITOR=nano lmtp-gateway secret edit" in done.stderr
    done = run_cli("secret", "edit", str(enc), "--key-file", str(key), "--generate-key", env=with_true)
    assert done.returncode == 1 and "already exists" in done.stderr
