"""Batch plan: global batches, rank shares, accumulation, modality grouping, determinism."""
import pytest

from llava_sft.data.sampler import BatchPlan


def plan(n=50, world=1, rank=0, group=False, seed=0, images=None):
    has_image = images if images is not None else [i % 3 != 0 for i in range(n)]
    lengths = [(i * 37) % 101 for i in range(n)]
    return BatchPlan(lengths, has_image, global_batch_size=8, micro_batch_size=2, world_size=world, rank=rank,
                     seed=seed, group_by_modality=group)


@pytest.mark.parametrize("group", [False, True])
def test_every_sample_once_per_epoch_and_constant_global_batch(group):
    p = plan(group=group)
    # leftovers of both modalities together exceed one global batch: 7 image + 7 text-only samples
    q = plan(n=30, group=group, images=[i < 15 for i in range(30)])
    assert all(len(b) == 8 for b in q.global_batches(0)) and len(q.global_batches(0)) == q.steps_per_epoch == 4
    assert set(i for b in q.global_batches(0) for i in b) == set(range(30))
    batches = p.global_batches(epoch=0)
    assert all(len(b) == 8 for b in batches) and len(batches) == p.steps_per_epoch == 7
    flat = [i for b in batches for i in b]
    assert set(flat) == set(range(50))
    assert len(flat) - 50 == p.repeated_per_epoch() == 6  # the last batch is filled, and that is reported


def test_deterministic_for_a_seed_and_different_across_epochs_and_seeds():
    assert plan(group=True).global_batches(0) == plan(group=True).global_batches(0)
    assert plan().global_batches(0) != plan().global_batches(1)
    assert plan().global_batches(0) != plan(seed=1).global_batches(0)


def test_modality_grouping_keeps_batches_pure_and_sorted_by_length():
    p = plan(n=64, group=True)
    batches = p.global_batches(0)
    mixed = [b for b in batches if len({p.has_image[i] for i in b}) > 1]
    assert all(b is batches[-1] or b is batches[-2] for b in mixed)  # only the leftovers mix, at the end
    for b in batches[:-1]:
        assert [p.lengths[i] for i in b] == sorted((p.lengths[i] for i in b), reverse=True)


def test_ranks_split_each_global_batch_into_disjoint_micro_batches():
    plans = [plan(world=2, rank=r) for r in range(2)]
    assert plans[0].accumulation_steps == 2  # 8 = 2 ranks x 2 accumulation x 2 micro
    for gb in plans[0].global_batches(0):
        shares = [[i for mb in p.micro_batches(gb) for i in mb] for p in plans]
        assert all(len(mb) == 2 for p in plans for mb in p.micro_batches(gb))
        assert sorted(shares[0] + shares[1]) == sorted(gb)


def test_indivisible_global_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of world_size x micro_batch_size"):
        BatchPlan([1] * 10, [True] * 10, global_batch_size=10, micro_batch_size=4)


def test_strided_shares_split_a_sorted_batch_evenly():
    """Packing takes strided rank shares: each rank gets long and short samples of a length-sorted batch."""
    shares = {}
    for rank in range(2):
        p = BatchPlan([(i * 37) % 101 for i in range(40)], [True] * 40, global_batch_size=8, micro_batch_size=4,
                      world_size=2, rank=rank, group_by_modality=True, strided_shares=True)
        batch = p.global_batches(0)[0]
        [shares[rank]] = p.micro_batches(batch)
        assert shares[rank] == batch[rank::2]
    assert sorted(shares[0] + shares[1]) == sorted(batch)  # the whole global batch, no sample twice
    lengths = [(i * 37) % 101 for i in range(40)]
    assert lengths[shares[0][0]] >= lengths[shares[1][0]] >= lengths[shares[0][1]]  # interleaved, not halves
