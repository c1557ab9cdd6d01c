"""The access list as columns: the binary image on disk and on the wire, deltas on columns.

A list read back from its image (mapped file or compact message) is the list
that was written; a torn, truncated or altered file is refused at start (the
gate starts with no list and says so); a JSON file of older versions is read
once and rewritten; a compact snapshot is taken only when its signed header
and digest hold, and its people are checked as a JSON snapshot's are; a delta
applied to columns gives the table a snapshot of the result gives, on both
twins.
"""
from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import pytest

from agent.core import events as ev
from agent.core.acl import AccessList, AclRejected, build_table
from agent.core.aclstore import ImageError
from agent.downlink import aclwire
from agent.downlink.acl_sync import AclSync
from agent.downlink.aclfiles import (
    ACL_FILE,
    LEGACY_ACL_FILE,
    CounterStore,
    store_list,
    stored_summary,
)
from agent.downlink.signing import generate_keypair, sign_acl
from bench.synthetic import synthetic_acl

ROOT = Path(__file__).resolve().parent.parent
SCHOOL = json.loads((ROOT / "examples" / "acl" / "school.json").read_text())
SITE, GATE, KEY_ID = "school-17", "main", "region-2026a"
KEY, PUB = generate_keypair()
_counter = [0]


def meaning(table, keys) -> dict:
    """What a table says about each key: its holder's id and kind, blocked or not."""
    out = {}
    for k in keys:
        i = table.lookup(k)
        out[k] = (table.person_id(i) if i >= 0 else None,
                  table.is_guest(i) if i >= 0 else None, table.is_blocked(k))
    return out


def all_keys(acl: AccessList) -> list[int]:
    cols = acl.columns().sorted_form()
    return list(cols.card_keys)


def sync(state: Path, fp, events: list, **kw) -> AclSync:
    state.mkdir(exist_ok=True)
    counters = CounterStore(state / "counters.json", wall=time.time, report=lambda *a: None)
    return AclSync(site=SITE, gate=GATE, fp=fp, state_dir=state, submit=events.append,
                   trusted_keys={KEY_ID: PUB}, counters=counters, wall=time.time, **kw)


def sign(header: dict) -> dict:
    _counter[0] += 1
    return sign_acl(KEY, header, key_id=KEY_ID, site=SITE, gate=GATE, counter=_counter[0])


def rejected_fields(events: list) -> dict:
    [rej] = [e.fields for e in events if isinstance(e, ev.Report) and e.type == "acl.rejected"]
    return rej


# --------------------------------------------------------------------------- image


@pytest.mark.parametrize("trusted", [True, False])
def test_an_image_reads_back_as_the_same_list(trusted, fp):
    acl = AccessList.from_snapshot(SCHOOL)
    image = b"".join(bytes(c) for c in acl.to_image(stored={"applied_at": 1.5}))
    back, stored = AccessList.from_image(image, trusted=trusted)
    assert stored == {"applied_at": 1.5}
    assert back.to_snapshot() == acl.to_snapshot() == SCHOOL  # the example is in id order
    keys = all_keys(acl)
    assert meaning(build_table(back, fp), keys) == meaning(build_table(acl, fp), keys)


def test_people_come_back_in_id_order_whatever_the_order_sent():
    doc = copy.deepcopy(SCHOOL)
    doc["people"].reverse()
    got = AccessList.from_snapshot(doc).to_snapshot()
    assert got["people"] == SCHOOL["people"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "empty"])
def test_a_damaged_image_is_refused_saying_what_is_wrong(damage):
    image = bytearray(b"".join(bytes(c) for c in AccessList.from_snapshot(SCHOOL).to_image()))
    if damage == "flip":
        image[len(image) // 2] ^= 0x01
    elif damage == "truncate":
        del image[-100:]
    elif damage == "magic":
        image[:4] = b"JUNK"
    else:
        image = bytearray()
    with pytest.raises(ImageError) as exc:
        AccessList.from_image(bytes(image))
    assert {"flip": "checksum", "truncate": "truncated", "magic": "magic",
            "empty": "too short"}[damage] in str(exc.value)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_stored_file_is_moved_aside_and_the_gate_starts_without_a_list(
        tmp_path, fp, damage):
    state = tmp_path / "state"
    state.mkdir()
    store_list(state / ACL_FILE, AccessList.from_snapshot(SCHOOL), applied_at=time.time())
    data = bytearray((state / ACL_FILE).read_bytes())
    if damage == "flip":
        data[-50] ^= 0x40
    else:
        data = data[: len(data) // 2]  # a power cut while a non-atomic copy was made
    (state / ACL_FILE).write_bytes(bytes(data))
    events: list = []
    s = sync(state, fp, events)
    assert s.load_persisted() == (None, None)
    assert s.acl is None
    assert not (state / ACL_FILE).exists()
    assert len(list(state.glob(f"{ACL_FILE}.corrupt-*"))) == 1
    [alarm] = [e.fields for e in events if isinstance(e, ev.Report)]
    assert (alarm["kind"], alarm["active"]) == ("acl_corrupt", True)
    assert "damaged" in alarm["detail"]


def test_the_stored_file_is_private_and_loads_mapped(tmp_path, fp):
    state = tmp_path / "state"
    state.mkdir()
    acl = AccessList.from_snapshot(SCHOOL)
    store_list(state / ACL_FILE, acl, applied_at=123.0, kind="delta", base="x")
    assert (state / ACL_FILE).stat().st_mode & 0o777 == 0o600
    assert (state / ACL_FILE).read_bytes()[:8] == b"GATEACL\0"
    events: list = []
    s = sync(state, fp, events)
    got, table = s.load_persisted()
    assert events == [] and s.applied_at == 123.0
    assert got.to_snapshot() == SCHOOL
    assert table.version == SCHOOL["version"]
    assert stored_summary(state)[1] == {"version": SCHOOL["version"], "applied_at": 123.0,
                                       "people": len(SCHOOL["people"])}


def test_a_json_file_of_an_older_version_is_read_once_and_rewritten(tmp_path, fp):
    state = tmp_path / "state"
    state.mkdir()
    legacy = {"format": 1, "applied_at": 1000.0, "kind": "snapshot", "base": None, "list": SCHOOL}
    (state / LEGACY_ACL_FILE).write_text(json.dumps(legacy))
    events: list = []
    acl, table = sync(state, fp, events).load_persisted()
    assert events == [] and acl.version == table.version == SCHOOL["version"]
    assert not (state / LEGACY_ACL_FILE).exists()
    assert (state / ACL_FILE).read_bytes()[:8] == b"GATEACL\0"
    again, _ = sync(state, fp, []).load_persisted()
    assert again.to_snapshot() == SCHOOL


def test_an_image_stored_under_the_old_name_is_taken_and_renamed(tmp_path, fp):
    state = tmp_path / "state"
    state.mkdir()
    store_list(state / LEGACY_ACL_FILE, AccessList.from_snapshot(SCHOOL), applied_at=5.0)
    acl, table = sync(state, fp, []).load_persisted()
    assert acl.version == table.version == SCHOOL["version"]
    assert not (state / LEGACY_ACL_FILE).exists() and (state / ACL_FILE).exists()


# --------------------------------------------------------------------------- compact wire form


def test_a_compact_snapshot_is_applied_stored_and_smaller_than_its_json(tmp_path, fp):
    doc = synthetic_acl(3000, version="big.1")
    acl = AccessList.from_snapshot(doc)
    payload = aclwire.pack(acl, sign)
    assert len(payload) < len(json.dumps(doc)) / 3
    events: list = []
    s = sync(tmp_path / "state", fp, events)
    assert s.handle(payload)
    [swap] = [e for e in events if isinstance(e, ev.SwapTable)]
    keys = all_keys(acl)
    assert meaning(swap.table, keys) == meaning(build_table(acl, fp), keys)
    assert s.acl.to_snapshot() == acl.to_snapshot()
    # The stored list loads at the next start.
    again, table = sync(tmp_path / "state", fp, []).load_persisted()
    assert again.version == "big.1" and meaning(table, keys) == meaning(swap.table, keys)


@pytest.mark.parametrize("tamper", ["body", "cut", "header", "unsigned"])
def test_a_compact_snapshot_that_is_not_the_one_signed_is_refused(tmp_path, fp, tamper):
    acl = AccessList.from_snapshot(SCHOOL)
    payload = bytearray(aclwire.pack(acl, sign if tamper != "unsigned" else None))
    line_end = payload.index(b"\n", len(aclwire.WIRE_MAGIC))
    if tamper == "body":
        payload[-10] ^= 0xFF
    elif tamper == "cut":
        del payload[-10:]
    elif tamper == "header":
        env = json.loads(payload[len(aclwire.WIRE_MAGIC):line_end])
        env["list"]["version"] = "forged.1"
        payload[len(aclwire.WIRE_MAGIC):line_end] = json.dumps(env).encode()
    events: list = []
    s = sync(tmp_path / "state", fp, events)
    assert not s.handle(bytes(payload))
    rej = rejected_fields(events)
    want = {"body": "/list/sha256", "cut": "/list/bytes", "header": "/sig", "unsigned": "/"}
    assert rej["errors"][0]["path"] == want[tamper]
    assert s.acl is None and not (tmp_path / "state" / ACL_FILE).exists()


def test_a_compact_snapshot_bigger_than_the_cap_is_not_inflated(tmp_path, fp):
    payload = aclwire.pack(AccessList.from_snapshot(synthetic_acl(2000)), sign)
    events: list = []
    s = sync(tmp_path / "state", fp, events, max_image_bytes=10_000)
    assert not s.handle(payload)
    assert rejected_fields(events)["errors"][0]["path"] == "/list/size"


def _signed_body(acl: AccessList, body: bytes, size: int) -> bytes:
    """A compact message whose signed header names exactly this body (a sender that lies)."""
    import hashlib

    header = {"kind": "image", "version": acl.version, "encoding": "zlib", "bytes": len(body),
              "size": size, "sha256": hashlib.sha256(body).hexdigest()}
    line = json.dumps(sign(header), separators=(",", ":")).encode()
    return aclwire.WIRE_MAGIC + line + b"\n" + body


@pytest.mark.parametrize("lie", ["junk after the stream", "stream cut short", "inflates past its size",
                                 "inflates short of its size"])
def test_a_signed_body_whose_zlib_stream_lies_is_refused_whole(tmp_path, fp, lie):
    import zlib

    acl = AccessList.from_snapshot(synthetic_acl(3000))
    image = b"".join(bytes(c) for c in acl.to_image(wire=True))
    body, size = zlib.compress(image), len(image)
    if lie == "junk after the stream":
        body += b"junk"
    elif lie == "stream cut short":
        body = body[: len(body) // 2]
    elif lie == "inflates past its size":
        size -= 1000
    else:
        size += 1000
    events: list = []
    s = sync(tmp_path / "state", fp, events)
    assert not s.handle(_signed_body(acl, body, size))
    assert rejected_fields(events)["errors"][0]["path"] in ("/list/size", "/list")
    assert s.acl is None and not (tmp_path / "state" / ACL_FILE).exists()
    # The honest message still goes through.
    assert s.handle(_signed_body(acl, zlib.compress(image), len(image)))


def _image_with(acl: AccessList, **columns) -> AccessList:
    """acl with some people columns replaced (a sender that breaks the rules)."""
    p = acl.people._copy()
    for name, value in columns.items():
        setattr(p, name, value)
    return acl._with(people=p)


def test_the_people_of_a_compact_snapshot_are_checked_as_a_json_snapshots(tmp_path, fp):
    from array import array

    acl = AccessList.from_snapshot(SCHOOL)
    keys = array("Q", acl.people.card_keys)
    keys[3] = keys[5]  # p-0004 given p-0006's key (its card string still says another)
    bad_key = _image_with(acl, card_keys=keys)
    blob = bytearray(acl.people.id_blob)
    blob[0:1] = b"-"  # an id that does not start with a letter or digit
    bad_id = _image_with(acl, id_blob=bytes(blob))
    for broken, path in ((bad_key, "/people/3/cards/0"), (bad_id, "/people/0/id")):
        events: list = []
        s = sync(tmp_path / "state", fp, events)
        assert not s.handle(aclwire.pack(broken, sign))
        rej = rejected_fields(events)
        assert rej["code"] == "invalid"
        assert path in [e["path"] for e in rej["errors"]], rej


def test_json_snapshots_and_deltas_are_still_taken_as_they_were(tmp_path, fp):
    events: list = []
    s = sync(tmp_path / "state", fp, events)
    body = sign_acl(KEY, SCHOOL, key_id=KEY_ID, site=SITE, gate=GATE, counter=10**6)
    assert s.handle(json.dumps(body).encode())
    delta = {"kind": "delta", "version": "v2", "base": SCHOOL["version"],
             "remove_people": ["p-0001"]}
    body = sign_acl(KEY, delta, key_id=KEY_ID, site=SITE, gate=GATE, counter=10**6 + 1)
    assert s.handle(json.dumps(body).encode())
    assert s.acl.version == "v2" and s.acl.people.find("p-0001") == -1


# --------------------------------------------------------------------------- deltas on columns


def random_delta(acl: AccessList, rng: random.Random, n: int) -> dict:
    people = acl.people
    taken = set(all_keys(acl))
    ids = [people.id_at(i) for i in rng.sample(range(people.n), min(people.n, 2 * n))]
    change, remove = ids[:n], ids[n:]
    fresh = iter(k for k in (rng.randrange(1, 1 << 24) for _ in range(100 * n)) if k not in taken)
    delta = {"kind": "delta", "version": f"{acl.version}+", "base": acl.version,
             "people": [], "remove_people": remove}
    for pid in change:
        _, cards, *_ = people.person(people.find(pid))
        keep = list(cards[:1]) if rng.random() < 0.5 else []  # some keep a card
        delta["people"].append({"id": pid, "cards": keep + [f"hex:{next(fresh):06X}"],
                                "groups": rng.choice([["junior"], ["senior", "staff"]])})
    for j in range(n):
        p = {"id": f"z-{rng.randrange(10**9):09d}-{j}", "cards": [f"{next(fresh):010d}"],
             "groups": ["staff"]}
        if rng.random() < 0.3:
            p["valid_until"] = "2027-01-31"
        delta["people"].append(p)
    return delta


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_delta_on_columns_gives_the_table_of_a_snapshot_of_the_result(fp, seed):
    rng = random.Random(seed)
    base = AccessList.from_snapshot(synthetic_acl(2000, seed=seed))
    if seed == 3:  # a list mapped from its image (memoryviews, not arrays)
        base, _ = AccessList.from_image(b"".join(bytes(c) for c in base.to_image()), trusted=True)
    acl = base
    for _ in range(3):
        acl = acl.apply_delta(random_delta(acl, rng, rng.randrange(1, 60)))
    ref = AccessList.from_snapshot(acl.to_snapshot())
    keys = sorted(set(all_keys(acl)) | set(all_keys(base)))
    assert meaning(build_table(acl, fp), keys) == meaning(build_table(ref, fp), keys)
    a, b = acl.columns().sorted_form(), ref.columns().sorted_form()
    assert (a.person_ids, a.person_from, a.person_until) == (b.person_ids, b.person_from,
                                                              b.person_until)
    assert acl.people.find(acl.people.id_at(7)) == 7
    assert list(acl.people.sorted_keys) == sorted(acl.people.card_keys)
    # The table finds every person by id, guests too.
    table = build_table(acl, fp)
    for i in range(0, table.persons, 97):
        assert table.person_index(table.person_id(i)) == i
    assert table.person_index("nobody") == -1


def test_a_delta_that_gives_a_kept_persons_card_to_another_is_refused_naming_both():
    acl = AccessList.from_snapshot(SCHOOL)
    holder = SCHOOL["people"][4]
    delta = {"kind": "delta", "version": "v2", "base": SCHOOL["version"],
             "people": [{"id": "p-7777", "cards": [holder["cards"][0]], "groups": ["staff"]}]}
    with pytest.raises(AclRejected) as exc:
        acl.apply_delta(delta)
    [err] = exc.value.errors
    assert err.path == "/people/0/cards/0"
    assert repr(holder["id"]) in err.message and "belongs to one person" in err.message
    # Moving the card: the old holder gives it up in the same delta.
    moved = acl.apply_delta({**delta, "remove_people": [holder["id"]]})
    assert moved.people.find("p-7777") >= 0 and moved.people.find(holder["id"]) == -1


def test_card_strings_are_read_a_chunk_at_a_time_at_their_byte_offsets():
    """text_slices cuts the blob at each string's byte offsets, across chunk edges,
    and reads a non-ASCII string whole (a decode of the whole blob sliced by byte
    offsets would shift every string after it)."""
    from array import array

    from agent.core import aclstore

    strs = [f"{i},{i % 65536}" for i in range(aclstore.CHUNK * 2 + 5)]
    strs[aclstore.CHUNK + 3] = "карта-ё"  # two-byte letters, in the second chunk
    raw = [t.encode("utf-8") for t in strs]
    raw[7] = b"\xff-bad"  # not UTF-8
    blob = b"".join(raw)
    off = array("Q", [0])
    for r in raw:
        off.append(off[-1] + len(r))
    got = aclstore.text_slices(blob, off, len(strs))
    want = list(strs)
    want[7] = "\ufffd-bad"
    assert got == want


def test_big_column_buffers_are_private_zeroed_pages():
    """aclstore.zeros hands out the downlink's anonymous pages for a big column:
    zeroed, writable, the size asked for, and private (a shared anonymous mapping
    is shmem: slower to fault, never on huge pages)."""
    import mmap

    from agent.core import aclstore
    from agent.downlink.aclfiles import anonymous_pages

    m = anonymous_pages(5 * (1 << 20) + 123)
    assert len(m) == 5 * (1 << 20) + 123
    assert m[:] == bytes(len(m))
    m[len(m) - 1] = 7
    assert m[-1] == 7
    import ctypes

    start = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(start)
    del start
    with open("/proc/self/maps") as f:
        spans = [ln.split() for ln in f]
    [perms] = [sp[1] for sp in spans if int(sp[0].split("-")[0], 16) <= addr < int(sp[0].split("-")[1], 16)]
    assert perms == "rw-p", perms  # private
    m.close()
    col = aclstore.zeros("Q", 300_000)
    assert isinstance(col, memoryview) and isinstance(col.obj, mmap.mmap) and len(col) == 300_000
    assert not any(col[:1000]) and not any(col[-1000:])


def test_long_passes_pause_between_chunks_for_the_gate_and_read_the_same(tmp_path, fp):
    """A received image is checked in chunks, and the pacer the service installs
    (GateRuntime.yield_to_gate) is called between two of them, never before the
    first: the same list comes out, paced or not."""
    from agent.core import aclstore

    assert list(aclstore.chunks(0, 10, 4)) == [0, 4, 8]
    calls: list[int] = []
    aclstore.use_pacer(lambda: calls.append(1))
    try:
        assert list(aclstore.chunks(0, 10, 4)) == [0, 4, 8] and len(calls) == 2
        calls.clear()
        assert list(aclstore.chunks(0, 3, 4)) == [0] and not calls
        acl = AccessList.from_snapshot(synthetic_acl(3 * aclstore.CHUNK, seed=5, version="p.1"))
        line, body = aclwire.split(aclwire.pack(acl, None))
        header = json.loads(line)
        paced, _ = AccessList.from_image(aclwire.open_body(header, body), trusted=False)
        assert len(calls) > 10  # every long pass over the columns paused between its chunks
    finally:
        aclstore.use_pacer(None)
    assert aclstore.pacer() is None
    unpaced, _ = AccessList.from_image(aclwire.open_body(header, body), trusted=False)
    assert paced.to_snapshot() == unpaced.to_snapshot() == acl.to_snapshot()
