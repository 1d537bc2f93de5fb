"""The preference loss (Stage 3): DPO and IPO on the last reply of each side, with the reference three ways.

A preference micro-batch (data/preference.py) holds, for each pair, its chosen and its rejected side as two
sequences (padded rows, or two segments of one packed row), chosen first, and each image once (`image_index`).
The policy's log-probability of a side, log pi(y|x), is the sum over its scored tokens (the last reply and its
end-of-turn: data/preference.py) of the fp32 log-softmax at the target, computed on the supervised rows only
(model/loss.py: supervised_logps). With z = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):

  sigmoid  -(1 - eps) log sigma(beta z) - eps log sigma(-beta z)     DPO, Rafailov et al. 2023, eq. 7; eps > 0
                                                                     is cDPO (Mitchell 2023), dpo.label_smoothing
  ipo      (z - 1 / (2 beta))^2, the log-probs each divided by the   IPO, Azar et al. 2023, eq. 17, with TRL's
           side's scored-token count                                 length normalisation (trl DPOTrainer)
  + sft_weight x (-log pi(y_w)) / |y_w|                              RPO (Pang et al. 2024): the chosen reply's
                                                                     mean token NLL, per pair. TRL's rpo_alpha
                                                                     takes the token mean over a micro-batch's
                                                                     chosen tokens instead: equal when the replies
                                                                     are equally long; per pair, it does not
                                                                     depend on how pairs are split into batches.

Rewards (logged): beta (log pi - log pi_ref) of each side, margins their difference, accuracy the share of pairs
whose chosen reward is the larger -- TRL's definitions. The loss of a step is the mean over the global batch's
pairs (train/trainer.py counts pairs as it counts supervised tokens for SFT). Tested against TRL's own
`DPOTrainer.dpo_loss` in tests/test_dpo_loss.py.

The reference (dpo.reference):
  precomputed   the batch carries its log-probs (train/reference.py computed them with the starting model);
  copy          a frozen copy of the starting model, kept beside the policy (`LlavaModel.reference_model`) and
                distributed by the engine (ZeRO-3, FSDP2: sharded; train/engines/*.py prepare_frozen);
  adapters_off  LoRA: the policy's own LLM with its adapters disabled, on the policy's image features (the projector
                and tower are frozen: config.py refuses otherwise), under no_grad.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

STAT_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
              "logps/rejected")


@dataclass
class PreferenceLoss:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    reference: str = "precomputed"

    @classmethod
    def of(cls, dpo) -> "PreferenceLoss":
        return cls(dpo.beta, dpo.loss_type, dpo.label_smoothing, dpo.sft_weight, dpo.reference)

    def losses(self, policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor):
        """Per-pair losses and rewards from per-side log-probs [2P] (chosen, rejected, chosen, ...), in fp32.
        -> (losses [P], chosen rewards [P], rejected rewards [P])."""
        # in float64: z is a difference of sums over hundreds of tokens (log-probs of -300 and more), where float32's
        # 7 digits leave ~3e-5 of the differences that decide the loss; the vectors are [pairs] long
        policy, reference, counts = policy.double(), reference.double().to(policy.device), counts.to(policy.device)
        nll = -policy[0::2] / counts[0::2]  # the chosen reply's mean token NLL (sft_weight)
        if self.loss_type == "ipo":
            policy, reference = policy / counts, reference / counts
        pc, pr, rc, rr = policy[0::2], policy[1::2], reference[0::2], reference[1::2]
        z = (pc - pr) - (rc - rr)
        if self.loss_type == "sigmoid":
            losses = (-F.logsigmoid(self.beta * z) * (1 - self.label_smoothing)
                      - F.logsigmoid(-self.beta * z) * self.label_smoothing)
        elif self.loss_type == "ipo":
            losses = (z - 1 / (2 * self.beta)) ** 2
        else:
            raise ValueError(f"unknown dpo.loss_type {self.loss_type!r}")
        if self.sft_weight:
            losses = losses + self.sft_weight * nll
        return losses, self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()

    def __call__(self, policy: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor, pairs: int):
        """(sum of the micro-batch's pair losses, pairs, sums of STAT_NAMES' quantities) for the policy's per-side
        log-probs; `pairs` 0 (a no-op batch) gives a zero that reaches every module the forward used."""
        if not pairs:
            zero = policy.sum() * 0.0
            return zero, 0, torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=policy.device)
        policy, reference, counts = policy[:2 * pairs], reference[:2 * pairs], counts[:2 * pairs]
        losses, chosen, rejected = self.losses(policy, reference, counts)
        stats = torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum(), (chosen > rejected).sum(),
                             policy[0::2].detach().double().sum(), policy[1::2].detach().double().sum()])
        return losses.sum().to(policy.dtype), pairs, stats


def sequence_index(attention_mask: torch.Tensor, spliced_segments: torch.Tensor) -> torch.Tensor:
    """The sequence number of every position of a spliced batch, in order of appearance (row by row, segment by
    segment); -1 at padding. `attention_mask`: the collated one (0/1 padded, or a packed row's segment ids 1..k),
    `spliced_segments`: the spliced batch's 0/1 mask or segment ids, on its positions."""
    per_row = attention_mask.max(dim=1).values.clamp(min=1)  # sequences in each row (a padded row: 1)
    first = per_row.cumsum(0) - per_row
    return torch.where(spliced_segments.ne(0), first[:, None] + spliced_segments - 1, -1)


def sequence_sums(values: torch.Tensor, sequence_of_value: torch.Tensor, sequences: int):
    """(per-sequence sum of `values`, per-sequence count) for values tagged with their sequence number."""
    sums = values.new_zeros(sequences).index_add(0, sequence_of_value, values)
    counts = torch.zeros(sequences, dtype=torch.long, device=values.device).index_add(
        0, sequence_of_value, torch.ones_like(sequence_of_value))
    return sums, counts


def disable_dropout(module: torch.nn.Module) -> int:
    """Dropout off everywhere (nn.Dropout modules, LoRA's included, and the float `*dropout` attributes that
    transformers' attention reads in training mode): the policy's log-probs must be those the reference's were
    computed like (TRL's disable_dropout does the modules only). -> the number of settings turned to zero."""
    changed = 0
    for sub in module.modules():
        if isinstance(sub, torch.nn.Dropout) and sub.p:
            sub.p, changed = 0.0, changed + 1
        for name in ("attention_dropout", "dropout"):
            value = getattr(sub, name, None)
            if isinstance(value, float) and value and not isinstance(sub, torch.nn.Dropout):
                setattr(sub, name, 0.0)
                changed += 1
    return changed
