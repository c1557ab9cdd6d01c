"""Access lists from the server: check, build off the gate thread, persist, swap in.

The flow for one message on ``gate/v1/{site}/{gate}/acl`` (docs/security.md):

0. The very message whose list is in use, again (a QoS 1 redelivery): ignored
   unread. Size and rate were bounded before this (``flood``).
1. Parse, at most ``MAX_DEPTH`` levels deep (``agent.core.acl``). A signed
   list comes in an envelope ``{"v", "site", "gate"?, "counter",
   "issued_at"?, "key_id", "sig", "list"}`` (``signing.sign_acl``); a bare
   list is taken only where the config allows unsigned lists (a lab).
2. Check the envelope: signature by a trusted key; its ``issued_at`` raises
   the time floor (or, far ahead of a synchronised clock, refuses the list);
   addressed to this gate's site (and gate, when it names one), counter above
   the last list accepted from that key (an old list cannot be replayed to
   roll a gate back).
3. Validate and apply (``agent.core.acl``): a snapshot whole, a delta against
   the version this gate holds. Any error: ``acl.rejected`` with the reasons
   (one by one while the flood guard allows, else counted), and the gate
   keeps deciding on the list it had. A delta against another
   base also sends ``acl.requested`` (reason ``base_mismatch``): the server
   answers that event with a snapshot.
4. Build the compiled table here, on the caller's thread (the Downlink's
   worker), never on the gate thread.
5. Persist the applied list (``acl.bin`` in the state directory, mode 0600:
   the binary image of agent/core/aclstore.py, checksummed, written to a
   temporary file, fsynced and renamed), then submit ``SwapTable``: the gate
   swaps tables between two events and never waits.

At start the image is mapped, not parsed: its columns feed the table in
place, and the mapped pages are then handed back to the page cache, so a
million-card list costs its compiled table and little more (docs/access-list.md,
"How a gate holds the list"). A list kept by an older version as ``acl.json``
is read once and rewritten as ``acl.bin``.

A snapshot may also come in the compact form (``aclwire``): a signed JSON
envelope whose list names a zlib-compressed image by its SHA-256.

Some 640 lines on purpose: one class, ``AclSync``, whose steps (the
envelope, the counters and the time floor, the delta log and its folding,
persisting, the swap) share the list in use, its counters and its log under
three locks, and the order above holds only between them. The list's files
themselves are agent/downlink/aclfiles.py.
"""
from __future__ import annotations

import gc
import hashlib
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.contract import CONTRACT_VERSION
from agent.core.acl import AccessList, AclError, AclRejected, build_table, parse_acl_json
from agent.core.aclstore import encode_record, read_records
from agent.core.events import Report, SwapTable
from agent.core.records import parse_rfc3339
from agent.host import background_thread

from . import aclwire
from .aclfiles import (
    _MAX_TEXT,
    ACL_FILE,
    DELTA_LOG,
    LEGACY_ACL_FILE,
    CounterStore,
    _move_aside_or_keep,
    _release_pages,
    _trim_heap,
    append_record,
    ensure_state_dir,
    read_stored,
    read_stored_seq,
    store_list,
)
from .flood import FloodGuard
from .signing import SignatureError, verify

log = logging.getLogger("agent.downlink")

__all__ = ["FUTURE_SKEW_S", "AclSync", "floor_candidate", "future_detail"]

# The log is folded into a fresh acl.bin (off the handling thread) past either bound.
FOLD_RECORDS = 32
FOLD_BYTES = 8 << 20
ENVELOPE_FIELDS = frozenset({"v", "site", "gate", "counter", "issued_at", "key_id", "sig", "list"})
# A signed time this far ahead of a synchronised clock is refused: one of the two clocks is
# wrong, and a floor in the future would make the gate refuse every command until it passed.
FUTURE_SKEW_S = 60.0
SWITCH_INTERVAL_S = 0.0001  # the interpreter's lock hand-over while a list is built


def floor_candidate(issued_at: float, now: float, synced: bool) -> float | None:
    """The floor a verified ``issued_at`` may set, or None when it is too far in the future
    of a synchronised clock (the message is then refused).

    With the clock synchronised the floor never goes past the clock (a server a few
    seconds ahead must not push the gate's time on); without, the server's word is the
    best there is."""
    if not synced:
        return issued_at
    if issued_at > now + FUTURE_SKEW_S:
        return None
    return min(issued_at, now)


def future_detail(what: str, issued_at: float, now: float) -> str:
    return (f"{what} was issued {issued_at - now:.0f} s ahead of this gate's synchronised clock "
            f"(more than {FUTURE_SKEW_S:.0f} s): the server's or the gate's clock is wrong; fix it "
            "and send it again")


# --------------------------------------------------------------------------- rejections


def _reject(path: str, message: str) -> AclRejected:
    return AclRejected([AclError(path, message)])


class AclSync:
    """One gate's access list: what it holds, what it applies next, what it kept on disk.

    Not thread-safe by itself: ``handle`` is called from one thread at a time
    (the Downlink's worker); ``status`` only reads.
    """

    def __init__(
        self,
        *,
        site: str,
        gate: str,
        fp: Any,
        state_dir: Path,
        submit: Callable[[Any], Any],
        trusted_keys: dict,
        counters: CounterStore,
        signed: bool = True,
        max_age_s: float | None = None,
        wall: Callable[[], float],
        clock_synced: Callable[[], bool] = lambda: True,
        guard: FloodGuard | None = None,
        builder: Callable[[AccessList, Any], Any] = build_table,
        max_image_bytes: int = aclwire.MAX_IMAGE_BYTES,
    ) -> None:
        self.site, self.gate = site, gate
        self.fp = fp
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / ACL_FILE
        self._submit = submit
        self._trusted = trusted_keys
        self._counters = counters
        self.signed = signed
        self.max_age_s = max_age_s
        self._wall = wall
        self._synced = clock_synced
        self._guard = guard
        self._builder = builder  # a seam for tests that hold a build open
        self.max_image_bytes = max_image_bytes  # a compact list inflates to at most this
        self._applied_digest: bytes | None = None  # of the message whose list is in use
        self._verified = False  # the message being handled had a good signature
        self.acl: AccessList | None = None
        self.applied_at: float | None = None  # wall time the held list was applied
        self._stale_raised = False
        self._corrupt_raised = False
        self._flags = threading.Lock()  # status() runs on another thread than handle()
        self.log_path = self.state_dir / DELTA_LOG
        self._table: Any = None  # the table last built (a delta's table is patched from it)
        self._seq = 0  # the last change stored (acl.bin's, or the delta log's last record)
        self._bin_seq = 0  # the last change acl.bin holds
        self._log_records = 0  # records in the log after acl.bin's
        self._log_bytes = 0
        self._store_lock = threading.Lock()  # acl.bin and the log: handling vs folding
        self._fold: threading.Thread | None = None
        self._acl_lock = threading.Lock()  # self.acl: set by handle() and by a fold

    # --- start-up --------------------------------------------------------------

    def load_persisted(self) -> tuple[AccessList | None, Any]:
        """The list kept on disk and its table, or (None, None).

        A damaged file (torn, truncated, altered: its checksum or shape does not
        hold) is moved aside and reported (``alarm`` ``acl_corrupt``); the gate
        then starts as a new board would (``acl_missing``, and asks for a
        snapshot). A list kept as JSON by an older version is read and rewritten
        as the binary image.
        """
        path = self.path
        if not path.exists() and (self.state_dir / LEGACY_ACL_FILE).exists():
            path = self.state_dir / LEGACY_ACL_FILE
        for tmp in self.state_dir.glob(f".{ACL_FILE}.tmp-*"):
            # A write a crash (or a stop during a fold) cut short: never renamed in.
            try:
                tmp.unlink()
            except OSError:
                pass
        mm = None
        try:
            acl, applied_at, mm, seq = read_stored_seq(path)
            self._seq = self._bin_seq = seq
            acl, applied_at = self._replay(acl, applied_at)
            table = self._builder(acl, self.fp)
        except FileNotFoundError:
            self._drop_orphan_log()
            return None, None
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error) as exc:
            # AclRejected, ImageError, or a shape nothing foresaw: the file is damaged
            moved = _move_aside_or_keep(path, self._wall())
            detail = (f"the stored access list {path} was damaged ({str(exc)[:300]}); moved "
                      f"to {moved}; the gate asks the server for a snapshot")
            log.error("%s", detail)
            self._corrupt_raised = True
            self._submit(Report("alarm", {"kind": "acl_corrupt", "active": True,
                                          "detail": detail[:_MAX_TEXT]}))
            self._drop_orphan_log()
            return None, None
        self._table = table
        _release_pages(mm)
        _trim_heap()
        self.acl, self.applied_at = acl, applied_at
        log.info("access list %s loaded from %s", acl.version, path)
        if self._seq > self._bin_seq:
            self.fold(wait=False)  # the replayed deltas' columns give way to a mapped file
        if path != self.path:
            self._upgrade(path, acl, applied_at, already_image=mm is not None)
        return acl, table

    def _replay(self, acl: AccessList, applied_at: float) -> tuple[AccessList, float]:
        """The stored list with the delta log's records after it applied in order.

        A torn last record (a crash while it was written: never acknowledged) is
        cut off and logged. A damaged record, one out of sequence or one that does
        not apply stops the replay: the list stays as the records before it left
        it, the log is moved aside and ``acl_corrupt`` raised (the server's next
        delta then misses its base and the gate asks for a snapshot)."""
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return acl, applied_at
        records, good, torn, damaged = read_records(data)
        applied, damage = 0, None
        for seq, rec in records:
            if seq <= self._bin_seq:
                continue  # folded into acl.bin already
            delta, at = rec.get("delta"), rec.get("applied_at")
            if seq != self._seq + 1:
                damage = f"record seq {seq} follows {self._seq}: a record is missing"
            elif not isinstance(delta, dict) or not isinstance(at, (int, float)):
                damage = f"record seq {seq} lacks its delta or applied_at"
            else:
                try:
                    acl = acl.apply_delta(delta)
                except AclRejected as exc:
                    damage = f"record seq {seq} does not apply to {acl.version!r} ({str(exc)[:200]})"
            if damage:
                break
            applied_at, self._seq = float(at), seq
            applied += 1
            self._log_records += 1
        del data
        damage = damage or damaged
        if damage:
            moved = _move_aside_or_keep(self.log_path, self._wall())
            detail = (f"the access-list delta log {self.log_path} is damaged ({damage}); moved to "
                      f"{moved}; the gate keeps list {acl.version} (the stored list and the "
                      f"{applied} delta(s) before the damage) and takes a snapshot when the "
                      "server's next delta does not match it")
            log.error("%s", detail)
            self._corrupt_raised = True
            self._submit(Report("alarm", {"kind": "acl_corrupt", "active": True,
                                          "detail": detail[:_MAX_TEXT]}))
            self._log_records = self._log_bytes = 0
            return acl, applied_at
        if torn:
            log.warning("access-list delta log %s: %s; a write a crash cut short (never "
                        "acknowledged), left out", self.log_path, torn)
            try:
                os.truncate(self.log_path, good)
            except OSError as exc:
                log.error("could not cut the torn record off %s (%s)", self.log_path, exc)
        self._log_bytes = good
        if applied:
            log.info("access list: %d delta(s) from %s applied after the stored list",
                     applied, self.log_path)
        return acl, applied_at

    def _drop_orphan_log(self) -> None:
        """A delta log without the list it changes is of no use: moved aside."""
        if self.log_path.exists():
            moved = _move_aside_or_keep(self.log_path, self._wall())
            log.warning("access-list delta log %s has no stored list to apply to; moved to %s",
                        self.log_path, moved)

    def _upgrade(self, old: Path, acl: AccessList, applied_at: float, *,
                 already_image: bool = False) -> None:
        """Rewrite a list kept as JSON by an older version as the binary image (an
        image stored under the old name is only renamed)."""
        try:
            if already_image:
                os.replace(old, self.path)
            else:
                store_list(self.path, acl, applied_at=applied_at)
                old.unlink()
        except OSError as exc:
            log.warning("could not rewrite %s as %s (%s); it is read as JSON again at the next "
                        "start", old, self.path, exc)
            return
        log.info("access list %s kept as JSON in %s rewritten as %s", acl.version, old, self.path)

    # --- messages ------------------------------------------------------------

    def handle(self, payload: bytes) -> bool:
        """One message from the acl topic; True when a new list was swapped in.

        While a list is checked and built, the interpreter is asked to hand its lock
        over every millisecond (not every 5): the gate thread, deciding cards
        meanwhile, then waits for it at most about that long between two chunks of
        the work. The cyclic garbage collector waits until it is done."""
        before = sys.getswitchinterval()
        sys.setswitchinterval(min(before, SWITCH_INTERVAL_S))
        # No cyclic garbage collection meanwhile: a collection walks every container
        # the check made (lists of a million entries) in one go, holding the lock.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._handle(payload)
        finally:
            if collecting:
                gc.enable()
            sys.setswitchinterval(before)

    def _handle(self, payload: bytes) -> bool:
        t0 = time.perf_counter()
        digest = hashlib.sha256(payload).digest()
        if digest == self._applied_digest:
            # The very message in use, again (QoS 1 redelivery or a replay): no need to
            # parse and verify 70 MB again to find that out.
            log.info("access list message received again; already applied, ignored")
            return False
        version: Any = None
        self._verified = False
        try:
            image_body = None
            if payload[:len(aclwire.WIRE_MAGIC)] == aclwire.WIRE_MAGIC:
                line, image_body = aclwire.split(payload)
                doc = parse_acl_json(line)
            else:
                doc = parse_acl_json(payload)
            doc, envelope = self._open_envelope(doc)
            if image_body is not None:
                errors = aclwire.header_errors(doc)
                if errors:
                    raise AclRejected(errors)
            elif doc.get("kind") == "image":
                raise _reject("/kind", "a compact list header without its body: send the "
                              "compact message whole (docs/contract.md, \"Compact snapshots\")")
            version = doc.get("version")
            if self._duplicate(doc, envelope):
                # MQTT QoS 1 may deliver twice; the list is in use already (docs/access-list.md).
                log.info("access list %r received again; already applied, ignored", version)
                return False
            if envelope is not None and envelope["counter"] <= self._counters.last("acl", envelope["key_id"]):
                raise _reject("/counter", f"counter {envelope['counter']} is not above the last list "
                              f"accepted from key {envelope['key_id']!r}: a replayed list; sign it "
                              "again with a new counter")
            if image_body is not None:
                acl, kind, base = self._apply_image(doc, image_body), "snapshot", None
            else:
                acl, kind, base = self._apply(doc)
            if envelope is not None and not self._counters.advance(
                    "acl", envelope["key_id"], envelope["counter"]):
                raise _reject("/counter", "counter is not above the last list accepted from key "
                              f"{envelope['key_id']!r}: a replayed list; sign it again with a new counter")
        except AclRejected as exc:
            self.rejected(exc, version, signed=self._verified)
            return False
        # The slow part: here, never on the gate thread. A delta patches the table in use.
        t1 = time.perf_counter()
        if self._builder is build_table:
            table = build_table(acl, self.fp, base=self._table if kind == "delta" else None)
        else:
            table = self._builder(acl, self.fp)
        t2 = time.perf_counter()
        now = self._wall()
        if kind == "delta" and self._log_delta(doc, now):
            pass  # on disk in the log; acl.bin is folded in later, off this thread
        elif self._persist(acl, kind, base, now):
            acl = self._mapped(acl)  # the message's columns are freed here
            _trim_heap()
        with self._acl_lock:
            self.acl, self.applied_at = acl, now
        self._table = table
        self._applied_digest = digest
        log.info("access list %s (%s, %d bytes) applied: read and checked in %.0f ms, table in %.0f ms, "
                 "stored in %.0f ms", acl.version, kind, len(payload), (t1 - t0) * 1e3,
                 (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3)
        # The time zone travels with the table: schedules switch zone at the swap itself.
        self._submit(SwapTable(table, kind, base, timezone=acl.timezone))
        with self._flags:
            cleared, self._stale_raised = self._stale_raised, False
        if cleared:
            self._submit(Report("alarm", {"kind": "acl_stale", "active": False,
                                          "detail": f"access list {acl.version} applied"}))
        if self._corrupt_raised:
            self._corrupt_raised = False
            self._submit(Report("alarm", {"kind": "acl_corrupt", "active": False,
                                          "detail": f"access list {acl.version} applied and stored"}))
        if self._log_records >= FOLD_RECORDS or self._log_bytes >= FOLD_BYTES:
            self.fold(wait=False)
        return True

    # --- the delta log -------------------------------------------------------

    def _log_delta(self, doc: dict, now: float) -> bool:
        """Append an applied delta to the log, durably; False when it cannot be (the
        whole list is then stored instead)."""
        try:
            record = encode_record(self._seq + 1, {"delta": doc, "applied_at": now})
        except (ValueError, TypeError) as exc:
            log.warning("delta not kept in the log (%s); storing the whole list", exc)
            return False
        with self._store_lock:
            try:
                ensure_state_dir(self.state_dir)
                append_record(self.log_path, record)
            except OSError as exc:
                log.error("could not append to %s (%s); storing the whole list", self.log_path, exc)
                return False
            self._seq += 1
            self._log_records += 1
            self._log_bytes += len(record)
        return True

    def fold(self, *, wait: bool = True) -> None:
        """Fold the delta log into a fresh acl.bin (written atomically), then empty the
        log, on a thread of its own: the handling thread and the gate go on. `wait`:
        join it (tests, shutdown)."""
        thread = self._fold
        if thread is None or not thread.is_alive():
            acl, seq, applied_at = self.acl, self._seq, self.applied_at
            if acl is None or seq <= self._bin_seq:
                return
            thread = threading.Thread(target=self._fold_now, args=(acl, seq, applied_at or 0.0),
                                      name="acl-fold", daemon=True)
            self._fold = thread
            thread.start()
        if wait:
            thread.join()

    def _fold_now(self, acl: AccessList, seq: int, applied_at: float) -> None:
        background_thread()
        with self._store_lock:
            if seq <= self._bin_seq:
                return
            try:
                store_list(self.path, acl, applied_at=applied_at, kind="delta", seq=seq)
            except OSError as exc:
                log.error("could not fold the delta log into %s (%s); the log keeps the deltas",
                          self.path, exc)
                return
            self._bin_seq = seq
            if self._seq == seq:
                # Nothing appended meanwhile: every record is in acl.bin now. A crash
                # before this leaves records that the next start skips by their seq.
                try:
                    os.truncate(self.log_path, 0)
                    self._log_records = self._log_bytes = 0
                except OSError as exc:
                    log.warning("could not empty %s after folding (%s)", self.log_path, exc)
        log.info("access-list delta log folded into %s (list %s)", self.path, acl.version)
        if self.acl is acl:
            mapped = self._mapped(acl)
            with self._acl_lock:
                if self.acl is acl:  # no newer list meanwhile
                    self.acl = mapped  # the merged columns freed: the file is mapped
            del acl, mapped
            _trim_heap()

    def rejected(self, exc: AclRejected, version: Any = None, *, signed: bool = False) -> None:
        """Record a refused list (``acl.rejected``, and ``acl.requested`` for a wrong base),
        one by one only while the flood guard allows; else it is counted."""
        if self._guard is not None and not self._guard.record(
                "acl.signed" if signed else "acl", f"rejected.{exc.code}"):
            return
        have = self.acl.version if self.acl is not None else None
        log.warning("access list %r refused: %s", version, exc)
        self._submit(Report("acl.rejected", exc.record_fields(version)))
        if exc.code == "base_mismatch":
            self._submit(Report("acl.requested", {"reason": "base_mismatch", "have": have}))

    def _open_envelope(self, doc: dict) -> tuple[dict, dict | None]:
        """The list inside a signed envelope (checked), or a bare list where allowed."""
        if "list" not in doc and "sig" not in doc:
            if self.signed:
                raise _reject("/", "unsigned access list: this gate takes only signed lists "
                              "({\"v\", \"site\", \"counter\", \"key_id\", \"sig\", \"list\"}); push it "
                              "with `gate-agent acl push --key ... --key-id ...`")
            return doc, None
        extra = sorted(set(doc) - ENVELOPE_FIELDS)
        if extra:
            raise _reject("/", f"unknown envelope field(s) {', '.join(extra)[:200]}; a signed list "
                          "has v, site, gate (optional), counter, issued_at (optional), key_id, sig "
                          "and list")
        try:
            verify(doc, self._trusted)
        except SignatureError as exc:
            raise _reject("/sig" if exc.reason == "bad_signature" else "/",
                          f"{exc.reason}: {exc.detail}") from None
        self._verified = True
        self._take_issued_at(doc)
        if doc.get("v") != CONTRACT_VERSION:
            raise _reject("/v", f"envelope version {doc.get('v')!r}; this gate reads v {CONTRACT_VERSION}")
        if doc.get("site") != self.site or ("gate" in doc and doc["gate"] != self.gate):
            where = f"{doc.get('site')!r}" + (f"/{doc['gate']!r}" if "gate" in doc else "")
            raise _reject("/site", f"misaddressed: the list is for {where[:200]}, this gate is "
                          f"{self.site!r}/{self.gate!r}")
        counter = doc.get("counter")
        if not isinstance(counter, int) or isinstance(counter, bool) or counter < 1:
            raise _reject("/counter", "counter must be an integer >= 1, above the last list's")
        inner = doc.get("list")
        if not isinstance(inner, dict):
            raise _reject("/list", "list must be the access-list object (a snapshot or a delta)")
        return inner, doc

    def _take_issued_at(self, doc: dict) -> None:
        """A verified envelope's ``issued_at`` raises the time floor; one far in the
        future of a synchronised clock refuses the list."""
        if "issued_at" not in doc:
            return
        text = doc["issued_at"]
        try:
            issued = parse_rfc3339(text).timestamp() if isinstance(text, str) else None
        except (ValueError, OverflowError):
            issued = None
        if issued is None:
            raise _reject("/issued_at", f"issued_at {str(text)[:64]!r} is not an RFC 3339 time with "
                          "an offset, e.g. \"2026-09-01T07:45:40Z\"")
        try:
            synced = bool(self._synced())
        except Exception:
            log.debug("clock sync check failed; taken as not synchronised", exc_info=True)
            synced = False
        now = self._wall()
        candidate = floor_candidate(issued, now, synced)
        if candidate is None:
            raise _reject("/issued_at", future_detail("the list", issued, now))
        self._counters.raise_floor(candidate)

    def _duplicate(self, doc: dict, envelope: dict | None) -> bool:
        """A redelivery of the list in use: same version, and no newer signature.

        A snapshot of the held version with a new counter is applied again (it
        refreshes the list's age, e.g. the answer to a "stale" request)."""
        if self.acl is None or doc.get("version") != self.acl.version:
            return False
        if doc.get("kind") == "delta" or envelope is None:
            return True
        return envelope["counter"] <= self._counters.last("acl", envelope["key_id"])

    def _apply(self, doc: dict) -> tuple[AccessList, str, str | None]:
        kind = doc.get("kind")
        if kind == "delta":
            if self.acl is None:
                base = doc.get("base")
                raise AclRejected([AclError("/base", f"delta is against version {str(base)[:128]!r} "
                                            "but this gate holds no list yet; send a snapshot")],
                                  code="base_mismatch")
            return self.acl.apply_delta(doc), "delta", self.acl.version
        return AccessList.from_snapshot(doc), "snapshot", None

    def _apply_image(self, header: dict, body: memoryview) -> AccessList:
        """The list of a compact snapshot whose signed header was checked."""
        image = aclwire.open_body(header, body, self.max_image_bytes)
        try:
            acl, _ = AccessList.from_image(image, trusted=False)
        except AclRejected:
            raise
        except (ValueError, TypeError, IndexError, KeyError, OverflowError, struct.error) as exc:
            # ImageError, or an image whose shape nothing above foresaw: refused, never raised on.
            raise _reject("/list", f"the image cannot be read ({str(exc)[:200]}); build it "
                          "again") from None
        if acl.version != header["version"]:
            raise _reject("/list/version", f"the header says version {header['version']!r}, the "
                          f"image holds {acl.version!r}; build it again")
        return acl

    def _mapped(self, acl: AccessList) -> AccessList:
        """The list just stored, read back from its mapped file: the columns built
        from the message (tens of MB for a big list) are freed, the gate holds its
        table and a mapping the kernel can drop."""
        try:
            stored, _, mm = read_stored(self.path)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("could not map the stored list back (%s); keeping it in memory", exc)
            return acl
        if stored.version != acl.version:
            return acl
        _release_pages(mm)
        return stored

    def _persist(self, acl: AccessList, kind: str, base: str | None, now: float) -> bool:
        """Store the list; False (and an alarm) when it cannot be written."""
        ensure_state_dir(self.state_dir)
        try:
            with self._store_lock:
                store_list(self.path, acl, applied_at=now, kind=kind, base=base, seq=self._seq + 1)
                self._seq = self._bin_seq = self._seq + 1
                if self._log_bytes or self.log_path.exists():
                    try:
                        os.truncate(self.log_path, 0)  # every record is older than acl.bin now
                    except OSError:
                        pass  # skipped by their seq at the next start anyway
                    self._log_records = self._log_bytes = 0
            return True
        except OSError as exc:
            # The gate still gets the list (principle 1); only the next start lacks it.
            log.error("could not store access list %s in %s (%s); it is applied but a restart "
                      "before the next list starts without it", acl.version, self.path, exc)
            self._submit(Report("alarm", {"kind": "acl_store_failed", "active": True,
                                          "detail": f"could not write {self.path}: {exc}"[:_MAX_TEXT]}))
            return False

    # --- age -----------------------------------------------------------------

    def freshness(self) -> tuple[float | None, bool]:
        """(age in seconds of the list in use, or None; whether it is past the age limit).
        No side effect: the console's status asks this from its own threads."""
        age = None if self.applied_at is None else round(max(0.0, self._wall() - self.applied_at), 1)
        return age, self.max_age_s is not None and age is not None and age > self.max_age_s

    def status(self) -> dict:
        """{acl_version, acl_age_s, acl_stale}; raises ``acl_stale`` once when the age passes the limit."""
        version = self.acl.version if self.acl is not None else None
        age, stale = self.freshness()
        with self._flags:
            raise_now = stale and not self._stale_raised
            if raise_now:
                self._stale_raised = True
        if raise_now:
            self._submit(Report("alarm", {"kind": "acl_stale", "active": True,
                                          "detail": f"access list {version} was applied {age:.0f} s ago, "
                                                    f"over the limit of {self.max_age_s:.0f} s; the gate "
                                                    "keeps using it and asks for a snapshot"}))
            self._submit(Report("acl.requested", {"reason": "stale", "have": version}))
        return {"acl_version": version, "acl_age_s": age, "acl_stale": bool(stale)}
