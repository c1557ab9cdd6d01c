"""A delta's table patched from the base table decides exactly as one built from
scratch: random deltas on random lists, both fastpath twins, card by card and
person by person (agent.core.acl.build_table with a base; fastpath TableChange)."""

from __future__ import annotations

import random

import pytest

from agent.core.acl import AccessList, build_table
from agent.core.cards import parse_card_string
from fastpath import codes

GROUPS = ["a", "b", "c"]
DATES = [None, "2026-09-01", "2027-01-15", "2027-06-30"]
# Local times spread over a week, with a holiday and dates on both sides of the validity ends.
TIMES = [1788220800 + h * 3600 for h in (0, 9, 13, 30, 57, 100, 150)] + [1800000000, 1830000000]


def card(key: int) -> str:
    return f"{key >> 16},{key & 0xFFFF}"


def random_person(rng: random.Random, pid: str, keys: list[int]) -> dict:
    p = {"id": pid, "cards": [card(k) for k in keys],
         "groups": rng.sample(GROUPS, rng.randint(1, 2))}
    vf, vu = rng.choice(DATES[:2]), rng.choice([None, "2027-06-30"])
    if vf:
        p["valid_from"] = vf
    if vu:
        p["valid_until"] = vu
    return p


def random_list(rng: random.Random, n: int) -> tuple[dict, list[int]]:
    free = rng.sample(range(1, 1 << 24), 4 * n + 50)
    people = [random_person(rng, f"p-{i:05d}", [free.pop() for _ in range(rng.randint(0, 2))])
              for i in rng.sample(range(10 * n), n)]
    doc = {
        "kind": "snapshot", "version": "v.0", "timezone": "Asia/Tomsk",
        "schedules": {"s1": {"week": {"mon": ["07:00-19:00"], "tue": ["08:00-12:00"]}},
                      "s2": {"holidays": True, "week": {"sat": ["00:00-24:00"], "mon": ["10:00-11:00"]}}},
        "groups": {"a": {"entry": "s1", "exit": None}, "b": {"entry": "s2", "exit": "s1"},
                   "c": {"entry": None, "exit": "s2"}},
        "people": people,
        "guests": [{"id": f"g-{j}", "card": card(free.pop()), "from": "2026-09-01T00:00:00Z",
                    "until": "2026-09-30T00:00:00Z", "uses": 2} for j in range(rng.randint(0, 3))],
        "blocked": [card(free.pop()) for _ in range(rng.randint(0, 3))],
        "holidays": ["2026-09-05"],
    }
    return doc, free


def random_delta(rng: random.Random, acl: AccessList, free: list[int], version: str) -> dict:
    snap = acl.to_snapshot()
    people = snap["people"]
    ids = [p["id"] for p in people]
    delta: dict = {"kind": "delta", "version": version, "base": acl.version}
    remove = rng.sample(ids, min(len(ids), rng.randint(0, 3)))
    kept = [p for p in people if p["id"] not in remove]
    upserts = []
    for p in rng.sample(kept, min(len(kept), rng.randint(0, 4))):
        q = dict(p)
        what = rng.random()
        if what < 0.3:
            q["cards"] = [card(free.pop()) for _ in range(rng.randint(0, 2))]  # new cards
        elif what < 0.6:
            q["groups"] = [rng.choice(GROUPS)]
            q.pop("valid_until", None)
        else:
            q["valid_until"] = "2026-12-31"
        upserts.append(q)
    for _ in range(rng.randint(0, 4)):
        pid = f"p-{rng.randrange(10 ** 6):06d}n"
        if pid not in ids:
            upserts.append(random_person(rng, pid, [free.pop() for _ in range(rng.randint(0, 2))]))
    if rng.random() < 0.3:  # a person's cards handed to a new person in the same delta
        donors = [p for p in kept if p["cards"] and p["id"] not in {u["id"] for u in upserts}]
        if donors:
            d = rng.choice(donors)
            upserts.append(dict(d, cards=[]))
            upserts.append(random_person(rng, f"p-{rng.randrange(10 ** 6):06d}h", []) | {"cards": d["cards"]})
    if rng.random() < 0.3:
        delta["groups"] = {"c": {"entry": "s1", "exit": "s1"}, "d": {"entry": "s2", "exit": None}}
        for u in upserts[:1]:
            u["groups"] = ["d"]
    delta["people"] = upserts
    delta["remove_people"] = remove
    if snap["guests"] and rng.random() < 0.5:
        delta["remove_guests"] = [snap["guests"][0]["id"]]
    if rng.random() < 0.5:
        delta["guests"] = [{"id": f"g-n{rng.randrange(10 ** 6)}", "card": card(free.pop()),
                            "from": "2026-09-01T00:00:00Z", "until": "2027-09-30T00:00:00Z",
                            "uses": 3}]
    held_cards = [c for p in kept for c in p["cards"]]
    if snap["blocked"] and rng.random() < 0.5:
        delta["unblock"] = [snap["blocked"][0]]
    if rng.random() < 0.5:
        delta["block"] = [rng.choice(held_cards) if held_cards and rng.random() < 0.5
                          else card(free.pop())]
        if delta["block"][0] in delta.get("unblock", []):
            del delta["block"]
    return delta


def all_keys(acls: list[AccessList]) -> set[int]:
    keys: set[int] = set()
    for a in acls:
        snap = a.to_snapshot()
        for p in snap["people"]:
            keys.update(parse_card_string(c, a.key_width) for c in p["cards"])
        keys.update(parse_card_string(g["card"], a.key_width) for g in snap["guests"])
        keys.update(parse_card_string(c, a.key_width) for c in snap["blocked"])
    return keys | {0, 1, 12345}


def assert_same(fp, patched, rebuilt, keys: set[int], ids: set[str]) -> None:
    assert patched.version == rebuilt.version
    assert len(patched) == len(rebuilt)
    assert patched.persons == rebuilt.persons
    for i in range(rebuilt.persons):
        assert patched.person_id(i) == rebuilt.person_id(i)
        assert patched.is_guest(i) == rebuilt.is_guest(i)
    for pid in ids:
        assert patched.person_index(pid) == rebuilt.person_index(pid), pid
    state = fp.GateState()
    for k in sorted(keys):
        assert patched.lookup(k) == rebuilt.lookup(k), k
        assert patched.is_blocked(k) == rebuilt.is_blocked(k), k
        for t in TIMES:
            for direction in (codes.IN, codes.OUT):
                args = (k, direction, codes.NORMAL, t, (t // 60 + 3 * 1440) % codes.MINUTES_PER_WEEK,
                        t // 86400 + 719163, False, codes.APB_OFF, 0)
                assert fp.decide(patched, state, *args) == fp.decide(rebuilt, state, *args), (k, t)


@pytest.mark.parametrize("seed", range(12))
def test_a_patched_table_decides_as_a_rebuilt_one(fp, seed):
    rng = random.Random(seed)
    doc, free = random_list(rng, rng.choice([0, 1, 5, 40, 200]))
    acl = AccessList.from_snapshot(doc)
    table = build_table(acl, fp)
    history = [acl]
    patched_count = 0
    for step in range(6):
        delta = random_delta(rng, acl, free, f"v.{step + 1}")
        new = acl.apply_delta(delta)
        patched = build_table(new, fp, base=table)
        rebuilt = build_table(new, fp)
        history.append(new)
        ids = {p["id"] for a in history[-2:] for p in a.to_snapshot()["people"]} | {"g-0", "zz"}
        assert_same(fp, patched, rebuilt, all_keys(history[-2:]), ids)
        patched_count += new._change is not None
        acl, table = new, patched  # the next delta patches the patched table
    assert patched_count == 6  # every step went the patching way


def test_the_base_table_is_left_as_it_was(fp):
    rng = random.Random(99)
    doc, free = random_list(rng, 60)
    acl = AccessList.from_snapshot(doc)
    table = build_table(acl, fp)
    keys = all_keys([acl])
    before = {k: (table.lookup(k), table.is_blocked(k)) for k in keys}
    new = acl.apply_delta(random_delta(rng, acl, free, "v.1"))
    build_table(new, fp, base=table)
    assert {k: (table.lookup(k), table.is_blocked(k)) for k in keys} == before
    assert table.version == "v.0" and len(table) == len(build_table(acl, fp))


def test_a_change_that_does_not_fit_its_base_is_refused(fp):
    from array import array

    from fastpath.columns import TableChange

    doc, _ = random_list(random.Random(3), 10)
    acl = AccessList.from_snapshot(doc)
    table = build_table(acl, fp)
    with pytest.raises(ValueError, match="do not match"):
        fp.Table(acl.columns(), base=table, change=TableChange(drop=array("q", [0])))
