"""The append-only progress log: round trip, torn / corrupt tails, fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from naclip.eval.metrics import joint_histogram
from naclip.eval.records import RecordLog, encode_record, read_log, read_logs, records_to_hist

FP = {"dataset": "voc21", "num_images": 3}


def _hists(n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        gt = rng.integers(0, 21, (5 + i, 7)).astype(np.uint8)
        gt[0, 0] = 255
        out.append(joint_histogram(gt, rng.integers(0, 21, gt.shape)))
    return out


def _write(path, hists, fp=FP):
    with RecordLog(path, fp) as log:
        for i, h in enumerate(hists):
            log.append(i, h)


def test_round_trip_is_exact(tmp_path):
    hists = _hists()
    _write(tmp_path / "rank0.log", hists)
    st = read_log(tmp_path / "rank0.log")
    assert st.fingerprint == FP and st.good_bytes == st.file_bytes and set(st.records) == {0, 1, 2}
    assert torch.equal(records_to_hist(st.records), sum(hists))
    assert torch.equal(records_to_hist(st.records, [0, 2]), hists[0] + hists[2])


def test_every_torn_tail_is_discarded(tmp_path):
    hists = _hists()
    path = tmp_path / "rank0.log"
    _write(path, hists)
    data = path.read_bytes()
    last = len(encode_record(2, hists[2]))
    start = len(data) - last
    for cut in range(start, len(data)):  # every prefix of the last record
        path.write_bytes(data[:cut])
        st = read_log(path)
        assert set(st.records) == {0, 1}, cut
        assert st.good_bytes == start and st.file_bytes == cut


def test_torn_header_means_nothing_committed(tmp_path):
    path = tmp_path / "rank0.log"
    _write(path, [])
    data = path.read_bytes()
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        assert read_log(path).fingerprint is None
    path.write_bytes(data[: len(data) - 1])
    _write(path, _hists(1))  # a torn header is rewritten
    assert set(read_log(path).records) == {0}


def test_corrupt_record_stops_reading(tmp_path):
    hists = _hists()
    path = tmp_path / "rank0.log"
    _write(path, hists)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # payload of the last record: checksum fails
    path.write_bytes(bytes(data))
    assert set(read_log(path).records) == {0, 1}


def test_writer_truncates_torn_tail_then_appends(tmp_path):
    hists = _hists(4)
    path = tmp_path / "rank0.log"
    _write(path, hists[:3])
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # record 2 torn
    with RecordLog(path, FP) as log:
        log.append(2, hists[2])
        log.append(3, hists[3])
    st = read_log(path)
    assert st.good_bytes == st.file_bytes
    assert torch.equal(records_to_hist(st.records), sum(hists))


def test_fingerprint_mismatch_is_refused(tmp_path):
    _write(tmp_path / "rank0.log", _hists(1))
    other = dict(FP, num_images=4)
    with pytest.raises(ValueError, match=r"different run \(differs in: num_images\)"):
        read_logs([tmp_path / "rank0.log"], other)
    with pytest.raises(ValueError, match="different run"):
        RecordLog(tmp_path / "rank0.log", other)


def test_merge_keeps_first_occurrence_and_counts_torn_bytes(tmp_path):
    hists = _hists()
    _write(tmp_path / "rank0.log", hists[:2])
    with RecordLog(tmp_path / "rank1.log", FP) as log:
        log.append(1, hists[1])  # duplicate (e.g. copied by hand)
        log.append(2, hists[2])
    with open(tmp_path / "rank1.log", "ab") as f:
        f.write(b"\x01\x02\x03")
    recs, torn = read_logs(sorted(tmp_path.glob("rank*.log")), FP)
    assert set(recs) == {0, 1, 2} and torn == 3
    assert torch.equal(records_to_hist(recs), sum(hists))


def test_foreign_file_is_an_error(tmp_path):
    p = tmp_path / "rank0.log"
    p.write_bytes(b"hello world, not a log")
    with pytest.raises(ValueError, match="not a naclip eval progress log"):
        read_log(p)
