"""Padding-free packing: rows of several samples behave exactly like the samples run alone.

Mixed batches (one-image, two-image and text-only samples) on the tiny model in fp32, for every way
attention is isolated: the 4-D block mask with sdpa and with eager attention, and the flattened
varlen path (cu_seq_lens) that flash attention takes, run here through a CPU reference kernel
registered as an attention implementation (flash-attn itself needs a GPU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import save_config
from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_sft.data.dataset import Collator
from llava_sft.data.packing import PackingCollator, expanded_length, pack_rows
from llava_sft.train.trainer import DDPEngine, accumulate_gradients, build, seed_everything, train
from tests.tiny import forward_passes, run_config

# "varlen" in the name: model/packed_attention.py flattens for it. Not "flash": transformers 5.x looks a name with
# "flash" up on the kernels hub. It builds no mask (as flash attention): the cu_seq_lens carry the boundaries.
VARLEN = "varlen_reference_cpu"
CALLS = {"varlen": 0}


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     cu_seq_lens_k=None, max_length_q=None, **kwargs):
    """What flash_attn_varlen_func computes: causal attention within each [cu[i], cu[i+1]) of one flattened row."""
    assert attention_mask is None and query.shape[0] == 1 and cu_seq_lens_q is not None
    assert torch.equal(cu_seq_lens_q, cu_seq_lens_k) and int(cu_seq_lens_q[-1]) == query.shape[2]
    assert max_length_q == int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    CALLS["varlen"] += 1
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.zeros_like(query)
    bounds = cu_seq_lens_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        out[:, :, a:b] = F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                        is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(VARLEN, varlen_reference)
AttentionMaskInterface.register(VARLEN, lambda *args, **kwargs: None)


def turn(who, value):
    return {"from": who, "value": value}


RECORDS = [
    {"id": "one_image", "image": "a.png",
     "conversations": [turn("human", "<image>\nWhat is it?"), turn("gpt", "It is a cat.")]},
    {"id": "text_only", "conversations": [turn("human", "Hello!"), turn("gpt", "Hi there."),
                                          turn("human", "How are you?"), turn("gpt", "I am fine.")]},
    {"id": "two_images", "image": ["b.png", "c.png"],
     "conversations": [turn("human", "<image>\n<image>\nCompare the two images."),
                       turn("gpt", "The first one is red. The second one is blue.")]},
    {"id": "two_rounds", "image": "c.png",
     "conversations": [turn("human", "<image>\nWhat color is it?"), turn("gpt", "It is red."),
                       turn("human", "Is it big?"), turn("gpt", "Yes, it is big.")]},
    {"id": "text_only_2", "conversations": [turn("human", "Describe the image."), turn("gpt", "A small cat on a table.")]},
    {"id": "short", "image": "a.png", "conversations": [turn("human", "<image>\nIs it big?"), turn("gpt", "Yes.")]},
    {"id": "text_only_3", "conversations": [turn("human", "You are helpful."), turn("gpt", "Hello!")]},
]


@pytest.fixture(scope="module")
def mixed(llama_tokenizer_dir, tmp_path_factory, write_pngs):
    """(model, dataset) on the mixed records, Stage-2 template, fp32."""
    data = tmp_path_factory.mktemp("mixed")
    write_pngs(data / "images", ["a.png", "b.png", "c.png"], size=(40, 24))
    (data / "stage2.json").write_text(json.dumps(RECORDS))
    cfg = run_config(llama_tokenizer_dir, data, data / "out", stage=2)
    seed_everything(0)
    model, _, dataset = build(cfg, torch.device("cpu"))
    return model.eval(), dataset


@pytest.fixture
def attention(mixed):
    """Sets the LLM's attention implementation for one test, sdpa again afterwards."""
    model, _ = mixed
    yield lambda name: model.llm.set_attn_implementation(name)
    model.llm.set_attn_implementation("sdpa")


def samples_and_budget(dataset):
    samples = [dataset[i] for i in range(len(dataset))]
    lengths = [expanded_length(s["input_ids"], dataset.tokens_per_image) for s in samples]
    budget = 160  # lengths 41..90 tokens: rows of 2 and 3 samples, images and text-only mixed
    assert max(lengths) < budget < sum(sorted(lengths)[:3]) + 30
    return samples, lengths, budget


def logits_and_owners(model, batch, labels=None):
    """(logits, labels, owners): owners[b, t] = index in batch["ids"] of the sample of logits[b, t] (-1: padding)."""
    with torch.no_grad():
        logits, labels = model.logits_and_labels(batch["input_ids"], batch["attention_mask"], batch["images"], labels)
        spliced = model.embed(batch["input_ids"], batch["attention_mask"], batch["images"])
    segments = spliced.segment_ids if spliced.segment_ids is not None else spliced.attention_mask
    offsets = segments.max(dim=1).values.cumsum(0) - segments.max(dim=1).values  # samples in the rows before
    owners = torch.where(segments.ne(0), segments - 1 + offsets[:, None], -1)
    if logits.shape[:2] != owners.shape:  # the flattened varlen path: real tokens only, row by row
        owners = owners[owners.ge(0)][None]
    assert logits.shape[:2] == owners.shape
    return logits, labels, owners


def per_sample_logits(model, batch) -> dict[str, torch.Tensor]:
    """Logits of each sample of a padded or packed batch, by id, over the sample's own (expanded) tokens."""
    logits, _, owners = logits_and_owners(model, batch)
    return {sample_id: logits[owners == i] for i, sample_id in enumerate(batch["ids"])}


def alone(model, samples) -> dict[str, torch.Tensor]:
    collate = Collator(0)
    return {s["id"]: per_sample_logits(model, collate([s]))[s["id"]] for s in samples}


def test_pack_rows_few_even_rows():
    lengths = [5, 9, 3, 7, 2, 6, 4]
    rows = pack_rows(lengths, budget=10)
    assert sorted(i for row in rows for i in row) == list(range(7))  # every sample exactly once
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    # 36 tokens need 4 rows of 10 (first-fit decreasing: 9 | 7+3 | 6+4 | 5+2); filled evenly: 9 tokens each
    assert len(rows) == 4 and [sum(lengths[i] for i in row) for row in rows] == [9, 9, 9, 9]
    assert rows == [[1], [3, 4], [5, 2], [0, 6]]  # longest first; then the emptiest row with room
    assert pack_rows(lengths, 10) == rows  # deterministic
    assert pack_rows([4, 4], budget=8) == [[0, 1]]  # exactly full
    assert pack_rows([6, 6, 6], budget=8) == [[0], [1], [2]]
    # filling 3 rows evenly would leave 41 without room (90+46 | 79+53 | 64+60): the first-fit rows then
    assert pack_rows([90, 79, 64, 60, 53, 46, 41], budget=160) == [[0, 2], [4, 5, 6], [1, 3]]
    with pytest.raises(ValueError, match="does not fit data.pack_max_tokens=8"):
        pack_rows([3, 9], budget=8)


def test_packed_layout(mixed):
    model, dataset = mixed
    samples, lengths, budget = samples_and_budget(dataset)
    micro = PackingCollator(0, dataset.tokens_per_image, budget, rows_per_micro_batch=2)(samples)
    assert len(micro) >= 2 and sum(len(b["ids"]) for b in micro) == len(samples)
    by_id = {s["id"]: s for s in samples}
    multi = 0
    for batch in micro:
        spliced = model.embed(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"])
        order = iter(batch["ids"])
        images = []
        for r in range(batch["input_ids"].shape[0]):
            seg = batch["attention_mask"][r]
            n_seg = int(seg.max())
            multi += n_seg > 1
            row_tokens = 0
            for k in range(1, n_seg + 1):
                sample = by_id[next(order)]
                at = seg.eq(k).nonzero().flatten()
                assert torch.equal(at, torch.arange(int(at[0]), int(at[0]) + len(at)))  # contiguous
                assert torch.equal(batch["input_ids"][r, at], sample["input_ids"])
                # the first token is no target (it would be the previous sample's next token); the rest as unpacked
                assert batch["labels"][r, at[0]] == IGNORE_INDEX
                assert torch.equal(batch["labels"][r, at[1:]], sample["labels"][1:])
                images.append(sample["images"])
                # positions restart at 0 for every sample, image tokens included
                expanded = spliced.segment_ids[r] == k
                assert spliced.position_ids[r][expanded].tolist() == list(range(lengths[samples.index(sample)]))
                row_tokens += int(expanded.sum())
            assert row_tokens <= budget
            assert int(seg.ne(0).sum()) == int(seg.ne(0).cumprod(0).sum())  # padding only at the row's end
        assert torch.equal(batch["images"], torch.cat(images))  # row by row, in order of appearance
    assert multi >= 2
    # the supervised tokens are exactly those of the unpacked batch
    unpacked = Collator(0)(samples)
    n_unpacked = int(unpacked["labels"][:, 1:].ne(IGNORE_INDEX).sum())
    assert sum(int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum()) for b in micro) == n_unpacked


@pytest.mark.latest_stack
@pytest.mark.parametrize("impl", ["sdpa", "eager", VARLEN])
def test_each_sample_packed_equals_alone(mixed, attention, impl):
    model, dataset = mixed
    samples, _, budget = samples_and_budget(dataset)
    want = alone(model, samples)  # sdpa, one sample per forward, no padding
    losses_alone = {s["id"]: model(**{k: v for k, v in Collator(0)([s]).items()
                                      if k in ("input_ids", "attention_mask", "images", "labels")}) for s in samples}
    attention(impl)
    CALLS["varlen"] = 0
    [batch] = PackingCollator(0, dataset.tokens_per_image, budget, rows_per_micro_batch=100)(samples)
    assert int(batch["attention_mask"].max()) >= 3  # a row of 3 samples
    got = per_sample_logits(model, batch)
    assert CALLS["varlen"] == (2 if impl == VARLEN else 0)  # once per layer: the flattened path was taken
    assert got.keys() == want.keys()
    for sample_id in want:
        assert got[sample_id].shape == want[sample_id].shape
        torch.testing.assert_close(got[sample_id], want[sample_id], rtol=1e-5, atol=2e-5, msg=sample_id)

    # each sample's loss inside the packed row = its loss alone
    logits, labels, owners = logits_and_owners(model, batch, batch["labels"])
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                                 ignore_index=IGNORE_INDEX)
    predictor = owners[:, :-1]  # the sample whose token predicts the next label
    for i, sample_id in enumerate(batch["ids"]):
        loss_sum, n = losses_alone[sample_id]
        assert int(labels[:, 1:][predictor == i].ne(IGNORE_INDEX).sum()) == int(n) > 0
        assert token_loss[predictor == i].sum().item() == pytest.approx(loss_sum.item(), rel=1e-5)

    # the whole batch: the token-weighted loss of the unpacked batch
    packed_sum, packed_n = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"])
    unpacked = Collator(0)(samples)
    model.llm.set_attn_implementation("sdpa")
    ref_sum, ref_n = model(unpacked["input_ids"], unpacked["attention_mask"], unpacked["images"], unpacked["labels"])
    assert int(packed_n) == int(ref_n) == sum(int(n) for _, n in losses_alone.values())
    assert (packed_sum / packed_n).item() == pytest.approx((ref_sum / ref_n).item(), rel=1e-5)


@pytest.mark.latest_stack
@pytest.mark.parametrize("impl", ["sdpa", "eager", VARLEN])
def test_no_attention_across_sample_boundaries(mixed, attention, impl):
    """Changing one sample's tokens and image changes its own logits and no other sample's."""
    model, dataset = mixed
    samples, _, budget = samples_and_budget(dataset)
    attention(impl)
    [batch] = PackingCollator(0, dataset.tokens_per_image, budget, rows_per_micro_batch=100)(samples)
    # the first sample of a row that holds an image sample after it
    row = next(r for r in range(batch["input_ids"].shape[0]) if int(batch["attention_mask"][r].max()) >= 2
               and bool(batch["input_ids"][r][batch["attention_mask"][r] >= 2].eq(IMAGE_TOKEN_INDEX).any()))
    victim = sum(int(batch["attention_mask"][r].max()) for r in range(row))  # its index in batch["ids"]
    first = batch["attention_mask"][row] == 1
    changed = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
    changed["ids"] = batch["ids"]
    text = first & batch["input_ids"][row].ne(IMAGE_TOKEN_INDEX)
    changed["input_ids"][row, text] = (changed["input_ids"][row, text] + 7) % 200 + 3
    before, after = per_sample_logits(model, batch), per_sample_logits(model, changed)
    victim_id = batch["ids"][victim]
    assert (after[victim_id] - before[victim_id]).abs().max() > 1e-2
    for sample_id in before:
        if sample_id != victim_id:
            torch.testing.assert_close(after[sample_id], before[sample_id], rtol=0, atol=1e-6, msg=sample_id)

    # an image sample's pixels stay inside it too
    n_images = {s["id"]: s["images"].shape[0] for s in samples}
    image_victim = next(i for i, s in enumerate(batch["ids"]) if s != victim_id and n_images[s])
    n_before = sum(n_images[s] for s in batch["ids"][:image_victim])
    changed = dict(batch, images=batch["images"].clone())
    changed["images"][n_before] = -changed["images"][n_before]
    after = per_sample_logits(model, changed)
    image_id = batch["ids"][image_victim]
    assert (after[image_id] - before[image_id]).abs().max() > 1e-3
    for sample_id in before:
        if sample_id != image_id:
            torch.testing.assert_close(after[sample_id], before[sample_id], rtol=0, atol=1e-6, msg=sample_id)


def test_a_plain_causal_row_would_leak(mixed):
    """Control: the same packed tokens with a 0/1 mask (one causal sequence) let a change reach the next sample."""
    model, dataset = mixed
    samples, _, budget = samples_and_budget(dataset)
    [batch] = PackingCollator(0, dataset.tokens_per_image, budget, rows_per_micro_batch=100)(samples)
    row = next(r for r in range(batch["input_ids"].shape[0]) if int(batch["attention_mask"][r].max()) >= 2)
    seg = batch["attention_mask"][row]
    causal = dict(batch, attention_mask=batch["attention_mask"].ne(0).long())
    changed = dict(causal, input_ids=batch["input_ids"].clone())
    text = seg.eq(1) & batch["input_ids"][row].ne(IMAGE_TOKEN_INDEX)
    changed["input_ids"][row, text] = (changed["input_ids"][row, text] + 7) % 200 + 3
    with torch.no_grad():
        a = model.logits_and_labels(causal["input_ids"], causal["attention_mask"], causal["images"])[0]
        b = model.logits_and_labels(changed["input_ids"], changed["attention_mask"], changed["images"])[0]
    spliced = model.embed(batch["input_ids"], batch["attention_mask"], batch["images"])
    second = spliced.segment_ids[row] == 2
    assert (a[row][second] - b[row][second]).abs().max() > 1e-3


def test_accumulated_packed_step_equals_unpacked(mixed):
    """Gradients of a step (several packed micro-batches) = those of the same samples unpacked."""
    model, dataset = mixed
    model.set_trainable(True, True)
    samples, _, budget = samples_and_budget(dataset)

    def grads(micro):
        model.zero_grad(set_to_none=True)
        row = accumulate_gradients(DDPEngine.local(model), micro, torch.device("cpu"), False)
        return row, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    collate = Collator(0)
    ref, g_ref = grads([collate(samples[:4]), collate(samples[4:])])
    packed = PackingCollator(0, dataset.tokens_per_image, budget, rows_per_micro_batch=1)(samples)
    assert len(packed) >= 3
    got, g = grads(packed)
    model.zero_grad(set_to_none=True)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["supervised_tokens"] == ref["supervised_tokens"] and got["samples"] == ref["samples"] == len(samples)
    assert got["tokens"] == ref["tokens"]
    assert got["real_token_frac"] > ref["real_token_frac"]
    assert g.keys() == g_ref.keys() and any(n.startswith("llm.") for n in g)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, seed=5, image_size=32, n_stage1=48, n_stage2=48, n_eval=4, text_only_frac=0.25)
    return out


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_run_packed_matches_unpacked(llama_tokenizer_dir, shapes_dir, tmp_path):
    """Stage 2, mixed image/text-only batches: same per-step losses with and without packing."""
    runs = {}
    for packing in (False, True):
        cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / str(packing), stage=2, max_steps=5, lr=3e-3,
                         global_batch_size=8, micro_batch_size=2 if not packing else 1)
        cfg.data.packing, cfg.data.pack_max_tokens = packing, 256
        train(cfg)
        runs[packing] = rows(tmp_path / str(packing))
    plain, packed = runs[False], runs[True]
    assert [r["samples"] for r in packed] == [r["samples"] for r in plain] == [8] * 5
    assert [r["supervised_tokens"] for r in packed] == [r["supervised_tokens"] for r in plain]
    assert [r["tokens"] for r in packed] == [r["tokens"] for r in plain]
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in plain], rel=1e-4)
    assert plain[-1]["loss"] < plain[0]["loss"]  # it trains
    assert all(p["real_token_frac"] > u["real_token_frac"] for p, u in zip(packed, plain, strict=True))
    assert min(r["real_token_frac"] for r in packed) > 0.9


def test_packed_resume_is_exact(llama_tokenizer_dir, shapes_dir, tmp_path):
    first = tmp_path / "first"
    cfg = run_config(llama_tokenizer_dir, shapes_dir, first, stage=1, max_steps=6, save_every=2, keep_last=3,
                     micro_batch_size=2)
    cfg.data.packing, cfg.data.pack_max_tokens = True, 64
    train(cfg)
    other = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "second", stage=1, max_steps=6, micro_batch_size=2,
                       resume=str(first / "checkpoints" / "step_2"))
    other.data.packing, other.data.pack_max_tokens = True, 64
    train(other)
    assert [r["step"] for r in rows(tmp_path / "second")] == [3, 4, 5, 6]
    assert [r["loss"] for r in rows(tmp_path / "second")] == [r["loss"] for r in rows(first)][2:]


def test_no_sample_is_trained_to_predict_the_next_sample():
    """Even where a sample's first token carries a label, packing never makes it a target across a boundary."""
    samples = [{"id": str(i), "input_ids": torch.arange(3, 3 + n), "labels": torch.arange(3, 3 + n),
                "images": torch.zeros(0, 3, 8, 8), "truncated": False} for i, n in enumerate((5, 4, 3))]
    [batch] = PackingCollator(0, tokens_per_image=4, max_tokens=12, rows_per_micro_batch=4)(samples)
    assert batch["attention_mask"].tolist() == [[1] * 5 + [2] * 4 + [3] * 3]
    targets = batch["labels"][0, 1:]
    assert targets.ne(IGNORE_INDEX).tolist() == [True] * 4 + [False] + [True] * 3 + [False] + [True] * 2
    unpacked = Collator(0)(samples)
    assert int(targets.ne(IGNORE_INDEX).sum()) == int(unpacked["labels"][:, 1:].ne(IGNORE_INDEX).sum()) == 9


@pytest.mark.timeout(300)
def test_two_ranks_packed_match_one_rank_unpacked(llama_tokenizer_dir, shapes_dir, tmp_path):
    """DDP on 2 CPU processes with packing (ranks may run different numbers of forward passes per step):
    the per-step losses of one unpacked process with the same global batch."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    runs = {}
    for world, packing in ((1, False), (2, True)):
        name = f"world{world}"
        cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / name, stage=2, max_steps=4, global_batch_size=8,
                         micro_batch_size=1 if packing else 2, lr=3e-3)
        cfg.data.group_by_modality, cfg.data.packing, cfg.data.pack_max_tokens = True, packing, 200
        if packing:  # what this test is about: the ranks run different numbers of forward passes
            assert any(len(set(per_rank)) > 1 for per_rank in forward_passes(cfg, world, 4))
        save_config(cfg, tmp_path / f"{name}.yaml")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(29620 + world), "-m", "llava_sft.train", str(tmp_path / f"{name}.yaml")]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[world] = rows(tmp_path / name)
    assert [r["samples"] for r in runs[2]] == [8] * 4
    assert [r["supervised_tokens"] for r in runs[2]] == [r["supervised_tokens"] for r in runs[1]]
    assert [r["loss"] for r in runs[2]] == pytest.approx([r["loss"] for r in runs[1]], rel=2e-4)
