"""The agent's configuration: one TOML file, checked whole at start.

``load_config(path) -> Config`` reads the file, expands ``${NAME}`` from the
environment, fills defaults from the JSON Schema (agent/schemas/
config.schema.json: one schema gives validation, defaults and the docs, the
mqtt-io habit), validates it with jsonschema_rs, then runs the checks a
schema cannot express (the gate's own rules, the board profile, readers
against the profile, files that must exist, keys that must decode). Every
problem is collected and raised at once as ``ConfigError`` with its key path
and what is allowed, so a technician fixes the whole file in one go.

Secrets (the MQTT password, an OSDP Secure Channel key) come from files
(``*_file`` keys) or the environment (``${NAME}``), never need to be written
in the file, and never appear in logs or error messages:
``Config.redacted()`` is what may be shown.

Relative paths in the file are taken relative to the file's own directory.

``add_check_config_parser(subparsers)`` adds ``gate-agent check-config``.

Some 820 lines on purpose: the typed settings the rest of the agent reads
and the checks that make them from the file are two halves of one thing,
each key of config.schema.json with its setting and its check beside it,
so that a key added to one half is not forgotten in the other. The schema
itself and its words are agent.core.schemas'.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import os
import re
import stat
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.core import schemas
from agent.core.gateconfig import GateConfig, GateConfigError
from agent.core.problems import ProblemsError

__all__ = [
    "DEFAULT_PATH",
    "AclSettings",
    "CommandsSettings",
    "Config",
    "ConfigError",
    "HardwareSettings",
    "JournalSettings",
    "MqttSettings",
    "ReaderSettings",
    "ServiceSettings",
    "TlsSettings",
    "add_check_config_parser",
    "load_config",
    "parse_config",
    "schema",
]

DEFAULT_PATH = Path("/etc/gate-agent/agent.toml")
BYTES_PER_EVENT = 450  # agent.uplink.journal.BYTES_PER_EVENT_ESTIMATE (not imported: keep this light)
REDACTED = "<redacted>"
# Keys whose values are secret: never quoted in an error, replaced in redacted().
SECRET_KEYS = frozenset({"mqtt.password"})
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A warning (Config.warnings); doctor and provision show it translated (agent/locale).
PASSWORD_IN_FILE = (
    "mqtt.password is written in the config file in clear text: whoever reads the file or a copy "
    "of it can connect as this gate; prefer a client certificate ([mqtt.tls] cert_file and "
    "key_file, no password), else move the password to mqtt.password_file (chown "
    "root:gate-agent, chmod 0640) or write password = \"${ENV_NAME}\" and set ENV_NAME in the "
    "service's environment")
_SCBK = re.compile(r"^[0-9A-Fa-f]{32}$")


class ConfigError(ProblemsError):
    """The config cannot be used. ``errors``: every problem as (key path, message)."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"config {source}: {len(errors)} problem(s); fix these:",
                         [f"{path}: {msg}" if path else msg for path, msg in errors])


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ReaderSettings:
    """One card reader (a [[hardware.readers]] entry, or one made from the profile)."""

    name: str
    type: str  # wiegand, rdm6300, emline, osdp
    d0: int | None = None
    d1: int | None = None
    format: int | None = None  # wiegand: fixed frame length in bits
    port: str | None = None
    baudrate: int = 9600
    repeat_window_s: float = 1.5
    number: str = "auto"
    address: int = 0
    scbk_file: str | None = None
    scbk: str | None = field(default=None, repr=False)  # the Secure Channel key, hex (secret)


@dataclass(frozen=True)
class HardwareSettings:
    profile: str
    pin_factory: str
    readers: tuple[ReaderSettings, ...]
    wiegand_max_lag_s: float = 0.2  # agent.hw.wiegand_gpio: how late an edge callback may come
    # The loaded agent.hw.profiles.Profile (None only when it failed to load).
    board: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class JournalSettings:
    path: Path
    sync_interval_s: float
    capacity_events: int
    disk_budget_mb: int
    retention_days: float

    @property
    def disk_budget_bytes(self) -> int:
        return self.disk_budget_mb * 1024 * 1024


@dataclass(frozen=True)
class TlsSettings:
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def to_uplink(self) -> Any:
        """agent.mqttclient.TlsConfig (no paho: it is imported only when a client is made)."""
        from agent.mqttclient import TlsConfig

        return TlsConfig(self.ca_file, self.cert_file, self.key_file, self.server_name)


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    client_id: str | None
    tls: TlsSettings | None
    ack_mode: str
    window: int
    keepalive: int
    backoff_max_s: float
    telemetry_interval_s: float
    username: str | None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    # Some of mqtt.password is written in the config file itself, not taken from ${ENV}.
    password_in_file: bool = False
    site_events: bool = False  # read the site's other gates' events (docs/site.md)
    session_expiry_s: int = 86400  # ... on a session the broker keeps this long

    @property
    def enabled(self) -> bool:
        """False: no broker configured, the agent runs offline."""
        return bool(self.host)


@dataclass(frozen=True)
class CommandsSettings:
    # key id -> base64 of the 32 raw Ed25519 public key bytes
    trusted_keys: Mapping[str, str]
    allow_unsigned: bool
    max_age_s: float


@dataclass(frozen=True)
class AclSettings:
    max_age_h: float | None
    max_list_mb: int = 128  # the largest list message read (the downlink's size cap)

    @property
    def max_age_s(self) -> float | None:
        return None if self.max_age_h is None else self.max_age_h * 3600.0

    @property
    def max_list_bytes(self) -> int:
        return self.max_list_mb * 1024 * 1024


@dataclass(frozen=True)
class ServiceSettings:
    require_compiled: bool
    state_dir: Path
    watchdog: bool
    state_save_s: float
    log_level: str


@dataclass(frozen=True)
class Config:
    """A checked configuration. ``gate`` is the core's GateConfig (site and gate included)."""

    source: str
    site: str
    gate_id: str
    key_width: int
    gate: GateConfig
    hardware: HardwareSettings
    journal: JournalSettings
    mqtt: MqttSettings
    commands: CommandsSettings
    acl: AclSettings
    service: ServiceSettings
    # The document after ${ENV} expansion and defaults (secrets included: never log it).
    document: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def redacted(self) -> dict:
        """The effective settings with every secret replaced: safe to log or print."""
        doc = json.loads(json.dumps(self.document, default=str))
        mqtt = doc.get("mqtt", {})
        if "password" in mqtt:
            mqtt["password"] = REDACTED
        if self.mqtt.password is not None:
            mqtt["password_set"] = True
        keys = doc.get("commands", {}).get("trusted_keys", {})
        for key_id in list(keys):
            # Public keys are not secret, but a short fingerprint is all a reader needs.
            raw = base64.b64decode(self.commands.trusted_keys.get(key_id, "") or b"")
            keys[key_id] = f"ed25519:{_fingerprint(raw)}" if raw else REDACTED
        doc["hardware"]["readers"] = [
            _reader_dict(r) for r in self.hardware.readers
        ]
        return doc

    def warnings(self) -> list[str]:
        """Settings that work but deserve a look (logged at start, printed by check-config)."""
        out = []
        if not self.mqtt.enabled:
            out.append("mqtt.host is not set: the agent runs offline, events stay in the journal")
        elif self.mqtt.tls is None:
            out.append("mqtt.tls is not set: events and commands cross the network unencrypted")
        if self.commands.allow_unsigned:
            out.append("commands.allow_unsigned = true: anyone who can publish to the broker can "
                       "open the gate; use it in a lab only")
        elif not self.commands.trusted_keys:
            out.append("commands.trusted_keys is empty: every remote command will be refused")
        if self.hardware.pin_factory == "mock":
            out.append("hardware.pin_factory = \"mock\": simulated hardware, no relay is driven")
        if self.mqtt.password_in_file:
            out.append(PASSWORD_IN_FILE)
        return out


def _fingerprint(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()[:16]


_READER_KEYS = {
    "wiegand": ("name", "type", "d0", "d1", "format"),
    "rdm6300": ("name", "type", "port", "baudrate", "repeat_window_s"),
    "emline": ("name", "type", "port", "baudrate", "repeat_window_s", "number"),
    "osdp": ("name", "type", "port", "baudrate", "address", "scbk_file"),
}


def _reader_dict(r: ReaderSettings) -> dict:
    """The settings that apply to the reader's type (never the Secure Channel key)."""
    return {k: getattr(r, k) for k in _READER_KEYS[r.type] if getattr(r, k) is not None}


# --------------------------------------------------------------------------- schema


def schema() -> dict:
    """The config's JSON Schema (a fresh copy)."""
    return schemas.load("config")


def _validator() -> Any:
    return schemas.validator("config")


_path_text = schemas.key_path
# The same keys as paths into the document: the schema's words never quote their values.
_SECRET_PARTS = tuple(tuple(k.split(".")) for k in SECRET_KEYS)


def _schema_error(err: Any, doc: Any) -> tuple[str, str]:
    """One schema error as (TOML key path, message): the words of agent/core/schemas.py."""
    p = schemas.problem(err, "config", doc=doc, secrets=_SECRET_PARTS)
    return _path_text(p.parts) or ("top level" if p.message.startswith("unknown keys") else ""), p.message


def _resolve(root: dict, ref: str) -> Any:
    node: Any = root
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def _fill_defaults(node: dict, doc: Any, root: dict) -> None:
    """Fill missing keys from the schema's defaults, in place, recursively."""
    if "$ref" in node:
        node = _resolve(root, node["$ref"])
    if not isinstance(doc, dict) or node.get("type") != "object":
        return
    for key, sub in node.get("properties", {}).items():
        if "$ref" in sub:
            sub = {**_resolve(root, sub["$ref"]), **{k: v for k, v in sub.items() if k != "$ref"}}
        if key not in doc and "default" in sub:
            doc[key] = json.loads(json.dumps(sub["default"]))
        if key in doc:
            _fill_defaults(sub, doc[key], root)


# --------------------------------------------------------------------------- environment


def _expand(value: Any, path: list[Any], env: Mapping[str, str], errors: list[tuple[str, str]]) -> Any:
    """${NAME} from the environment in every string; $${ is a literal ${."""
    if isinstance(value, dict):
        return {k: _expand(v, [*path, k], env, errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, [*path, i], env, errors) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$${":
            return "${"
        name = m.group(1)
        if name not in env:
            errors.append((_path_text(path),
                           (f"environment variable {name} is not set; set it (systemd: Environment= or "
                           "EnvironmentFile= in a drop-in) or write the value in a file and use the "
                           "*_file key")))
            return ""
        return env[name]

    return _ENV_REF.sub(sub, value)


# --------------------------------------------------------------------------- files


def _abs(base: Path, text: str) -> str:
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _check_file(path: str, where: str, errors: list[tuple[str, str]], *, private: bool = False) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        errors.append((where, f"{path} does not exist; create it or fix the path"))
        return False
    except OSError as exc:
        errors.append((where, f"{path} cannot be read ({exc.strerror}); check its owner and mode"))
        return False
    if not stat.S_ISREG(st.st_mode):
        errors.append((where, f"{path} is not a regular file"))
        return False
    if private and st.st_mode & stat.S_IROTH:
        errors.append((where, (f"{path} holds a secret but every user can read it (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 0640 {path}")))
    if not os.access(path, os.R_OK):
        errors.append((where, (f"{path} is not readable by this user; the service user gate-agent "
                              "must be able to read it (chown root:gate-agent, chmod 0640)")))
        return False
    return True


def _read_secret(path: str, where: str, errors: list[tuple[str, str]]) -> str | None:
    if not _check_file(path, where, errors, private=True):
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        errors.append((where, f"{path} cannot be read ({exc}); it must hold one line of text"))
        return None
    lines = text.strip("\r\n").splitlines()
    if not lines or not lines[0]:
        errors.append((where, f"{path} is empty; write the secret on its first line"))
        return None
    return lines[0]


def _b64_key(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return b""


def _public_key(value: str, base: Path, where: str, errors: list[tuple[str, str]]) -> str | None:
    """A trusted command key as base64 of its 32 raw bytes: from base64 text, or a file
    (absolute or ./relative path) holding base64 text or a PEM public key."""
    text = value.strip()
    # Base64 may start with "/": a value that decodes to a key is a key, not a path.
    if len(_b64_key(text)) != 32 and text.startswith(("/", "./", "../", "~")):
        path = _abs(base, text)
        if not _check_file(path, where, errors):
            return None
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            errors.append((where, f"{path} cannot be read ({exc.strerror})"))
            return None
        if b"-----BEGIN" in data:
            try:
                from cryptography.hazmat.primitives import serialization
                from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

                key = serialization.load_pem_public_key(data)
            except (ValueError, TypeError) as exc:
                errors.append((where, f"{path} is not a PEM Ed25519 public key ({exc})"))
                return None
            if not isinstance(key, Ed25519PublicKey):
                errors.append((where, (f"{path} holds a {type(key).__name__}; commands are signed with "
                                      "Ed25519: give that key's public half")))
                return None
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return base64.b64encode(raw).decode()
        text = data.decode("ascii", errors="replace").strip()
        origin = path
    else:
        origin = "the value"
    raw = _b64_key(text)
    if len(raw) != 32:
        errors.append((where, (f"{origin} is not an Ed25519 public key: give base64 of its 32 raw bytes "
                              "(44 characters ending in '='), or an absolute path to a file holding "
                              "that or a PEM public key")))
        return None
    return base64.b64encode(raw).decode()


# --------------------------------------------------------------------------- parsing


def load_config(path: str | os.PathLike[str] = DEFAULT_PATH, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and check a config file; raise ConfigError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), [("", (f"{p} does not exist; copy examples/agent.toml there "
                                        "(the installer puts one in /etc/gate-agent) and edit it"))]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), [("", (f"{p} cannot be read ({exc}); check its owner and mode "
                                        "(root:gate-agent 0640)"))]) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), [("", f"not valid TOML: {exc}; fix the syntax at that line")]) from None
    return parse_config(doc, source=str(p), base_dir=p.resolve().parent, env=env)


def parse_config(
    doc: Mapping[str, Any],
    *,
    source: str = "<config>",
    base_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Check a config document (parsed TOML); raise ConfigError listing every problem.

    base_dir: where relative paths point from (default: the working directory).
    env: the environment for ${NAME} (default os.environ).
    """
    errors: list[tuple[str, str]] = []
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    env = os.environ if env is None else env
    password_in_file = _written_out(_get(doc, "mqtt", "password"))
    doc = _expand(dict(doc), [], env, errors)
    root = schema()
    _fill_defaults(root, doc, root)
    bad: set[str] = set()  # key paths with a schema error: later checks skip what depends on them
    for err in _validator().iter_errors(doc):
        item = _schema_error(err, doc)
        if item not in errors:
            errors.append(item)
        bad.add(item[0] or "top level")
    config = _Checks(doc, base, errors, bad).run()
    errors.sort(key=lambda x: x[0])  # by key path, so a section's problems sit together
    if errors or config is None:
        raise ConfigError(source, errors)
    if password_in_file and config["mqtt"].password is not None:
        config["mqtt"] = replace(config["mqtt"], password_in_file=True)
    return Config(source=source, document=doc, **config)


def _written_out(value: Any) -> bool:
    """A string with text of its own besides ${NAME} references (a secret written in the file)."""
    if not isinstance(value, str):
        return False
    return _ENV_REF.sub(lambda m: "" if m.group(1) else "${", value) != ""


def _get(doc: Any, *keys: str | int, default: Any = None) -> Any:
    node: Any = doc
    for k in keys:
        in_list = isinstance(k, int) and isinstance(node, list) and 0 <= k < len(node)
        if not (in_list or (isinstance(node, Mapping) and k in node)):
            return default
        node = node[k]
    return node


class _Checks:
    """The checks a schema cannot express, section by section. A section whose
    schema check failed is skipped (its problems are already listed), so each
    problem is reported once and the rest are still found."""

    def __init__(self, doc: dict, base: Path, errors: list[tuple[str, str]], bad: set[str]) -> None:
        self.doc, self.base, self.errors, self.bad = doc, base, errors, bad

    def broken(self, prefix: str) -> bool:
        """A schema error at prefix, inside it, or above it (top level)."""
        return any(b == "top level" or b == prefix or b.startswith((prefix + ".", prefix + "["))
                   or prefix.startswith((b + ".", b + "[")) for b in self.bad)

    def error(self, path: str, msg: str) -> None:
        if (path, msg) not in self.errors:
            self.errors.append((path, msg))

    def run(self) -> dict | None:
        doc = self.doc
        site_id = _get(doc, "site", "id", default="")
        gate_id = _get(doc, "site", "gate", default="")
        gate_cfg = self.gate(site_id, gate_id)
        board = self.profile()
        # A reader entry with a schema problem is skipped; the others are still checked.
        whole = {"top level", "hardware", "hardware.readers", "gate", "gate.readers"}
        readers = None if self.bad & whole or self.broken("gate.readers") \
            else _readers(doc, board, self.base, self.errors,
                          skip=lambda i: self.broken(f"hardware.readers[{i}]"))
        journal = None if self.broken("journal") else _journal(doc, self.base, self.errors)
        mqtt = None if self.broken("mqtt") else _mqtt(doc, self.base, self.errors)
        commands = None if self.broken("commands") else _commands(doc, self.base, self.errors)
        service = None
        if not self.broken("service"):
            svc = doc["service"]
            service = ServiceSettings(
                require_compiled=svc["require_compiled"],
                state_dir=Path(_abs(self.base, svc["state_dir"])),
                watchdog=svc["watchdog"],
                state_save_s=float(svc["state_save_s"]),
                log_level=svc["log_level"],
            )
            svc["state_dir"] = str(service.state_dir)
        if (gate_cfg is not None and board is not None and gate_cfg.fire_release
                and "fire_release" not in board.outputs):
            # Else fire and free mode would drive no line at all: the gate would not be freed.
            self.error("gate.fire_release", f"true, but the board profile {board.name!r} has no "
                       "fire_release output; wire a release relay and add it to the profile, or set "
                       "gate.fire_release = false (then fire and free mode hold both unlock lines)")
        parts = (gate_cfg, readers, journal, mqtt, commands, service)
        if self.errors or self.bad or any(x is None for x in parts) or board is None:
            return None
        hw = doc["hardware"]
        return {
            "site": site_id,
            "gate_id": gate_id,
            "key_width": doc["site"]["key_width"],
            "gate": gate_cfg,
            "hardware": HardwareSettings(profile=hw["profile"], pin_factory=hw["pin_factory"],
                                         readers=tuple(readers or ()), board=board,
                                         wiegand_max_lag_s=float(hw["wiegand_max_lag_s"])),
            "journal": journal,
            "mqtt": mqtt,
            "commands": commands,
            "acl": AclSettings(max_age_h=_get(doc, "acl", "max_age_h"),
                               max_list_mb=_get(doc, "acl", "max_list_mb", default=128)),
            "service": service,
        }

    def gate(self, site_id: Any, gate_id: Any) -> GateConfig | None:
        """The core's own rules (timezone, pulse within wait, timed window), on the
        fields the schema passed; a field it failed takes its default for this check."""
        gate_doc = _get(self.doc, "gate", default={})
        if not isinstance(gate_doc, dict):
            return None
        known = set(GateConfig.field_names())
        kwargs = {k: v for k, v in gate_doc.items() if k in known and not self.broken(f"gate.{k}")}
        site_ok = not self.broken("site.id") and not self.broken("site")
        gate_ok = not self.broken("site.gate") and not self.broken("site")
        try:
            cfg = GateConfig(site=site_id if site_ok else "site", gate=gate_id if gate_ok else "gate",
                             **kwargs)
        except GateConfigError as exc:
            for name, msg in exc.errors:
                path = {"site": "site.id", "gate": "site.gate"}.get(name, f"gate.{name}")
                if not self.broken(path):
                    self.error(path, msg)
            return None
        return cfg if not self.broken("gate") and site_ok and gate_ok else None

    def profile(self) -> Any:
        text = _get(self.doc, "hardware", "profile")
        if not isinstance(text, str) or not text or self.broken("hardware.profile"):
            return None
        from agent.hw.profiles import ProfileError, load_profile

        if text.endswith(".toml") or "/" in text:
            text = _abs(self.base, text)
            self.doc["hardware"]["profile"] = text
        try:
            return load_profile(text)
        except ProfileError as exc:
            for e in exc.errors:
                self.error("hardware.profile", f"{text}: {e}")
            return None


def _readers(doc: dict, board: Any, base: Path, errors: list[tuple[str, str]], *,
             skip: Callable[[int], bool] = lambda i: False) -> list[ReaderSettings] | None:
    gate_readers = _get(doc, "gate", "readers", default={})
    listed = _get(doc, "hardware", "readers")
    if listed is None:
        # Default: one Wiegand reader per gate reader, on the profile's pins.
        entries = [{"name": n, "type": "wiegand"} for n in (gate_readers or {})]
        where_of = {i: f"gate.readers.{e['name']}" for i, e in enumerate(entries)}
    else:
        entries = [e for e in listed if isinstance(e, dict)]
        where_of = {i: f"hardware.readers[{i}]" for i in range(len(entries))}
    out: list[ReaderSettings] = []
    seen: dict[str, str] = {}
    ports: dict[str, tuple[str, str, int, int]] = {}  # port -> (type, reader, address, baudrate)
    used_pins: dict[int, str] = {}
    if board is not None:
        # The board's turnstile lines; a reader's own pins are added as they come.
        for n, o in board.outputs.items():
            used_pins[o.pin] = f"profile outputs.{n}"
        for n, i in board.inputs.items():
            used_pins[i.pin] = f"profile inputs.{n}"
    for i, e in enumerate(entries):
        where = where_of[i]
        name, rtype = e.get("name"), e.get("type")
        if listed is not None and skip(i):
            seen.setdefault(name, where)  # its problems are listed already
            continue
        if name in seen:
            errors.append((f"{where}.name", (f"reader {name!r} is listed twice (also {seen[name]}); "
                                            "give each reader once")))
            continue
        seen[name] = where
        if gate_readers and name not in gate_readers:
            errors.append((f"{where}.name", (f"reader {name!r} has no direction: add it to [gate.readers] "
                                            f"as {name} = \"in\" or \"out\" (known: {', '.join(gate_readers)})")))
        kw: dict[str, Any] = {"name": name, "type": rtype}
        if rtype == "wiegand":
            d0, d1 = e.get("d0"), e.get("d1")
            if (d0 is None) != (d1 is None):
                errors.append((where, "give both d0 and d1, or neither (then the profile's pins are used)"))
                continue
            if d0 is None:
                pins = board.readers.get(name) if board is not None else None
                if board is not None and pins is None:
                    errors.append((where, (f"Wiegand reader {name!r} is not wired in hardware profile "
                                          f"{board.name} (it wires: {', '.join(board.readers) or 'none'}); "
                                          "name the reader as the profile does, or give d0 and d1")))
                    continue
                if pins is not None:
                    d0, d1 = pins.d0, pins.d1
            for line, pin in (("d0", d0), ("d1", d1)):
                if pin is None:
                    continue
                if pin in used_pins:
                    errors.append((f"{where}.{line}", (f"BCM {pin} is already used by {used_pins[pin]}; "
                                                      "every line needs its own pin")))
                else:
                    used_pins[pin] = f"reader {name} {line}"
            kw.update(d0=d0, d1=d1, format=e.get("format"))
        else:
            port = e["port"]
            # OSDP is a multi-drop bus: its readers share a port (each with its own
            # address); a serial reader needs the port to itself.
            other = ports.get(port)
            if other is not None:
                other_type, other_name, other_addr, other_baud = other
                if rtype != "osdp" or other_type != "osdp":
                    errors.append((f"{where}.port", (f"{port} is already used by reader {other_name}; "
                                                    "each serial reader needs its own port")))
                elif e.get("address", 0) == other_addr:
                    errors.append((f"{where}.address", (f"address {other_addr} is already used by reader "
                                                       f"{other_name} on {port}; give each OSDP reader its "
                                                       "own address (as set on the reader)")))
                elif e.get("baudrate", 9600) != other_baud:
                    errors.append((f"{where}.baudrate", (f"readers on one OSDP bus ({port}) share one speed; "
                                                        f"reader {other_name} uses {other_baud}")))
            else:
                ports[port] = (rtype, name, e.get("address", 0), e.get("baudrate", 9600))
            kw["port"] = port
            if "baudrate" in e:
                kw["baudrate"] = e["baudrate"]
            if "repeat_window_s" in e:
                kw["repeat_window_s"] = float(e["repeat_window_s"])
            if "number" in e:
                kw["number"] = e["number"]
            if rtype == "osdp":
                kw["address"] = e.get("address", 0)
                scbk_file = e.get("scbk_file")
                if scbk_file is not None:
                    scbk_file = _abs(base, scbk_file)
                    e["scbk_file"] = scbk_file
                    kw["scbk_file"] = scbk_file
                    key = _read_secret(scbk_file, f"{where}.scbk_file", errors)
                    if key is not None and not _SCBK.match(key.strip()):
                        errors.append((f"{where}.scbk_file", (f"{scbk_file} must hold the Secure Channel "
                                                             "base key as 32 hex digits on one line")))
                    elif key is not None and bytes.fromhex(key.strip()) == bytes(range(0x30, 0x40)):
                        errors.append((f"{where}.scbk_file", (f"{scbk_file} holds SCBK-D, the published "
                                                             "install-mode key: it protects nothing; generate "
                                                             "a random key (openssl rand -hex 16), load it "
                                                             "into the reader and put it here")))
                    elif key is not None:
                        kw["scbk"] = key.strip().upper()
        out.append(ReaderSettings(**kw))
    if listed is not None:
        for name in gate_readers:
            if name not in seen:
                errors.append((f"gate.readers.{name}", (f"no reader named {name!r} in [[hardware.readers]]; "
                                                       "add one or remove it from [gate.readers]")))
    return out


def _journal(doc: dict, base: Path, errors: list[tuple[str, str]]) -> JournalSettings:
    j = doc["journal"]
    path = Path(_abs(base, j["path"]))
    j["path"] = str(path)
    need = j["capacity_events"] * BYTES_PER_EVENT
    if j["disk_budget_mb"] * 1024 * 1024 < need:
        errors.append(("journal.disk_budget_mb",
                       (f"{j['disk_budget_mb']} MiB cannot hold capacity_events = {j['capacity_events']} "
                       f"(about {BYTES_PER_EVENT} bytes each); raise it to at least "
                       f"{math.ceil(need / (1024 * 1024))} or lower journal.capacity_events")))
    return JournalSettings(path=path, sync_interval_s=float(j["sync_interval_s"]),
                           capacity_events=j["capacity_events"], disk_budget_mb=j["disk_budget_mb"],
                           retention_days=float(j["retention_days"]))


def _mqtt(doc: dict, base: Path, errors: list[tuple[str, str]]) -> MqttSettings:
    m = doc["mqtt"]
    tls = None
    if "tls" in m:
        t = m["tls"]
        files = {}
        for key in ("ca_file", "cert_file", "key_file"):
            if key in t:
                files[key] = t[key] = _abs(base, t[key])
                _check_file(files[key], f"mqtt.tls.{key}", errors, private=key == "key_file")
        if ("cert_file" in t) != ("key_file" in t):
            errors.append(("mqtt.tls", ("mutual TLS needs both cert_file and key_file; set both, "
                                       "or neither for server-only TLS")))
        tls = TlsSettings(ca_file=files["ca_file"], cert_file=files.get("cert_file"),
                          key_file=files.get("key_file"), server_name=t.get("server_name"))
    password = m.get("password")
    password_file = m.get("password_file")
    if password is not None and password_file is not None:
        errors.append(("mqtt.password_file", "give either password or password_file, not both"))
    elif password_file is not None:
        password_file = m["password_file"] = _abs(base, password_file)
        password = _read_secret(password_file, "mqtt.password_file", errors)
    if password is not None and "username" not in m:
        errors.append(("mqtt.username", "missing; a password needs a username"))
    port = m.get("port", 8883 if tls is not None else 1883)
    m["port"] = port
    return MqttSettings(
        host=m["host"], port=port, client_id=m.get("client_id"), tls=tls, ack_mode=m["ack_mode"],
        window=m["window"], keepalive=m["keepalive"], backoff_max_s=float(m["backoff_max_s"]),
        telemetry_interval_s=float(m["telemetry_interval_s"]), username=m.get("username"),
        password=password, password_file=password_file,
        site_events=bool(m["site_events"]), session_expiry_s=int(m["session_expiry_s"]),
    )


def _commands(doc: dict, base: Path, errors: list[tuple[str, str]]) -> CommandsSettings:
    c = doc["commands"]
    keys = {}
    for key_id, value in c["trusted_keys"].items():
        b64 = _public_key(value, base, f"commands.trusted_keys.{key_id}", errors)
        if b64 is not None:
            keys[key_id] = b64
    return CommandsSettings(trusted_keys=keys, allow_unsigned=c["allow_unsigned"],
                            max_age_s=float(c["max_age_s"]))


# --------------------------------------------------------------------------- CLI


def _cmd_check_config(args: argparse.Namespace) -> int:
    # A tool for people: its words in the user's language (the service's log stays English).
    from agent.i18n import _
    from agent.tools.words import config_error_text, config_message

    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(f"gate-agent check-config: {config_error_text(exc)}", file=sys.stderr)
        return 2
    out = sys.stdout
    print(_("OK: {source}").format(source=cfg.source), file=out)
    for w in cfg.warnings():
        print(_("warning: {w}").format(w=config_message(w)), file=out)
    print(json.dumps(cfg.redacted(), indent=2, ensure_ascii=False, sort_keys=False), file=out)
    return 0


def add_check_config_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `check-config [FILE]` to a `gate-agent` subparsers object."""
    p = subparsers.add_parser(
        "check-config",
        help="check a config file: prints OK and the settings (secrets hidden), or every problem (exit 2)",
        description="Check a gate-agent config file without starting anything. Prints OK and the "
        "effective settings with secrets hidden, or every problem with its key; exit code 2 when "
        "the file cannot be used.",
    )
    p.add_argument("file", nargs="?", default=str(DEFAULT_PATH),
                   help=f"config file (default {DEFAULT_PATH})")
    p.set_defaults(func=_cmd_check_config)
    return p
