"""The Hugging Face integration equals the materialised-logits loss: tiny random LlamaForCausalLM teacher and student
(nothing downloaded), the loss and every student parameter's gradient against float64 copies of both models, their
own logits and ckd_ext.reference; real Trainer steps with gradient accumulation 2, and with 2 data-parallel processes,
equal one batch of twice the size. Cost: ~30 s of CPU on 2 cores (models of 2-3 layers, width 32-48, vocabulary
101), half of it the data-parallel run's two interpreter starts."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import ckd_ext  # noqa: E402
from ckd_ext import reference  # noqa: E402

pytestmark = pytest.mark.skipif(not ckd_ext.is_available(), reason="needs the compiled extension")

from ckd_ext.integrations.transformers import (  # noqa: E402
    CausalLMDistillationLoss, DistillationTrainer, last_hidden_state, shifted_targets)

VOCAB = 101


def llama(hidden, layers, seed, tie=False):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=tie, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # random heads of a realistic logit scale (the default init gives near-uniform softmaxes)
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model


def padded_batch(lengths, seed, width=None):
    """Right-padded sequences of the given lengths: input_ids, attention_mask, labels (-100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def oracle(student, teacher, inputs, loss_fn):
    """The loss and student gradients from float64 copies of both models, their own full logits, targets shifted by
    an explicit loop, and ckd_ext.reference."""
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits_s = s64(**model_inputs).logits
    with torch.no_grad():
        logits_t = t64(**model_inputs).logits
    labels, mask = inputs["labels"], inputs["attention_mask"]
    rows, targets = [], []
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            if mask[b, i] and mask[b, i + 1] and labels[b, i + 1] != -100:
                rows.append((b, i))
                targets.append(int(labels[b, i + 1]))
    index = torch.tensor(rows)
    s, t, y = logits_s[index[:, 0], index[:, 1]], logits_t[index[:, 0], index[:, 1]], torch.tensor(targets)
    n = len(rows)
    loss = (loss_fn.ce_weight * F.cross_entropy(s, y, reduction="sum")
            + loss_fn.kd_weight * reference.kd_loss(s, t, temperature=loss_fn.temperature, reduction="sum",
                                                    divergence=loss_fn.divergence, beta=loss_fn.beta,
                                                    alpha=loss_fn.alpha)
            + loss_fn.ckd_weight * reference.ckd_loss(s, t, tau=loss_fn.tau, anchor=loss_fn.anchor,
                                                      reduction="sum")) / n
    loss.backward()
    return loss, {name: p.grad for name, p in s64.named_parameters()}, s64


def assert_matches_oracle(student, teacher, inputs, loss_fn):
    loss = loss_fn(student, teacher, inputs)
    loss.backward()
    expected, grads, _ = oracle(student, teacher, inputs, loss_fn)
    assert abs(loss.item() - expected.item()) <= 2e-5 * abs(expected.item()), (loss.item(), expected.item())
    for name, p in student.named_parameters():
        scale = grads[name].abs().max().item()
        error = (p.grad.double() - grads[name]).abs().max().item()
        # fp32 forward/backward through 2 layers against float64: ~1e-6 of the largest entry
        assert error <= 2e-5 * scale + 1e-9, (name, error, scale)


@pytest.mark.parametrize("case", [
    dict(ce_weight=1.0, kd_weight=1.0, temperature=2.0),
    dict(ce_weight=0.5, kd_weight=0.0, ckd_weight=3.0, tau=0.5),
    dict(ce_weight=0.0, kd_weight=1.0, ckd_weight=1.0, anchor="teacher"),
    dict(ce_weight=1.0, kd_weight=1.0, temperature=2.0, divergence="jsd", beta=0.3),
    dict(ce_weight=1.0, kd_weight=2.0, divergence="reverse_kl"),
])
@pytest.mark.parametrize("tie", [False, True])
def test_loss_and_gradients_equal_the_materialised_logits(case, tie):
    """Loss and every student parameter's gradient (a tied head's from both of its uses) equal those of the models'
    own float64 logits through ckd_ext.reference, over the shifted, unpadded positions."""
    student, teacher = llama(32, 2, seed=1, tie=tie), llama(48, 3, seed=2)
    assert (student.get_output_embeddings().weight is student.get_input_embeddings().weight) == tie
    inputs = padded_batch([9, 5, 12], seed=3)
    assert_matches_oracle(student, teacher, inputs, CausalLMDistillationLoss(**case))


def test_head_with_bias():
    """A biased linear head: the bias enters both models' logits and receives its gradient."""
    student, teacher = llama(32, 2, seed=1), llama(48, 3, seed=2)
    for model, seed in ((student, 4), (teacher, 5)):
        head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=True)
        torch.manual_seed(seed)
        torch.nn.init.normal_(head.weight, 0, 0.5)
        torch.nn.init.normal_(head.bias, 0, 1.0)
        model.lm_head = head
    assert_matches_oracle(student, teacher, padded_batch([7, 11], seed=6),
                          CausalLMDistillationLoss(ce_weight=1.0, kd_weight=1.0, ckd_weight=1.0))


def test_ce_equals_the_models_own_loss():
    """With CE alone, the loss is the model's own `labels=` loss (its shift and -100 convention)."""
    student, teacher = llama(32, 2, seed=1), llama(48, 3, seed=2)
    inputs = padded_batch([9, 5, 12], seed=3)
    ours = CausalLMDistillationLoss(ce_weight=1.0, kd_weight=0.0)(student, teacher, inputs)
    own = copy.deepcopy(student).double()(**inputs).loss
    assert abs(ours.item() - own.item()) <= 2e-6 * own.item()
    # the logged parts: the same CE, and the weighted sum of the parts is the loss
    loss_fn = CausalLMDistillationLoss(ce_weight=0.5, kd_weight=2.0, ckd_weight=3.0)
    total, parts = loss_fn(student, teacher, inputs, return_parts=True)
    assert abs(parts["ce"].item() - own.item()) <= 2e-6 * own.item()
    recombined = 0.5 * parts["ce"] + 2.0 * parts["kd"] + 3.0 * parts["ckd"]
    assert abs(recombined.item() - total.item()) <= 1e-5 * total.item()


def test_batch_without_targets_gives_zero():
    """Every label -100: the loss is 0 with finite (zero) gradients, with and without num_items_in_batch = 0."""
    student, teacher = llama(32, 2, seed=1), llama(48, 3, seed=2)
    inputs = padded_batch([5, 3], seed=0)
    inputs["labels"][:] = -100
    loss_fn = CausalLMDistillationLoss(ce_weight=1.0, kd_weight=1.0, ckd_weight=1.0)
    for items in (None, torch.tensor(0)):
        student.zero_grad()
        loss = loss_fn(student, teacher, inputs, num_items_in_batch=items)
        loss.backward()
        assert loss.item() == 0.0
        assert all(p.grad is None or (p.grad == 0).all() for p in student.parameters())


def test_packed_sequences_do_not_predict_across_boundaries():
    """Packed rows (position_ids restarting at 0): the last token of one sequence predicts nothing, as if the
    sequences were separate rows."""
    labels = torch.tensor([[5, 6, 7, 8, 9, 10]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    targets = shifted_targets(labels, position_ids=position_ids)
    assert targets.tolist() == [[6, 7, -100, 9, 10, -100]]
    mask = torch.tensor([[0, 1, 1, 1, 1, 0]])  # left and right padding
    assert shifted_targets(labels, attention_mask=mask).tolist() == [[-100, 7, 8, 9, -100, -100]]
    given = torch.tensor([[1, 2, 3, 4, 5, -100]])
    assert shifted_targets(labels, shift_labels=given).tolist() == given.tolist()


def test_packed_batch_equals_separate_rows():
    """The loss of two sequences packed into one row (position_ids, no attention mask) equals that of the same two
    sequences as padded rows: attention and targets stay inside each sequence."""
    student, teacher = llama(32, 2, seed=1), llama(48, 3, seed=2)
    rows = padded_batch([6, 9], seed=7)
    first, second = rows["input_ids"][0, :6], rows["input_ids"][1, :9]
    packed = {"input_ids": torch.cat([first, second])[None],
              "position_ids": torch.cat([torch.arange(6), torch.arange(9)])[None],
              "labels": torch.cat([first, second])[None]}
    loss_fn = CausalLMDistillationLoss(ce_weight=1.0, kd_weight=1.0, temperature=1.5)
    with torch.no_grad():
        a, b = loss_fn(student, teacher, packed), loss_fn(student, teacher, rows)
    assert abs(a.item() - b.item()) <= 1e-5 * b.item(), (a.item(), b.item())


def test_refuses_heads_that_are_not_linear():
    """Logit soft-capping (Gemma 2) and a non-linear head are refused with a ValueError naming the model."""
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       final_logit_softcapping=30.0)
    gemma = transformers.Gemma2ForCausalLM(config)
    student, teacher = llama(32, 2, seed=1), llama(48, 3, seed=2)
    inputs = padded_batch([5], seed=0)
    with pytest.raises(ValueError, match="student: its logits are soft-capped"):
        CausalLMDistillationLoss()(gemma, teacher, inputs)
    teacher.lm_head = torch.nn.Sequential(torch.nn.Linear(48, VOCAB), torch.nn.Tanh())
    with pytest.raises(ValueError, match="teacher: its output head is Sequential"):
        CausalLMDistillationLoss()(student, teacher, inputs)


def test_scaled_head_equals_its_own_logits():
    """A scalar logit scale (Cohere's logit_scale) is linear: the loss equals that of the model's own scaled logits."""
    def cohere(hidden, seed):
        config = transformers.CohereConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                           logit_scale=0.25, tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = transformers.CohereForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 2.0)
        return model
    assert_matches_oracle(cohere(32, 1), cohere(48, 2), padded_batch([8, 6], seed=9),
                          CausalLMDistillationLoss(ce_weight=1.0, kd_weight=1.0, ckd_weight=1.0))


class Sequences(torch.utils.data.Dataset):
    def __init__(self, lengths, seed):
        g = torch.Generator().manual_seed(seed)
        self.items = [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i]}


def collate(features):
    batch = padded_batch([len(f["input_ids"]) for f in features], seed=0)
    for row, f in enumerate(features):
        batch["input_ids"][row, :len(f["input_ids"])] = f["input_ids"]
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def train(tmp_path, batch_size, accumulation, steps=3, **extra):
    student, teacher = llama(32, 2, seed=1), llama(48, 3, seed=2)
    # lengths vary so that micro-batches hold different numbers of tokens: a per-micro-batch mean would differ
    data = Sequences([3, 14, 9, 4, 12, 5, 16, 7, 6, 13, 8, 10], seed=11)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"b{batch_size}a{accumulation}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0, disable_tqdm=True, **extra)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  data_collator=collate,
                                  distillation=CausalLMDistillationLoss(ce_weight=1.0, kd_weight=2.0,
                                                                        temperature=2.0))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return student, losses, trainer


def test_trainer_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Three Trainer steps (SGD) of 2 accumulated micro-batches of 2 sequences end at the parameters and logged
    losses of three steps of batches of 4: num_items_in_batch, the token count over both micro-batches, is the
    divisor of each micro-batch's sum."""
    big, big_losses, _ = train(tmp_path, batch_size=4, accumulation=1)
    accumulated, accumulated_losses, trainer = train(tmp_path, batch_size=2, accumulation=2)
    assert trainer.loss_is_scaled_for_ga is True
    assert len(big_losses) == len(accumulated_losses) == 3
    assert all(math.isfinite(x) for x in big_losses)
    for a, b in zip(accumulated_losses, big_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (accumulated_losses, big_losses)
    for (name, p), q in zip(big.named_parameters(), accumulated.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    # the check can fail: a mean per micro-batch gives another loss on these unequal micro-batches
    student, teacher = llama(32, 2, seed=1), llama(48, 3, seed=2)
    batches = [collate([{"input_ids": x} for x in Sequences([3, 14, 9, 4], seed=11).items[i:i + 2]]) for i in (0, 2)]
    loss_fn = CausalLMDistillationLoss(ce_weight=1.0, kd_weight=2.0, temperature=2.0)
    with torch.no_grad():
        per_batch_means = sum(loss_fn(student, teacher, b).item() for b in batches) / 2
    assert abs(per_batch_means - big_losses[0]) > 1e-3 * big_losses[0]


def test_trainer_data_parallel_equals_one_big_batch(tmp_path):
    """Two gloo processes (torch.distributed.run, the Trainer's DDP) with batches of 2 each log the losses and reach
    the parameters of one process with batches of 4: num_items_in_batch counts both ranks' tokens and the loss is
    scaled by the number of processes, which DDP's gradient average undoes. Cost: ~35 s."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(tests / "hf_ddp_worker.py"), str(tmp_path)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = json.loads((tmp_path / "losses.json").read_text())
    state = torch.load(tmp_path / "student.pt")
    big, big_losses, _ = train(tmp_path / "one", batch_size=4, accumulation=1)
    assert len(losses) == 3
    for a, b in zip(losses, big_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, big_losses)
    for name, p in big.state_dict().items():
        assert torch.allclose(state[name], p, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("body", ["fp32", "bf16"])
def test_bf16_autocast_equals_the_reference_on_its_hidden_states(body):
    """Under bf16 autocast (bf16 matmuls in the models, fp32 heads; with a bf16 body the hidden states themselves are
    bf16, widened exactly to the head's fp32), the loss equals the float64 reference on the very hidden states the
    models produced."""
    student, teacher = llama(32, 2, seed=1), llama(48, 3, seed=2)
    if body == "bf16":
        student.model.to(torch.bfloat16)
        teacher.model.to(torch.bfloat16)
    inputs = padded_batch([9, 5, 12], seed=3)
    loss_fn = CausalLMDistillationLoss(ce_weight=1.0, kd_weight=1.0, ckd_weight=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(student, teacher, inputs)
        with torch.no_grad():
            hs, ht = last_hidden_state(student, inputs), last_hidden_state(teacher, inputs)
    targets = shifted_targets(inputs["labels"], attention_mask=inputs["attention_mask"])
    valid = targets != -100
    s = (hs.double() @ student.lm_head.weight.double().T)[valid]
    t = (ht.double() @ teacher.lm_head.weight.double().T)[valid]
    expected = (F.cross_entropy(s, targets[valid], reduction="sum") + reference.kd_loss(s, t, temperature=1.0, reduction="sum")
                + reference.ckd_loss(s, t, tau=1.0, reduction="sum")) / valid.sum()
    assert hs.dtype == (torch.bfloat16 if body == "bf16" else torch.float32)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= 2e-5 * expected.item()
    loss.backward()
    assert student.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(student.lm_head.weight.grad).all()


def test_trainer_bf16_steps(tmp_path):
    """Two Trainer steps with bf16=True (its autocast around compute_loss) run and give finite losses."""
    _, losses, _ = train(tmp_path, batch_size=2, accumulation=2, steps=2, bf16=True)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_example_script_both_styles_agree(tmp_path, capsys):
    """examples/hf_trainer_distillation.py runs, and its own-compute_loss subclass (the TRL-style lines) trains
    exactly as DistillationTrainer does."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_distillation.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_distillation", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    lines = []
    for style in ("trainer", "subclass"):
        assert example.main(["--style", style, "--steps", "2", "--batch-size", "2", "--context", "32",
                             "--out", str(tmp_path / style)]) == 0
        lines.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert lines[0].startswith("trainer: 2 steps, loss ")
    assert lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1], lines
