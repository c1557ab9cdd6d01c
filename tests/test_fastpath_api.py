"""Both fastpath twins provide exactly the interface of fastpath/api.py."""
from __future__ import annotations

import inspect

import pytest

import fastpath._pure as pure
from fastpath import api

try:
    import fastpath._compiled as compiled
except ImportError:  # no compiler here: the pure twin is still checked
    compiled = None

TWINS = [pytest.param(pure, id="pure"),
         pytest.param(compiled, id="compiled", marks=pytest.mark.skipif(compiled is None, reason="not built"))]


def public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def protocol_members(proto: type) -> set[str]:
    return {n for n in vars(proto) if not n.startswith("_")} | set(getattr(proto, "__annotations__", {}))


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize(("name", "proto"), [("Table", api.TableAPI), ("GateState", api.GateStateAPI)])
def test_each_twin_has_exactly_the_interface(twin, name, proto):
    assert public(getattr(twin, name)) == protocol_members(proto), (
        f"{twin.__name__}.{name} and fastpath/api.py {proto.__name__} differ: update both twins and the API")


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("twin", TWINS)
def test_each_twin_takes_the_same_arguments(twin):
    assert _params(twin.decide) == _params(api.Decide.__call__)
    for name, proto in (("Table", api.TableAPI), ("GateState", api.GateStateAPI)):
        for member in protocol_members(proto):
            ours = getattr(getattr(twin, name), member)
            theirs = getattr(proto, member, None)
            if callable(theirs) and not isinstance(inspect.getattr_static(proto, member), property):
                try:
                    got = _params(ours)
                except (TypeError, ValueError):  # a builtin without a signature: nothing to compare
                    continue
                want = _params(theirs)  # a classmethod comes bound: no cls
                assert got == want, f"{twin.__name__}.{name}.{member}{got} != api {want}"


@pytest.mark.parametrize("twin", TWINS)
def test_each_twin_builds_a_table_with_the_same_arguments(twin):
    try:
        got = _params(twin.Table.__init__)
    except (TypeError, ValueError):  # a Cython type without a signature for __init__
        pytest.skip("no introspectable signature")
    assert got == _params(api.TableAPI.__init__)


def test_the_check_sees_a_missing_method():
    class Short:
        def lookup(self, key): ...

    assert public(Short) != protocol_members(api.TableAPI)


def test_both_twins_export_the_same_names():
    if compiled is None:
        pytest.skip("not built")
    assert compiled.__all__ == pure.__all__


@pytest.mark.parametrize("twin", TWINS)
def test_sort_keys_sorts_like_sorted(twin):
    import random
    from array import array

    rng = random.Random(7)
    for keys in ([], [5], [3, 3, 1], [2**64 - 1, 0, 2**63, 2**63 - 1],
                 [rng.getrandbits(64) for _ in range(5000)], [rng.randrange(100) for _ in range(5000)]):
        got = twin.sort_keys(array("Q", keys))
        assert isinstance(got, array) and got.typecode == "Q" and list(got) == sorted(keys)
