"""Secrets: where passwords and client secrets come from, resolved in one place when the configuration loads.

A secret (``password``, ``inbox_options.client_secret``, ``redis.sentinel_password``) may be given

- in plain text, as in ``gitlab.yml``;
- as ``<key>_file: PATH``: the file's content, trailing newline stripped; refused when anyone may read it;
- as ``<key>_env: NAME``: an environment variable (systemd ``EnvironmentFile=``, a container's secrets);
- for a mailbox's ``user`` and ``password``: GitLab's own encrypted credentials file (``encrypted_secret_file``,
  what ``gitlab-rake gitlab:incoming_email:secret:edit`` writes), decrypted with the key base from
  ``encrypted_settings_key_file``.

GitLab's format (``Gitlab::EncryptedConfiguration``): the key is PBKDF2-HMAC-SHA1 of ``encrypted_settings_key_base``
with the salt ``GitLabEncryptedConfigSalt``, 2**16 iterations, 32 bytes; the file is ActiveSupport's
``MessageEncryptor`` output for AES-256-GCM: ``base64(ciphertext)--base64(iv)--base64(auth tag)``, the plaintext
being the YAML text serialised with Ruby's ``Marshal`` (Rails 7.1's JSON serialiser is read too).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets as random
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from lmtp_gateway.errors import ConfigError, SecretError

FILE_SUFFIX = "_file"
ENV_SUFFIX = "_env"
KEY_FILE_KEY = "encrypted_settings_key_file"

# Where each secret lives in the checked configuration: (section path, key).
MAILBOX_SECRETS: tuple[tuple[tuple[str, ...], str], ...] = (((), "password"), (("inbox_options",), "client_secret"))
REDIS_SECRETS: tuple[tuple[tuple[str, ...], str], ...] = (((), "sentinel_password"),)

SALT = b"GitLabEncryptedConfigSalt"
ITERATIONS = 2**16
MIN_KEY_BASE = 16  # GitLab refuses a shorter base key ("Base key too small")
NEW_FILE_TEMPLATE = """\
# Credentials for one mailbox, as GitLab's encrypted settings hold them:
# user: 'gitlab-incoming@example.com'
# password: '...'
"""


# --- files and environment variables ---


def check_secret_file(path: Path) -> None:
    """Refuse a secret anyone on the machine can read."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise ConfigError(f"{path}: cannot read secret file: {error.strerror}") from None
    if mode & stat.S_IROTH:
        raise ConfigError(f"{path}: secret file is world-readable; fix with: chmod 600 {path}")


def read_secret_file(path: Path, what: str) -> str:
    """The secret in `path`: one value, its trailing newline stripped (``echo secret > file`` adds one)."""
    check_secret_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what}: cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    value = text.removesuffix("\n").removesuffix("\r")
    if not value:
        raise ConfigError(f"{what}: {path} is empty")
    return value


def read_secret_env(name: str, what: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SecretError(f"{what}: environment variable {name} is {'empty' if value == '' else 'not set'}")
    return value


# --- GitLab's encrypted settings ---


def derive_key(key_base: str) -> bytes:
    """ActiveSupport::KeyGenerator.new(key_base).generate_key(SALT, 32), as Gitlab::EncryptedConfiguration does."""
    # SHA1: GitLab keeps Rails' pre-7.0 key_generator_hash_digest_class, and mail_room uses ActiveSupport's default.
    kdf = PBKDF2HMAC(algorithm=hashes.SHA1(), length=32, salt=SALT, iterations=ITERATIONS)
    return kdf.derive(key_base.encode("utf-8"))


def _marshal_long(value: int) -> bytes:
    if value == 0:
        return b"\x00"
    if 0 < value < 123:
        return bytes([value + 5])
    size = (value.bit_length() + 7) // 8
    return bytes([size]) + value.to_bytes(size, "little")


def _read_long(data: bytes, at: int) -> tuple[int, int]:
    first = data[at]
    signed = first - 256 if first > 127 else first
    if signed == 0:
        return 0, at + 1
    if signed > 4:
        return signed - 5, at + 1
    if 0 < signed <= 4:
        return int.from_bytes(data[at + 1 : at + 1 + signed], "little"), at + 1 + signed
    raise ValueError("negative length")


def marshal_string(text: str) -> bytes:
    """Ruby's Marshal.dump of a UTF-8 String (what GitLab's MessageEncryptor serialises)."""
    data = text.encode("utf-8")
    return b'\x04\x08I"' + _marshal_long(len(data)) + data + b"\x06:\x06ET"


def unmarshal_string(data: bytes) -> str:
    """The String in Ruby Marshal data (optionally with its encoding ivar); anything else is refused."""
    if not data.startswith(b"\x04\x08"):
        raise ValueError("not Ruby Marshal data")
    at = 2
    if data[at : at + 1] == b"I":
        at += 1
    if data[at : at + 1] != b'"':
        raise ValueError("the encrypted value is not a string")
    length, at = _read_long(data, at + 1)
    if at + length > len(data):
        raise ValueError("truncated string")
    return data[at : at + length].decode("utf-8")


def _deserialise(plain: bytes) -> str:
    if plain.startswith(b"\x04\x08"):
        return unmarshal_string(plain)
    value = json.loads(plain)  # Rails 7.1's :json / :json_allow_marshal serialisers
    if not isinstance(value, str):
        raise ValueError("the encrypted value is not a string")
    return value


def encrypt(text: str, key: bytes) -> bytes:
    """MessageEncryptor#encrypt_and_sign with aes-256-gcm and Marshal, as GitLab writes ``*.yaml.enc``."""
    iv = os.urandom(12)
    sealed = AESGCM(key).encrypt(iv, marshal_string(text), b"")
    ciphertext, tag = sealed[:-16], sealed[-16:]
    return b"--".join(base64.b64encode(part) for part in (ciphertext, iv, tag))


def decrypt(blob: bytes, key: bytes) -> str:
    """The inverse of `encrypt`; raises InvalidTag for a wrong key, ValueError for a damaged file."""
    parts = blob.strip().split(b"--")
    if len(parts) != 3:
        raise ValueError("not GitLab's encrypted format (ciphertext--iv--tag)")
    try:
        ciphertext, iv, tag = (base64.b64decode(part, validate=True) for part in parts)
    except binascii.Error:
        raise ValueError("not GitLab's encrypted format (bad base64)") from None
    if len(tag) != 16 or len(iv) != 12:
        raise ValueError("not GitLab's encrypted format (iv or tag of the wrong size)")
    return _deserialise(AESGCM(key).decrypt(iv, ciphertext + tag, b""))


def generate_key_base() -> str:
    """A new key base the way GitLab makes its own (SecureRandom.hex(64))."""
    return random.token_hex(64)


def read_key_bases(path: Path) -> list[str]:
    """The key base(s) in `path`: a file holding just the key, or GitLab's own secrets file.

    GitLab's ``config/secrets.yml`` (``production.encrypted_settings_key_base``) and Omnibus'
    ``/etc/gitlab/gitlab-secrets.json`` (``gitlab_rails.encrypted_settings_key_base``) are read as they are, with
    ``rotated_encrypted_settings_key_base`` after the current key.
    """
    text = read_secret_file(path, KEY_FILE_KEY).strip()
    bases: list[str] = []
    if "\n" not in text and ":" not in text:
        bases = [text]
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        for section in _key_sections(data):
            current = section.get("encrypted_settings_key_base")
            rotated = section.get("rotated_encrypted_settings_key_base") or []
            bases += [str(base) for base in [current, *(rotated if isinstance(rotated, list) else [rotated])] if base]
        if not bases:
            raise ConfigError(
                f"{path}: no encrypted_settings_key_base in it (give a file holding only the key, GitLab's "
                "config/secrets.yml or /etc/gitlab/gitlab-secrets.json)"
            )
    for base in bases:
        if len(base) < MIN_KEY_BASE:
            raise ConfigError(f"{path}: the key is too short ({len(base)} characters; GitLab needs at least 16)")
    return bases


def _key_sections(data: Any) -> list[Mapping[str, Any]]:
    if not isinstance(data, dict):
        return []
    candidates = [data, data.get("production"), data.get("shared"), data.get("gitlab_rails")]
    return [section for section in candidates if isinstance(section, dict)]


def read_encrypted_text(path: Path, key_bases: list[str]) -> str:
    """Decrypt `path` with the first key base that fits (GitLab's key rotation)."""
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read encrypted credentials: {error.strerror}") from None
    for base in key_bases:
        try:
            return decrypt(blob, derive_key(base))
        except InvalidTag:
            continue
        except (ValueError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: {error}") from None
    raise ConfigError(f"{path}: cannot decrypt: wrong key (is {KEY_FILE_KEY} GitLab's encrypted_settings_key_base?)")


def read_encrypted_credentials(path: Path, key_bases: list[str]) -> dict[str, Any]:
    """The YAML mapping in an encrypted credentials file (``user``, ``password``)."""
    data = _parse_credentials(read_encrypted_text(path, key_bases))
    if data is None:
        raise ConfigError(f"{path}: the decrypted content is not a YAML mapping (user: ..., password: ...)")
    return data


def _parse_credentials(text: str) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if data is None:
        return {}
    return data if isinstance(data, dict) else None


def write_encrypted(path: Path, text: str, key_base: str) -> None:
    """Encrypt `text` into `path` atomically (a private temporary file beside it, then rename)."""
    blob = encrypt(text, derive_key(key_base))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:  # mkstemp makes it 0600
            out.write(blob)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_key_file(path: Path) -> None:
    """Write a new key base to `path` with mode 0600; never overwrite an existing key."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; drop --generate-key to use it") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot create the key file: {error.strerror}") from None
    with os.fdopen(fd, "w") as out:
        out.write(generate_key_base() + "\n")


@dataclass(frozen=True)
class EditResult:
    changed: bool
    warnings: tuple[str, ...] = ()


def edit_encrypted(path: Path, key_bases: list[str], editor: str) -> EditResult:
    """Open the decrypted `path` in `editor`, re-encrypt on save; the plaintext never outlives this call.

    The plaintext sits in a private directory (0700) in a 0600 file and is removed whatever happens. A new file
    starts from a commented template. Content that is not a YAML mapping is not saved.
    """
    exists = path.exists()
    before = read_encrypted_text(path, key_bases) if exists else NEW_FILE_TEMPLATE
    private = Path(tempfile.mkdtemp(prefix="lmtp-gateway-secret-"))
    try:
        plain = private / (path.name.removesuffix(".enc") or "secret.yaml")
        fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(before)
        try:
            done = subprocess.run([*shlex.split(editor), str(plain)], check=False)
        except OSError as error:
            raise ConfigError(f"cannot run the editor {editor!r}: {error.strerror}; nothing saved") from None
        if done.returncode != 0:
            raise ConfigError(f"the editor {editor!r} exited with {done.returncode}; nothing saved")
        after = plain.read_text(encoding="utf-8")
    finally:
        shutil.rmtree(private, ignore_errors=True)
    if exists and after == before:
        return EditResult(changed=False)
    data = _parse_credentials(after)
    if data is None:
        raise ConfigError(f"{path}: not saved: the content must be a YAML mapping (user: ..., password: ...)")
    unknown = sorted(set(data) - {"user", "password"})
    warnings = (f"{path}: the gateway reads only user and password; ignoring {', '.join(map(str, unknown))}",)
    write_encrypted(path, after, key_bases[0])
    return EditResult(changed=True, warnings=warnings if unknown else ())


# --- resolution, called by config._build ---


def resolve_secrets(data: dict[str, Any], source: str, mailbox_names: tuple[str, ...]) -> dict[str, Any]:
    """`data` (already checked against the schema) with every secret resolved to its value, in place.

    The ``*_file`` / ``*_env`` keys are replaced by the plain key; a mailbox's ``encrypted_secret_file`` fills
    ``user`` and ``password`` (overriding plain values, as GitLab's mail_room does). Errors name the key and the
    file or variable, never the value.
    """
    key_file = data.pop(KEY_FILE_KEY, None)
    key_bases: list[str] | None = None
    for name in mailbox_names:
        section = data.get(name)
        if not section:
            continue
        for where, key in MAILBOX_SECRETS:
            _resolve_one(section, where, key, f"{source}: {name}")
        encrypted = section.get("encrypted_secret_file")
        if encrypted and section.get("enabled", True) is not False:
            if not key_file:
                raise ConfigError(
                    f"{source}: {name}.encrypted_secret_file: needs {KEY_FILE_KEY} at the top level "
                    "(a file holding GitLab's encrypted_settings_key_base, or GitLab's secrets.yml)"
                )
            if key_bases is None:
                key_bases = read_key_bases(Path(key_file).expanduser())
            credentials = read_encrypted_credentials(Path(encrypted).expanduser(), key_bases)
            for field in ("user", "password"):
                if credentials.get(field) is not None:
                    section[field] = str(credentials[field])
    if data.get("redis"):
        for where, key in REDIS_SECRETS:
            _resolve_one(data["redis"], where, key, f"{source}: redis")
    return data


def _resolve_one(section: dict[str, Any], where: tuple[str, ...], key: str, prefix: str) -> None:
    holder = section.get(where[0]) if where else section
    if not isinstance(holder, dict):
        return
    dotted = f"{prefix}.{'.'.join((*where, key))}"
    given = [k for k in (key, key + FILE_SUFFIX, key + ENV_SUFFIX) if k in holder]
    if len(given) > 1:
        raise ConfigError(f"{dotted}: give only one of {', '.join(given)}")
    if key + FILE_SUFFIX in holder:
        path = Path(holder.pop(key + FILE_SUFFIX)).expanduser()
        holder[key] = read_secret_file(path, dotted + FILE_SUFFIX)
    elif key + ENV_SUFFIX in holder:
        holder[key] = read_secret_env(holder.pop(key + ENV_SUFFIX), dotted + ENV_SUFFIX)
