"""The preference loss (model/dpo.py): equal to TRL's DPOTrainer.dpo_loss on the same log-probs (sigmoid, IPO, cDPO),
ln 2 when the policy is its reference, per-sequence log-probs equal to a brute-force sum over the scored positions
(padded and packed), each image encoded once per pair, and only the last reply scored.

Tolerances. Against TRL: ours is computed in float64 from the same float32 inputs, TRL's in float32. The sums here
are at most 40 tokens x 4.5 nats = 180 in size, each held in float32 to 180 x 6e-8 = 1.1e-5; z is a difference of
four of them (~4.4e-5) times beta 0.1, and the loss' slope in beta z is at most 1: ~5e-6 on a loss, so atol 2e-5.
IPO divides by the token counts first (sums ~4.5: 3e-7 each) but squares (z - 5) with |z - 5| < 20: 40 x 1.2e-6 ~
5e-5, so atol 1e-4 there. Brute force: the same fp32 model on one row against a padded or packed batch: every
logit may differ by a few float32 ulps from the different matmul shapes (K = 64: ~4e-6 relative), each
log-probability by about as much, and a side's sum over <= 20 tokens of ~6 nats each by ~20 x 6 x 4e-6 = 5e-4 in the
worst case: atol 1e-3 (the sums are ~100; a wrongly included or missed position moves a sum by ~6).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import trl

if not trl.__version__.startswith("0.24."):  # the oracle is pinned with the reproduction stack (constraints/repro.txt)
    pytest.skip(f"the oracle is TRL 0.24's DPOTrainer.dpo_loss (constraints/repro.txt); TRL {trl.__version__} "
                f"reorganised it", allow_module_level=True)
from trl.trainer.dpo_trainer import DPOTrainer, FDivergenceType  # noqa: E402

from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_sft.data.dataset import Collator
from llava_sft.data.packing import PackingCollator
from llava_sft.data.preference import pair_sides, tokenize_pair
from llava_sft.data.templates import get_template
from llava_sft.model.dpo import STAT_NAMES, PreferenceLoss
from tests.test_loss import tiny_model

P = 6


def log_probs(seed: int, equal_lengths: bool = False):
    """Per-side summed log-probs [2P] (chosen, rejected, ...) of a policy and a reference, and token counts."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.full((2 * P,), 10) if equal_lengths else torch.randint(3, 41, (2 * P,), generator=g)
    policy = -(torch.rand(2 * P, generator=g) * 4 + 0.5) * counts
    reference = policy + torch.randn(2 * P, generator=g) * 3
    return policy, reference, counts


def trl_dpo_loss(policy, reference, beta, loss_type, label_smoothing):
    """TRL 0.24's DPOTrainer.dpo_loss, called on a stand-in for the trainer's attributes it reads."""
    trainer = SimpleNamespace(beta=beta, label_smoothing=label_smoothing, reference_free=False,
                              f_divergence_type=FDivergenceType.REVERSE_KL, f_divergence_params={},
                              accelerator=SimpleNamespace(device=torch.device("cpu")))
    return DPOTrainer.dpo_loss(trainer, policy[0::2], policy[1::2], reference[0::2], reference[1::2],
                               loss_type=loss_type)


@pytest.mark.parametrize("loss_type,smoothing,atol", [("sigmoid", 0.0, 2e-5), ("sigmoid", 0.2, 2e-5),
                                                      ("ipo", 0.0, 1e-4)])
def test_losses_rewards_and_gradients_equal_trl_dpo_trainer(loss_type, smoothing, atol):
    policy, reference, counts = log_probs(0)
    ours = PreferenceLoss(beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    mine = policy.clone().requires_grad_()
    losses, chosen, rejected = ours.losses(mine, reference, counts)
    [grad] = torch.autograd.grad(losses.mean(), mine)
    # TRL's concatenated_forward divides the summed log-probs by the loss mask's count for IPO before dpo_loss
    theirs = policy.clone().requires_grad_()
    normalised = theirs / counts if loss_type == "ipo" else theirs
    ref = reference / counts if loss_type == "ipo" else reference
    t_losses, t_chosen, t_rejected = trl_dpo_loss(normalised, ref, 0.1, loss_type, smoothing)
    [t_grad] = torch.autograd.grad(t_losses.mean(), theirs)
    assert losses.tolist() == pytest.approx(t_losses.tolist(), abs=atol)
    assert chosen.tolist() == pytest.approx(t_chosen.tolist(), abs=atol)
    assert rejected.tolist() == pytest.approx(t_rejected.tolist(), abs=atol)
    assert grad.tolist() == pytest.approx(t_grad.tolist(), abs=atol)
    assert losses.std() > 0.05 and grad.abs().min() > 0  # a test on values that differ, gradients that are not 0


def test_sft_term_is_trl_rpo_when_replies_are_equally_long():
    """RPO (TRL's rpo_alpha) adds the token mean of the chosen replies' NLL over the batch; ours adds each pair's
    mean token NLL, averaged over pairs: the same number when every chosen reply has the same length."""
    policy, reference, counts = log_probs(1, equal_lengths=True)
    losses, _, _ = PreferenceLoss(beta=0.1, sft_weight=0.5).losses(policy, reference, counts)
    t_losses, _, _ = trl_dpo_loss(policy, reference, 0.1, "sigmoid", 0.0)
    nll = -policy[0::2].sum() / counts[0::2].sum()  # TRL: cross-entropy mean over the chosen tokens
    assert float(losses.mean()) == pytest.approx(float(t_losses.mean() + 0.5 * nll), abs=2e-5)


# ------------------------------------------------------------------------------------- through the model
def pair(prompt: list[int], chosen: list[int], rejected: list[int], n_images: int, seed: int) -> dict:
    """A pair sample as PreferenceDataset gives it: both sides' ids, labels on the reply only, the images once."""
    g = torch.Generator().manual_seed(seed)
    sample = {"id": f"p{seed}", "images": torch.randn(n_images, 3, 32, 32, generator=g), "truncated": 0}
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        ids = torch.tensor(prompt + reply)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[len(prompt):] = ids[len(prompt):]
        sample[f"{side}_ids"], sample[f"{side}_labels"] = ids, labels
    return sample


def pairs():
    image = IMAGE_TOKEN_INDEX
    return [pair([1, image, 20, 21, 22], [30, 31, 32, 2], [33, 34, 2], 1, 0),
            pair([1, 40, 41, 42], [50, 51, 2], [52, 53, 54, 55, 56, 2], 0, 1),  # text only
            pair([1, image, 60, image, 61], [70, 71, 72, 2], [73, 2], 2, 2)]


def padded_pairs(items):
    return Collator(0, pair_sides)(items)


def packed_pairs(items):
    [batch] = PackingCollator(0, 16, 4096, 4, pair_sides)(items)
    return batch


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "images", "labels", "image_index", "pairs", "reference_logps")
    return {k: batch[k] for k in keys if k in batch}


def brute_force_logps(model, sample: dict, side: str) -> float:
    """One side alone, every position's logits: the sum of log-softmax at the labelled next tokens."""
    ids, labels = sample[f"{side}_ids"][None], sample[f"{side}_labels"][None]
    logits, spliced = model.logits_and_labels(ids, torch.ones_like(ids), sample["images"], labels)
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    targets = spliced[0, 1:]
    keep = targets.ne(IGNORE_INDEX)
    return float(logp[keep].gather(1, targets[keep][:, None]).sum().detach())


@pytest.mark.parametrize("layout", [padded_pairs, packed_pairs], ids=["padded", "packed"])
def test_sequence_logps_equal_a_brute_force_sum_over_the_scored_positions(llama_tokenizer_dir, layout):
    model = tiny_model(llama_tokenizer_dir).eval()
    items = pairs()
    batch = layout(items)
    with torch.no_grad():
        spliced = model.embed(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"],
                              image_index=batch.get("image_index"))
        logps, counts = model.sequence_logps(spliced, batch["attention_mask"])
    in_batch = [next(s for s in items if s["id"] == i) for i in batch["ids"]]  # packing orders pairs by length
    assert len(in_batch) == batch["pairs"] == 3
    expected = [brute_force_logps(model, s, side) for s in in_batch for side in ("chosen", "rejected")]
    assert logps.tolist() == pytest.approx(expected, abs=1e-3)
    # the scored tokens: each reply and its end-of-turn id, nothing of the prompt or the images
    assert counts.tolist() == [len(s[f"{side}_ids"]) - int(s[f"{side}_labels"].eq(IGNORE_INDEX).sum())
                               for s in in_batch for side in ("chosen", "rejected")]
    assert sorted(counts.tolist()) == [2, 3, 3, 4, 4, 6]


def test_each_image_is_encoded_once_per_pair_for_both_sides(llama_tokenizer_dir):
    model = tiny_model(llama_tokenizer_dir).eval()
    seen = []
    model.vision_tower.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    batch = padded_pairs(pairs())
    assert batch["images"].shape[0] == 3 and batch["image_index"].tolist() == [0, 0, 1, 2, 1, 2]
    with torch.no_grad():
        spliced = model.embed(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"],
                              image_index=batch["image_index"])
        once = model.sequence_logps(spliced, batch["attention_mask"])[0]
    assert seen == [3]  # 3 images (1 + 0 + 2) for 6 sequences, not 6
    # the same logps as a batch in which each side has its own copy of its images (encoded twice)
    separate = [{"id": s["id"], "truncated": 0, "sides": [{**side, "images": side["images"].clone()}
                                                          for side in pair_sides(s)]} for s in pairs()]
    twice = Collator(0, lambda s: s["sides"])(separate)
    assert "image_index" not in twice and twice["images"].shape[0] == 6
    with torch.no_grad():
        spliced = model.embed(twice["input_ids"], twice["attention_mask"], twice["images"], twice["labels"])
        assert model.sequence_logps(spliced, twice["attention_mask"])[0].tolist() == pytest.approx(
            once.tolist(), abs=1e-4)


def test_policy_equal_to_its_reference_gives_ln2_and_zero_margins(llama_tokenizer_dir):
    model = tiny_model(llama_tokenizer_dir)
    model.preference = PreferenceLoss(beta=0.1, reference="copy")
    model.keep_reference_copy()
    model.set_trainable(True, True)
    batch = padded_pairs(pairs())
    loss, n_pairs, stats = model(**model_inputs(batch))
    assert n_pairs == 3
    assert float(loss) / n_pairs == pytest.approx(math.log(2), abs=1e-6)
    means = dict(zip(STAT_NAMES, (stats / n_pairs).tolist(), strict=True))
    assert means["rewards/margins"] == means["rewards/chosen"] == means["rewards/rejected"] == 0.0
    loss.backward()  # at z = 0 the gradient is -beta/2 dz: not zero
    assert model.llm.get_output_embeddings().weight.grad.abs().sum() > 0


def test_a_precomputed_reference_gives_the_loss_of_the_copy(llama_tokenizer_dir):
    """The precomputed numbers (return_logps, as train/reference.py stores them) in the batch give the loss the
    frozen copy gives, after the policy has moved."""
    model = tiny_model(llama_tokenizer_dir)
    batch = padded_pairs(pairs())
    with torch.no_grad():
        stored, _ = model(**model_inputs(batch), return_logps=True)
    model.keep_reference_copy()
    with torch.no_grad():
        for p in model.llm.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.preference = PreferenceLoss(beta=0.1, reference="copy")
    copy_loss, _, copy_stats = model(**model_inputs(batch))
    model.preference = PreferenceLoss(beta=0.1, reference="precomputed")
    given_loss, _, given_stats = model(**model_inputs(batch), reference_logps=stored.double())
    assert abs(float(copy_loss) - math.log(2) * 3) > 1e-3  # the policy has moved from its reference
    assert float(given_loss) == pytest.approx(float(copy_loss), abs=1e-6)
    assert given_stats.tolist() == pytest.approx(copy_stats.tolist(), abs=1e-6)


def test_only_the_last_reply_and_its_end_of_turn_are_scored(llama_tokenizer):
    """A two-turn prompt: the earlier reply, the prompt and the image carry no label on either side."""
    template = get_template("vicuna_v1")
    record = {"conversations": [{"from": "human", "value": "<image>\nWhat color is the circle?"},
                                {"from": "gpt", "value": "The circle is red."},
                                {"from": "human", "value": "Is there a square?"}],
              "chosen": "Yes, a blue square.", "rejected": "No, there is no square."}
    (c_ids, c_labels), (r_ids, r_labels) = tokenize_pair(record, llama_tokenizer, template, 1, "two-turn")
    for ids, labels, reply in ((c_ids, c_labels, record["chosen"]), (r_ids, r_labels, record["rejected"])):
        assert len(ids) == len(labels)
        scored = [t for t in labels if t != IGNORE_INDEX]
        assert scored[-1] == llama_tokenizer.eos_token_id
        assert llama_tokenizer.decode(scored[:-1]).strip() == reply
        assert labels[-len(scored):] == scored  # the reply is the end of the sequence
    first = next(i for i, t in enumerate(c_labels) if t != IGNORE_INDEX)
    assert c_ids[:first] == r_ids[:first]  # the same prompt, the earlier reply included
    assert "The circle is red." in llama_tokenizer.decode([t for t in c_ids[:first] if t >= 0])
