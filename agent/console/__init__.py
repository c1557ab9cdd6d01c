"""``gate-agent console``: the web console for the guard and the technician (docs/console.md).

    gate-agent console serve [--config FILE] [--bind ADDR] [--port N] [--tls-cert F --tls-key F | --no-tls]
    gate-agent console user add NAME --role guard|technician [--password-stdin]
    gate-agent console user list | del NAME | passwd NAME [--password-stdin]

Its own process and systemd unit (systemd/gate-agent-console.service), never
inside the gate: it reads the agent's state over the agent's local socket
(``<state_dir>/console.sock``), the journal read-only and presence.json; if it
dies, the gate does not notice. It does not start until an account exists.

Exit codes: 0 done; 1 the command failed (an account that exists or not); 2 bad
input or a file that cannot be used; 3 the port is taken.
"""
from __future__ import annotations

import argparse
import getpass
import sys
import tomllib
from pathlib import Path
from typing import Any

from agent.exits import Exit
from agent.i18n import _

__all__ = ["DEFAULT_CONFIG", "add_console_parser", "console_paths"]

DEFAULT_CONFIG = Path("/etc/gate-agent/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/gate-agent")
ACCOUNTS_FILE = "console-accounts.json"
SOCKET_FILE = "console.sock"


class ConsoleSetupError(RuntimeError):
    """The console cannot start; the message says what to do."""


def _read_config(config: str | None) -> tuple[Path, dict[str, Any]]:
    path = Path(config) if config is not None else DEFAULT_CONFIG
    try:
        return path, tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if config is not None:
            raise ConsoleSetupError(_("config {path} does not exist; give the right --config").format(path=path)) from None
        return path, {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConsoleSetupError(_("config {path} cannot be read ({error}); check it with gate-agent check-config")
                                .format(path=path, error=exc)) from None


def console_paths(config: str | None) -> dict[str, Any]:
    """What the console reads from the gate's config (only these keys, leniently, like the other
    tools): the state directory, the journal, and the gate's TLS certificate and key."""
    path, doc = _read_config(config)
    base = path.resolve().parent

    def rel(value: Any) -> Path | None:
        if not isinstance(value, str) or not value:
            return None
        p = Path(value)
        return p if p.is_absolute() else base / p

    state_dir = rel((doc.get("service") or {}).get("state_dir")) or DEFAULT_STATE_DIR
    journal = rel((doc.get("journal") or {}).get("path")) or DEFAULT_STATE_DIR / "journal.db"
    tls = ((doc.get("mqtt") or {}).get("tls") or {})
    return {"state_dir": state_dir, "journal": journal, "cert": rel(tls.get("cert_file")),
            "key": rel(tls.get("key_file"))}


def _accounts_path(args: argparse.Namespace) -> Path:
    if args.accounts is not None:
        return Path(args.accounts)
    return console_paths(args.config)["state_dir"] / ACCOUNTS_FILE


def _password(args: argparse.Namespace) -> str:
    if getattr(args, "password_stdin", False):
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(_("password: "))
    second = getpass.getpass(_("the password again: "))
    if first != second:
        raise ValueError(_("the two passwords differ; nothing changed"))
    return first


def _cmd_user(args: argparse.Namespace) -> int:
    from agent.console.accounts import AccountError, Accounts

    what = args.user_command
    try:
        accounts = Accounts(_accounts_path(args)).load()
        if what == "list":
            if not accounts.accounts:
                print(_("no accounts in {path}: add one with gate-agent console user add NAME --role technician")
                      .format(path=accounts.path))
            for a in sorted(accounts.accounts.values(), key=lambda a: a.name):
                print(f"{a.name}\t{a.role}\t{a.created}")
            return Exit.OK
        if what == "del":
            accounts.remove(args.name)
            print(_("account {name} removed; its sessions end at their next request").format(name=args.name))
            return Exit.OK
        if what == "add":
            from agent.console.accounts import check_name

            check_name(args.name)
            if args.name in accounts.accounts:
                raise AccountError(_("account {name!r} exists already; change its password with "
                                     "gate-agent console user passwd {name}").format(name=args.name))
            accounts.add(args.name, args.role, _password(args))
            print(_("account {name} ({role}) added to {path}").format(name=args.name, role=args.role,
                                                                     path=accounts.path))
            return Exit.OK
        if args.name not in accounts.accounts:
            raise AccountError(_("no account {name!r}; see gate-agent console user list").format(name=args.name))
        accounts.set_password(args.name, _password(args))
        print(_("password of {name} changed; its sessions end at their next request").format(name=args.name))
        return Exit.OK
    except (AccountError, ConsoleSetupError, ValueError) as exc:
        print(f"gate-agent console user: {exc}", file=sys.stderr)
        return Exit.USAGE
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return Exit.FAILED
    except OSError as exc:
        print("gate-agent console user: " + _("cannot write the accounts file ({error}); run as the gate-agent "
                                              "user or with sudo").format(error=exc), file=sys.stderr)
        return Exit.USAGE


def _fixed_mmap_threshold() -> None:
    """Each login's scrypt takes 16 MB; glibc then raises its mmap threshold and keeps such
    blocks in the heap, so the process would stay ~20 MB larger after the first login. A fixed
    threshold (as MALLOC_MMAP_THRESHOLD_ sets) gives them back at once; and two malloc arenas
    at most. glibc only; quiet elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        # Each thread that reads the journal would get a malloc arena of its own, kept after it:
        # two are enough for a console (MALLOC_ARENA_MAX=2).
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    _fixed_mmap_threshold()

    from agent.console.accounts import AccountError, Accounts

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        paths = console_paths(args.config)
    except ConsoleSetupError as exc:
        print(f"gate-agent console: {exc}", file=sys.stderr)
        return Exit.USAGE
    accounts_path = Path(args.accounts) if args.accounts else paths["state_dir"] / ACCOUNTS_FILE
    try:
        accounts = Accounts(accounts_path).load()
    except AccountError as exc:
        print(f"gate-agent console: {exc}", file=sys.stderr)
        return Exit.USAGE
    if not accounts.accounts:
        print("gate-agent console: " + _("no account in {path}: the console stays off until one exists. Add one: "
                                         "sudo -u gate-agent gate-agent console user add NAME --role technician")
              .format(path=accounts_path), file=sys.stderr)
        return Exit.USAGE
    if args.tls_cert and not args.tls_key or args.tls_key and not args.tls_cert:
        print("gate-agent console: " + _("give both --tls-cert and --tls-key, or neither"), file=sys.stderr)
        return Exit.USAGE
    console_log = logging.getLogger("agent.console")
    https, cert, key = not args.no_tls, None, None
    if https:  # cryptography (some 8 MB) only where a certificate is to be checked or made
        from agent.console.tlscert import choose, fingerprint, server_usable
    if https and args.tls_cert:
        cert, key = Path(args.tls_cert), Path(args.tls_key)
        why = server_usable(cert, key)
        if why:
            print("gate-agent console: " + _("{cert} cannot serve the console: {why}. Give a server "
                                             "certificate, or leave --tls-cert out: the console then makes "
                                             "its own").format(cert=cert, why=why), file=sys.stderr)
            return Exit.USAGE
    elif https:
        try:
            chosen = choose(paths["cert"], paths["key"], paths["state_dir"], args.bind)
        except OSError as exc:
            # Said in the log, not refused: a console on plain HTTP beats none for the guard.
            https = False
            console_log.warning("no certificate for HTTPS: the gate's cannot be used and the console's own "
                                "cannot be written (%s): serving plain HTTP; passwords cross the network "
                                "unencrypted", exc)
        else:
            cert, key = chosen.cert, chosen.key
            if chosen.own:
                console_log.warning(
                    "HTTPS with the console's own self-signed certificate %s (the gate's certificate: %s). "
                    "Browsers warn about it: compare its SHA-256 fingerprint %s with the one the browser "
                    "shows before accepting it", cert, chosen.why, fingerprint(cert))
    port = args.port or (8443 if https else 8080)
    from agent.console.app import ConsoleSettings, create_app
    from agent.tools.presence import DEFAULT_NAMES

    settings = ConsoleSettings(
        accounts_path=accounts_path, socket_path=Path(args.socket) if args.socket else paths["state_dir"] / SOCKET_FILE,
        journal_path=paths["journal"], presence_path=paths["state_dir"] / "presence.json",
        names_path=Path(args.names) if args.names else DEFAULT_NAMES, https=https,
        idle_s=args.idle_min * 60.0, late_after=args.late_after)
    app = create_app(settings)
    import uvicorn

    logging.getLogger("agent.console").info("serving on %s://%s:%d", "https" if https else "http", args.bind, port)
    try:
        from agent.console.slowguard import GuardedH11Protocol

        # h11 with a time limit on a request's head and a cap per address (slow clients cannot hold
        # every descriptor), and no websockets: fewer modules, less memory (the board has the gate to run).
        uvicorn.run(app, host=args.bind, port=port, http=GuardedH11Protocol, ws="none", lifespan="on",
                    access_log=False,
                    log_level="warning", proxy_headers=False, server_header=False,
                    # An open live page (its event stream) would hold a stop for good: 2 s, then closed.
                    timeout_graceful_shutdown=2,
                    ssl_certfile=str(cert) if https else None, ssl_keyfile=str(key) if https else None)
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
        print("gate-agent console: " + _("cannot listen on {bind}:{port}: is it taken, or not an address of "
                                         "this board? See the log above").format(bind=args.bind, port=port),
              file=sys.stderr)
        return Exit.UNAVAILABLE if exc.code else Exit.OK
    return Exit.OK


def _late(text: str) -> str:
    try:
        hh, mm = (int(x) for x in text.split(":"))
        if 0 <= hh < 24 and 0 <= mm < 60:
            return f"{hh:02d}:{mm:02d}"
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(_("{text!r}: give a time as HH:MM, e.g. 08:30").format(text=text))


def add_console_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``console serve`` and ``console user ...`` to a ``gate-agent`` subparsers object."""
    p = subparsers.add_parser(
        "console", help="the web console for the guard and the technician (docs/console.md)",
        description="A web console on the school network: status, live passages, today's chart, presence "
                    "and roll-call, the journal; for a technician also io-test, enroll, modes and a manual "
                    "open. Its own process; it stays off until an account exists.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, metavar="FILE",
                        help="the gate's config: its state_dir, journal and TLS certificate are read "
                             "(default /etc/gate-agent/agent.toml)")
    common.add_argument("--accounts", default=None, metavar="FILE",
                        help="the accounts file (default <state_dir>/console-accounts.json)")
    sub = p.add_subparsers(dest="console_command", required=True)
    s = sub.add_parser("serve", parents=[common], help="serve the console (the systemd unit runs this)")
    s.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="the address to listen on: the board's address on the school network "
                        "(default 127.0.0.1: this board only)")
    s.add_argument("--port", type=int, default=None, help="the port (default 8443 with TLS, 8080 without)")
    s.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="HTTPS certificate (default: the gate's mqtt.tls cert_file, when readable)")
    s.add_argument("--tls-key", default=None, metavar="FILE", help="its private key (default: mqtt.tls key_file)")
    s.add_argument("--no-tls", action="store_true", help="plain HTTP even when a certificate is there")
    s.add_argument("--socket", default=None, metavar="PATH",
                   help="the agent's console socket (default <state_dir>/console.sock)")
    s.add_argument("--names", default=None, metavar="FILE",
                   help="the school's names file for presence (default /etc/gate-agent/names.csv when it exists)")
    s.add_argument("--idle-min", type=float, default=30.0, help="minutes without a request that end a session (default 30)")
    s.add_argument("--late-after", type=_late, default="08:30", metavar="HH:MM",
                   help="a first entry after this time is a late arrival (default 08:30)")
    s.set_defaults(func=_cmd_serve)
    u = sub.add_parser("user", help="the console's accounts: add, list, del, passwd")
    usub = u.add_subparsers(dest="user_command", required=True)
    ua = usub.add_parser("add", parents=[common], help="add an account (asks the password twice)")
    ua.add_argument("name", help="the account name (letters, digits, . _ @ -)")
    ua.add_argument("--role", required=True, choices=("guard", "technician"),
                    help="guard: reads and the roll-call; technician: also io-test, enroll, modes, open")
    ua.add_argument("--password-stdin", action="store_true", help="read the password from standard input (one line)")
    usub.add_parser("list", parents=[common], help="list the accounts and their roles")
    ud = usub.add_parser("del", parents=[common], help="remove an account")
    ud.add_argument("name", help="the account name")
    up = usub.add_parser("passwd", parents=[common], help="set an account's password")
    up.add_argument("name", help="the account name")
    up.add_argument("--password-stdin", action="store_true", help="read the password from standard input (one line)")
    for x in (ua, ud, up, usub.choices["list"]):
        x.set_defaults(func=_cmd_user)
    return p
