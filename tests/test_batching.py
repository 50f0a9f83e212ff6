"""Tests for w2vbert_asr.batching: caps, coverage, determinism, distribution, resume."""

import numpy as np
import pytest
import torch

from w2vbert_asr.batching import DurationBatchSampler, greedy_batches, padding_share

MAX_SECONDS = 60.0
MAX_BATCH_SIZE = 16


def speech_durations(n: int = 2000, seed: int = 0) -> np.ndarray:
    """Log-normal durations clipped to 1-10 s (median 4.5 s), like read-speech corpora."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(4.5), 0.45, n), 1.0, 10.0)


def flat(batches):
    return [i for b in batches for i in b]


@pytest.fixture
def durations():
    return speech_durations()


def test_caps_respected(durations):
    for bucket_width in (None, 0.5):
        s = DurationBatchSampler(durations, MAX_SECONDS, MAX_BATCH_SIZE, bucket_width=bucket_width)
        batches = list(s)
        assert batches
        for b in batches:
            assert 1 <= len(b) <= MAX_BATCH_SIZE
            assert len(b) * durations[b].max() <= MAX_SECONDS + 1e-9


def test_each_index_exactly_once(durations):
    for bucket_width in (None, 0.5):
        s = DurationBatchSampler(durations, MAX_SECONDS, MAX_BATCH_SIZE, bucket_width=bucket_width)
        batches = list(s)
        assert len(batches) == len(s)
        assert sorted(flat(batches)) == list(range(len(durations)))


def test_overlong_utterance_forms_batch_of_one():
    d = np.array([2.0, 3.0, 90.0, 2.5, 150.0, 1.0])
    batches = list(DurationBatchSampler(d, MAX_SECONDS, MAX_BATCH_SIZE))
    assert [2] in batches and [4] in batches
    assert sorted(flat(batches)) == list(range(len(d)))
    # Normal utterances are not forced into batches of one by sharing a bucket with them.
    assert any(len(b) > 1 for b in batches)


def test_deterministic_from_seed(durations):
    a = list(DurationBatchSampler(durations, MAX_SECONDS, MAX_BATCH_SIZE, seed=3))
    torch.manual_seed(123)  # global RNG state must not matter
    np.random.seed(123)
    b = list(DurationBatchSampler(durations, MAX_SECONDS, MAX_BATCH_SIZE, seed=3))
    c = list(DurationBatchSampler(durations, MAX_SECONDS, MAX_BATCH_SIZE, seed=4))
    assert a == b
    assert a != c


def test_epochs_differ_in_order_and_composition(durations):
    s = DurationBatchSampler(durations, MAX_SECONDS, MAX_BATCH_SIZE)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert len(e0) == len(e1) == len(s)
    assert e0 != e1
    # Within-bucket shuffling: not just the same batches in another order.
    assert {tuple(sorted(b)) for b in e0} != {tuple(sorted(b)) for b in e1}
    s.set_epoch(0)
    assert list(s) == e0


def test_no_shuffle_is_sorted_and_fixed(durations):
    s = DurationBatchSampler(durations, MAX_SECONDS, MAX_BATCH_SIZE, shuffle=False)
    e0 = list(s)
    s.set_epoch(5)
    assert list(s) == e0
    assert np.all(np.diff(durations[flat(e0)]) >= 0)


@pytest.mark.parametrize("n", [2000, 2002, 40])  # 187, 186 and 7 batches: odd and even totals
def test_two_ranks_equal_length_and_disjoint(n):
    d = speech_durations(n)
    ranks = [DurationBatchSampler(d, MAX_SECONDS, MAX_BATCH_SIZE, num_replicas=2, rank=r) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    out = [list(s) for s in ranks]
    assert len(out[0]) == len(out[1]) == len(ranks[0]) == len(ranks[1])
    seen = [set(flat(b)) for b in out]
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(n))
    # Remainder handling: a short rank repeats one of its own batches, nothing else repeats.
    total = DurationBatchSampler(d, MAX_SECONDS, MAX_BATCH_SIZE)._num_batches
    dupes = sum(len(b) - len({tuple(x) for x in b}) for b in out)
    assert dupes == (-total) % 2


def test_fewer_batches_than_ranks_still_equal_length():
    d = np.array([2.0, 3.0, 2.5])  # one batch, three ranks
    out = [list(DurationBatchSampler(d, MAX_SECONDS, MAX_BATCH_SIZE, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(b) for b in out] == [1, 1, 1]
    assert all(sorted(b[0]) == [0, 1, 2] for b in out)  # documented fallback: repeat the batch


def test_resume_mid_epoch_yields_exactly_remaining(durations):
    s = DurationBatchSampler(durations, MAX_SECONDS, MAX_BATCH_SIZE, seed=7, num_replicas=2, rank=1)
    s.set_epoch(3)
    full = list(s)
    k = 5
    for step, _batch in enumerate(s):  # training loop: step, then advance, then checkpoint
        s.advance()
        if step + 1 == k:
            break
    state = s.state_dict()
    assert state == {"epoch": 3, "batches_done": k}

    fresh = DurationBatchSampler(durations, MAX_SECONDS, MAX_BATCH_SIZE, seed=7, num_replicas=2, rank=1)
    fresh.load_state_dict(state)
    fresh.set_epoch(3)  # a resumed loop re-sets the same epoch: must keep the position
    assert list(fresh) == full[k:]
    fresh.advance(len(full) - k)
    assert list(fresh) == []
    fresh.set_epoch(4)  # next epoch starts from its beginning
    assert fresh.state_dict() == {"epoch": 4, "batches_done": 0}
    assert len(list(fresh)) == len(fresh)


def test_bad_state_and_input_rejected(durations):
    s = DurationBatchSampler(durations, MAX_SECONDS, MAX_BATCH_SIZE)
    with pytest.raises(ValueError, match="batches_done"):
        s.load_state_dict({"epoch": 0, "batches_done": len(s) + 1})
    with pytest.raises(KeyError, match="batches_done"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match=r"durations\[1\]"):
        DurationBatchSampler([1.0, float("nan"), 2.0], MAX_SECONDS, MAX_BATCH_SIZE)
    with pytest.raises(ValueError, match="rank"):
        DurationBatchSampler(durations, MAX_SECONDS, MAX_BATCH_SIZE, num_replicas=2, rank=2)


def test_padding_share_low_on_speech_durations():
    d = speech_durations(20000)
    ours = padding_share(list(DurationBatchSampler(d, 200.0, 32)), d)
    rng = np.random.default_rng(0)
    random = padding_share(greedy_batches(rng.permutation(len(d)), d, 200.0, 32), d)
    assert ours <= 0.03
    assert random > 5 * ours


def test_padding_share_definition():
    d = np.array([1.0, 3.0, 2.0])
    assert padding_share([[0], [1], [2]], d) == 0.0
    # One batch padded to 3 s: 9 s total, 6 s real -> 1/3 padding.
    assert padding_share([[0, 1, 2]], d) == pytest.approx(1 / 3)


class _Lengths(torch.utils.data.Dataset):
    def __init__(self, d):
        self.d = d

    def __len__(self):
        return len(self.d)

    def __getitem__(self, i):
        return torch.zeros(int(self.d[i] * 100)), i  # (T,) at 100 frames/s


def _pad_collate(items):
    feats, idx = zip(*items)
    return torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), torch.tensor(idx)


def test_dataloader_batch_sampler(durations):
    d = durations[:300]
    s = DurationBatchSampler(d, MAX_SECONDS, MAX_BATCH_SIZE)
    loader = torch.utils.data.DataLoader(_Lengths(d), batch_sampler=s, collate_fn=_pad_collate)
    assert len(loader) == len(s)
    seen = []
    for feats, idx in loader:
        assert feats.shape[0] == len(idx) <= MAX_BATCH_SIZE  # (B, T)
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(d)))
