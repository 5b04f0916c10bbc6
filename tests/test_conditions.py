"""Tests for the Table 1 alt-text conditions."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from altogether.conditions import CONDITIONS, build_conditions, random_alt_permutation

ALTS = [f"alt text number {i}" for i in range(12)]


def test_with_and_without_alt():
    built = build_conditions(ALTS, seed=0)
    assert list(built) == list(CONDITIONS)
    assert built["w/ alt"] == ALTS
    assert built["w/o alt"] == [""] * len(ALTS)


def test_random_alt_is_another_records_alt():
    built = build_conditions(ALTS, seed=3)
    random_alts = built["w/ random alt"]
    assert all(mine != borrowed for mine, borrowed in zip(ALTS, random_alts))
    # A permutation: every alt-text is used exactly once.
    assert sorted(random_alts) == sorted(ALTS)


def test_random_alt_is_deterministic_by_seed():
    first = build_conditions(ALTS, seed=7)["w/ random alt"]
    assert build_conditions(ALTS, seed=7)["w/ random alt"] == first
    others = {tuple(build_conditions(ALTS, seed=s)["w/ random alt"]) for s in range(8, 14)}
    assert any(other != tuple(first) for other in others)


def test_names_select_and_order_conditions():
    built = build_conditions(ALTS, seed=0, names=["w/ random alt", "w/ alt"])
    assert list(built) == ["w/ random alt", "w/ alt"]


@pytest.mark.parametrize(
    "names, message",
    [(["w/ alt", "with alt"], "unknown condition"), (["w/ alt", "w/ alt"], "more than once")],
)
def test_bad_names_raise(names, message):
    with pytest.raises(ValueError, match=message):
        build_conditions(ALTS, seed=0, names=names)


def test_single_string_names_raise():
    with pytest.raises(TypeError, match="single string"):
        build_conditions(ALTS, seed=0, names="w/ alt")


def test_one_record_cannot_borrow_but_others_work():
    with pytest.raises(ValueError, match="at least 2 records"):
        build_conditions(["only"], seed=0)
    assert build_conditions(["only"], seed=0, names=["w/ alt", "w/o alt"]) == {"w/ alt": ["only"], "w/o alt": [""]}
    assert build_conditions([], seed=0) == {name: [] for name in CONDITIONS}


def test_non_string_alt_text_is_named():
    with pytest.raises(TypeError, match=r"alt_texts\[1\]"):
        build_conditions(["a", None], seed=0)


def test_duplicate_alt_texts_avoided_where_possible():
    # 4 of 10 records share one alt-text: a permutation exists that gives nobody an identical string.
    alts = ["same"] * 4 + [f"other {i}" for i in range(6)]
    for seed in range(20):
        built = build_conditions(alts, seed=seed)["w/ random alt"]
        assert all(mine != borrowed for mine, borrowed in zip(alts, built))


@settings(max_examples=200, deadline=None)
@given(alts=st.lists(st.sampled_from(["a", "b", "c", "d", ""]), min_size=2, max_size=15), seed=st.integers(0, 10**6))
def test_random_permutation_properties(alts, seed):
    perm = random_alt_permutation(alts, seed)
    assert sorted(perm) == list(range(len(alts)))
    assert all(perm[i] != i for i in range(len(alts)))
    # Identical strings only where no permutation avoids them: the minimum is max(0, 2m - n).
    largest = max(Counter(alts).values())
    collisions = sum(alts[i] == alts[perm[i]] for i in range(len(alts)))
    assert collisions == max(0, 2 * largest - len(alts))
