"""LruIndex (kmsguard.lru): exactly least-recently-used under uses and inserts, bounded heap."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from kmsguard.fastpath import next_tick
from kmsguard.lru import LruIndex


class Value:
    """Records its own last use, as a Budget or a plan does."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.last_used = next_tick()

    def use(self) -> None:
        self.last_used = next_tick()


def recency(value: Value) -> int:
    return value.last_used


ops = st.lists(st.tuples(st.sampled_from(["use", "put", "drop"]), st.integers(0, 11)), max_size=300)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 6), steps=ops)
def test_evicts_exactly_the_least_recently_used(capacity: int, steps: list[tuple[str, int]]) -> None:
    """Against a model that moves each used or inserted key to the end of an OrderedDict."""
    index: LruIndex[int, Value] = LruIndex(capacity, recency)
    model: OrderedDict[int, Value] = OrderedDict()
    for op, key in steps:
        if op == "use" and key in model:
            model[key].use()  # the index is not told: the value records its use itself
            model.move_to_end(key)
        elif op == "put":
            value = Value(f"{key}")
            expected = None
            if key in model:
                model.move_to_end(key)
            elif len(model) >= capacity:
                expected = model.popitem(last=False)[1]
            model[key] = value
            assert index.put(key, value) is expected
        elif op == "drop" and key in model:
            assert index.discard(key, model.pop(key))
        assert set(index.items) == set(model)
        assert len(index) <= capacity


def test_a_replaced_or_dropped_value_is_never_evicted_or_dropped_again() -> None:
    index: LruIndex[str, Value] = LruIndex(2, recency)
    old, new = Value("old"), Value("new")
    index.put("a", old)
    index.put("a", new)
    assert not index.discard("a", old)  # not the value there any more
    index.put("b", Value("b"))
    assert index.put("c", Value("c")) is new


def test_the_heap_stays_bounded_under_churn() -> None:
    index: LruIndex[int, Value] = LruIndex(10, recency)
    values = {}
    for i in range(10_000):
        values[i] = Value(str(i))
        index.put(i, values[i])
        if i % 3 == 0:
            index.discard(i, values[i])
        for j in range(max(0, i - 5), i):
            values[j].use()
    assert len(index) <= 10
    assert len(index._heap) <= 2 * 10 + 64 + 1
