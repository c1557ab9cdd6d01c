"""Long-run coverage-guided fuzzing with atheris (libFuzzer) of the parsers the
network and the readers feed: ``make -f Makefile.fuzz fuzz`` runs each target
for a bounded time (FUZZ_SECONDS).

    .venv/bin/python fuzz/fuzz_parsers.py TARGET [libFuzzer options] [CORPUS_DIR]

TARGET: ``acl`` (access-list JSON, snapshot and delta), ``cmd`` (command
checks and signature), ``wiegand`` (edge sequences), ``serial`` (RDM6300
and EM line streams). A crash is any exception other than the parser's
documented error; libFuzzer saves the input as ``crash-*`` in the working
directory. The corpus directory starts from the examples (seeded on the
first run) and grows as libFuzzer finds new paths; it lives under build/.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports():
    from agent.core.acl import AccessList, AclRejected, build_table, parse_acl_json
    from agent.core.cards import decode_wiegand
    from agent.core.serialframes import EmLineStream, Rdm6300Stream
    from agent.core.wiegand import WiegandDecoder
    from agent.downlink.commands import Delivery, Refusal, check_command
    from agent.downlink.signing import SignatureError, generate_keypair, make_command, sign_command

import fastpath

SCHOOL = (ROOT / "examples" / "acl" / "school.json").read_bytes()
BASE = AccessList.from_snapshot(json.loads(SCHOOL))
KEY, PUB = generate_keypair()
T0 = 1_788_300_000.0
READER_ERRORS = {"parity", "length", "checksum", "glitch", "garbage"}


def fuzz_acl(data: bytes) -> None:
    try:
        doc = parse_acl_json(data)
        acl = BASE.apply_delta(doc) if doc.get("kind") == "delta" else AccessList.from_snapshot(doc)
    except AclRejected:
        return
    build_table(acl, fastpath)


DELIVERY = Delivery(response_topic="gate/v1/s/g/reply/x", correlation_data=b"c", expiry_s=20, known=True)


def fuzz_cmd(data: bytes) -> None:
    try:
        check_command(data, DELIVERY, site="school-17", gate="main", trusted_keys={"k": PUB},
                      allow_unsigned=bool(data[:1] == b"u"), now=T0, synced=bool(len(data) % 2),
                      max_age_s=30)
    except (Refusal, SignatureError):
        return


def fuzz_wiegand(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    d = WiegandDecoder(fixed_bits=fdp.PickValueInList([None, 26, 34, 37]))
    t = 0.0
    for _ in range(fdp.ConsumeIntInRange(0, 300)):
        t += fdp.ConsumeIntInRange(0, 50_000) / 1e6  # gaps up to 50 ms, in microseconds
        for r in d.feed(t, fdp.ConsumeIntInRange(0, 1), fdp.ConsumeIntInRange(0, 1)):
            assert r.ok or r.error in READER_ERRORS, r
    for r in d.poll(t + 10):
        assert r.ok or r.error in READER_ERRORS, r
    assert d.pending_bits == 0
    bits = "".join("1" if b & 1 else "0" for b in data[:80])
    r = decode_wiegand(bits)
    assert r.ok or r.error in READER_ERRORS, r


def fuzz_serial(data: bytes) -> None:
    rdm, em = Rdm6300Stream(), EmLineStream()
    pos = 0
    while pos < len(data):  # random chunking from the data itself
        n = 1 + data[pos] % 17
        chunk = data[pos + 1:pos + 1 + n]
        pos += 1 + n
        for r in rdm.feed(chunk) + em.feed(chunk):
            assert r.ok or r.error in READER_ERRORS, r
    for r in rdm.flush():
        assert r.ok or r.error in READER_ERRORS, r


TARGETS = {"acl": fuzz_acl, "cmd": fuzz_cmd, "wiegand": fuzz_wiegand, "serial": fuzz_serial}


def seeds(target: str) -> list[bytes]:
    if target == "acl":
        delta = {"kind": "delta", "version": "2", "base": BASE.version, "block": ["100,60179"],
                 "people": [{"id": "p-9", "cards": ["100,1"], "groups": ["staff"]}]}
        return [SCHOOL, json.dumps(delta).encode()]
    if target == "cmd":
        msg = sign_command(KEY, make_command("school-17", "main", "open", {"direction": "in"},
                                             key_id="k", counter=1, now=T0))
        return [json.dumps(msg).encode()]
    if target == "wiegand":
        return [struct.pack("<64B", *range(64))]
    return [b"\x0214008EC793CE\x03", b"0006613779\r\n"]


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [CORPUS_DIR]")
    target = sys.argv.pop(1)
    corpus = ROOT / "build" / "fuzz-corpus" / target
    if not any(a for a in sys.argv[1:] if not a.startswith("-")):
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds(target)):
            path = corpus / f"seed-{i}"
            if not path.exists():
                path.write_bytes(seed)
        sys.argv.append(str(corpus))
    atheris.Setup(sys.argv, TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
