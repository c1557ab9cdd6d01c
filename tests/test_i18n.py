"""The technician tools speak Russian or English by the locale (agent/i18n.py)."""
from __future__ import annotations

import gettext
import io
import os
import re
import shutil
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


# --------------------------------------------------------------------------- the build step

MO = PO.with_suffix(".mo")
HEADER = 'msgid ""\nmsgstr "Content-Type: text/plain; charset=UTF-8\\n"\n\n'


def _mo_messages(data: bytes) -> dict[str, str]:
    trans = gettext.GNUTranslations(io.BytesIO(data))
    return {k: v for k, v in trans._catalog.items() if isinstance(k, str) and k}


def _build(tmp_path: Path, po_text: str) -> tuple[subprocess.CompletedProcess, Path]:
    """setup.py's build step (build_py) on a copy of the project holding only this .po."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    folder = tmp_path / "agent" / "locale" / "ru" / "LC_MESSAGES"
    folder.mkdir(parents=True, exist_ok=True)
    po = folder / "gate-agent.po"
    po.write_text(po_text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    env["GATE_PUREPYTHON"] = "1"  # the catalogue only: no Cython run
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    return res, po.with_suffix(".mo")


def test_the_built_mo_says_what_the_po_says():
    """The .mo the tools read (built by make build / pip) holds every translated msgid of the .po,
    translated the same, and nothing else; GNU msgfmt, where installed, compiles the same table."""
    assert MO.exists(), f"{MO} is missing: run make build (setup.py's build_py compiles it)"
    built = _mo_messages(MO.read_bytes())
    source = i18n.po_messages(PO)
    assert len(source) > 500
    stale = sorted(set(source.items()) ^ set(built.items()))[:5]
    assert built == source, f"the .mo is not the .po's ({stale} ...): run make build"
    msgfmt = shutil.which("msgfmt")
    if msgfmt is not None:
        res = subprocess.run([msgfmt, "-o", "-", str(PO)], capture_output=True, timeout=60, check=True)
        assert _mo_messages(res.stdout) == built


def test_the_catalogue_passes_gnu_msgfmt_check():
    """What Babel reads leniently (a msgid given twice, an unclosed string) msgfmt refuses."""
    msgfmt = shutil.which("msgfmt")
    if msgfmt is None:
        pytest.skip("GNU msgfmt is not installed here (apt install gettext)")
    res = subprocess.run([msgfmt, "--check", "-o", os.devnull, str(PO)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr


def test_the_build_compiles_multiline_strings_escapes_and_leaves_out_fuzzy_entries_reproducibly(tmp_path):
    text = HEADER + (
        '#: x.py:1\nmsgid "one"\nmsgstr "один"\n\n'
        'msgid ""\n"two "\n"lines\\n"\nmsgstr ""\n"две "\n"строки\\n"\n\n'
        'msgid "say \\"hi\\"\\t{x}"\nmsgstr "скажи \\"привет\\"\\t{x}"\n\n'
        '#, fuzzy\nmsgid "unsure"\nmsgstr "неуверенно"\n\n'
        'msgid "untranslated"\nmsgstr ""\n'
    )
    res, mo = _build(tmp_path, text)
    assert res.returncode == 0, res.stderr
    first = mo.read_bytes()
    assert _mo_messages(first) == {"one": "один", "two lines\n": "две строки\n",
                                   'say "hi"\t{x}': 'скажи "привет"\t{x}'}
    res, mo = _build(tmp_path, text)
    assert res.returncode == 0, res.stderr
    assert mo.read_bytes() == first  # one .po, one .mo: the package build is reproducible


@pytest.mark.parametrize(("entry", "said"), [
    ('msgid "a"\nnonsense here\n', r"gate-agent\.po:5: .*'nonsense here'; fix the \.po syntax"),
    ('msgid "{n} cards"\nmsgstr "{count} карт"\n', r"gate-agent\.po:4: the translation names \{count\}"),
    ('#, python-format\nmsgid "%(n)d cards"\nmsgstr "%(n)s карт"\n', r"gate-agent\.po:5: .*placeholder"),
])
def test_a_po_with_an_error_fails_the_build_with_its_place(tmp_path, entry, said):
    res, mo = _build(tmp_path, HEADER + entry)
    assert res.returncode != 0
    assert re.search(said, res.stderr), res.stderr
    assert not mo.exists()  # no half-checked catalogue is left for the package


def test_a_wheel_of_a_fresh_checkout_carries_the_compiled_catalogue(tmp_path):
    """install.sh and the Debian package install a wheel pip builds: it must hold the .mo,
    compiled in that build from a tree that has none (the .mo is not in git)."""
    import zipfile

    src = tmp_path / "src"
    junk = shutil.ignore_patterns("__pycache__", "*.so", "*.c", "*.html", "*.mo")
    shutil.copytree(ROOT / "agent", src / "agent", ignore=junk)  # the fastpath has no part in it
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = {**os.environ, "GATE_PUREPYTHON": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                          "--no-index", "-w", str(tmp_path / "dist"), str(src)],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    wheel = next((tmp_path / "dist").glob("gate_agent-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        mo = z.read("agent/locale/ru/LC_MESSAGES/gate-agent.mo")
    assert _mo_messages(mo) == i18n.po_messages(PO)


def test_every_way_a_board_builds_the_package_can_compile_the_catalogue():
    """install.sh's pip build fetches [build-system] requires; an offline bundle must carry them."""
    import tomllib

    from agent.tools import bundle

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    names = {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower() for r in requires}
    assert "babel" in names
    assert names <= {p.lower() for p in bundle.PURE_PACKAGES + bundle.BINARY_PACKAGES}


def test_a_missing_catalogue_means_english_and_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(i18n, "LOCALE_DIR", tmp_path)
    monkeypatch.setattr(i18n, "_catalogs", {})
    i18n.set_language("ru")
    assert i18n.gettext("the journal file itself") == "the journal file itself"
    assert i18n.gettext("no readers configured") == "no readers configured"
    err = capsys.readouterr().err
    assert err.count("no compiled ru catalogue") == 1 and "make build" in err


@pytest.mark.parametrize("cut", [3, 100, 0.5])
def test_a_truncated_mo_means_english_and_never_stops_a_tool(tmp_path, monkeypatch, capsys, cut):
    folder = tmp_path / "ru" / "LC_MESSAGES"
    folder.mkdir(parents=True)
    data = MO.read_bytes()
    (folder / "gate-agent.mo").write_bytes(data[:int(len(data) * cut) if cut < 1 else cut])
    monkeypatch.setattr(i18n, "LOCALE_DIR", tmp_path)
    monkeypatch.setattr(i18n, "_catalogs", {})
    i18n.set_language("ru")
    assert i18n.gettext("no readers configured") == "no readers configured"
    assert "translations for ru not loaded" in capsys.readouterr().err


def test_a_catalogue_is_read_from_its_mo_with_gettext(tmp_path, monkeypatch):
    folder = tmp_path / "ru" / "LC_MESSAGES"
    folder.mkdir(parents=True)
    shutil.copy(MO, folder / "gate-agent.mo")
    (folder / "gate-agent.po").write_text('msgid "hello"\nmsgstr "привет из po"\n', encoding="utf-8")
    monkeypatch.setattr(i18n, "LOCALE_DIR", tmp_path)
    monkeypatch.setattr(i18n, "_catalogs", {})
    i18n.set_language("ru")
    assert i18n.gettext("hello") == "hello"  # the .po is the source, not what the tools read
    assert CYRILLIC.search(i18n.gettext("no readers configured"))


def test_every_message_of_the_tools_has_a_russian_translation_with_the_same_placeholders():
    assert i18n.missing_msgids("ru") == {}, "run: python -m agent.i18n check, and translate what it lists"
    catalog = i18n.po_messages(PO)
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
