"""Batch plan: global batches, rank shares, accumulation, modality grouping, determinism."""
import pytest
import torch

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


def length_plan(n=2000, group_by_length=True, modality=False, seed=0, batch=8):
    lengths = [int(x) for x in torch.randint(1, 101, (n,), generator=torch.Generator().manual_seed(5))]
    return BatchPlan(lengths, [i % 4 != 0 for i in range(n)], global_batch_size=batch, micro_batch_size=batch,
                     seed=seed, group_by_modality=modality, group_by_length=group_by_length)


def padding(p: BatchPlan, batches) -> int:
    return sum(len(b) * max(p.lengths[i] for i in b) - sum(p.lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("modality", [False, True])
def test_length_grouping_keeps_every_sample_and_cuts_the_padding(modality):
    """Batches of 8 from lengths uniform on 1..100: at random the longest of 8 is ~89 against a mean of ~50, so
    ~39 padded tokens per sample; sorted megabatches of 400 samples span ~0.25 length units per sample, so a batch
    pads ~1 token per sample. A tenth of the random padding is a loose bound on both."""
    grouped, plain = length_plan(modality=modality), length_plan(group_by_length=False, modality=modality)
    for p in (grouped, plain):
        batches = p.global_batches(0)
        assert all(len(b) == 8 for b in batches) and len(batches) == p.steps_per_epoch == 250
        assert sorted(i for b in batches for i in b) == list(range(2000))
    assert padding(grouped, grouped.global_batches(0)) < 0.1 * padding(plain, plain.global_batches(0))
    if modality:  # still one modality per batch, but for the leftovers of both (4 + 4 of 1,500 + 500) at the end
        assert all(len({grouped.has_image[i] for i in b}) == 1 for b in grouped.global_batches(0)[:-1])


def test_length_grouped_batches_come_in_random_order_and_vary_by_seed_and_epoch():
    """HF's sampler leaves each megabatch longest first; here the batches are shuffled, so the epoch has no length
    curriculum: the first 50 batches' longest samples are not in decreasing order, and the long batches are spread
    over the epoch rather than all at the start of each megabatch."""
    p = length_plan()
    batches = p.global_batches(0)
    longest = [max(p.lengths[i] for i in b) for b in batches]
    assert longest[:50] != sorted(longest[:50], reverse=True)
    halves = [sum(longest[:125]) / 125, sum(longest[125:]) / 125]
    assert abs(halves[0] - halves[1]) < 15  # each half's mean of the batch maxima is near the overall ~50
    assert batches == length_plan().global_batches(0)
    assert batches != p.global_batches(1) and batches != length_plan(seed=1).global_batches(0)


def test_the_default_plan_is_the_seeded_permutation_cut_in_order():
    """Without grouping, epoch e's batches are torch.randperm under seed * 1000003 + e cut in order, the last batch
    filled from the start: the order every earlier checkpoint was saved under (resuming needs it unchanged)."""
    p = plan(seed=3)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 1000003 + 2)).tolist()
    expected = [order[i:i + 8] for i in range(0, 48, 8)] + [order[48:] + order[:6]]
    assert p.global_batches(2) == expected
