"""Every command line the technician's docs quote runs as written, on a staged board.

Each ``gate-agent ...`` line (``sudo`` and a console's ``$`` dropped) in a
fenced code block of the technician's pages (DOCS: wiring, operations,
readers, the PERCo page, profiles, configuration, scenarios) is run, in the
order the page gives them, in a shell, against a board staged in a
temporary directory:

- ``/etc/gate-agent/agent.toml`` is the installer's example config
  (examples/agent.toml) with what a test machine needs changed: the pins
  are gpiozero's mock pins, the journal and state live in the temporary
  directory, and the two readers are RDM6300 serial readers on ptys (the
  test presents cards through the other end). The board is unprovisioned
  until the page's own ``provision`` line fills in site, broker,
  certificates and keys.
- The technician's working directory holds what the page's commands name
  (the gate's certificate, key and CA, the region's public key), made by
  tests/pki.py, and for ``sim`` the bench agent's ``agent.toml``.
- The board's ``/dev/gate-reader`` (the udev link) is the entry reader's
  pty; ``examples/`` is the checkout's. Pages that start from a configured
  board (PROVISIONED) are first provisioned with docs/operations.md's own
  ``provision`` line; docs/configuration.md's file with three mistakes is
  staged as ``agent.toml`` in the technician's directory.
- The lines naming no config get ``--config <staged agent.toml>``: the
  pages say every board tool takes ``--config FILE`` (checked below).
- ``sudo systemctl start|restart|stop gate-agent`` start and stop the agent
  on the staged config (``gate-agent run``), as systemd would.

Long-running commands (enroll, monitor, ``journal tail -f``) get what they
wait for (cards on the ptys, a first screen) and then Ctrl-C, as a
technician ends them. A command runs when it exits with its documented code,
prints no traceback, and shows what the page says it shows. The few lines
that need what a test machine has not are in ``NOT_RUN`` with the reason.

Every other ``gate-agent`` line of every page (inline ``code`` too, and the
regional and packaging pages) is checked without running: the tool exists,
it has each option the line names, and a full line parses as written.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.downlink.signing import generate_keypair
from tests.agentproc import AgentProcess, journal_records
from tests.pki import TestCA

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("hardware/wiring.md", "docs/operations.md", "docs/readers.md", "hardware/perco.md",
        "hardware/profiles.md", "docs/configuration.md", "docs/scenarios.md")
BOARD_CONFIG = "/etc/gate-agent/agent.toml"
FRAME = b"\x0214008EC793CE\x03"  # an RDM6300 frame: card 142,51091, printed 0009357203
EMLINE = b"0009357203\r\n"  # the same card from a text (emline) reader: its 10-digit print
WAIT_S = 60.0  # generous: the machine may be busy; nothing asserts speed

# Lines that cannot run on a test machine, by their start: the reason, and where they are tested.
NOT_RUN = {
    "gate-agent bundle": "downloads the aarch64 wheels from PyPI (no registry downloads in tests); "
    "tests/test_bundle.py runs the same options with --no-download",
    "gate-agent monitor --broker": "the regional view needs the region's broker mqtt.region.example:8884 "
    "(a name this machine cannot resolve) and a regional certificate; tests/test_monitor.py runs its "
    "broker source against a real mosquitto",
    "gate-agent demo": "starts its own mosquitto, ingest and agent and runs until Ctrl-C; "
    "tests/test_demo.py runs it",
}
# Pages that start from a provisioned board (the others provision it with their own lines or need not).
PROVISIONED = ("docs/configuration.md", "hardware/profiles.md")
# The board tools that read /etc/gate-agent/agent.toml unless given --config FILE.
BOARD_TOOLS = ("io-test", "enroll", "doctor", "provision", "monitor", "journal", "check-config", "wiring")


@dataclass
class DocLine:
    doc: str
    lineno: int
    text: str  # as written, continuation lines joined, sudo kept

    @property
    def command(self) -> str:
        return re.sub(r"^sudo\s+", "", self.text)

    def __str__(self) -> str:
        return f"{self.doc}:{self.lineno}: {self.text}"


def doc_lines(doc: str, root: Path = ROOT) -> list[DocLine]:
    """Every gate-agent line (and the service's systemctl lines) in the page's fenced blocks."""
    out: list[DocLine] = []
    fenced = False
    pending: DocLine | None = None
    for n, raw in enumerate((root / doc).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            continue
        line = re.sub(r"^\$\s+", "", line)  # a console block's prompt
        if re.match(r"gate-agent [\w-]+:", line):  # a tool's message quoted as output, not a command
            continue
        if pending is not None:  # a continued line
            pending.text += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                out.append(pending)
                pending = None
            continue
        if re.match(r"(sudo\s+)?(gate-agent\s|systemctl\s.*\sgate-agent$)", line):
            item = DocLine(doc, n, line.rstrip("\\").strip())
            if line.endswith("\\"):
                pending = item
            else:
                out.append(item)
    assert pending is None, f"{doc}: a command ends in a backslash: {pending}"
    return out


def with_config(command: str, config: Path) -> str:
    """The command with --config <staged> where it reads the board's config by default."""
    words = shlex.split(command, comments=True)
    tool = words[1] if len(words) > 1 else ""
    regional = tool == "monitor" and "--broker" in words  # the regional view reads no board config
    if tool not in BOARD_TOOLS or "--config" in words or regional or "--db" in words:
        return _rejoin(words)
    if tool == "check-config":
        words = [w if w != BOARD_CONFIG else str(config) for w in words]
        return _rejoin(words)
    cut = words.index(">") if ">" in words else len(words)
    return _rejoin([*words[:cut], "--config", str(config), *words[cut:]])


def staged_shell(board: Board, shell: str) -> str:
    """The board's udev link /dev/gate-reader (hardware/99-gate-reader.rules) is the entry reader's pty."""
    return shell.replace("/dev/gate-reader", board.ports["entry"])


def touches_the_real_board(shell: str) -> bool:
    """A board tool that would read or write this machine's /etc/gate-agent (never run those)."""
    words = shlex.split(shell)
    tool = words[1] if len(words) > 1 else ""
    if tool == "check-config":  # the file is its argument; without one, the board's
        return BOARD_CONFIG in words or not [w for w in words[2:] if not w.startswith("-")]
    return BOARD_CONFIG in words or (tool in BOARD_TOOLS and "--config" not in words and "--db" not in words
                                     and not (tool == "monitor" and "--broker" in words))


def _rejoin(words: list[str]) -> str:
    cut = words.index(">") if ">" in words else len(words)
    return shlex.join(words[:cut]) + ("" if cut == len(words) else " > " + shlex.quote(words[cut + 1]))


class Output:
    """A process's stdout and stderr, read as they come, to wait for a line."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.text = ""
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._read, args=(s,), daemon=True)
                         for s in (proc.stdout, proc.stderr)]
        for t in self._threads:
            t.start()

    def _read(self, stream) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            with self._cond:
                self.text += chunk.decode("utf-8", "replace")
                self._cond.notify_all()

    def wait_for(self, needle: str, timeout: float = WAIT_S) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while needle not in self.text:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and needle not in self.text:
                    if self.proc.poll() is not None:
                        self._cond.wait(0.2)  # the last output after the exit
                        return needle in self.text
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def join(self) -> None:
        for t in self._threads:
            t.join(10)


@dataclass
class Board:
    """The staged board: its config, the technician's directory, the reader ptys, the agent."""

    root: Path
    config: Path
    home: Path
    readers: dict[str, int]  # reader name -> pty master fd
    ports: dict[str, str]  # reader name -> the pty the reader opens
    env: dict[str, str]
    service: subprocess.Popen | None = None
    bench: AgentProcess | None = None
    notes: list[str] = field(default_factory=list)

    def present_cards(self, only: str | None = None, frame: bytes = FRAME) -> None:
        """A card at each reader (or at the one named): bytes nobody reads would wait in the pty."""
        for name, fd in self.readers.items():
            if only is None or name == only:
                os.write(fd, frame)

    # -- the service, as systemd runs it -------------------------------------------------

    def systemctl(self, action: str) -> None:
        if action in ("stop", "restart"):
            self.stop_service()
        if action in ("start", "restart"):
            log = open(self.root / "service.log", "ab")  # noqa: SIM115 - the process keeps it
            self.service = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                cwd="/", env=self.env, stdout=subprocess.DEVNULL, stderr=log)
            log.close()
            journal = self.root / "var/lib/gate-agent/journal.db"
            deadline = time.monotonic() + WAIT_S
            # Up when it has journalled its start; an unprovisioned board's agent refuses to start,
            # as on a Pi.
            while self.service.poll() is None and time.monotonic() < deadline and not self._started(journal):
                time.sleep(0.1)
            if self.service.poll() is not None:
                self.notes.append(f"the service exited with {self.service.returncode} (as systemd would show)")

    def _started(self, journal: Path) -> bool:
        try:
            return any(r.get("type") == "agent.started" for r in journal_records(journal))
        except (OSError, sqlite3.Error):
            return False  # not there yet, or being created

    def stop_service(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait(10)
        self.service = None


@pytest.fixture
def board(tmp_path):
    root = tmp_path / "board"
    etc = root / "etc/gate-agent"
    etc.mkdir(parents=True)
    state = root / "var/lib/gate-agent"
    state.mkdir(parents=True, mode=0o700)
    masters: dict[str, int] = {}
    ports: dict[str, str] = {}
    slaves: list[int] = []
    reader_blocks = []
    for name in ("entry", "exit"):
        master, slave = os.openpty()
        masters[name] = master
        slaves.append(slave)
        ports[name] = os.ttyname(slave)
        reader_blocks.append(f'\n[[hardware.readers]]\nname = "{name}"\ntype = "rdm6300"\n'
                             f'port = "{os.ttyname(slave)}"\n')
    text = (ROOT / "examples/agent.toml").read_text(encoding="utf-8")
    for old, new in (('#pin_factory = "auto"', 'pin_factory = "mock"'),
                     ('#path = "/var/lib/gate-agent/journal.db"', f'path = "{state}/journal.db"'),
                     ('#state_dir = "/var/lib/gate-agent"', f'state_dir = "{state}"')):
        assert old in text, f"examples/agent.toml no longer has {old!r}: update the staging"
        text = text.replace(old, new)
    config = etc / "agent.toml"
    config.write_text(text + "".join(reader_blocks))
    config.chmod(0o640)

    home = tmp_path / "home"
    home.mkdir()
    (home / "examples").symlink_to(ROOT / "examples")  # docs/scenarios.md runs from a checkout
    ca = TestCA(tmp_path / "ca")
    ident = ca.issue("school-17/main-1")
    for src, dst in ((ca.cert_path, "ca.pem"), (ident.cert, "gate.pem"), (ident.key, "gate.key")):
        (home / dst).write_bytes(Path(src).read_bytes())
    (home / "gate.key").chmod(0o600)  # as the region hands it over: a secret
    (home / "region-2026.key.pub").write_text(generate_keypair()[1] + "\n")
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT),
               LC_ALL="C.UTF-8", LANG="C.UTF-8", LANGUAGE="", COLUMNS="100")
    b = Board(root, config, home, masters, ports, env)
    try:
        yield b
    finally:
        b.stop_service()
        if b.bench is not None:
            b.bench.stop()
        for fd in (*masters.values(), *slaves):
            os.close(fd)


@dataclass
class Expect:
    """What a command must do: exit codes, text, what to give it while it runs."""

    codes: tuple[int, ...] = (0,)
    shows: tuple[str, ...] = ()
    interact: str | None = None  # "cards": present a card at each reader (or `reader`) when `when` shows
    reader: str | None = None
    frame: bytes = FRAME  # what the reader sends for the card
    when: str | None = None
    then_ctrl_c: str | None = None  # Ctrl-C once this shows (a command that runs until stopped)


def expect_for(command: str) -> Expect:
    words = shlex.split(command, comments=True)
    sub = words[1:3]
    if sub[:1] == ["io-test"]:
        return Expect(shows=("io-test on profile pi4-relay4", "unlock_a"))
    if sub[:1] == ["enroll"] and ("--wiegand" in words or "--profile" in words):
        # A Wiegand reader on mock pins: this process cannot pulse another's mock pins, so the
        # line runs when it listens on the pins it names and ends cleanly on Ctrl-C (the cards
        # themselves: tests/test_enroll.py, in-process).
        return Expect(then_ctrl_c="Ctrl+C to stop", shows=("wiegand on D0=GPIO20 D1=GPIO21",))
    if sub[:1] == ["enroll"]:
        reader = words[words.index("--reader") + 1] if "--reader" in words else None
        needle = f"via {reader}:" if reader else "card 2:"
        if "--serial" in words:
            reader, needle = "entry", "card 1:"  # /dev/gate-reader is the entry reader's pty (staged_shell)
        frame = EMLINE if "emline" in words else FRAME
        return Expect(interact="cards", reader=reader, frame=frame, when="Ctrl+C to stop", then_ctrl_c=needle,
                      shows=("facility,card 142,51091", "print 0009357203"))
    if sub[:1] == ["doctor"]:
        # Exit 1 is doctor's answer "something FAILs": a test machine has no broker
        # mqtt.region.example and no config.txt; the lines this page is about must be OK.
        if "--wait-card" in words:
            return Expect(codes=(0, 1), interact="cards", when="present a card",
                          shows=("OK    reader entry", "OK    reader exit", "card 142,51091"))
        return Expect(codes=(0, 1), shows=("OK    config", "OK: "))
    if sub[:1] == ["provision"]:
        return Expect(shows=("school-17/main-1",))
    if sub[:1] == ["monitor"]:
        return Expect(then_ctrl_c="agent.started")
    if sub == ["journal", "tail"] and "-f" in words:
        return Expect(then_ctrl_c="agent.started")
    if sub == ["journal", "tail"]:
        return Expect(shows=("agent.started",))
    if sub == ["journal", "stats"]:
        return Expect(shows=("agent.started",))
    if sub == ["check-config", "agent.toml"]:
        # docs/configuration.md's example of a file with three mistakes (staged as the page shows it)
        return Expect(codes=(2,), shows=("3 problem(s)", "gate.apb", "gate.pulse_s", "mqtt.tls.ca_file"))
    if sub[:1] == ["check-config"]:
        return Expect(shows=("OK: ",))
    if sub[:1] == ["sim"]:
        return Expect(codes=(0,))  # 1 would be a refusal: every line the page shows is accepted
    return Expect()


def run_line(board: Board, line: DocLine) -> str | None:
    """Run one doc line on the board; None when it did what the page says, else why not."""
    command = line.command
    m = re.match(r"systemctl\s+(start|stop|restart)\s+gate-agent$", command)
    if m:
        board.systemctl(m.group(1))
        return None
    if command.split()[1] == "sim" and board.bench is None:
        # The page: `sim` drives an agent run on simulated hardware with `gate-agent run --config agent.toml`.
        board.bench = AgentProcess(board.home).start(timeout=WAIT_S)
    shell = staged_shell(board, with_config(command, board.config))
    if touches_the_real_board(shell):  # the test runs as root on a shared machine: never its /etc
        return f"not run: {shell!r} would use this machine's {BOARD_CONFIG}"
    exp = expect_for(command)
    proc = subprocess.Popen(["bash", "-c", shell], cwd=board.home, env=board.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    out = Output(proc)
    try:
        if exp.interact == "cards" and out.wait_for(exp.when):
            time.sleep(0.5)  # the readers open their ports just before saying so
            board.present_cards(exp.reader, exp.frame)
        if exp.then_ctrl_c is not None:
            if not out.wait_for(exp.then_ctrl_c):
                return f"never showed {exp.then_ctrl_c!r}: {out.text[-1500:]}"
            time.sleep(0.3)  # a person reads the line before pressing Ctrl-C
            os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(WAIT_S * 2)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        return f"still running after {WAIT_S * 2:.0f} s: {out.text[-1500:]}"
    finally:
        if proc.poll() is None:  # it never showed what it waits for: leave nothing running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.join()
    if "Traceback" in out.text:
        return f"a traceback:\n{out.text[-3000:]}"
    if code not in exp.codes:
        return f"exit {code} (expected {exp.codes}) running {shell!r}:\n{out.text[-2000:]}"
    missing = [s for s in exp.shows if s not in out.text]
    if missing:
        return f"did not show {missing}:\n{out.text[-2000:]}"
    return None


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_line_of_the_page_runs_on_a_staged_board(doc, board):
    lines = doc_lines(doc)
    assert any(x.command.startswith("gate-agent ") for x in lines), f"{doc}: no command found"
    text = (ROOT / doc).read_text(encoding="utf-8")
    injected = [x for x in lines if with_config(x.command, board.config) != _rejoin(shlex.split(x.command, comments=True))]
    if injected:
        # The test may add --config only because the page itself says the tools take it.
        assert "--config FILE" in text, f"{doc} runs tools on the board's config but never says --config FILE"
    if doc in PROVISIONED:  # the page shows a board already provisioned: as docs/operations.md does it
        line = next(x for x in doc_lines("docs/operations.md") if x.command.startswith("gate-agent provision"))
        assert run_line(board, line) is None, f"provisioning as {line} failed"
    if doc == "docs/configuration.md":  # the page's file with three mistakes, in the technician's directory
        (board.home / "agent.toml").write_text(
            '[site]\nid = "school-17"\ngate = "main-1"\n\n[gate]\napb = "sometimes"\npulse_s = 0.05\n\n'
            '[mqtt.tls]\nca_file = "/etc/gate-agent/ca.pem"\ncert_file = "gate.pem"\nkey_file = "gate.key"\n')
    failures = []
    for line in lines:
        if any(line.command.startswith(prefix) for prefix in NOT_RUN):
            continue
        why = run_line(board, line)
        if why is not None:
            failures.append(f"{line}\n  -> {why}")
    notes = "\n".join(board.notes)
    assert not failures, "\n\n".join(failures) + (f"\n\nnotes: {notes}" if notes else "")


def test_the_not_run_list_names_only_lines_the_pages_still_quote():
    quoted = [x.command for doc in DOCS for x in doc_lines(doc)]
    for prefix in NOT_RUN:
        assert any(c.startswith(prefix) for c in quoted), f"NOT_RUN names {prefix!r}, which no page quotes now"


def test_the_extraction_finds_continued_lines_and_drops_sudo():
    lines = {x.command for x in doc_lines("docs/operations.md")}
    provision = [c for c in lines if c.startswith("gate-agent provision")]
    assert provision and all("--trusted-key" in c for c in provision)  # its second line was joined
    assert "gate-agent doctor" in {c.split("#")[0].strip() for c in lines}


# -- every other gate-agent line of every page: a real tool, real options ---------------------

ALL_PAGES = sorted({*map(str, ROOT.glob("docs/*.md")), *map(str, ROOT.glob("hardware/*.md")), str(ROOT / "README.md")})
PLACEHOLDER = re.compile(r"^(\.\.\.|…|\[.*|.*\]|[A-Z][A-Z0-9_]*(=[A-Z][A-Z0-9_]*)?)$")  # FILE, NAME=KEY, [--gate G ...]


def quoted_commands(page: str, root: Path = ROOT) -> list[tuple[str, str]]:
    """(where, command) for each gate-agent line of the page: inline `code` spans and fenced lines."""
    text = Path(page).read_text(encoding="utf-8")
    rel = str(Path(page).relative_to(root))
    found = [(f"{rel}: `{m.group(1)}`", m.group(1)) for m in re.finditer(r"`((?:sudo )?gate-agent [^`]*)`", text)]
    found += [(str(x), x.command) for x in doc_lines(rel, root) if x.command.startswith("gate-agent ")]
    return found


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    from agent.cli import build_parser
    from agent.regional.ingest import build_parser as ingest_parser

    return build_parser(), ingest_parser()


def _tool(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, int]:
    """The (sub)parser the words name, and how many words name it."""
    used = 0
    while used < len(words):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or words[used] not in subs[0].choices:
            break
        parser = subs[0].choices[words[used]]
        used += 1
    return parser, used


def quoted_command_problems(pages: list[str], root: Path = ROOT) -> tuple[int, list[str]]:
    """(how many commands were checked, what is wrong with them)."""
    main_parser, ingest = _parsers()
    problems = []
    seen = 0
    for page in pages:
        for where, command in quoted_commands(page, root):
            words = shlex.split(re.sub(r"^sudo\s+", "", command), comments=True)[1:]
            if ">" in words:
                words = words[:words.index(">")]
            if words[:1] == ["ingest"]:
                parser, used = ingest, 1
            else:
                parser, used = _tool(main_parser, words)
                if used == 0:
                    problems.append(f"{where}: no such tool {words[:1]}")
                    continue
            seen += 1
            args = [w for w in words[used:] if w != "--"]
            known = {s for a in parser._actions for s in a.option_strings}
            unknown = [w.split("=")[0] for w in args if w.startswith("-") and w.split("=")[0] not in known]
            if unknown:
                problems.append(f"{where}: {' '.join(words[:used])} has no option {unknown}")
                continue
            if not args or any(PLACEHOLDER.match(w) for w in args):
                continue  # the tool's name in a sentence, or a synopsis: its options are checked above
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    parser.parse_args(args)
            except SystemExit as exc:
                problems.append(f"{where}: does not parse (exit {exc.code}): {err.getvalue().strip()[-300:]}")
    return seen, problems


def test_every_quoted_command_names_a_real_tool_and_real_options():
    """Inline commands and the fenced lines of the other pages (regional, packaging) are not run on
    a staged board, but each must name a tool that exists and only options that tool has; a full
    line (no placeholder such as FILE, NAME=KEY, ... or [--gate G]) must parse as written."""
    seen, problems = quoted_command_problems(ALL_PAGES)
    assert seen > 60, f"only {seen} quoted commands found: the extraction broke"
    assert not problems, "\n".join(problems)


def test_the_quoted_command_check_catches_a_wrong_option_a_wrong_tool_and_a_missing_argument(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `gate-agent io-test --profle pi4-relay4`, `gate-agent iotest`, "
                    "`gate-agent ingest --conflicts` and `gate-agent wiring --text`.\n")
    seen, problems = quoted_command_problems([str(page)], tmp_path)
    assert seen == 3
    assert len(problems) == 3, problems
    assert "no option ['--profle']" in problems[0]
    assert "no such tool ['iotest']" in problems[1]
    assert "does not parse" in problems[2] and "--db" in problems[2]
