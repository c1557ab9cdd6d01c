"""Fuzzed parsers: whatever arrives from the network or a reader, the parsers
return a result or raise their documented error, and never hang.

- access lists: random JSON-ish documents and mutated valid ones, through
  ``parse_acl_json`` / ``AccessList`` (only ``AclRejected``), and signed ones
  through the Downlink (only ``acl.rejected`` or a swap);
- commands: random and mutated messages through ``check_command``/``verify``
  (only ``Refusal``/``SignatureError``) and the Downlink (always one
  ``command.result`` record, never an exception);
- Wiegand: random bit strings (``decode_wiegand``) and random edge sequences
  (``WiegandDecoder``);
- serial: random byte streams in random chunks (RDM6300, EM line readers).

Short by default (part of ``make test``); ``GATE_FUZZ_EXAMPLES=N`` runs N
examples per property (``make -f Makefile.fuzz fuzz`` does). Each example
has a deadline, so a parser that hangs fails instead of stalling the run.
"""
from __future__ import annotations

import copy
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import events as ev
from agent.core.acl import AccessList, AclRejected, build_table, parse_acl_json
from agent.core.cards import CardResult, decode_wiegand
from agent.core.serialframes import EmLineStream, Rdm6300Stream
from agent.core.wiegand import WiegandDecoder
from agent.downlink import Downlink
from agent.downlink.commands import Delivery, Refusal, check_command
from agent.downlink.signing import (
    SignatureError,
    generate_keypair,
    make_command,
    sign_acl,
    sign_command,
    verify,
)

ROOT = Path(__file__).resolve().parent.parent
SCHOOL = json.loads((ROOT / "examples" / "acl" / "school.json").read_text())
EXAMPLES = int(os.environ.get("GATE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),  # generous: a hang, not a slow machine, should trip it
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
    derandomize=EXAMPLES <= 100,  # the short run in `make test` is the same every time
    database=None,
)
KEY, PUB = generate_keypair()
KEY_ID = "fuzz-key"
SITE, GATE = "school-17", "main"
T0 = 1_788_300_000.0
READER_ERRORS = {"parity", "length", "checksum", "glitch", "garbage"}

# --- strategies ---------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.sampled_from(["100,60179", "0006613779", "hex:0A0064EB13", "07:00-18:00", "2026-09-01",
                     "2026-09-01T07:00:00+07:00", "Asia/Tomsk", "junior", "snapshot", "delta",
                     "p-0001", "24:00-00:00", "hex:", ",", "99999999999,1"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=25,
)
ACL_FIELDS = ["kind", "version", "base", "site", "generated", "timezone", "key_width", "schedules",
              "groups", "people", "guests", "blocked", "holidays", "block", "unblock",
              "remove_people", "remove_guests", "holidays_add", "holidays_remove"]
aclish = st.dictionaries(st.sampled_from(ACL_FIELDS), json_values, max_size=10)


@st.composite
def mutated(draw, base: dict) -> dict:
    """``base`` with a few random edits: a value replaced, a key dropped or added, an item duplicated."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        node = doc
        while True:  # walk down a random path
            children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
            if not children:
                break
            k, child = children[draw(st.integers(0, len(children) - 1))]
            if not isinstance(child, (dict, list)) or draw(st.booleans()):
                op = draw(st.sampled_from(["replace", "drop", "add", "dup"]))
                if op == "replace":
                    node[k] = draw(json_values)
                elif op == "drop":
                    del node[k]
                elif op == "add" and isinstance(node, dict):
                    node[draw(st.text(max_size=8))] = draw(json_values)
                elif op == "dup" and isinstance(node, list):
                    node.append(copy.deepcopy(child))
                break
            node = child
    return doc


DELTA = {"kind": "delta", "version": "2026-09-02.1", "base": SCHOOL["version"],
         "people": [{"id": "p-9001", "cards": ["100,1"], "groups": ["staff"]}],
         "block": ["100,60179"], "unblock": ["100,12345"], "holidays_add": ["2026-09-03"]}
BASE = AccessList.from_snapshot(SCHOOL)


# --- access lists ---------------------------------------------------------------------------


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_acl_json_parser_takes_any_bytes(data):
    try:
        doc = parse_acl_json(data)
    except AclRejected as exc:
        assert exc.errors and exc.code == "invalid"
        return
    assert isinstance(doc, dict)


@FUZZ
@given(doc=st.one_of(json_values, aclish))
def test_random_documents_are_refused_with_reasons(doc, fp):
    try:
        acl = AccessList.from_snapshot(doc)
    except AclRejected as exc:
        assert exc.errors and all(isinstance(e.path, str) and e.message for e in exc.errors)
        return
    assert build_table(acl, fp).version == acl.version


@FUZZ
@given(doc=mutated(SCHOOL))
def test_mutated_snapshots_apply_or_are_refused(doc, fp):
    try:
        acl = AccessList.from_snapshot(doc)
    except AclRejected as exc:
        assert exc.errors and exc.code == "invalid"
        return
    table = build_table(acl, fp)
    assert len(table) >= 0 and table.version == acl.version
    assert AccessList.from_snapshot(acl.to_snapshot()).version == acl.version  # round-trips


@FUZZ
@given(doc=st.one_of(mutated(DELTA), aclish))
def test_mutated_deltas_apply_or_are_refused(doc, fp):
    try:
        acl = BASE.apply_delta(doc)
    except AclRejected as exc:
        assert exc.errors and exc.code in ("invalid", "base_mismatch")
        return
    assert build_table(acl, fp).version == acl.version


class Recorder:
    def __init__(self) -> None:
        self.events: list = []
        self.published: list = []


def downlink(tmp_path: Path, fp, rec: Recorder) -> Downlink:
    return Downlink(site=SITE, gate=GATE, fp=fp, state_dir=tmp_path, submit=rec.events.append,
                    publish=lambda *a: rec.published.append(a), trusted_keys={KEY_ID: PUB},
                    wall=lambda: T0, acl_async=False)


@FUZZ
@given(inner=st.one_of(mutated(SCHOOL), aclish, json_values), counter=st.integers(-3, 2**40),
       raw=st.booleans())
def test_signed_lists_of_any_content_end_in_a_swap_or_a_rejection(tmp_path_factory, fp, inner,
                                                                   counter, raw):
    rec = Recorder()
    dl = downlink(tmp_path_factory.mktemp("dl"), fp, rec)
    if raw or not isinstance(inner, dict):
        payload = json.dumps(inner).encode()
    else:  # a valid signature over fuzzed content: reaches the validator behind the envelope
        payload = json.dumps(sign_acl(KEY, inner, key_id=KEY_ID, site=SITE, counter=max(counter, 1)))
        payload = payload.encode()
    dl.on_message(f"gate/v1/{SITE}/{GATE}/acl", payload, None)
    kinds = [type(e).__name__ if not isinstance(e, ev.Report) else e.type for e in rec.events]
    assert kinds in (["SwapTable"], ["acl.rejected"], ["acl.rejected", "acl.requested"]), kinds


# --- commands --------------------------------------------------------------------------------

VALID_CMD = sign_command(KEY, make_command(SITE, GATE, "open", {"direction": "in"}, key_id=KEY_ID,
                                           counter=5, now=T0, request_id="r-1"))
DELIVERY = Delivery(response_topic="gate/v1/school-17/main/reply/x", correlation_data=b"c",
                    expiry_s=20, known=True)
REFUSALS = {"invalid", "unsigned", "bad_signature", "misaddressed", "expired"}


def _check(payload: bytes, delivery: Delivery = DELIVERY, synced: bool = True):
    return check_command(payload, delivery, site=SITE, gate=GATE, trusted_keys={KEY_ID: PUB},
                         allow_unsigned=False, now=T0, synced=synced, max_age_s=30)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())),
       synced=st.booleans())
def test_command_checker_takes_any_bytes(data, synced):
    try:
        _check(data, synced=synced)
    except Refusal as r:
        assert r.reason in REFUSALS and r.detail
        return
    pytest.fail("random bytes passed the signature check")


@FUZZ
@given(msg=mutated(VALID_CMD), expiry=st.one_of(st.none(), st.integers(-5, 100)),
       retain=st.booleans())
def test_mutated_commands_are_refused_unless_untouched(msg, expiry, retain):
    delivery = Delivery(response_topic=DELIVERY.response_topic, correlation_data=b"c",
                        expiry_s=expiry, retain=retain, known=True)
    try:
        checked = _check(json.dumps(msg).encode(), delivery)
    except Refusal as r:
        assert r.reason in REFUSALS and len(r.detail) <= 1000
        assert isinstance(r.request_id, str) and len(r.request_id) <= 128
        return
    # Only a message whose signed fields survived may pass.
    assert {k: v for k, v in msg.items()} == VALID_CMD
    assert checked.command == "open"


@FUZZ
@given(msg=st.one_of(json_values, mutated(VALID_CMD)))
def test_verify_raises_only_signature_errors(msg):
    try:
        assert verify(msg, {KEY_ID: PUB}) == KEY_ID
    except SignatureError as exc:
        assert exc.reason in ("unsigned", "bad_signature")


@FUZZ
@given(payload=st.one_of(st.binary(max_size=200), mutated(VALID_CMD).map(lambda m: json.dumps(m).encode())),
       props=st.one_of(st.none(), st.dictionaries(
           st.sampled_from(["response_topic", "correlation_data", "message_expiry_interval", "retain"]),
           json_values, max_size=4)))
def test_the_downlink_answers_every_command_message_once(tmp_path_factory, fp, payload, props):
    rec = Recorder()
    dl = downlink(tmp_path_factory.mktemp("dl"), fp, rec)
    dl.on_message(f"gate/v1/{SITE}/{GATE}/cmd", payload, props)
    results = [e for e in rec.events if isinstance(e, ev.Report) and e.type == "command.result"]
    core = [e for e in rec.events if not isinstance(e, ev.Report)]
    assert len(results) + len(core) == 1  # refused here, or handed to the gate


# --- Wiegand -----------------------------------------------------------------------------------


@FUZZ
@given(bits=st.text(alphabet="01", max_size=80), width=st.sampled_from([24, 32, 40, 64]))
def test_wiegand_bit_strings_decode_or_name_their_error(bits, width):
    r = decode_wiegand(bits, width)
    assert isinstance(r, CardResult)
    assert r.ok or r.error in READER_ERRORS
    if r.ok and r.kind == "card":
        assert 0 <= r.key < 2**width


edge = st.tuples(st.floats(min_value=0, max_value=0.05, allow_nan=False),  # gap to the previous edge
                 st.integers(0, 1), st.integers(0, 1))


@FUZZ
@given(edges=st.lists(edge, max_size=200), fixed=st.sampled_from([None, 26, 34, 37]),
       max_bits=st.sampled_from([40, 64]))
def test_wiegand_decoder_takes_any_edge_sequence(edges, fixed, max_bits):
    d = WiegandDecoder(fixed_bits=fixed, max_bits=max_bits)
    t, results = 1000.0, []
    for gap, line, level in edges:
        t += gap
        results += d.feed(t, line, level)
    deadline = d.deadline()
    if deadline is not None:
        results += d.poll(deadline)
    results += d.poll(t + 10.0)  # all silence: everything pending completes
    assert d.pending_bits == 0
    for r in results:
        assert r.ok or r.error in READER_ERRORS


@FUZZ
@given(line=st.integers(), level=st.integers(0, 1))
def test_wiegand_decoder_rejects_an_unknown_line_with_value_error(line, level):
    d = WiegandDecoder()
    if line in (0, 1):
        d.feed(0.0, line, level)
    else:
        with pytest.raises(ValueError):
            d.feed(0.0, line, level)


# --- serial streams ----------------------------------------------------------------------------

frame_bits = st.sampled_from([b"\x02", b"\x03", b"\r", b"\n", b"14008EC793CE", b"\x0214008EC793CE\x03",
                              b"0006613779", b"100,60179", b"\x00", b"\xff"])
stream = st.lists(st.one_of(st.binary(max_size=20), frame_bits), max_size=40)


@FUZZ
@given(chunks=stream)
def test_rdm6300_stream_takes_any_bytes(chunks):
    s = Rdm6300Stream()
    out = []
    for c in chunks:
        out += s.feed(c)
    out += s.flush()
    for r in out:
        assert r.ok or r.error in READER_ERRORS

    # Nothing vanishes: every byte is in a decoded frame (14 bytes) or reported as garbage.
    def size(r: CardResult) -> int:
        whole_frame = r.error != "garbage" or "all-zero" in (r.detail or "")
        return 14 if whole_frame else len(r.raw) // 2

    assert sum(size(r) for r in out) == sum(len(c) for c in chunks)


@FUZZ
@given(chunks=stream, number=st.sampled_from(["auto", "dec", "hex"]))
def test_em_line_stream_takes_any_bytes(chunks, number):
    s = EmLineStream(number=number)
    for c in chunks:
        for r in s.feed(c):
            assert r.ok or r.error in READER_ERRORS
