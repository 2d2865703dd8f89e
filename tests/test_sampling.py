"""The resumable, rank-sharded batch order."""

import pytest

from fusion.data.sampling import EpochBatchSampler


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_once_per_epoch_across_ranks(world_size):
    samplers = [EpochBatchSampler(30, 4, shuffle=True, seed=7, rank=r, world_size=world_size)
                for r in range(world_size)]
    seen = [i for s in samplers for batch in epoch_batches(s, 3) for i in batch]
    assert len(seen) == len(set(seen))  # never twice
    assert len(seen) == 30 // world_size // 4 * 4 * world_size  # only the last partial global batch is dropped
    assert len({len(list(s)) for s in samplers}) == 1  # ranks stay in step


def test_order_is_seeded_and_changes_per_epoch():
    a, b = EpochBatchSampler(50, 5, shuffle=True, seed=1), EpochBatchSampler(50, 5, shuffle=True, seed=1)
    assert epoch_batches(a, 0) == epoch_batches(b, 0)
    assert epoch_batches(a, 1) != epoch_batches(b, 0)
    assert epoch_batches(EpochBatchSampler(50, 5, shuffle=True, seed=2), 0) != epoch_batches(b, 0)


def test_restored_state_continues_at_the_first_unconsumed_batch():
    full = epoch_batches(EpochBatchSampler(40, 4, shuffle=True, seed=3), 2)
    sampler = EpochBatchSampler(40, 4, shuffle=True, seed=3)
    sampler.set_epoch(2)
    sampler.consumed = 6
    resumed = EpochBatchSampler(40, 4, shuffle=True, seed=3)
    resumed.load_state_dict(sampler.state_dict())
    resumed.set_epoch(2)  # Lightning calls this again on resume: same epoch, position kept
    assert list(resumed) == full[6:]
    resumed.set_epoch(3)  # a new epoch starts from its beginning
    assert len(list(resumed)) == len(full)


def test_state_from_another_order_is_refused():
    state = EpochBatchSampler(40, 4, shuffle=True, seed=3).state_dict()
    with pytest.raises(ValueError, match="same recipe"):
        EpochBatchSampler(40, 8, shuffle=True, seed=3).load_state_dict(state)


def test_validation_order_pads_so_ranks_stay_in_step():
    samplers = [EpochBatchSampler(10, 4, shuffle=False, rank=r, world_size=3, drop_last=False) for r in range(3)]
    batches = [list(s) for s in samplers]
    assert {len(b) for b in batches} == {1}
    assert set(range(10)) <= {i for b in batches for batch in b for i in batch}


def test_the_loader_starts_the_next_epoch_after_a_finished_one():
    """Lightning never calls `set_epoch` on a batch sampler: the loader itself moves on once an epoch is used up
    (a recipe with max_epochs > 1 once trained only its first epoch)."""
    from fusion.data.sampling import ResumableLoader

    loader = ResumableLoader(list(range(20)), EpochBatchSampler(20, 4, shuffle=True, seed=5))
    epochs = []
    for _ in range(3):
        batches = []
        for batch in loader:
            batches.append(batch.tolist())
            loader.batch_consumed()
        epochs.append(batches)
    assert [len(e) for e in epochs] == [5, 5, 5]
    assert epochs[0] != epochs[1] != epochs[2]
    assert all(sorted(i for b in e for i in b) == list(range(20)) for e in epochs)
    assert loader.state_dict()["epoch"] == 2
