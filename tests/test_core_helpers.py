"""The core's small shared helpers: RFC 3339 times (agent.core.records.parse_rfc3339,
the one parser of signed lists, commands and the access list's validity times) and
nearest-rank percentiles (agent.core.stats, the one definition of telemetry's and the
benchmarks' figures)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from agent.core.records import parse_rfc3339, rfc3339_ms
from agent.core.stats import nearest_rank, percentiles


def test_rfc3339_takes_z_and_offsets_as_the_same_instant():
    utc = parse_rfc3339("2026-09-01T07:46:00Z")
    tomsk = parse_rfc3339("2026-09-01T14:46:00+07:00")
    assert utc == tomsk and utc.timestamp() == tomsk.timestamp()
    assert utc.tzinfo == UTC and tomsk.utcoffset() == timedelta(hours=7)


def test_rfc3339_cuts_fractions_past_microseconds():
    assert parse_rfc3339("2026-09-01T07:46:00.123456789Z") == datetime(2026, 9, 1, 7, 46, 0, 123456, UTC)
    assert parse_rfc3339("2026-09-01T07:46:00.1Z").microsecond == 100_000


def test_rfc3339_takes_what_the_rfc_allows_besides():
    """Lower-case t and z (RFC 3339, 5.6) and the space separator; spaces around are
    forgiven, as they always were."""
    want = datetime(2026, 9, 1, 7, 46, tzinfo=UTC)
    for text in ("2026-09-01t07:46:00z", "2026-09-01 07:46:00Z", " 2026-09-01T07:46:00Z\n"):
        assert parse_rfc3339(text) == want, text


def test_rfc3339_round_trips_the_records_own_times():
    text = rfc3339_ms(1_788_248_700.125)
    assert text == "2026-09-01T07:45:00.125Z"
    assert parse_rfc3339(text).timestamp() == 1_788_248_700.125


@pytest.mark.parametrize("text", ["2026-09-01T07:46:00", "2026-09-01", "2026-09-01T07:46:00.1234567"])
def test_rfc3339_without_an_offset_is_refused(text):
    with pytest.raises(ValueError, match="no UTC offset"):
        parse_rfc3339(text)


@pytest.mark.parametrize("text", ["", "tomorrow", "2026-13-01T00:00:00Z", "2026-09-01T07:46:00ZZ",
                                  "2026-09-01T07:46:00.12a3Z", "2026-12-31T23:59:60Z", "９"])
def test_rfc3339_malformed_is_a_value_error(text):
    with pytest.raises(ValueError):
        parse_rfc3339(text)


def test_rfc3339_keeps_far_offsets():
    dt = parse_rfc3339("2026-09-01T00:30:00-11:00")
    assert dt.tzinfo == timezone(timedelta(hours=-11))
    assert dt.astimezone(UTC) == datetime(2026, 9, 1, 11, 30, tzinfo=UTC)


def test_percentiles_are_nearest_rank_values_of_any_order():
    samples = [float(v) for v in range(1000, 0, -1)]  # 1..1000, unordered
    assert percentiles(samples) == {0.5: 500.0, 0.99: 990.0, 0.999: 999.0}
    assert percentiles([3.0, 1.0, 2.0], (0.5, 1.0)) == {0.5: 2.0, 1.0: 3.0}  # always one of the values
    assert percentiles([]) == {}


def test_nearest_rank_of_one_value_and_of_none():
    assert nearest_rank([7.0], 0.999) == 7.0
    with pytest.raises(ValueError):
        nearest_rank([], 0.5)


def test_a_background_thread_is_made_nicer_than_the_rest_and_alone():
    """host.background_thread lowers the calling thread's priority only (Linux applies
    setpriority on a thread id to that thread): the gate thread keeps its own."""
    import os
    import threading

    from agent.host import BACKGROUND_NICE, background_thread

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    got: list = []

    def work():
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        got.append((before, background_thread()))

    t = threading.Thread(target=work)
    t.start()
    t.join(10)
    [(before, after)] = got
    assert after == min(before + BACKGROUND_NICE, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
