"""hypothesis strategies for plugin tests (importable only when hypothesis is installed).

    from hypothesis import given
    from extproc_host.testing.strategies import splits

    @given(splits())
    def test_any_cut(split):
        assert runner.exchange(request(BODY), splits=split).upstream.body == EXPECTED

A failing example shrinks to the fewest, smallest cuts and prints as ``split_at(...)``.
"""

from __future__ import annotations

from hypothesis import strategies as st

from .splits import split_at


def splits(max_offset: int = 4096, max_cuts: int = 8) -> st.SearchStrategy[split_at]:
    """Splitters cutting bodies at up to ``max_cuts`` offsets below ``max_offset`` (offsets
    past a body's end are ignored; a repeated offset gives an empty chunk)."""
    return st.lists(st.integers(0, max_offset), max_size=max_cuts).map(lambda offsets: split_at(*offsets))


def bodies(max_size: int = 4096) -> st.SearchStrategy[bytes]:
    """Request or response bodies: any bytes up to ``max_size``."""
    return st.binary(max_size=max_size)
