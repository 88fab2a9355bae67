"""What the ledger's subject modules share (ledger.common); the rest is exercised through them."""

from ledger.common import chunks


def test_chunks_stay_under_sqlites_parameter_limit() -> None:
    assert [len(c) for c in chunks(list(range(1801)))] == [900, 900, 1]
    assert [list(c) for c in chunks([1, 2])] == [[1, 2]]
    assert list(chunks([])) == []
