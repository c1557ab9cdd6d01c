"""Doctor's checks of what the board keeps: free disk (and a card the kernel
made read-only), the journal and its fallback, the stored access list.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from agent.i18n import _
from agent.tools.doctor.base import (
    BACKLOG_WARN_S,
    DEFAULT_STATE_DIR,
    DISK_FAIL_BYTES,
    FAIL,
    OK,
    WARN,
    Check,
)
from agent.tools.words import age_text


class StorageChecks:
    """disk, journal (and the fallback journal), acl (mixed into Doctor)."""

    def _journal_path(self) -> Path:
        if self.cfg is not None:
            return self.cfg.journal.path
        from agent.tools.journaltool import journal_path

        try:
            return journal_path(self.config_path)
        except Exception:  # noqa: BLE001 - the config is broken; look where the default puts it
            from agent.tools.journaltool import DEFAULT_JOURNAL

            return DEFAULT_JOURNAL

    def check_disk(self) -> Check:
        path = self._journal_path()
        probe = path.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            usage = shutil.disk_usage(probe)
        except OSError as exc:
            return Check(WARN, "disk", _("cannot measure {path}: {error}").format(path=probe, error=exc))
        free_mb = usage.free / 1024 / 1024
        budget = self.cfg.journal.disk_budget_bytes if self.cfg is not None else None
        used = 0
        for f in (path, Path(str(path) + "-wal")):
            try:
                used += f.stat().st_size
            except OSError:
                pass
        summary = _("{path}: free {free} MB of {total} MB").format(
            path=probe, free=int(free_mb), total=int(usage.total / 1024 / 1024))
        from agent.uplink.journal import readonly_dir

        if readonly_dir(probe):
            return Check(FAIL, "disk", _("{path} is read-only: the SD card is failing (the kernel remounted "
                                         "it after errors)").format(path=probe), (
                _("the gate still decides; its records go to a temporary journal in {run} and still reach "
                  "the server, but a reboot or a power cut loses those the server has not confirmed")
                .format(run=self.env.runtime_dir),
                _("see the errors: sudo dmesg | grep -i -e mmc -e ext4 -e 'I/O error'"),
                _("see the mount: findmnt -no OPTIONS -T {path} (ro: read-only)").format(path=probe),
                _("replace the SD card: first save the records still waiting on it (journal line below; they "
                  "are sent by themselves if the card recovers): sudo gate-agent journal export --pending > "
                  "/run/pending.jsonl and copy that file off the board for the regional office; wait until the "
                  "fallback line shows nothing waiting for the server; then switch off and put in a new card "
                  "with a fresh image and this gate's config"),
            ))
        if usage.free < DISK_FAIL_BYTES:
            return Check(FAIL, "disk", summary, (
                _("the journal cannot keep records much longer: free space (old logs: sudo journalctl "
                  "--vacuum-size=100M; apt: sudo apt clean) or use a bigger card"),))
        if budget is not None and usage.free < budget - used:
            return Check(WARN, "disk", summary, (
                _("the journal may grow to journal.disk_budget_mb = {mb} MB but the disk has less left: "
                  "free space or lower the budget").format(mb=budget // 1024 // 1024),))
        return Check(OK, "disk", summary)

    def check_journal(self) -> list[Check]:
        checks = [self._check_journal_file(self._journal_path())]
        fallback = self._check_fallback()
        if fallback is not None:
            checks.append(fallback)
        return checks

    def _check_fallback(self) -> Check | None:
        """The journal the service writes while the card is read-only, if any."""
        from agent.tools.journaltool import JournalReadError, journal_stats, open_readonly
        from agent.uplink.failover import fallback_path

        path = fallback_path(self._journal_path(), self.env.runtime_dir)
        try:
            if not path.exists():
                return None
        except PermissionError:
            return None
        try:
            conn = open_readonly(path)
        except JournalReadError as exc:
            return Check(WARN, "fallback", str(exc))
        try:
            stats = journal_stats(conn, path, self.env.wall())
        except Exception as exc:  # noqa: BLE001 - sqlite3 errors
            return Check(WARN, "fallback", _("{path} cannot be read: {error}").format(path=path, error=exc))
        finally:
            conn.close()
        return Check(WARN, "fallback", _("{path}: records go here while the card is read-only; waiting for "
                                         "the server: {n}").format(path=path, n=stats["pending"]), (
            _("kept across restarts of the agent, lost on a reboot or a power cut: do not switch the gate "
              "off while records wait for the server"),
            _("when the card takes writes again the agent copies them back into {path} by itself")
            .format(path=self._journal_path()),
        ))

    def _check_journal_file(self, path: Path) -> Check:
        from agent.tools.journaltool import JournalReadError, journal_stats, open_readonly
        from agent.uplink.journal import readonly_dir

        try:
            conn = open_readonly(path)
        except JournalReadError as exc:
            if Path(path).parent.exists() and readonly_dir(Path(path).parent):
                return Check(FAIL, "journal", _("{path} is on the read-only card (see disk): {error}").format(
                    path=path, error=exc))
            status = WARN if not Path(path).exists() or "permission" in str(exc).lower() else FAIL
            return Check(status, "journal", str(exc))
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                return Check(FAIL, "journal", _("{path} is damaged: {problem}").format(path=path, problem=result), (
                    _("restart the service: it rebuilds the journal, keeps every record it can read and the "
                      "damaged file beside it (sudo systemctl restart gate-agent)"),))
            stats = journal_stats(conn, path, self.env.wall())
        except Exception as exc:  # noqa: BLE001 - sqlite3 errors on a damaged file
            return Check(FAIL, "journal", _("{path} cannot be read: {error}").format(path=path, error=exc), (
                _("restart the service: it checks and rebuilds a damaged journal at start"),))
        finally:
            conn.close()
        pending, oldest = stats["pending"], stats["oldest_pending_s"]
        summary = _("{path}: intact; last seq {seq}; waiting for the server: {n}").format(
            path=path, seq=stats["last_seq"], n=pending)
        if oldest is not None:
            summary += _(" (oldest {age})").format(age=age_text(oldest))
        if pending and oldest is not None and oldest > BACKLOG_WARN_S:
            hints = [_("events are not reaching the server: check the broker line above")]
            if self.cfg is not None and self.cfg.mqtt.ack_mode == "ingest":
                hints.append(_("if the broker is fine, the region's ingest is not confirming: tell the regional "
                               "office"))
            return Check(WARN, "journal", summary, tuple(hints))
        return Check(OK, "journal", summary)

    # -- fastpath, acl -------------------------------------------------------------

    def check_acl(self) -> Check:
        from agent.downlink.aclfiles import ACL_FILE, stored_summary

        state_dir = self.cfg.service.state_dir if self.cfg is not None else DEFAULT_STATE_DIR
        path = Path(state_dir) / ACL_FILE
        try:
            path, data = stored_summary(Path(state_dir))
        except FileNotFoundError:
            try:
                os.stat(path.parent)
            except PermissionError:
                return Check(WARN, "acl", _("{dir} cannot be read: run the doctor with sudo").format(dir=path.parent))
            except FileNotFoundError:
                pass
            return Check(WARN, "acl", _("no access list on this board yet: every card is refused"), (
                _("the server sends one once the gate is online (see broker); ask the regional office to "
                  "push the school's list"),))
        except PermissionError:
            return Check(WARN, "acl", _("{path} cannot be read: run the doctor with sudo").format(path=path))
        except (OSError, ValueError) as exc:
            return Check(FAIL, "acl", _("{path} is damaged ({error})").format(path=path, error=exc), (
                _("restart the service: it moves the damaged file aside and asks the server for a new list"),))
        version, applied_at = data["version"], data["applied_at"]
        if not isinstance(applied_at, (int, float)):
            return Check(FAIL, "acl", _("{path} is damaged (no applied_at)").format(path=path), (
                _("restart the service: it moves the damaged file aside and asks the server for a new list"),))
        age = max(0.0, self.env.wall() - applied_at)
        people = data["people"]
        summary = _("version {version}, people: {n}, received {age} ago").format(
            version=version, n=people, age=age_text(age))
        max_h = self.cfg.acl.max_age_h if self.cfg is not None else None
        if max_h is not None and age > max_h * 3600:
            return Check(WARN, "acl", summary, (
                _("older than acl.max_age_h = {h} h: the server has not refreshed it; check the broker line and "
                  "tell the regional office").format(h=max_h),))
        return Check(OK, "acl", summary)
