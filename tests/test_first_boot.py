# ruff: noqa: F811 - pytest fixtures imported from tests.pki, used as arguments
"""A flashed board that works on its first boot, end to end, with no step by hand.

From an empty staging root: the region makes its signing key (``gate-agent
keygen``) and the gate's bundle (``gate-agent bundle`` with that key's
``.pub``); the bundle is copied onto a boot partition (a folder here, with
Raspberry Pi OS bookworm's config.txt and cmdline.txt); its first-boot script
installs into the staging root as it would into / (``firstrun.sh --root``,
install.sh staged, no venv built); ``gate-agent run`` starts on the installed
config exactly as written (mock pins: the region's bench template says so)
against mosquitto running the shipped broker config with a test CA, the
reference ingest storing events on the services' listener; the region
pushes a signed list (``gate-agent acl push`` as ``regional-server`` on
8884); a card is read (``gate-agent sim ... card entry``); the ingest holds
the ``access.granted``. The first boot also left the profile's boot line in
config.txt, which the doctor finds.

What a region's template needs for this bench: ``pin_factory = "mock"`` and
the journal and state under ``../../var/lib/gate-agent`` (relative to the
config's folder: /var/lib/gate-agent on a board, inside the staging root
here). Nothing else is changed between the steps.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from agent.tools.doctor import OK, Doctor, DoctorEnv
from agent.tools.provision import set_toml_values
from tests.pki import GATE_A, SITE, gate_broker, pki  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
GATE = GATE_A
CARD = "100,60179"
BOOT_LINE = "console=serial0,115200 console=tty1 root=PARTUUID=1234-02 rootfstype=ext4 fsck.repair=yes rootwait"
CONFIG_TXT = "dtparam=audio=on\narm_64bit=1\n\n[cm4]\notg_mode=1\n\n[cm5]\ndtoverlay=dwc2,dr_mode=host\n"
ALWAYS = {d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM") and not k.startswith("LC_")}
    e.update(PYTHONPATH=str(ROOT), LANG="C.UTF-8")
    return e


def gate_agent(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def wait_for(what: str, check, timeout: float = 60.0, why=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s. {why()}")
        time.sleep(0.1)


def stored(db: Path, sql: str, *params) -> list:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # the ingest has not made its tables yet
        return []


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(nothing)"


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_a_bundled_board_takes_the_regions_list_and_grants_a_card(tmp_path_factory, pki, gate_broker):
    base = tmp_path_factory.mktemp("fb")  # short: the agent's socket lives under it
    region, part, stage = base / "region", base / "bootfs", base / "root"
    region.mkdir()

    # --- the region: its signing key, its bench template, the gate's bundle ---------------------------
    made = gate_agent("keygen", str(region / "region-2026.key"), "--key-id", "region-2026", cwd=region)
    assert made.returncode == 0, made.stderr
    template = region / "bench.toml"
    template.write_text(set_toml_values((ROOT / "examples" / "agent.toml").read_text(), [
        ("hardware", "pin_factory", "mock"),
        ("journal", "path", "../../var/lib/gate-agent/journal.db"),
        ("service", "state_dir", "../../var/lib/gate-agent"),
    ]))
    bundle = region / "bundle"
    made = gate_agent("bundle", "--site", SITE, "--gate", GATE, "--config", str(template),
                      "--ca", str(pki.ca_file), "--cert", str(pki.gate_a.cert), "--key", str(pki.gate_a.key),
                      "--trusted-keys-file", str(region / "region-2026.key.pub"),
                      "--broker", f"{gate_broker.host}:{gate_broker.port}", "--out", str(bundle), "--no-download",
                      cwd=region)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "region-2026" in made.stdout

    # --- the card: the bundle onto a bookworm boot partition, then the first boot --------------------
    shutil.copytree(bundle, part)
    (part / "config.txt").write_text(CONFIG_TXT)
    (part / "cmdline.txt").write_text(BOOT_LINE + (part / "gate-agent" / "cmdline.txt.append").read_text())
    first = subprocess.run(["bash", str(part / "gate-agent" / "firstrun.sh"), "--root", str(stage), "--no-build"],
                           capture_output=True, text=True, timeout=120, check=False, env=env())
    assert first.returncode == 0, first.stdout + first.stderr
    config = stage / "etc" / "gate-agent" / "agent.toml"
    assert config.is_file() and not (part / "gate-agent" / "gate").exists()
    assert (part / "config.txt").read_text().count("gpio=4-7=op,dh") == 1
    doctor = Doctor(config, env=DoctorEnv(gpio_chips=list, service_active=lambda: None, boot_dirs=(part,),
                                          boot_time=lambda: None))
    doctor.check_config()
    assert doctor.check_boot().status == OK

    ingest_db, ingest_log, agent_log = base / "ingest.db", base / "ingest.log", base / "agent.log"
    ingest = agent = None
    try:
        # --- the regional ingest, on the services' listener --------------------------------------------
        with open(ingest_log, "ab") as log:
            ingest = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "ingest", "--host", gate_broker.host,
                 "--port", str(gate_broker.services_port), "--db", str(ingest_db), "--ca-file", str(pki.ca_file),
                 "--cert-file", str(pki.ingest.cert), "--key-file", str(pki.ingest.key), "-v"],
                cwd=base, env=env(), stdout=subprocess.DEVNULL, stderr=log)
        # (Should its SUBACK come after the gate's first events, the broker answers those 0x10 and the
        # gate sends them again within resend_after_s, 30 s: the waits below are longer.)
        wait_for("the ingest connected", lambda: "subscribing to" in tail(ingest_log), 60, lambda: tail(ingest_log))

        # --- the board's service, on the config the first boot installed ---------------------------
        with open(agent_log, "ab") as log:
            agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                     cwd=base, env=env(), stdout=subprocess.DEVNULL, stderr=log)
        # Its first events reach the ingest: TLS with the bundle's certificate, its topics allowed.
        wait_for("the gate's first event at the ingest",
                 lambda: stored(ingest_db, "SELECT type FROM events WHERE site=? AND gate=?", SITE, GATE), 90,
                 lambda: f"agent: {tail(agent_log)}\ningest: {tail(ingest_log)}\nbroker: {gate_broker.log_text()[-2000:]}")

        # --- the region pushes a list signed with the key the bundle was given ------------------------
        school = region / "school-17.json"
        school.write_text(json.dumps({
            "kind": "snapshot", "version": "2026-09-01.1", "site": SITE, "timezone": "UTC",
            "schedules": {"always": {"week": ALWAYS}}, "groups": {"pupils": {"entry": "always", "exit": "always"}},
            "people": [{"id": "p-1", "cards": [CARD], "groups": ["pupils"]}], "blocked": []}))
        push = ["acl", "push", str(school), "--site", SITE, "--gate", GATE, "--host", gate_broker.host,
                "--port", str(gate_broker.services_port), "--tls-ca", str(pki.ca_file),
                "--tls-cert", str(pki.regional.cert), "--tls-key", str(pki.regional.key),
                "--key", str(region / "region-2026.key"), "--key-id", "region-2026", "--wait", "30"]

        def pushed() -> subprocess.CompletedProcess | None:
            res = gate_agent(*push, cwd=region)
            # Its subscriptions follow its first publish by a moment: "no subscriber" is tried again.
            return None if "no subscriber" in res.stdout else res

        res = wait_for("the gate subscribed to its list", pushed, 60, lambda: tail(agent_log))
        assert res.returncode == 0, res.stdout + res.stderr + tail(agent_log)
        assert f"{SITE}/{GATE}: applied" in res.stdout

        # --- a card at the entry reader --------------------------------------------------------------
        card = gate_agent("sim", "--config", str(config), "card", "entry", CARD, "--wait", "10", cwd=base)
        assert card.returncode == 0, card.stdout + card.stderr + tail(agent_log)
        assert "access granted" in card.stdout and "p-1" in card.stdout

        # --- stored at the region ---------------------------------------------------------------------
        rows = wait_for("access.granted at the ingest", lambda: stored(
            ingest_db, "SELECT body FROM events WHERE site=? AND gate=? AND type='access.granted'", SITE, GATE),
            60, lambda: f"agent: {tail(agent_log)}\ningest: {tail(ingest_log)}")
        granted = json.loads(rows[0][0])
        assert granted["person"] == "p-1" and granted["reader"] == "entry"
        applied = stored(ingest_db, "SELECT body FROM events WHERE site=? AND gate=? AND type='acl.applied'",
                         SITE, GATE)
        assert applied and json.loads(applied[0][0])["version"] == "2026-09-01.1"
    finally:
        stop(agent)
        stop(ingest)
    if agent is not None:
        assert agent.returncode == 0, tail(agent_log)  # a clean stop
