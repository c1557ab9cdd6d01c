"""The access list: schema and semantic checks with paths, snapshots and deltas,
compiled columns, and a Table built from them on both fastpath twins."""

from __future__ import annotations

import copy
import json
import os
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.contract import validate
from agent.core.acl import (
    MAX_REPORTED_ERRORS,
    AccessList,
    AclRejected,
    build_table,
    check_document,
    minute_of_week,
    parse_acl_json,
    schedule_bitmap,
    schema,
)
from agent.core.cards import parse_card_string
from agent.core.events import Now
from agent.core.records import SequenceSink, make_record
from bench.synthetic import synthetic_acl
from fastpath import codes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "acl" / "school.json"
TOMSK = timezone(timedelta(hours=7))  # Asia/Tomsk: UTC+7 all year since 2016


def example() -> dict:
    return json.loads(EXAMPLE.read_text(encoding="utf-8"))


def minimal(**extra) -> dict:
    """A small valid snapshot; tests add the part they need."""
    doc = {
        "kind": "snapshot",
        "version": "t.1",
        "timezone": "Asia/Tomsk",
        "schedules": {"lessons": {"week": {"mon": ["07:00-08:30"]}}},
        "groups": {"pupils": {"entry": "lessons", "exit": None}},
        "people": [{"id": "p-1", "cards": ["100,60179"], "groups": ["pupils"]}],
    }
    doc.update(extra)
    return doc


def rejected(doc: dict, base: AccessList | None = None) -> AclRejected:
    with pytest.raises(AclRejected) as info:
        if base is None:
            AccessList.from_snapshot(doc)
        else:
            base.apply_delta(doc)
    return info.value


def paths(exc: AclRejected) -> set[str]:
    return {e.path for e in exc.errors}


def bit(bitmap: bytes, minute: int) -> bool:
    return bool(bitmap[minute // 8] & (1 << (minute % 8)))


def epoch(y, mo, d, h=0, mi=0, s=0, tz=TOMSK) -> int:
    return int(datetime(y, mo, d, h, mi, s, tzinfo=tz).timestamp())


def person_index(cols, pid: str) -> int:
    return cols.person_ids.index(pid)


# --------------------------------------------------------------------------- the example


def test_example_list_validates_and_compiles():
    acl = AccessList.from_snapshot(example())
    assert acl.version == "2026-09-01.1"
    assert acl.timezone == "Asia/Tomsk"
    assert acl.key_width == 24
    counts = acl.counts()
    assert counts["people"] >= 35 and counts["guests"] == 2 and counts["blocked"] >= 2
    cols = acl.columns().sorted_form()
    assert list(cols.card_keys) == sorted(set(cols.card_keys))
    assert len(cols.person_ids) == counts["people"] + counts["guests"]
    assert check_document(example()) == []


def test_example_list_holds_what_the_docs_table_promises():
    doc = example()
    people = {p["id"]: p for p in doc["people"]}
    assert people["p-0001"]["cards"] == ["100,60179"] and people["p-0001"]["groups"] == ["junior"]
    assert any("staff" in p["groups"] for p in doc["people"])
    rdm = [p for p in doc["people"] if "142,51091" in p["cards"]]
    assert len(rdm) == 1 and rdm[0]["groups"] == ["senior"]
    assert any(p.get("valid_from", "") > "2026-09-01" for p in doc["people"])
    assert any(p.get("valid_until") == "2026-06-30" for p in doc["people"])
    assert "2026-11-04" in doc["holidays"] and date(2026, 11, 4).weekday() == 2  # a Wednesday
    one_use = [g for g in doc["guests"] if g["uses"] == 1]
    assert one_use and one_use[0]["from"].startswith("2026-09-01T07:00")
    assert one_use[0]["until"].startswith("2026-09-30T20:00")
    assert doc["blocked"]
    schedules, groups = doc["schedules"], doc["groups"]
    junior_exit = schedules[groups["junior"]["exit"]]["week"]
    assert junior_exit == {d: ["12:00-19:00"] for d in ("mon", "tue", "wed", "thu", "fri")}
    staff = schedules[groups["staff"]["entry"]]
    assert staff["holidays"] is True and len(staff["week"]) == 7
    # every card form appears
    cards = [c for p in doc["people"] for c in p["cards"]]
    assert any("," in c for c in cards) and any(c.isdigit() for c in cards)
    assert any(c.startswith("hex:") for c in cards)


def test_example_round_trips_through_to_snapshot():
    doc = example()
    acl = AccessList.from_snapshot(doc)
    assert acl.to_snapshot() == doc
    again = AccessList.from_snapshot(acl.to_snapshot())
    assert again.columns().sorted_form() == acl.columns().sorted_form()


def test_docs_schema_is_a_relative_symlink_to_the_package_schema():
    link = ROOT / "docs" / "schemas" / "acl.schema.json"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == (ROOT / "agent" / "schemas" / "acl.schema.json").resolve()
    assert jsonschema_rs.meta.is_valid(schema())


def test_full_schema_accepts_both_kinds_and_refuses_an_unknown_kind():
    v = jsonschema_rs.validator_for(schema())
    assert v.is_valid(example())
    assert v.is_valid({"kind": "delta", "version": "b", "base": "a", "block": ["100,1"]})
    assert not v.is_valid(dict(example(), kind="patch"))
    exc = rejected(dict(minimal(), kind="patch"))
    assert paths(exc) == {"/kind"}


# --------------------------------------------------------------------------- errors with paths


def test_schema_errors_name_every_bad_field_at_once():
    doc = minimal()
    doc["people"] = [
        {"id": "p-1", "cards": ["100,60179"], "groups": ["pupils"]},
        {"id": "p-2", "cards": ["card-7"], "groups": ["pupils"], "valid_until": "2027-6-30"},
    ]
    doc["schedules"]["lessons"]["week"]["tue"] = ["7:00-08:00"]
    doc["holidays"] = ["2026-13-01"]
    doc["guests"] = [
        {"id": "g-1", "card": "0001234567", "from": "2026-09-01", "until": "x", "uses": 0}
    ]
    exc = rejected(doc)
    assert exc.code == "invalid"
    assert {
        "/people/1/cards/0",
        "/people/1/valid_until",
        "/schedules/lessons/week/tue/0",
        "/holidays/0",
        "/guests/0/from",
        "/guests/0/until",
        "/guests/0/uses",
    } <= paths(exc)
    text = str(exc)
    assert "/people/1/cards/0" in text and "card" in text


def test_semantic_errors_name_their_paths_at_once():
    doc = minimal(timezone="Asia/Atlantis")
    doc["key_width"] = 24
    doc["schedules"]["backwards"] = {"week": {"mon": ["10:00-09:00"], "tue": ["08:00-08:00"]}}
    doc["groups"]["ghosts"] = {"entry": "no-such-schedule"}
    doc["people"] += [
        {"id": "p-2", "cards": ["300,1"], "groups": ["pupils"]},  # facility over 255 at width 24
        {"id": "p-3", "cards": ["0006613779"], "groups": ["pupils"]},  # same key as p-1's card
        {"id": "p-4", "cards": ["100,2"], "groups": ["no-such-group"]},
        {
            "id": "p-5",
            "cards": ["100,3"],
            "groups": ["pupils"],
            "valid_from": "2027-01-01",
            "valid_until": "2026-12-31",
        },
        {"id": "p-1", "cards": ["100,4"], "groups": ["pupils"]},  # duplicate id
    ]
    doc["guests"] = [
        {
            "id": "p-4",
            "card": "100,5",
            "from": "2026-09-01T07:00:00+07:00",
            "until": "2026-09-01T20:00:00+07:00",
            "uses": 1,
        }
    ]  # id of a person
    doc["holidays"] = ["2026-02-30"]
    exc = rejected(doc)
    assert {
        "/timezone",
        "/schedules/backwards/week/mon/0",
        "/schedules/backwards/week/tue/0",
        "/groups/ghosts/entry",
        "/people/1/cards/0",
        "/people/2/cards/0",
        "/people/3/groups/0",
        "/people/4/valid_from",
        "/people/5/id",
        "/guests/0/id",
        "/holidays/0",
    } <= paths(exc)
    by_path = {e.path: e.message for e in exc.errors}
    assert "p-1" in by_path["/people/2/cards/0"]  # names the other holder
    assert "Asia/Atlantis" in by_path["/timezone"]


def test_a_card_on_two_people_is_an_error_at_the_second():
    doc = minimal()
    doc["people"].append({"id": "p-2", "cards": ["hex:0A0064EB13"], "groups": ["pupils"]})
    exc = rejected(doc)
    assert paths(exc) == {"/people/1/cards/0"}
    assert "p-1" in exc.errors[0].message


def test_a_guest_card_held_by_a_person_is_an_error():
    doc = minimal(
        guests=[
            {
                "id": "g-1",
                "card": "0006613779",
                "from": "2026-09-01T07:00:00+07:00",
                "until": "2026-09-02T07:00:00+07:00",
                "uses": 1,
            }
        ]
    )
    assert paths(rejected(doc)) == {"/guests/0/card"}


@pytest.mark.parametrize("field", ["name", "photo", "surname", "face_template"])
def test_schema_forbids_personal_fields_on_a_person(field):
    doc = minimal()
    doc["people"][0][field] = "Ivanov Ivan"
    exc = rejected(doc)
    assert paths(exc) == {"/people/0"}
    assert field in exc.errors[0].message and "no names" in exc.errors[0].message


def test_schema_forbids_unknown_fields_on_guests_and_the_document():
    doc = minimal(extra=1)
    doc["guests"] = [
        {
            "id": "g-1",
            "card": "100,5",
            "from": "2026-09-01T07:00:00+07:00",
            "until": "2026-09-01T20:00:00+07:00",
            "uses": 1,
            "phone": "+7",
        }
    ]
    assert paths(rejected(doc)) == {"", "/guests/0"}


def test_an_error_list_is_bounded_and_str_shows_the_first_ones():
    doc = minimal()
    doc["people"] = [{"id": f"p-{i}", "cards": ["bad"], "groups": ["pupils"]} for i in range(1500)]
    exc = rejected(doc)
    assert exc.total == 1500 and len(exc.errors) == 1000
    assert str(exc).count("/people/") == 10 and "1490 more" in str(exc)
    assert all(len(e.message) <= 1000 for e in exc.errors)


def test_missing_required_fields_are_reported():
    exc = rejected({"kind": "snapshot", "people": [{"id": "p-1"}]})
    messages = " ".join(str(e) for e in exc.errors)
    assert "version" in messages and "timezone" in messages
    # Each missing field at its own pointer, where the sender has to add it.
    assert {"/version", "/timezone", "/people/0/cards", "/people/0/groups"} <= paths(exc)
    assert all("missing; it is required" in e.message for e in exc.errors)


def test_a_delta_is_not_a_snapshot_and_the_reverse():
    acl = AccessList.from_snapshot(minimal())
    assert rejected({"kind": "delta", "version": "b", "base": "t.1"}).errors[0].path == "/kind"
    assert rejected(minimal(), base=acl).errors[0].path == "/kind"


# --------------------------------------------------------------------------- JSON


def test_parse_acl_json_reads_bytes_and_text():
    raw = EXAMPLE.read_bytes()
    assert parse_acl_json(raw) == example() == parse_acl_json(raw.decode())


def test_parse_acl_json_says_where_the_json_breaks():
    with pytest.raises(AclRejected) as info:
        parse_acl_json(b'{\n  "kind": "snapshot",\n  "version": }')
    assert info.value.code == "invalid"
    assert "line 3" in str(info.value) and "column" in str(info.value)


@pytest.mark.parametrize("data", [b"\xff\xfe{}", "[1, 2]", '{"a": NaN}', ""])
def test_parse_acl_json_refuses_non_documents(data):
    with pytest.raises(AclRejected):
        parse_acl_json(data)


# --------------------------------------------------------------------------- deltas


def base_list() -> AccessList:
    return AccessList.from_snapshot(example())


def test_delta_changes_only_what_it_says_and_the_old_list_is_unchanged():
    old_doc = example()
    acl = AccessList.from_snapshot(old_doc)
    old_columns = acl.columns().sorted_form()
    delta = {
        "kind": "delta",
        "version": "2026-09-02.1",
        "base": "2026-09-01.1",
        "people": [
            {"id": "p-0002", "cards": ["100,1002"], "groups": ["middle"]},  # replaced
            {"id": "p-0100", "cards": ["100,1100"], "groups": ["senior"]},  # new
        ],
        "remove_people": ["p-0003"],
        "guests": [
            {
                "id": "g-0003",
                "card": "100,1003",
                "from": "2026-09-02T08:00:00+07:00",
                "until": "2026-09-02T18:00:00+07:00",
                "uses": 2,
            }
        ],
        "remove_guests": ["g-0002"],
        "block": ["100,1004"],
        "unblock": ["100,12345"],
        "holidays_add": ["2026-09-03"],
        "holidays_remove": ["2026-12-31"],
        "schedules": {"visitors": {"week": {"sat": ["09:00-12:00"]}}},
        "groups": {"interns": {"entry": "staff", "exit": None}},
    }
    new = acl.apply_delta(delta)

    # The old object is untouched.
    assert acl.version == "2026-09-01.1"
    assert acl.to_snapshot() == old_doc
    assert acl.columns().sorted_form() == old_columns

    # Expected: the old document edited by hand as the delta says.
    want = copy.deepcopy(old_doc)
    want["version"] = "2026-09-02.1"
    people = {p["id"]: p for p in want["people"] if p["id"] != "p-0003"}
    people.update({p["id"]: p for p in delta["people"]})
    guests = {g["id"]: g for g in want["guests"] if g["id"] != "g-0002"}
    guests.update({g["id"]: g for g in delta["guests"]})
    got = new.to_snapshot()
    assert {p["id"]: p for p in got["people"]} == people
    assert {g["id"]: g for g in got["guests"]} == guests
    assert set(got["blocked"]) == (set(want["blocked"]) - {"100,12345"}) | {"100,1004"}
    assert set(got["holidays"]) == (set(want["holidays"]) - {"2026-12-31"}) | {"2026-09-03"}
    assert got["schedules"] == {**want["schedules"], **delta["schedules"]}
    assert got["groups"] == {**want["groups"], **delta["groups"]}
    assert (got["timezone"], got["key_width"], got["site"]) == (
        want["timezone"],
        want["key_width"],
        want["site"],
    )
    assert new.version == "2026-09-02.1"
    # The result is itself a valid snapshot.
    assert AccessList.from_snapshot(got).to_snapshot() == got


def test_delta_with_the_wrong_base_is_refused_as_base_mismatch():
    acl = base_list()
    exc = rejected(
        {
            "kind": "delta",
            "version": "2026-09-03.1",
            "base": "2026-09-02.1",
            "remove_people": ["p-0001"],
        },
        base=acl,
    )
    assert exc.code == "base_mismatch"
    assert exc.errors[0].path == "/base"
    assert "2026-09-01.1" in exc.errors[0].message  # says which version the gate holds


def test_the_rejected_record_carries_what_the_contract_allows():
    """80 bad cards: the refusal counts them all, its acl.rejected record carries the
    first MAX_REPORTED_ERRORS (the event schema's maxItems) and stays valid."""
    doc = minimal(people=[{"id": f"p-{i}", "cards": ["card-7"], "groups": ["pupils"]} for i in range(80)])
    exc = rejected(doc)
    assert exc.total == 80
    fields = exc.record_fields("t.1")
    assert len(fields["errors"]) == MAX_REPORTED_ERRORS == 50
    assert fields["errors"][0]["path"] == "/people/0/cards/0"
    now = Now(mono=1.0, wall=1_788_248_700.0)
    rec = SequenceSink().commit([make_record("acl.rejected", now, "boot-1", **fields)])[0]
    assert validate("event", rec) == []


def test_an_invalid_delta_is_refused_whole():
    acl = base_list()
    before = acl.to_snapshot()
    delta = {
        "kind": "delta",
        "version": "2026-09-02.1",
        "base": "2026-09-01.1",
        "people": [
            {"id": "p-0200", "cards": ["100,2000"], "groups": ["senior"]},
            {"id": "p-0201", "cards": ["100,60179"], "groups": ["senior"]},
        ],  # p-0001's card
        "holidays_add": ["2026-09-10"],
    }
    exc = rejected(delta, base=acl)
    assert exc.code == "invalid"
    assert paths(exc) == {"/people/1/cards/0"}
    assert "p-0001" in exc.errors[0].message
    assert acl.to_snapshot() == before  # nothing of the good parts was applied


def test_delta_must_match_its_base():
    acl = base_list()
    exc = rejected(
        {
            "kind": "delta",
            "version": "v2",
            "base": "2026-09-01.1",
            "remove_people": ["p-9999"],
            "remove_guests": ["g-9999"],
            "unblock": ["100,777"],
            "block": ["100,12345"],
            "holidays_remove": ["2026-09-15"],
            "holidays_add": ["2026-11-04"],
            "groups": {"late": {"entry": "no-such", "exit": None}},
            "people": [{"id": "p-0300", "cards": ["100,3000"], "groups": ["no-such-group"]}],
            "schedules": {"odd": {"week": {"fri": ["18:00-17:00"]}}},
        },
        base=acl,
    )
    assert {
        "/remove_people/0",
        "/remove_guests/0",
        "/unblock/0",
        "/block/0",
        "/holidays_remove/0",
        "/holidays_add/0",
        "/groups/late/entry",
        "/people/0/groups/0",
        "/schedules/odd/week/fri/0",
    } <= paths(exc)


def test_delta_unblocks_by_key_whatever_the_form():
    acl = base_list()
    new = acl.apply_delta(
        {"kind": "delta", "version": "v2", "base": "2026-09-01.1", "unblock": ["0006565945"]}
    )  # "100,12345" in its printed form
    assert "100,12345" not in new.to_snapshot()["blocked"]
    assert new.counts()["blocked"] == acl.counts()["blocked"] - 1


def test_a_person_moved_out_frees_the_card_for_another_in_the_same_delta():
    acl = base_list()
    new = acl.apply_delta(
        {
            "kind": "delta",
            "version": "v2",
            "base": "2026-09-01.1",
            "remove_people": ["p-0001"],
            "people": [{"id": "p-0500", "cards": ["0006613779"], "groups": ["junior"]}],
        }
    )
    cols = new.columns().sorted_form()
    key = parse_card_string("100,60179")
    assert cols.person_ids[cols.card_person[list(cols.card_keys).index(key)]] == "p-0500"


def test_delta_timezone_moves_date_boundaries():
    acl = AccessList.from_snapshot(
        minimal(
            people=[
                {"id": "p-1", "cards": ["100,1"], "groups": ["pupils"], "valid_until": "2026-06-30"}
            ]
        )
    )
    moved = acl.apply_delta(
        {"kind": "delta", "version": "t.2", "base": "t.1", "timezone": "Europe/Moscow"}
    )
    assert moved.timezone == "Europe/Moscow"
    assert moved.columns().sorted_form().person_until[0] - acl.columns().sorted_form().person_until[0] == 4 * 3600


def test_access_list_is_immutable():
    acl = base_list()
    with pytest.raises(AttributeError):
        acl.version = "x"
    snap = acl.to_snapshot()
    snap["people"][0]["cards"].append("100,9")
    snap["schedules"]["staff"]["week"]["mon"] = []
    assert acl.to_snapshot() == example()


def test_input_document_changes_after_loading_do_not_reach_the_list():
    doc = example()
    acl = AccessList.from_snapshot(doc)
    doc["schedules"]["staff"]["week"]["mon"] = []
    doc["people"][0]["cards"][0] = "1,1"
    assert acl.to_snapshot() == example()


# --------------------------------------------------------------------------- date semantics


def test_valid_until_date_includes_the_whole_local_day():
    acl = AccessList.from_snapshot(
        minimal(
            people=[
                {
                    "id": "p-1",
                    "cards": ["100,1"],
                    "groups": ["pupils"],
                    "valid_from": "2025-09-01",
                    "valid_until": "2026-06-30",
                }
            ]
        )
    )
    cols = acl.columns().sorted_form()
    start, until = cols.person_from[0], cols.person_until[0]
    assert start == epoch(2025, 9, 1)  # from local midnight
    assert until > epoch(2026, 6, 30, 23, 59, 59)  # the last second of the local day is valid
    assert until <= epoch(2026, 7, 1)  # the next local day is not
    assert until == epoch(2026, 7, 1) and start <= epoch(2025, 9, 1, 0, 0, 0)


def test_datetime_validity_is_taken_as_given_and_guests_keep_their_window():
    acl = AccessList.from_snapshot(example())
    cols = acl.columns().sorted_form()
    i = person_index(cols, "p-0040")
    assert cols.person_from[i] == epoch(2026, 9, 1, 8, 0)
    assert cols.person_until[i] == epoch(2026, 12, 31, 18, 0)
    g = person_index(cols, "g-0001")
    assert cols.person_flags[g] & codes.PERSON_GUEST
    assert cols.person_max_uses[g] == 1
    assert (cols.person_from[g], cols.person_until[g]) == (
        epoch(2026, 9, 1, 7),
        epoch(2026, 9, 30, 20),
    )


def test_people_without_validity_have_open_bounds_and_no_use_limit():
    cols = AccessList.from_snapshot(minimal()).columns().sorted_form()
    assert (cols.person_from[0], cols.person_until[0]) == (codes.NO_START, codes.NO_END)
    assert cols.person_max_uses[0] == 0 and cols.person_flags[0] == 0


def test_holidays_compile_to_sorted_local_date_ordinals():
    cols = AccessList.from_snapshot(minimal(holidays=["2026-12-31", "2026-11-04"])).columns().sorted_form()
    assert list(cols.holidays) == [date(2026, 11, 4).toordinal(), date(2026, 12, 31).toordinal()]


def test_minute_of_week_counts_from_monday_midnight():
    assert minute_of_week(datetime(2026, 8, 31, 0, 0)) == 0  # a Monday
    assert minute_of_week(datetime(2026, 8, 31, 7, 0)) == 420
    assert minute_of_week(datetime(2026, 9, 6, 23, 59)) == 7 * 1440 - 1  # Sunday
    assert minute_of_week(datetime(2026, 11, 4, 12, 0, tzinfo=TOMSK)) == 2 * 1440 + 720


# --------------------------------------------------------------------------- bitmaps


def test_a_monday_0700_0830_range_sets_exactly_minutes_420_to_509():
    cols = AccessList.from_snapshot(minimal()).columns().sorted_form()
    entry = cols.gs_entry[cols.person_groupset[0]]
    assert len(entry) == codes.BITMAP_BYTES
    assert [m for m in range(codes.MINUTES_PER_WEEK) if bit(entry, m)] == list(range(420, 510))


def test_end_2400_closes_the_day_and_days_map_to_their_offsets():
    bm = schedule_bitmap({"week": {"sun": ["23:00-24:00"], "wed": ["00:00-00:01"]}})
    assert [m for m in range(codes.MINUTES_PER_WEEK) if bit(bm, m)] == (
        [2 * 1440] + list(range(6 * 1440 + 1380, 7 * 1440))
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 1439), st.integers(1, 1440)), max_size=6)
)
def test_schedule_bitmap_sets_a_minute_when_some_range_covers_it(ranges):
    days = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    week: dict[str, list[str]] = {}
    spans = []
    for d, start, length in ranges:
        end = min(1440, start + length)
        week.setdefault(days[d], []).append(
            f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
        )
        spans.append((d * 1440 + start, d * 1440 + end))
    bm = schedule_bitmap({"week": week})
    for m in range(0, codes.MINUTES_PER_WEEK, 7):
        assert bit(bm, m) == any(a <= m < b for a, b in spans)


def test_groupsets_or_the_groups_and_treat_null_and_holidays_as_specified():
    doc = minimal(
        schedules={
            "morning": {"week": {"mon": ["07:00-08:00"]}},
            "evening": {"week": {"mon": ["18:00-19:00"]}},
            "staff": {"holidays": True, "week": {"wed": ["06:00-22:00"]}},
        },
        groups={
            "a": {"entry": "morning", "exit": "evening"},
            "b": {"entry": "evening"},  # exit missing: always
            "staff": {"entry": "staff", "exit": "morning"},
            "free": {"entry": None, "exit": None},
        },
        people=[
            {"id": "p-ab", "cards": ["1,1"], "groups": ["a", "b"]},
            {"id": "p-a", "cards": ["1,2"], "groups": ["a"]},
            {"id": "p-staff", "cards": ["1,3"], "groups": ["staff", "a"]},
            {"id": "p-free", "cards": ["1,4"], "groups": ["free"]},
            {"id": "p-ba", "cards": ["1,5"], "groups": ["b", "a"]},
        ],
        guests=[
            {
                "id": "g-1",
                "card": "1,6",
                "from": "2026-09-01T07:00:00+07:00",
                "until": "2026-09-02T07:00:00+07:00",
                "uses": 1,
            }
        ],
    )
    cols = AccessList.from_snapshot(doc).columns().sorted_form()
    gs = {pid: cols.person_groupset[i] for i, pid in enumerate(cols.person_ids)}

    def on(bm):
        return [m for m in range(codes.MINUTES_PER_WEEK) if bit(bm, m)]

    assert on(cols.gs_entry[gs["p-ab"]]) == list(range(420, 480)) + list(range(1080, 1140))
    assert on(cols.gs_exit[gs["p-ab"]]) == list(range(codes.MINUTES_PER_WEEK))  # b's missing exit
    assert on(cols.gs_exit[gs["p-a"]]) == list(range(1080, 1140))
    assert on(cols.gs_entry_holiday[gs["p-a"]]) == []
    assert on(cols.gs_entry_holiday[gs["p-staff"]]) == list(range(2 * 1440 + 360, 2 * 1440 + 1320))
    assert cols.gs_entry[gs["p-free"]] == bytes([0xFF]) * codes.BITMAP_BYTES
    assert cols.gs_entry_holiday[gs["p-free"]] == bytes(codes.BITMAP_BYTES)  # null: not on holidays
    assert gs["p-ab"] == gs["p-ba"]  # interned whatever the order
    g = gs["g-1"]  # a guest without groups: unrestricted, but not on holidays
    assert cols.gs_entry[g] == cols.gs_exit[g] == bytes([0xFF]) * codes.BITMAP_BYTES
    assert cols.gs_entry_holiday[g] == bytes(codes.BITMAP_BYTES)


# --------------------------------------------------------------------------- cards


def test_the_three_forms_of_one_card_give_one_key():
    keys = set()
    for form in ("100,60179", "0006613779", "hex:0A0064EB13"):
        cols = AccessList.from_snapshot(
            minimal(people=[{"id": "p-1", "cards": [form], "groups": ["pupils"]}])
        ).columns().sorted_form()
        keys.add(tuple(cols.card_keys))
    assert len(keys) == 1


def test_blocked_cards_are_flagged_with_or_without_a_holder():
    cols = AccessList.from_snapshot(example()).columns().sorted_form()
    entries = dict(zip(cols.card_keys, zip(cols.card_person, cols.card_flags)))
    nobody = entries[parse_card_string("100,12345")]
    assert nobody == (-1, codes.CARD_BLOCKED)
    old, new = entries[parse_card_string("100,50012")], entries[parse_card_string("100,60190")]
    assert cols.person_ids[old[0]] == "p-0012" and old[1] == codes.CARD_BLOCKED
    assert cols.person_ids[new[0]] == "p-0012" and new[1] == 0
    assert sum(1 for f in cols.card_flags if f & codes.CARD_BLOCKED) == len(example()["blocked"])


def test_wider_key_width_keeps_full_hex_uids_apart():
    doc = minimal(
        key_width=40,
        people=[
            {"id": "p-1", "cards": ["hex:0A0064EB13"], "groups": ["pupils"]},
            {"id": "p-2", "cards": ["hex:0B0064EB13"], "groups": ["pupils"]},  # same low 24 bits
        ],
    )
    cols = AccessList.from_snapshot(doc).columns().sorted_form()
    assert list(cols.card_keys) == [0x0A0064EB13, 0x0B0064EB13] and cols.key_width == 40
    with pytest.raises(AclRejected):  # at 24 bits they are one card
        AccessList.from_snapshot(dict(doc, key_width=24))


# --------------------------------------------------------------------------- tables on both twins


def test_table_from_the_example_finds_cards_on_both_twins(fp):
    acl = AccessList.from_snapshot(example())
    table = build_table(acl, fp)
    assert table.version == "2026-09-01.1"
    assert len(table) == acl.counts()["cards"] + 2  # two blocked cards held by nobody
    p1 = table.lookup(parse_card_string("0006613779"))
    assert table.person_id(p1) == "p-0001"
    assert table.person_id(table.lookup(0x8EC793)) == "p-0021"  # RDM6300 read 14008EC793
    assert table.lookup(parse_card_string("100,12345")) == -1
    assert table.is_blocked(parse_card_string("100,12345"))
    assert table.lookup(parse_card_string("1,1")) == -1 and not table.is_blocked(1 << 16 | 1)


def _decide(fp, table, card, direction, local: datetime) -> str:
    result, _, _ = fp.decide(
        table,
        fp.GateState(),
        parse_card_string(card),
        direction,
        codes.NORMAL,
        int(local.timestamp()),
        minute_of_week(local),
        local.date().toordinal(),
        False,
        codes.APB_OFF,
        0,
    )
    return codes.RESULTS[result]


def test_example_decisions_follow_schedules_dates_and_holidays(fp):
    table = build_table(AccessList.from_snapshot(example()), fp)
    monday_10 = datetime(2026, 9, 7, 10, 0, tzinfo=TOMSK)
    monday_13 = datetime(2026, 9, 7, 13, 0, tzinfo=TOMSK)
    holiday_10 = datetime(2026, 11, 4, 10, 0, tzinfo=TOMSK)
    assert _decide(fp, table, "100,60179", codes.IN, monday_10) == "granted"
    assert _decide(fp, table, "100,60179", codes.OUT, monday_10) == "exit_restricted"
    assert _decide(fp, table, "100,60179", codes.OUT, monday_13) == "granted"
    assert _decide(fp, table, "100,60179", codes.IN, holiday_10) == "holiday"
    assert _decide(fp, table, "100,60205", codes.IN, holiday_10) == "granted"  # staff p-0027
    assert _decide(fp, table, "100,50012", codes.IN, monday_10) == "blocked"  # p-0012's lost card
    assert _decide(fp, table, "100,60190", codes.IN, monday_10) == "granted"  # p-0012's new card
    assert _decide(fp, table, "hex:0A0064EB38", codes.IN, monday_10) == "not_yet_valid"  # p-0038
    assert _decide(fp, table, "100,60217", codes.IN, monday_10) == "expired"  # p-0039
    assert _decide(fp, table, "0001234567", codes.IN, monday_10) == "granted"  # guest g-0001


# --------------------------------------------------------------------------- size


def test_synthetic_list_is_valid_and_compiles():
    doc = synthetic_acl(3000)
    acl = AccessList.from_snapshot(doc)
    cols = acl.columns().sorted_form()
    assert acl.counts()["cards"] == 3000
    assert len(cols.card_keys) == 3000 + acl.counts()["blocked"]


@pytest.mark.soak
def test_a_million_card_list_validates_and_compiles_in_seconds(fp):
    doc = synthetic_acl(1_000_000)
    t0 = time.perf_counter()
    acl = AccessList.from_snapshot(doc)
    t1 = time.perf_counter()
    table = build_table(acl, fp)
    t2 = time.perf_counter()
    print(f"1M cards: validate {t1 - t0:.1f} s, columns+Table({fp.__name__}) {t2 - t1:.1f} s")
    assert len(table) == 1_000_000 + acl.counts()["blocked"]


# --------------------------------------------------------------------------- robustness

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10, 10**12)
    | st.text(max_size=12)
    | st.sampled_from(["100,60179", "2026-09-01", "07:00-08:00", "pupils", "lessons", "p-1"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _all_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _all_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _all_paths(v, prefix + (i,))


def _replace(doc, path, value):
    doc = copy.deepcopy(doc)
    if not path:
        return value
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


_SNAPSHOT = minimal(
    guests=[
        {
            "id": "g-1",
            "card": "100,5",
            "from": "2026-09-01T07:00:00+07:00",
            "until": "2026-09-02T07:00:00+07:00",
            "uses": 1,
            "groups": ["pupils"],
        }
    ],
    blocked=["100,9"],
    holidays=["2026-11-04"],
)
_DELTA = {
    "kind": "delta",
    "version": "t.2",
    "base": "t.1",
    "people": [{"id": "p-2", "cards": ["100,7"], "groups": ["pupils"]}],
    "remove_people": ["p-1"],
    "guests": [],
    "remove_guests": ["g-1"],
    "block": ["100,8"],
    "unblock": ["100,9"],
    "holidays_add": ["2026-11-05"],
    "holidays_remove": ["2026-11-04"],
    "schedules": {"x": {"week": {"mon": ["01:00-02:00"]}}},
    "groups": {"y": {"entry": "x"}},
}


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_junk_anywhere_in_a_snapshot_is_refused_cleanly_or_accepted(data):
    paths_ = list(_all_paths(_SNAPSHOT))
    doc = _replace(_SNAPSHOT, data.draw(st.sampled_from(paths_)), data.draw(_json))
    try:
        acl = AccessList.from_snapshot(doc)
    except AclRejected as exc:
        assert exc.errors and all(isinstance(e.path, str) and e.message for e in exc.errors)
    else:
        acl.columns().sorted_form()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_junk_anywhere_in_a_delta_is_refused_cleanly_or_applied(data):
    base = AccessList.from_snapshot(_SNAPSHOT)
    paths_ = list(_all_paths(_DELTA))
    doc = _replace(_DELTA, data.draw(st.sampled_from(paths_)), data.draw(_json))
    try:
        new = base.apply_delta(doc)
    except AclRejected as exc:
        assert exc.errors
    else:
        new.columns().sorted_form()
    assert base.to_snapshot() == AccessList.from_snapshot(_SNAPSHOT).to_snapshot()


def test_check_document_reports_delta_errors_without_a_base():
    delta = {
        "kind": "delta",
        "version": "b",
        "base": "a",
        "block": ["300,1"],
        "people": [{"id": "p-9", "cards": ["100,1"], "groups": ["g"]}],
    }
    assert [e.path for e in check_document(delta)] == ["/block/0"]
    assert check_document(delta, key_width=32) == []  # facility 300 fits 16 facility bits
