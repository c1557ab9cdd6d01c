"""Every technician's and regional tool speaks Russian under a Russian locale:
its --help, its errors, its output (issue 11). A run of English words in the
output is an untranslated sentence (see english_runs for what is excepted)."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import i18n
from agent.core.events import Now
from agent.core.records import make_record
from agent.tools import words
from agent.uplink.journal import Journal
from tests.test_board_tools import osdp_board  # noqa: F401 (a fixture: an OSDP reader on a pty)

ROOT = Path(__file__).resolve().parent.parent
PO = ROOT / "agent" / "locale" / "ru" / "LC_MESSAGES" / "gate-agent.po"
CYRILLIC = re.compile(r"[А-Яа-яЁё]")
BOOT = "boot-1"

# Command lines quoted inside Russian sentences ("запустите: sudo systemctl start
# gate-agent") are what the technician types, not prose: from the command word
# to the next punctuation is left out.
_COMMAND = re.compile(r"\b(?:sudo|gate-agent|systemctl|journalctl|apt|timedatectl|udevadm|ls|findmnt|openssl"
                      r"|chmod|chown|printf|dmesg|grep|usermod)\b[^;,:()«»\n]*")
_WORD = re.compile(r"[a-z]+")
# Words that are not English prose in this output: the contract's two-word
# value "entry only" never appears; these are io-test's command words
# ("on LINE | off LINE", "all off") that the technician types as shown.
ALLOWED_WORDS = {"on", "off", "all"}


def english_runs(text: str) -> list[str]:
    """Runs of 3 or more consecutive English words (lowercase letters only) per
    line. Identifiers (entry_only, access.denied, reason=blocked), paths, option
    names (--config), numbers and single contract values shown beside their
    translation («обычный (normal)») are not words by this rule."""
    found = []
    for line in text.splitlines():
        line = _COMMAND.sub(" ", line)
        run: list[str] = []
        for token in line.split() + [""]:
            # A bare word, maybe ending a clause; one in quotes, brackets or
            # parentheses is a value shown as it is ('card', (wiegand), {in,out}).
            word = token.rstrip(".,;:!?")
            if _WORD.fullmatch(word) and word not in ALLOWED_WORDS:
                run.append(word)
                continue
            if len(run) >= 3:
                found.append(" ".join(run))
            run = []
    return found


def test_the_detector_finds_an_english_sentence_and_passes_russian_with_identifiers():
    assert english_runs("подсказка: does not exist; create it or fix the path") == [
        "does not exist create it or fix the path"]
    assert english_runs("gate-agent io-test: error: the following arguments are required: --profile")
    assert english_runs("режим обычный (normal)   отказано 5 (заблокированная карта (blocked) 5)") == []
    assert english_runs("--    readers   entry (wiegand), exit (wiegand): не проверены") == []
    assert english_runs("недопустимое значение 'status' (допустимые: 'card', 'pass', 'fire', 'ping')") == []
    assert english_runs("запустите: sudo systemctl start gate-agent; access.denied reason=unknown_card") == []


# --------------------------------------------------------------------------- helpers


def _ru_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_") and k != "LANGUAGE"}
    env["LANG"] = "ru_RU.UTF-8"
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, **env: str) -> tuple[int, str]:
    res = subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=cwd, env=_ru_env(PYTHONPATH=str(ROOT), **env),
                         capture_output=True, text=True, timeout=120, check=False)
    return res.returncode, res.stdout + res.stderr


def _assert_russian(name: str, out: str) -> None:
    assert CYRILLIC.search(out), f"{name}: no Russian at all:\n{out}"
    bad = english_runs(out)
    assert not bad, f"{name}: English left in the Russian output: {bad}\n{out}"


@pytest.fixture
def board(tmp_path: Path) -> dict[str, Path]:
    """A staged board: a valid config on simulated pins, a small journal, a broken config."""
    journal = tmp_path / "journal.db"
    config = tmp_path / "agent.toml"
    config.write_text('[site]\nid = "school-17"\ngate = "main-1"\n[hardware]\npin_factory = "mock"\n'
                      f'[journal]\npath = "{journal}"\n[service]\nstate_dir = "{tmp_path}"\n')
    now = time.time()
    rows = [("agent.started", {"mode": "normal", "acl_version": "v1"}),
            ("access.granted", {"reader": "entry", "direction": "in", "card": 6613779, "format": "w26",
                                "person": "p-1"}),
            ("passage", {"direction": "in"}),
            ("access.denied", {"reader": "entry", "direction": "in", "card": 12345, "format": "w26",
                               "reason": "blocked"}),
            ("access.denied", {"reader": "exit", "direction": "out", "card": 12346, "format": "w26",
                               "reason": "unknown_card"}),
            ("passage.forced", {"direction": "out"}),
            ("alarm", {"kind": "acl_stale", "active": True, "detail": "age 30 h"}),
            ("alarm", {"kind": "acl_missing", "active": True,
                       "detail": "no access list yet: every card is refused as unknown_card"}),
            ("mode.changed", {"from": "normal", "to": "entry_only", "by": "cmd"})]
    with Journal(journal, boot=BOOT) as j:
        j.commit([make_record(kind, Now(i + 1.0, now + i, True), BOOT, **fields)
                  for i, (kind, fields) in enumerate(rows)])
    broken = tmp_path / "broken.toml"
    broken.write_text('[site]\ngate = "main 1"\n[gate]\nwait_s = 99\nrelay_mode = "pulsed"\n'
                      'timezone = "Mars/Base"\nreaders = {entry = "in", exit = "sideways"}\n'
                      '[hardware]\nprofile = "pi4-relay4"\npin_factory = "mock"\ncolour = "red"\n'
                      '[mqtt]\nhost = "x"\npassword = "p"\n[mqtt.tls]\nca_file = "nope.pem"\n'
                      f'[journal]\npath = "{journal}"\n')
    return {"dir": tmp_path, "config": config, "journal": journal, "broken": broken}


# --------------------------------------------------------------------------- --help


def _subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))


@pytest.fixture
def russian():
    i18n.set_language("ru")
    yield
    i18n.set_language(None)


@pytest.mark.parametrize("module", ["agent.cli", "agent.regional.ingest"])
def test_every_help_text_has_a_russian_translation(module):
    """The gate-agent parser, and the ingest's own (`gate-agent ingest -- --help`)."""
    import importlib

    i18n.set_language("en")
    try:
        parser = importlib.import_module(module).build_parser()
    finally:
        i18n.set_language(None)
    catalog = i18n.po_messages(PO)
    missing = [m for m in i18n.parser_msgids(parser) if m not in catalog]
    assert missing == [], "translate these --help texts in gate-agent.po"


def test_every_help_of_every_subcommand_is_russian(russian):
    from agent.cli import build_parser

    parser = build_parser()
    helps = list(_subparsers(parser))
    assert len(helps) > 20  # every subcommand, down to `acl push` and `sim card`
    for path, sub in helps:
        text = sub.format_help()
        assert text.startswith("использование: "), path
        _assert_russian("gate-agent " + " ".join(path) + " --help", text)


def test_gate_agent_help_and_its_usage_errors_are_russian(tmp_path):
    code, out = _run(["--help"], tmp_path)
    assert code == 0
    _assert_russian("gate-agent --help", out)
    assert "Агент школьного турникета" in out and "параметры:" in out
    code, out = _run(["check-config", "--no-such-option"], tmp_path)
    assert code == 2
    _assert_russian("a usage error", out)
    assert "неизвестные аргументы: --no-such-option" in out


def test_language_wins_over_an_english_locale_as_gnu_gettext_does(tmp_path):
    code, out = _run(["--help"], tmp_path, LANG="en_US.UTF-8", LANGUAGE="ru:en")
    assert code == 0 and "Агент школьного турникета" in out
    code, out = _run(["--help"], tmp_path, LANG="C", LANGUAGE="ru")  # plain C ignores LANGUAGE
    assert code == 0 and "School turnstile agent" in out and not CYRILLIC.search(out)


# --------------------------------------------------------------------------- the tools at work


def test_check_config_reports_every_problem_in_russian(board):
    code, out = _run(["check-config", str(board["broken"])], board["dir"])
    assert code == 2
    _assert_russian("check-config (broken)", out)
    assert "ошибок: " in out and "site.id: не задан" in out and "gate.wait_s:" in out
    code, out = _run(["check-config", str(board["config"])], board["dir"])
    assert code == 0
    head = out.split("{", 1)[0]  # then the settings as JSON: keys and values, not prose
    _assert_russian("check-config (valid)", head)
    assert "предупреждение: commands.trusted_keys пуст" in head


def test_doctor_on_a_staged_board_is_russian(board):
    code, out = _run(["doctor", "--config", str(board["config"])], board["dir"])
    assert code in (0, 1), out
    _assert_russian("doctor", out)
    assert "commands.trusted_keys пуст" in out


def test_journal_and_monitor_show_russian_terms_with_the_contract_values(board):
    code, out = _run(["journal", "stats", "--db", str(board["journal"])], board["dir"])
    assert code == 0
    _assert_russian("journal stats", out)
    code, out = _run(["journal", "tail", "--db", str(board["dir"] / "missing.db")], board["dir"])
    assert code == 2
    _assert_russian("journal tail (no journal)", out)
    code, out = _run(["monitor", "--db", str(board["journal"]), "--once"], board["dir"], COLUMNS="250")
    assert code == 0, out
    _assert_russian("monitor --once", out)
    assert "только вход (entry_only)" in out
    assert "заблокированная карта (blocked) 1" in out and "неизвестная карта (unknown_card) 1" in out
    assert "несанкционированных проходов 1" in out
    assert "список доступа устарел (acl_stale)" in out
    assert "detail=списка доступа ещё нет" in out  # a record's detail, shown in Russian


def test_provision_bundle_and_sim_errors_are_russian(board):
    d = board["dir"]
    code, out = _run(["provision", "--config", str(d / "p.toml"), "--site", "school-17", "--gate", "main-1",
                      "--broker", "mqtt.example:8883", "--ca", str(d / "missing-ca.pem"), "--no-trusted-keys"], d)
    assert code == 2
    _assert_russian("provision (missing CA)", out)
    # The config is written but names a CA that is not there: config.py's problem, shown in Russian.
    (d / "prov.toml").write_text('[mqtt.tls]\nca_file = "missing-ca.pem"\n')
    code, out = _run(["provision", "--config", str(d / "prov.toml"), "--site", "school-17", "--gate", "main-1",
                      "--broker", "mqtt.example:8883", "--no-trusted-keys"], d)
    assert code == 1
    _assert_russian("provision (config with a problem)", out)
    assert "missing-ca.pem не существует; создайте файл или исправьте путь" in out
    code, out = _run(["bundle", "--site", "school-17", "--gate", "main-1", "--config", str(d / "missing.toml"),
                      "--out", str(d / "bundle")], d)
    assert code == 2
    _assert_russian("bundle (missing template)", out)
    code, out = _run(["sim", "--config", str(board["broken"]), "ping"], d)
    assert code == 2
    _assert_russian("sim (broken config)", out)


def test_bench_tools_errors_are_russian(board):
    d = board["dir"]
    code, out = _run(["enroll", "--serial", str(d / "no-such-tty"), "--timeout", "1"], d)
    assert code == 2
    _assert_russian("enroll (no port)", out)
    code, out = _run(["io-test", "--profile", "no-such-board", "--pin-factory", "mock", "-c", "show"], d)
    assert code == 2
    _assert_russian("io-test (unknown profile)", out)
    code, out = _run(["io-test", "--profile", "pi4-relay4", "--pin-factory", "mock", "-c", "show",
                      "-c", "pulse unlock_a 0.1", "-c", "bogus"], d)
    _assert_russian("io-test (a session)", out)


def test_regional_tools_errors_are_russian(board):
    d = board["dir"]
    code, out = _run(["cmd", "status", "--site", "school-17", "--gate", "main-1", "--port", "1", "--unsigned",
                      "--connect-timeout", "2"], d)
    assert code == 2
    _assert_russian("cmd (no broker)", out)
    code, out = _run(["acl", "push", str(d / "missing.json"), "--site", "school-17", "--unsigned"], d)
    assert code == 2
    _assert_russian("acl push (no file)", out)
    code, out = _run(["keygen", str(d / "region.key"), "--key-id", "region-2026"], d)
    assert code == 0
    _assert_russian("keygen", out)


# --------------------------------------------------------------------------- the catalogue


def test_every_config_message_and_contract_term_has_a_russian_translation():
    catalog = i18n.po_messages(PO)
    ids = words.config_msgids()
    assert len(ids) > 100  # config.py's messages and the schema's texts were found
    for msgid in ids:
        assert msgid in catalog, f"translate in gate-agent.po: {msgid!r}"
        fields = set(re.findall(r"\{[^}]*\}", msgid))
        ru = set(re.findall(r"\{[^}]*\}", catalog[msgid]))
        # Only a field for English grammar ({'s' if ...}) may be left out.
        assert ru <= fields and all("'s'" in f for f in fields - ru), msgid
    details = words.detail_msgids()
    assert "no access list yet: every card is refused as unknown_card" in details
    for msgid in details:
        assert msgid in catalog, f"translate the record detail in gate-agent.po: {msgid!r}"
        assert set(re.findall(r"\{[^}]*\}", catalog[msgid])) == set(re.findall(r"\{[^}]*\}", msgid)), msgid
    for table in (words.MODE_TERMS, words.REASON_TERMS, words.ALARM_TERMS, words.READER_ERROR_TERMS):
        for term in table.values():
            assert CYRILLIC.search(catalog.get(term, "")), f"translate the term {term!r}"


def test_contract_values_are_shown_beside_their_russian_term_and_alone_in_english(russian):
    assert words.mode_text("normal") == "обычный (normal)"
    assert words.reason_text("antipassback") == "запрет повторного прохода (antipassback)"
    assert words.alarm_text("some_new_kind") == "some_new_kind"  # the contract's list is open
    i18n.set_language("en")
    assert words.mode_text("normal") == "normal" and words.reason_text("blocked") == "blocked"


def test_a_config_message_is_translated_by_its_template_and_english_stays_as_it_was(russian):
    msg = "/etc/gate-agent/ca.pem does not exist; create it or fix the path"
    assert words.config_message(msg) == "/etc/gate-agent/ca.pem не существует; создайте файл или исправьте путь"
    hinted = "99 is above 60 (5.0 on a TTR-04, 8.0 on a TTR-10A)"
    assert words.config_message(hinted) == "99: больше допустимого 60 (5.0 у TTR-04, 8.0 у TTR-10A)"
    assert words.config_message("something nobody wrote") == "something nobody wrote"
    i18n.set_language("en")
    assert words.config_message(msg) == msg


# --------------------------------------------------------------------------- ingest, simulate (h-ru2)


def test_ingest_help_and_its_usage_errors_are_russian(tmp_path):
    code, out = _run(["ingest", "--", "--help"], tmp_path)
    assert code == 0
    _assert_russian("gate-agent ingest -- --help", out)
    assert out.startswith("использование: gate-agent ingest") and "по умолчанию 500000" in out
    code, out = _run(["ingest", "--port", "x"], tmp_path)
    assert code == 2
    _assert_russian("gate-agent ingest (a usage error)", out)
    assert "нужен один из аргументов: --db --db-url" in out or "недопустимое значение" in out
    code, out = _run(["ingest", "--conflicts", "--db", str(tmp_path / "none.db")], tmp_path)
    assert code == 2
    _assert_russian("gate-agent ingest --conflicts (no database)", out)


BROKEN_SCENARIO = '''name = "broken"
start = "2026-09-01T08:40:00"

[gate]
colour = "red"
wait_s = 99

[[steps]]
at = "08:47:20"
card = "100,60179"
reader = "sideways"

[[steps]]
at = "08:00:00"
serial = "x"

[[steps]]
at = "09:00:00"
acl_delta = "missing.json"
'''

SCHEMA_BROKEN_SCENARIO = '''name = 5
start = "2026-09-01T08:40:00+07:00"
colour = 1

[[steps]]
card = "100,60179"

[[steps]]
at = "08:00"
walk = -1
rush = { cards = [], every = 0 }

[[expect]]
count = "x"
'''

UNMET_SCENARIO = '''name = "unmet"
start = "2026-09-01T08:40:00+07:00"

[[steps]]
at = "08:47:20"
card = "100,60179"

[[expect]]
type = "passage"
count = 3

[[expect]]
type = "access.denied"
min = 2
'''


def test_simulate_errors_and_expectations_are_russian(tmp_path):
    (tmp_path / "bad.toml").write_text(BROKEN_SCENARIO)
    code, out = _run(["simulate", "--check", str(tmp_path / "bad.toml")], tmp_path)
    assert code == 2
    _assert_russian("simulate (a broken scenario)", out)
    assert "шаг 1 (строка 11), reader: у турникета нет считывателя 'sideways'" in out
    assert "шаг 3 (строка 19), acl_delta: файл списка доступа" in out
    assert "/gate: параметры турникета: ошибок: 1" in out and "wait_s: 99; допустимо: секунды" in out
    (tmp_path / "bad2.toml").write_text(SCHEMA_BROKEN_SCENARIO)
    code, out = _run(["simulate", str(tmp_path / "bad2.toml")], tmp_path)
    assert code == 2
    _assert_russian("simulate (the schema's problems)", out)
    assert "шаг 1 (строка 5), at: не задан; это обязательный ключ" in out
    assert "ожидание 1 (строка 14), count: \"x\": ожидается целое число" in out
    assert "/colour: неизвестный ключ: \"colour\"; здесь допустимы: \"acl\"," in out
    (tmp_path / "unmet.toml").write_text(UNMET_SCENARIO)
    code, out = _run(["simulate", "--check", str(tmp_path / "unmet.toml")], tmp_path)
    assert code == 1
    said = "\n".join(line for line in out.splitlines() if not line.startswith("{"))  # the records are JSON
    _assert_russian("simulate --check (unmet)", said)
    assert "ожидание не выполнено: ожидание 1 (строка 8)" in out and "ожидалось ровно 3" in out
    code, out = _run(["simulate", "--check", str(ROOT / "examples" / "scenarios" / "late-pupil.toml")], tmp_path)
    assert code == 0 and "ожидания выполнены: 4" in out


def test_every_scenario_message_has_a_russian_translation(russian):
    catalog = i18n.po_messages(PO)
    ids = words.scenario_msgids()
    assert "{where}: access-list file {path} not found" in ids and len(ids) > 15
    for msgid in ids:
        assert msgid in catalog, f"translate the scenario message in gate-agent.po: {msgid!r}"
        assert set(re.findall(r"\{[^}]*\}", catalog[msgid])) == set(re.findall(r"\{[^}]*\}", msgid)), msgid
    assert words.scenario_message("step 2 (line 7), at: 08:00 is before the previous step; steps run in time order") \
        == "шаг 2 (строка 7), at: 08:00 раньше предыдущего шага; шаги идут по порядку времени"
    i18n.set_language("en")
    assert words.scenario_message("step 2, card: x") == "step 2, card: x"


def test_io_test_state_words_are_russian_with_the_identifier_beside(board):
    d = board["dir"]
    script = ["-c", "show", "-c", "on stop", "-c", "pulse unlock_a 0.1", "-c", "all off"]
    code, out = _run(["io-test", "--profile", "pi4-relay4", "--pin-factory", "mock", *script], d)
    assert code == 0, out
    _assert_russian("io-test (states)", out)
    # Too short for a 3-word run: each state word must not stand alone, only beside its term.
    for word in words.IO_STATE_TERMS:
        alone = re.findall(rf"(?<![(\w]){word}(?![)\w])", out)
        assert alone == [], f"io-test: {word!r} shown without its Russian term:\n{out}"
    assert "сработал (ASSERTED)" in out and "покой (rest)" in out
    assert "включён (ACTIVE)" in out and "выключен (inactive)" in out and "низкий (low)" in out
    code, out = _run(["io-test", "--profile", "pi4-relay4", "--pin-factory", "mock", *script], d, LANG="C")
    assert code == 0 and not CYRILLIC.search(out)
    assert re.search(r"ready +GPIO22 low  ASSERTED the turnstile reports ready", out), out
    assert re.search(r"stop +GPIO6  low  ACTIVE  ", out), out  # the English columns as before


def test_the_russian_sign_off_sheet_quotes_io_test_as_it_prints(russian):
    text = (ROOT / "hardware" / "commissioning-ru.md").read_text(encoding="utf-8")
    quoted = re.findall(r"«([^«»]+) \(`?([A-Za-z]+)`?\)»", text)
    assert {ident for _term, ident in quoted} >= {"ASSERTED", "rest", "ACTIVE", "inactive", "high", "low"}
    for term, ident in quoted:
        assert words.io_state_text(ident) == f"{term} ({ident})", (term, ident)


def test_details_assembled_before_they_are_passed_are_shown_in_russian(tmp_path):
    """The flood summary and the journal's backlog alarm build their detail in a
    variable (or a helper's parameter) first: the real producers make them here."""
    from agent.downlink.flood import FloodGuard

    clock = [100.0]
    reports: list[tuple[str, dict]] = []
    guard = FloodGuard(report=lambda rtype, fields: reports.append((rtype, fields)), interval_s=10,
                       verbatim=1, monotonic=lambda: clock[0], timers=False)
    for _ in range(5):
        guard.record("cmd", "refused.invalid")
    clock[0] += 11
    guard.tick()  # the flood window closes: the active summary
    clock[0] += 11
    guard.tick()  # a quiet window: the clearing summary
    assert [f["active"] for _t, f in reports] == [True, False]
    db = tmp_path / "journal.db"
    now = time.time()
    with Journal(db, boot=BOOT, capacity_events=20) as j:
        j.commit([make_record(rtype, Now(1.0 + i, now + i, True), BOOT, **fields)
                  for i, (rtype, fields) in enumerate(reports)])
        for i in range(20):  # past the backlog mark: the journal's own journal_capacity alarm
            j.commit([make_record("passage", Now(10.0 + i, now + 10 + i, True), BOOT, direction="in")])
    code, out = _run(["journal", "tail", "--db", str(db), "-n", "100"], tmp_path)
    assert code == 0, out
    _assert_russian("journal tail (flood, backlog)", out)
    assert "detail=поток команд за 10 с" in out and "detail=поток команд прекратился" in out
    assert "detail=очередь к серверу: " in out
    code, out = _run(["monitor", "--db", str(db), "--once"], tmp_path, COLUMNS="400")
    assert code == 0, out
    _assert_russian("monitor --once (flood, backlog)", out)
    assert "очередь к серверу: " in out or "поток команд" in out
    code, out = _run(["journal", "tail", "--db", str(db), "-n", "100"], tmp_path, LANG="C")
    assert code == 0 and "detail=downlink flood, 10 s" in out and "detail=backlog " in out  # English stays


def test_enroll_labels_an_osdp_reader_in_russian(monkeypatch, capsys, request):
    """enroll on a board whose reader is OSDP (libosdp's own reader on a pty, the fixture
    of tests/test_board_tools.py), under LANG=ru_RU.UTF-8."""
    from tests.test_board_tools import ADDRESS

    cfg, present = request.getfixturevalue("osdp_board")
    for name in ("LC_ALL", "LC_MESSAGES", "LANGUAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "ru_RU.UTF-8")
    i18n.set_language(None)
    try:
        from agent.cli import main

        present()
        code = main(["enroll", "--config", str(cfg), "--count", "1", "--timeout", "30"])
    finally:
        i18n.set_language(None)
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 0, text
    _assert_russian("enroll (OSDP)", text)
    assert f"entry: OSDP, адрес {ADDRESS} на " in text and "142,51091" in text


def test_enroll_shows_a_bad_read_in_russian(tmp_path):
    """A text (emline) reader on a pty sends a line that is no card number, then a card:
    the bad read's detail, assembled by the decoder, is shown in Russian."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "enroll", "--serial", os.ttyname(slave),
                                 "--protocol", "emline", "--count", "1", "--timeout", "30"],
                                cwd=tmp_path, env=_ru_env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                os.write(master, b"12AB\r\n0009357203\r\n")  # until the reader has the port open
                time.sleep(0.5)
            out, _err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 0, out
    _assert_russian("enroll (a bad read)", out)
    assert "строка не в формате 10 десятичных цифр или 8/10 шестнадцатеричных" in out, out
    assert "142,51091" in out


def test_details_kept_in_variables_attributes_and_parameters_are_found(russian):
    ids = words.detail_msgids()
    for msgid in ("backlog {stored} of {self._capacity}",  # a helper's parameter (Journal._alarm)
                  "downlink quiet again; last {span:.0f} s: {parts or 'nothing refused'}",  # a variable, sliced
                  "write failed: {exc}", "read-only filesystem"):  # kept in self._blocked, a module constant
        assert msgid in ids, msgid
    # A detail inside a detail: the journal clears its alarm with the reason it raised it for.
    assert words.detail_text("read-only filesystem: writable again") == \
        "файловая система только для чтения: запись снова возможна"


# --------------------------------------------------------------------------- ingest's terminal, simulate's cards, dates, --pretty (h-ru3)


def _conflicting_store(path: Path) -> None:
    """A store whose quarantine holds one version: an id first stored with other content."""
    import json

    from agent.regional.store import Row, open_store

    store = open_store(path)
    try:
        for person in ("p-0001", "p-9999"):
            body = json.dumps({"id": "j1:1", "seq": 1, "type": "passage", "person": person})
            store.insert([Row("j1:1", "j1", 1, "school-17", "main-1", "passage", "2026-09-01T08:47:20+07:00", body)])
    finally:
        store.close()


def test_ingest_conflicts_listing_and_database_errors_are_russian(tmp_path):
    db = tmp_path / "ingest.db"
    _conflicting_store(db)
    code, out = _run(["ingest", "--conflicts", "--db", str(db)], tmp_path)
    assert code == 1, out
    _assert_russian("gate-agent ingest --conflicts", out)
    assert "конфликтующих версий в карантине: 1" in out and "j1:1" in out and '"p-0001" -> "p-9999"' in out
    # The JSON listing is data: as stored, whatever the language.
    code, out = _run(["ingest", "--conflicts", "--json", "--db", str(db)], tmp_path)
    assert code == 1 and '"person": "p-9999"' in out and not CYRILLIC.search(out)
    for args, said in ((["--db-url", "sqlite://"], "не удалось разобрать адрес базы данных"),
                       (["--db-url", "ftp://host/db"], "у адреса базы данных 'ftp://host/db' схема 'ftp'"),
                       (["--db-url", str(tmp_path)], "не удалось открыть базу данных сервера сбора событий")):
        code, out = _run(["ingest", "--conflicts", *args], tmp_path)
        assert code == 2, out
        # SQLite's own words ("(unable to open database file)") stay as the library gives them.
        _assert_russian(f"gate-agent ingest --conflicts {args}", re.sub(r"\([a-z ]+\)", "", out))
        assert out.startswith("ошибка: " + said), out
    code, out = _run(["ingest", "--db", str(db), "--hold-hours", "0"], tmp_path)
    assert code == 2 and "hold_hours (--hold-hours) 0.0: нужно число часов больше 0" in out, out
    _assert_russian("gate-agent ingest --hold-hours 0", out)


def test_ingest_start_and_stop_lines_are_russian_and_its_log_stays_english(tmp_path):
    import signal

    # No broker on this port: the ingest starts, says so, keeps trying to connect (logged, English).
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "ingest", "--port", "1", "--db", str(tmp_path / "i.db")],
                            cwd=tmp_path, env=_ru_env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    said = first + out
    assert proc.returncode == 0, said + err
    _assert_russian("gate-agent ingest (start, stop)", said)
    assert said.startswith("сервер сбора событий: 127.0.0.1:1 -> ") and "Ctrl-C — остановить" in said
    assert "сервер сбора событий: остановлен;" in said
    assert not CYRILLIC.search(err), err  # the service log: English


def test_every_ingest_error_message_has_a_russian_translation(russian):
    catalog = i18n.po_messages(PO)
    ids = words.ingest_msgids()
    assert any(m.startswith("cannot connect to the ingest database") for m in ids) and len(ids) > 10
    for msgid in ids:
        assert msgid in catalog, f"translate the ingest's message in gate-agent.po: {msgid!r}"
        assert set(re.findall(r"\{[^}]*\}", catalog[msgid])) == set(re.findall(r"\{[^}]*\}", msgid)), msgid
    i18n.set_language("en")
    assert words.ingest_message("writing to 'x.db' failed: disk I/O error") == "writing to 'x.db' failed: disk I/O error"


BROKEN_CARDS_SCENARIO = '''name = "карты"
start = "2026-09-01T08:40:00+07:00"

[[steps]]
at = "08:47:20"
card = "100,99999"

[[steps]]
at = "08:48:00"
card = "300,1"

[[steps]]
at = "08:49:00"
rush = { cards = ["100,60179", "zz"], every = 2 }

[[steps]]
at = "2026-09-01T09:00:00"
card = "100,60179"

[[steps]]
at = "2026-13-01T09:00:00+07:00"
card = "100,60179"

[[steps]]
at = "2026-09-01T09:0x:00+07:00"
card = "100,60179"
'''


def test_simulate_card_and_date_errors_are_russian(tmp_path):
    (tmp_path / "cards.toml").write_text(BROKEN_CARDS_SCENARIO)
    code, out = _run(["simulate", str(tmp_path / "cards.toml")], tmp_path)
    assert code == 2, out
    _assert_russian("simulate (bad cards and dates)", out)
    assert "шаг 1 (строка 6), card: карта '100,99999': номер карты 99999 больше 65535" in out
    assert "шаг 2 (строка 10), card: карта '300,1': серия 300 больше 255" in out
    assert "шаг 3 (строка 14), rush/cards/1: 'zz' не является номером карты; допустимые записи:" in out
    assert "шаг 4 (строка 17), at: у одного из времён (start или at) нет смещения от UTC" in out
    assert "шаг 5 (строка 21), at: месяц должен быть от 1 до 12" in out
    assert "шаг 6 (строка 25), at: '2026-09-01T09:0x:00+07:00': неверная дата-время" in out


def test_simulate_pretty_lines_are_russian_and_json_lines_stay_as_they_are(tmp_path):
    late = str(ROOT / "examples" / "scenarios" / "late-pupil.toml")
    code, out = _run(["simulate", "--pretty", "--trace-io", late], tmp_path)
    assert code == 0, out
    lines = out.splitlines()[1:]  # the first names the scenario, in its author's words
    _assert_russian("simulate --pretty --trace-io", "\n".join(lines))
    assert any(line.endswith("io unlock_a     вкл") for line in lines), out
    assert any(line.endswith("io entry индикация считывателя доступ разрешён (granted)") for line in lines), out
    code, out = _run(["simulate", "--trace-io", late], tmp_path)
    assert code == 0 and not CYRILLIC.search(out) and '"active":true' in out
