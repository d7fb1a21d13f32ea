import pytest

from stylekit.host.batch import COND, UNCOND, chunks


def test_rows_split_evenly_in_the_order_cond_or_uncond_gives():
    got = chunks({"cond_or_uncond": [UNCOND, COND]}, 6)
    assert [(c.kind, c.rows) for c in got] == [(UNCOND, slice(0, 3)), (COND, slice(3, 6))]
    assert got[0].is_uncond and not got[1].is_uncond


def test_a_separate_pass_is_one_chunk_of_the_whole_batch():
    assert [(c.kind, c.rows) for c in chunks({"cond_or_uncond": [COND]}, 4)] == [(COND, slice(0, 4))]


def test_no_cond_or_uncond_means_a_single_cond_chunk():
    assert [(c.kind, c.rows) for c in chunks({}, 2)] == [(COND, slice(0, 2))]


def test_a_batch_that_does_not_split_is_an_error():
    with pytest.raises(ValueError, match="does not split"):
        chunks({"cond_or_uncond": [0, 1]}, 3)
