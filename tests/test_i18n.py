"""The technician tools speak Russian or English by the locale (agent/i18n.py)."""
from __future__ import annotations

import gettext
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent import i18n

ROOT = Path(__file__).resolve().parent.parent
PO = ROOT / "agent" / "locale" / "ru" / "LC_MESSAGES" / "gate-agent.po"
CYRILLIC = re.compile(r"[А-Яа-яЁё]")


@pytest.fixture(autouse=True)
def _fresh_language():
    i18n.set_language(None)
    yield
    i18n.set_language(None)


@pytest.mark.parametrize(("env", "lang"), [
    ({"LANG": "ru_RU.UTF-8"}, "ru"),
    ({"LANG": "en_US.UTF-8"}, "en"),
    ({"LANG": "C.UTF-8"}, "en"),
    ({}, "en"),
    ({"LC_MESSAGES": "ru_RU.UTF-8", "LANG": "en_US.UTF-8"}, "ru"),
    ({"LC_ALL": "C", "LC_MESSAGES": "ru_RU.UTF-8", "LANG": "ru_RU.UTF-8"}, "en"),  # LC_ALL wins
    ({"LC_ALL": "ru_RU.UTF-8", "LANG": "C"}, "ru"),
    ({"LC_ALL": "", "LANG": "ru_UA.UTF-8"}, "ru"),  # an empty variable does not count
])
def test_the_language_follows_the_posix_locale_order(env, lang):
    assert i18n.detect_language(env) == lang


@pytest.mark.parametrize(("env", "lang"), [
    ({"LANGUAGE": "ru", "LANG": "en_US.UTF-8"}, "ru"),  # LANGUAGE first, as GNU gettext reads it
    ({"LANGUAGE": "de:ru:en", "LANG": "en_GB.UTF-8"}, "ru"),  # a language we lack is skipped
    ({"LANGUAGE": "en", "LANG": "ru_RU.UTF-8"}, "en"),
    ({"LANGUAGE": "ru_RU:en", "LC_ALL": "de_DE.UTF-8"}, "ru"),
    ({"LANGUAGE": "de", "LANG": "ru_RU.UTF-8"}, "ru"),  # nothing usable in LANGUAGE: the locale decides
    ({"LANGUAGE": "ru", "LANG": "C.UTF-8"}, "ru"),  # C.UTF-8 can show Cyrillic
    ({"LANGUAGE": "ru", "LANG": "C"}, "en"),  # plain C and POSIX ignore LANGUAGE, as GNU gettext does
    ({"LANGUAGE": "ru", "LC_ALL": "POSIX", "LANG": "ru_RU.UTF-8"}, "en"),
    ({"LANGUAGE": "ru"}, "en"),  # no locale at all is C
    ({"LANGUAGE": "", "LANG": "ru_RU.UTF-8"}, "ru"),
])
def test_language_is_read_first_unless_the_locale_is_c(env, lang):
    assert i18n.detect_language(env) == lang


def test_a_po_file_is_read_with_multiline_strings_escapes_and_without_fuzzy_entries():
    text = (
        'msgid ""\nmsgstr "Content-Type: text/plain; charset=UTF-8\\n"\n\n'
        '#: x.py:1\nmsgid "one"\nmsgstr "один"\n\n'
        'msgid ""\n"two "\n"lines\\n"\nmsgstr ""\n"две "\n"строки\\n"\n\n'
        'msgid "say \\"hi\\"\\t{x}"\nmsgstr "скажи \\"привет\\"\\t{x}"\n\n'
        '#, fuzzy\nmsgid "unsure"\nmsgstr "неуверенно"\n\n'
        'msgid "untranslated"\nmsgstr ""\n'
    )
    got = i18n.parse_po(text)
    assert got == {"one": "один", "two lines\n": "две строки\n", 'say "hi"\t{x}': 'скажи "привет"\t{x}'}


def test_a_broken_po_line_is_reported_with_its_place():
    with pytest.raises(i18n.PoError, match=r"bad\.po:2"):
        i18n.parse_po('msgid "a"\nnonsense here\n', "bad.po")


def test_the_compiled_mo_reads_back_through_gettext_as_the_po_says():
    messages = i18n.parse_po(PO.read_text(encoding="utf-8"))
    trans = gettext.GNUTranslations(io.BytesIO(i18n.compile_mo(messages)))
    for msgid, msgstr in messages.items():
        assert trans.gettext(msgid) == msgstr


def test_the_mo_is_used_only_when_it_is_not_older_than_the_po(tmp_path, monkeypatch):
    folder = tmp_path / "ru" / "LC_MESSAGES"
    folder.mkdir(parents=True)
    po, mo = folder / "gate-agent.po", folder / "gate-agent.mo"
    po.write_text('msgid "hello"\nmsgstr "привет из po"\n', encoding="utf-8")
    mo.write_bytes(i18n.compile_mo({"hello": "привет из mo"}))
    monkeypatch.setattr(i18n, "LOCALE_DIR", tmp_path)
    monkeypatch.setattr(i18n, "_catalogs", {})
    os.utime(po, (1_000_000, 1_000_000))
    os.utime(mo, (2_000_000, 2_000_000))
    assert i18n.catalog("ru")["hello"] == "привет из mo"
    monkeypatch.setattr(i18n, "_catalogs", {})
    os.utime(po, (3_000_000, 3_000_000))  # the .po was edited after the .mo was built
    assert i18n.catalog("ru")["hello"] == "привет из po"


def test_a_missing_catalogue_means_english(tmp_path, monkeypatch):
    monkeypatch.setattr(i18n, "LOCALE_DIR", tmp_path)
    monkeypatch.setattr(i18n, "_catalogs", {})
    i18n.set_language("ru")
    assert i18n.gettext("the journal file itself") == "the journal file itself"


def test_every_message_of_the_tools_has_a_russian_translation_with_the_same_placeholders():
    assert i18n.missing_msgids("ru") == {}, "run: python -m agent.i18n check, and translate what it lists"
    catalog = i18n.parse_po(PO.read_text(encoding="utf-8"))
    used = i18n.used_msgids()
    assert len(used) > 100  # the tools really route their words through _()
    for msgid in used:
        ru = catalog[msgid]
        assert sorted(re.findall(r"\{[^}]*\}", msgid)) == sorted(re.findall(r"\{[^}]*\}", ru)), msgid
        if CYRILLIC.search(ru) is None:
            # Only pure formats may stay as they are ("OK: {ok}, ...").
            assert not re.sub(r"\{[^}]*\}|OK|WARN|FAIL|[^A-Za-z]", "", ru), msgid


def test_gettext_switches_language():
    i18n.set_language("ru")
    ru = i18n.gettext("no readers configured")
    i18n.set_language("en")
    en = i18n.gettext("no readers configured")
    assert en == "no readers configured" and CYRILLIC.search(ru)
    with pytest.raises(ValueError, match="allowed"):
        i18n.set_language("de")


def _doctor_output(lang: str, config: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
    env["LANG"] = lang
    code = "import sys; from agent.tools.doctor import run_doctor; sys.exit(run_doctor(sys.argv[1]))"
    res = subprocess.run([sys.executable, "-c", code, str(config)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode in (0, 1), res.stderr
    return res.stdout


def test_a_tool_speaks_russian_under_a_russian_locale_and_english_otherwise(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[site]\nid = "s1"\ngate = "g1"\n[hardware]\npin_factory = "mock"\n'
                      f'[journal]\npath = "{tmp_path / "j.db"}"\n[service]\nstate_dir = "{tmp_path}"\n')
    ru = _doctor_output("ru_RU.UTF-8", config)
    en = _doctor_output("C.UTF-8", config)
    i18n.set_language("ru")
    assert i18n.gettext("no serial readers configured") in ru
    assert "no serial readers configured" in en and not CYRILLIC.search(en)
    # The status words stay the same in both languages: a script may grep for FAIL.
    assert [line.split()[0] for line in ru.splitlines()[:5]] == [line.split()[0] for line in en.splitlines()[:5]]


def test_the_catalogue_names_each_msgid_once():
    """Blocks appended by parallel work must not say one msgid twice (msgfmt refuses such a
    catalogue, and which translation wins would depend on the parser)."""
    text = (Path(i18n.LOCALE_DIR) / "ru" / "LC_MESSAGES" / "gate-agent.po").read_text(encoding="utf-8")
    ids = []
    for block in re.split(r"\n\s*\n", text):
        m = re.search(r'^msgid ((?:"(?:[^"\\]|\\.)*"\s*)+)', block, flags=re.MULTILINE)
        if m:
            ids.append("".join(re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(1))))
    dups = sorted({m for m in ids if ids.count(m) > 1 and m})
    assert dups == [], dups
