"""benchmarks.secagg measures what it says: the secure round sums correctly and counts more bytes than plain."""

from benchmarks.secagg import DIM, _round


def test_secure_and_plain_rows_of_three_silos():
    plain, secure, dropped = _round("plain", 3, 1, False), _round("secagg", 3, 1, False), _round("secagg", 3, 1, True)
    assert plain["up"] >= 4 * DIM and secure["up"] >= 4 * DIM  # float32 / uint32 vectors on the wire
    assert secure["total"] > plain["total"]  # keys and ciphertexts come on top
    assert plain["error"] < 1e-6 and secure["error"] < 3 * 2.0 / ((2**32 - 1) // 3) and dropped["error"] < 1e-6
    assert dropped["up"] < secure["up"]  # the dropped silo uploads no masked vector
