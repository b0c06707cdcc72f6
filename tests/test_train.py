"""labkit.train and labkit.train: every promise of the training loop, on tiny CPU models.

The model is an embedding, one or more causal labkit EncoderLayers and a linear head; the task
is counting (the next token is the current one plus 1, mod V), which it learns in a few steps.
Shapes: N examples of T tokens over a vocabulary of V, model width D.
"""

import copy
import dataclasses
import math
from dataclasses import replace
from typing import NamedTuple

import matplotlib
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import labkit.train.trainer as train_module
from labkit.device import BF16Hardware, bf16_hardware
from labkit.nn import EncoderLayer
from labkit.train import (
    IGNORE_INDEX,
    TrainConfig,
    Trainer,
    accuracy,
    checkpoint_path,
    constant_lr,
    cosine_lr,
    cross_entropy_sum,
    enable_activation_checkpointing,
    latest_checkpoint,
    list_checkpoints,
    make_optimizer,
    make_scheduler,
    noam_lr,
    output_logits,
    param_groups,
    saved_activation_bytes,
    schedule_lr,
    split_batch,
)
from labkit.viz import plot_training_curves

matplotlib.use("Agg")

V, T, D = 12, 6, 16
# Columns that depend on the wall clock, left out when two runs are compared.
CLOCK_COLUMNS = ["tokens_per_s", "time_s"]


class TinyLM(nn.Module):
    """(B, T) token ids -> (B, T, V) next-token logits."""

    def __init__(self, n_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList(
            EncoderLayer(D, n_heads=2, d_ff=32, dropout=dropout) for _ in range(n_layers)
        )
        self.head = nn.Linear(D, V)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)  # (B, T, D)
        for layer in self.layers:
            h = layer(h, is_causal=True).hidden
        return self.head(h)  # (B, T, V)


class TinyClassifier(nn.Module):
    """(B, T, D) features -> (B, 2) class logits, from the mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = EncoderLayer(D, n_heads=2, d_ff=32, dropout=0.0)
        self.head = nn.Linear(D, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).hidden.mean(dim=1))


def make_lm(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kwargs).to(dtype)


def lm_data(n: int = 32, *, seed: int = 0, ignore_fraction: float = 0.0) -> TensorDataset:
    """Counting sequences; a random ``ignore_fraction`` of the labels is -100."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=generator)
    tokens = (start + torch.arange(T + 1)) % V  # (N, T + 1)
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=generator) < ignore_fraction] = IGNORE_INDEX
    return TensorDataset(inputs, labels)


def config(**overrides) -> TrainConfig:
    settings = {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "device": "cpu", "progress": False}
    return TrainConfig(**{**settings, **overrides})


def run(model: nn.Module, data, eval_data=None, *, trainer_kwargs=None, **overrides) -> Trainer:
    trainer = Trainer(model, config(**overrides), data, eval_data, **(trainer_kwargs or {}))
    trainer.fit()
    return trainer


def global_grad_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    b_state = b.state_dict()
    for name, weight in a.state_dict().items():
        torch.testing.assert_close(weight, b_state[name], atol=atol, rtol=0, msg=name)


# --- schedules --------------------------------------------------------------------------------


def paper_noam(t: int, d_model: int, warmup: int) -> float:
    """Vaswani et al. (2017), eq. 3, written out again here."""
    return (1 / math.sqrt(d_model)) * min(1 / math.sqrt(t), t / warmup**1.5)


@pytest.mark.parametrize(("d_model", "warmup"), [(512, 4000), (64, 10), (16, 1)])
def test_noam_matches_the_paper(d_model, warmup):
    steps = [*range(1, 60), warmup - 1, warmup, warmup + 1, 3 * warmup, 100_000]
    for t in filter(lambda t: t >= 1, steps):
        assert math.isclose(
            noam_lr(t, d_model, warmup), paper_noam(t, d_model, warmup), rel_tol=1e-12
        ), t


def test_noam_peaks_at_warmup_and_is_not_the_sqrt_over_min_mistake():
    d_model, warmup = 512, 4000
    rates = [noam_lr(t, d_model, warmup) for t in range(1, 3 * warmup)]
    assert rates.index(max(rates)) + 1 == warmup
    assert math.isclose(max(rates), (d_model * warmup) ** -0.5)  # 6.99e-4 for the paper's model
    assert math.isclose(max(rates), 6.9877e-4, rel_tol=1e-4)

    def mistaken(t: int) -> float:
        return d_model**-0.5 * math.sqrt(t) / min(t, warmup)

    # The two agree at the peak, so a spot check there cannot tell them apart...
    assert math.isclose(mistaken(warmup), noam_lr(warmup, d_model, warmup))
    # ...but the mistake falls during warm-up and rises after it: the opposite shape.
    for t in (1, 100, warmup // 2, 2 * warmup, 10 * warmup):
        assert not math.isclose(mistaken(t), noam_lr(t, d_model, warmup), rel_tol=1e-3), t
    assert mistaken(100) > mistaken(200) and noam_lr(100, 512, 4000) < noam_lr(200, 512, 4000)
    assert mistaken(8000) < mistaken(9000) and noam_lr(8000, 512, 4000) > noam_lr(9000, 512, 4000)


def test_cosine_matches_its_formula_and_peaks_after_warmup():
    base, warmup, total, floor = 3e-4, 10, 100, 3e-5

    def expected(t: int) -> float:
        if t <= warmup:
            return base * t / warmup
        if t > total:
            return floor
        return floor + (base - floor) / 2 * (
            1 + math.cos(math.pi * (t - warmup) / (total - warmup))
        )

    rates = [cosine_lr(t, base, warmup, total, floor) for t in range(1, total + 20)]
    for t, rate in enumerate(rates, start=1):
        assert math.isclose(rate, expected(t), rel_tol=1e-12, abs_tol=1e-18), t
    assert rates.index(max(rates)) + 1 == warmup and max(rates) == base
    assert math.isclose(cosine_lr(55, base, warmup, total, floor), (base + floor) / 2)  # halfway
    assert cosine_lr(total, base, warmup, total, floor) == floor
    assert cosine_lr(total + 5, base, warmup, total, floor) == floor
    assert cosine_lr(1, base, 0, total) == pytest.approx(base, rel=1e-3)  # no warm-up


def test_constant_lr_warms_up_linearly():
    assert [constant_lr(t, 1.0, 4) for t in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert all(constant_lr(t, 0.1) == 0.1 for t in range(1, 10))


def test_schedule_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match="step counts optimizer updates from 1, got 0"):
        noam_lr(0, 512, 4000)
    with pytest.raises(ValueError, match="warmup must be an int >= 1, got 0"):
        noam_lr(1, 512, 0)
    with pytest.raises(ValueError, match="d_model must be a positive int, got 0"):
        noam_lr(1, 0, 10)
    with pytest.raises(ValueError, match="max_steps must be an int >= warmup=10, got 5"):
        cosine_lr(1, 1e-3, 10, 5)
    with pytest.raises(ValueError, match="base_lr must be a number >= 0"):
        constant_lr(1, -1.0)
    with pytest.raises(ValueError, match="base_lr must be a number >= 0, got -1.0"):
        cosine_lr(1, -1.0, 2, 4)
    with pytest.raises(ValueError, match="min_lr must be a number >= 0, got -0.5"):
        cosine_lr(1, 1.0, 2, 4, min_lr=-0.5)
    # bools are ints in Python, but True steps or rates are mistakes, not numbers
    with pytest.raises(ValueError, match="step counts optimizer updates from 1, got True"):
        constant_lr(True, 1.0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0, got True"):
        constant_lr(1, 1.0, True)
    with pytest.raises(ValueError, match="base_lr must be a number >= 0, got True"):
        constant_lr(1, True)
    with pytest.raises(ValueError, match="max_steps must be an int >= warmup=0, got True"):
        cosine_lr(1, 1.0, 0, True)
    with pytest.raises(ValueError, match="d_model must be a positive int, got True"):
        noam_lr(1, True, 4)


def test_schedules_at_their_edges():
    """The smallest valid settings: the warm-up ending on the last step, a width of 1."""
    assert cosine_lr(3, 1.0, 3, 3) == 1.0  # max_steps == warmup: the peak, then the floor
    assert cosine_lr(4, 1.0, 3, 3, min_lr=0.1) == 0.1
    assert noam_lr(1, 1, 1) == 1.0  # d_model = 1 is a (tiny) valid width


@pytest.mark.parametrize(
    ("overrides", "pure"),
    [
        ({"schedule": "constant", "warmup_steps": 3}, lambda t: constant_lr(t, 1e-2, 3)),
        (
            {"schedule": "cosine", "warmup_steps": 3, "min_lr": 1e-3},
            lambda t: cosine_lr(t, 1e-2, 3, 12, 1e-3),
        ),
        # noam: lr is a factor on the paper's rate
        (
            {"schedule": "noam", "warmup_steps": 4, "d_model": 16, "lr": 2.0},
            lambda t: 2.0 * paper_noam(t, 16, 4),
        ),
    ],
)
def test_lambda_lr_scheduler_gives_step_t_its_scheduled_rate(overrides, pure):
    cfg = config(max_steps=12, **overrides)
    optimizer = make_optimizer(nn.Linear(2, 2), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    for t in range(1, cfg.max_steps + 1):
        rate = optimizer.param_groups[0]["lr"]  # the rate the t-th optimizer.step() uses
        assert math.isclose(rate, schedule_lr(t, cfg), rel_tol=1e-12), t
        assert math.isclose(rate, pure(t), rel_tol=1e-12), t
        assert all(group["lr"] == rate for group in optimizer.param_groups)
        optimizer.step()
        scheduler.step()


def test_history_records_the_rate_each_step_used():
    cfg = {"max_steps": 8, "schedule": "cosine", "warmup_steps": 3, "min_lr": 1e-3}
    history = run(make_lm(), lm_data(), **cfg).history
    expected = [cosine_lr(t, 1e-2, 3, 8, 1e-3) for t in range(1, 9)]
    assert history["step"].tolist() == list(range(1, 9))
    assert history["lr"].tolist() == pytest.approx(expected, rel=1e-12)


# --- optimizer --------------------------------------------------------------------------------


def test_weight_decay_spares_biases_norms_and_embeddings():
    model = make_lm()
    groups = param_groups(model, 0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    spared = {names[id(p)] for p in groups[1]["params"]}
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.1, 0.0)
    assert decayed | spared == set(names.values()) and not decayed & spared
    assert "embed.weight" in spared and "head.bias" in spared
    assert "layers.0.norm1.weight" in spared and "layers.0.ffn.up_proj.bias" in spared
    assert "head.weight" in decayed and "layers.0.ffn.up_proj.weight" in decayed
    assert all(model.get_parameter(name).dim() >= 2 for name in decayed)
    optimizer = make_optimizer(model, config(weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_a_head_tied_to_the_embedding_is_not_decayed():
    model = make_lm()
    model.head.weight = model.embed.weight  # (V, D) both
    groups = param_groups(model, 0.1)
    assert not any(p is model.embed.weight for p in groups[0]["params"])
    assert sum(p is model.embed.weight for p in groups[1]["params"]) == 1  # once, not twice


# --- clipping and accumulation ------------------------------------------------------------------


@pytest.mark.parametrize("grad_clip", [1e-3, None])
def test_clipping_bounds_the_global_norm_and_history_keeps_the_norm_before(grad_clip):
    data = lm_data(8)
    model = make_lm()
    reference = copy.deepcopy(model)
    trainer = run(model, data, max_steps=1, grad_clip=grad_clip, shuffle=False)

    inputs, labels = data.tensors
    F.cross_entropy(reference(inputs).reshape(-1, V), labels.reshape(-1)).backward()
    norm_before = global_grad_norm(reference)
    assert norm_before > 100 * 1e-3  # so the clip has work to do
    assert trainer.history["grad_norm"].iloc[0] == pytest.approx(norm_before, rel=1e-5)
    # The gradients the optimizer used are still in .grad: clipped to the bound, or untouched.
    expected_after = norm_before if grad_clip is None else grad_clip
    assert global_grad_norm(model) == pytest.approx(expected_after, rel=1e-4)


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch():
    """Micro-batches of 2 examples hold different numbers of ignored (-100) labels, so only
    weighing each token by the count of the whole batch makes the sums agree."""
    data = lm_data(32, ignore_fraction=0.3)
    models, histories = {}, {}
    for k in (1, 4):
        models[k] = make_lm(dtype=torch.float64)
        histories[k] = run(models[k], data, max_steps=5, grad_accum_steps=k).history
    assert_same_weights(models[1], models[4], atol=1e-10)
    torch.testing.assert_close(
        torch.tensor(histories[1]["train_loss"]),
        torch.tensor(histories[4]["train_loss"]),
        atol=1e-12,
        rtol=0,
    )
    assert not torch.equal(models[1].head.weight, make_lm(dtype=torch.float64).head.weight)


# --- resume ---------------------------------------------------------------------------------


def _resume_setup(directory) -> tuple[TensorDataset, TensorDataset, TrainConfig]:
    """28 examples in micro-batches of 4: 7 per epoch, 2 per step, so steps straddle epochs."""
    cfg = config(
        max_steps=6,
        batch_size=8,
        grad_accum_steps=2,
        schedule="cosine",
        warmup_steps=2,
        eval_every=2,
        checkpoint_dir=directory,
        checkpoint_every=1,
    )
    return lm_data(28), lm_data(8, seed=1), cfg


@pytest.mark.parametrize("resume_step", [3, 4])  # mid-epoch; just after crossing into epoch 1
def test_resume_continues_exactly_with_dropout_and_shuffling(tmp_path, resume_step):
    train, held_out, cfg = _resume_setup(tmp_path / "full")
    full = Trainer(make_lm(dropout=0.2), cfg, train, held_out)
    full.fit()

    cfg_resumed = replace(cfg, checkpoint_dir=tmp_path / "resumed")
    resumed = Trainer(make_lm(seed=7, dropout=0.2), cfg_resumed, train, held_out)
    resumed.fit(resume_from=checkpoint_path(tmp_path / "full", resume_step))

    assert resumed.step == full.step == 6
    assert_same_weights(resumed.model, full.model)  # exactly
    pd.testing.assert_frame_equal(
        resumed.history.drop(columns=CLOCK_COLUMNS), full.history.drop(columns=CLOCK_COLUMNS)
    )
    assert full.history["eval_loss"].notna().sum() == 3


def test_resume_needs_the_saved_rng_state(tmp_path, monkeypatch):
    """The control for the test above: without restoring the RNG, dropout masks differ."""
    train, held_out, cfg = _resume_setup(tmp_path / "full")
    full = Trainer(make_lm(dropout=0.2), cfg, train, held_out)
    full.fit()
    monkeypatch.setattr(train_module, "restore_rng_state", lambda state: None)
    resumed = Trainer(
        make_lm(dropout=0.2), replace(cfg, checkpoint_dir=tmp_path / "b"), train, held_out
    )
    resumed.fit(resume_from=checkpoint_path(tmp_path / "full", 3))
    assert not torch.equal(resumed.model.head.weight, full.model.head.weight)


def test_resume_restores_the_state_and_checks_the_checkpoint_fits(tmp_path):
    train, held_out, cfg = _resume_setup(tmp_path)
    full = Trainer(make_lm(), cfg, train, held_out)
    full.fit()
    saved = checkpoint_path(tmp_path, 3)
    trainer = Trainer(make_lm(), cfg, train, held_out)
    trainer.resume(saved)
    assert (trainer.step, trainer.epoch, trainer.batches_seen) == (3, 0, 6)
    assert trainer.history["step"].tolist() == [1, 2, 3]
    assert trainer.scheduler.last_epoch == 3

    with pytest.raises(
        ValueError, match="written with batch_size=8 but this Trainer has batch_size=4"
    ):
        Trainer(make_lm(), replace(cfg, batch_size=4), train, held_out).resume(saved)
    with pytest.raises(
        ValueError, match="train_examples=28 but this Trainer has train_examples=24"
    ):
        Trainer(make_lm(), cfg, lm_data(24), held_out).resume(saved)
    with pytest.raises(ValueError, match="does not fit this model"):
        Trainer(make_lm(n_layers=2), cfg, train, held_out).resume(saved)
    with pytest.raises(ValueError, match="does not exist"):
        trainer.resume(tmp_path / "missing.pt")


def test_resume_restores_early_stopping_state(tmp_path):
    """A run resumed between a best evaluation and the end of its patience stops at the very step
    the uninterrupted run stopped at: the best loss and the count of evaluations without
    improvement are carried over, not restarted."""
    cfg = config(
        max_steps=40,
        eval_every=1,
        early_stopping_patience=3,
        checkpoint_dir=tmp_path / "full",
        checkpoint_every=1,
    )
    train, held_out = _classification(64, flip=False), _classification(32, flip=True)
    torch.manual_seed(0)
    full = Trainer(TinyClassifier(), cfg, train, held_out)
    full.fit()
    assert full.stopped_early
    eval_loss = full.history["eval_loss"].tolist()
    best = eval_loss.index(min(eval_loss))
    resume_step = best + 2  # one evaluation without improvement already counted
    resumed_cfg = replace(cfg, checkpoint_dir=tmp_path / "b")
    resumed = Trainer(TinyClassifier(), resumed_cfg, train, held_out)
    resumed.resume(checkpoint_path(tmp_path / "full", resume_step))
    assert resumed.best_eval_loss == min(eval_loss[:resume_step]) == full.best_eval_loss
    assert resumed.evals_without_improvement == 1 and not resumed.stopped_early
    resumed.fit()
    assert resumed.stopped_early and resumed.step == full.step == best + 1 + 3
    # Resumed from the last checkpoint, a run that stopped early stays stopped.
    done = Trainer(TinyClassifier(), replace(cfg, checkpoint_dir=tmp_path / "c"), train, held_out)
    done.resume(checkpoint_path(tmp_path / "full", full.step))
    assert done.stopped_early and done.evals_without_improvement == 3
    done.fit()
    assert done.step == full.step


def test_resume_restores_the_grad_scaler(tmp_path):
    """The loss scale (halved by every skipped fp16 step) and its growth tracker are resumed:
    a fresh scaler would restart at its initial scale. GradScaler runs on the CPU here."""

    def trainer(directory) -> Trainer:
        cfg = config(max_steps=4, checkpoint_dir=directory, checkpoint_every=1)
        t = Trainer(make_lm(), cfg, lm_data(), loss_fn=_nan_gradient_loss)
        t.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        return t

    full = trainer(tmp_path / "full")
    full.fit()
    assert full.scaler.get_scale() == 1024.0 / 2**4  # every step overflowed and halved it
    resumed = trainer(tmp_path / "b")
    resumed.resume(checkpoint_path(tmp_path / "full", 2))
    assert resumed.scaler.get_scale() == 256.0
    resumed.fit()
    assert resumed.scaler.state_dict() == full.scaler.state_dict()
    assert resumed.history["skipped"].tolist() == [True] * 4


def test_checkpoint_files_are_listed_and_pruned(tmp_path):
    run(
        make_lm(),
        lm_data(),
        max_steps=5,
        checkpoint_dir=tmp_path,
        checkpoint_every=2,
        keep_checkpoints=2,
    )
    # Saved after steps 2, 4 and the last one (5); the oldest was deleted.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004.pt", "step_0000005.pt"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_0000005.pt"
    assert latest_checkpoint(tmp_path / "empty") is None
    assert not list(tmp_path.glob("*.partial"))


# --- precision ------------------------------------------------------------------------------


def _counting_loss(dtypes: list[torch.dtype]):
    def loss_fn(model: nn.Module, batch) -> Tensor:
        inputs, labels = batch
        logits = model(inputs)
        dtypes.append(logits.dtype)
        return F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1))

    return loss_fn


def test_bf16_autocast_trains_on_the_cpu():
    dtypes: list[torch.dtype] = []
    trainer = run(
        make_lm(),
        lm_data(),
        precision="bf16",
        max_steps=8,
        trainer_kwargs={"loss_fn": _counting_loss(dtypes)},
    )
    assert trainer.amp_dtype is torch.bfloat16
    assert set(dtypes) == {torch.bfloat16}  # the forward really ran in bf16
    losses = trainer.history["train_loss"]
    assert losses.notna().all() and losses.iloc[-1] < losses.iloc[0] - 0.2
    assert trainer.model.head.weight.dtype is torch.float32  # master weights stay fp32


def test_fp32_runs_without_autocast_and_auto_picks_bf16_where_the_cpu_has_it(monkeypatch):
    dtypes: list[torch.dtype] = []
    run(make_lm(), lm_data(), max_steps=1, trainer_kwargs={"loss_fn": _counting_loss(dtypes)})
    assert dtypes == [torch.float32]
    expected = torch.bfloat16 if bf16_hardware("cpu").units else None
    assert Trainer(make_lm(), config(precision="auto"), lm_data()).amp_dtype is expected
    # The choice follows the detected hardware, not the machine the tests run on.
    for units, dtype in ((True, torch.bfloat16), (False, None), (None, None)):
        fake = BF16Hardware("cpu", "a CPU", units, "faked")
        monkeypatch.setattr("labkit.train.trainer.bf16_hardware", lambda device, f=fake: f)
        assert Trainer(make_lm(), config(precision="auto"), lm_data()).amp_dtype is dtype


def test_adamw_is_fused_on_the_cpu_and_equals_the_unfused_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    optimizer = make_optimizer(model, config(weight_decay=0.1))
    assert optimizer.defaults["fused"] is True
    twin, start = copy.deepcopy(model), model[0].weight.detach().clone()
    reference = torch.optim.AdamW(param_groups(twin, 0.1), lr=1e-2, foreach=False)
    x = torch.randn(32, 8)
    for _ in range(5):
        for net, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    assert not torch.allclose(model[0].weight, start, atol=1e-3)  # it did train


def test_fp16_on_the_cpu_is_refused():
    with pytest.raises(ValueError, match="precision='fp16' needs a CUDA device.*got device cpu"):
        Trainer(make_lm(), config(precision="fp16"), lm_data())


def _nan_gradient_loss(model: nn.Module, batch) -> Tensor:
    """A finite loss whose gradient is NaN, like an fp16 backward that overflowed:
    d sqrt(u)/du = inf at u = 0, times du/d(bias) = 0."""
    inputs, labels = batch
    loss = F.cross_entropy(model(inputs).reshape(-1, V), labels.reshape(-1))
    return loss + (model.head.bias * 0).sqrt().sum()


def test_steps_the_grad_scaler_skips_are_recorded():
    """With fp16 the GradScaler skips overflowed steps itself and halves its scale; the history
    says so. (GradScaler is enabled on the CPU here to exercise that path without a GPU.)"""
    model = make_lm()
    initial = copy.deepcopy(model)
    trainer = Trainer(model, config(max_steps=2), lm_data(), loss_fn=_nan_gradient_loss)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    history = trainer.fit()
    assert history["skipped"].tolist() == [True, True]
    assert history["train_loss"].notna().all() and history["grad_norm"].isna().all()
    assert trainer.scaler.get_scale() == 256.0
    assert_same_weights(model, initial)


def test_a_nan_gradient_without_a_scaler_stops_training():
    trainer = Trainer(make_lm(), config(max_steps=2), lm_data(), loss_fn=_nan_gradient_loss)
    with pytest.raises(FloatingPointError, match=r"gradient norm nan\) at step 1"):
        trainer.fit()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fp16_with_grad_scaler_trains_on_cuda():
    trainer = run(make_lm(), lm_data(), device="cuda", precision="fp16", max_steps=8)
    assert trainer.amp_dtype is torch.float16 and trainer.scaler.is_enabled()
    losses = trainer.history["train_loss"]
    assert losses.iloc[-1] < losses.iloc[0]
    assert trainer.model.head.weight.dtype is torch.float32


# --- loss -----------------------------------------------------------------------------------


def test_cross_entropy_sum_over_count_is_torchs_smoothed_mean():
    logits = torch.randn(4, T, V)
    targets = torch.randint(0, V, (4, T))
    targets[0, :3] = IGNORE_INDEX
    for smoothing in (0.0, 0.1):
        total, count = cross_entropy_sum(logits, targets, smoothing)
        expected = F.cross_entropy(
            logits.reshape(-1, V), targets.reshape(-1), label_smoothing=smoothing
        )
        assert count.item() == 4 * T - 3
        torch.testing.assert_close(total / count, expected)
    classes = torch.randn(5, 3)
    labels = torch.tensor([0, 2, 1, 1, 0])
    total, count = cross_entropy_sum(classes, labels, 0.2)
    torch.testing.assert_close(total / 5, F.cross_entropy(classes, labels, label_smoothing=0.2))
    with pytest.raises(ValueError, match=r"logits \(4, 6, 12\) do not fit targets \(4, 5\)"):
        cross_entropy_sum(logits, targets[:, :5])


def test_cross_entropy_sum_upcasts_low_precision_logits_and_checks_shapes():
    logits = 4 * torch.randn(3, T, V)
    targets = torch.randint(0, V, (3, T))
    total, count = cross_entropy_sum(logits.bfloat16(), targets)  # default: no smoothing
    # Summed in float32 from the bf16 values: a bf16 log-softmax or a smoothed loss differs.
    expected = F.cross_entropy(
        logits.bfloat16().float().reshape(-1, V), targets.reshape(-1), reduction="sum"
    )
    assert total.dtype == torch.float32 and count.item() == 3 * T
    torch.testing.assert_close(total, expected)
    # (V,) logits with a 0-dim target: shape[:-1] fits, but a batch dimension is missing.
    message = (
        r"^logits \(5,\) do not fit targets \(\): expected logits \(B, T, V\) with targets "
        r"\(B, T\), or \(B, C\) with \(B,\)$"
    )
    with pytest.raises(ValueError, match=message):
        cross_entropy_sum(torch.randn(5), torch.tensor(1))


def test_accuracy_counts_only_the_targets_that_count():
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # argmax 1, 0, 2
    assert accuracy(logits, torch.tensor([[1, 1, 2]])) == pytest.approx(2 / 3)
    assert accuracy(logits, torch.tensor([[1, IGNORE_INDEX, IGNORE_INDEX]])) == 1.0
    assert accuracy(logits, torch.tensor([[0, IGNORE_INDEX, 2]])) == 0.5
    assert accuracy(logits, torch.full((1, 3), IGNORE_INDEX)) == 0.0


def test_split_batch_and_output_logits_read_each_format_or_say_what_is_missing():
    ids, labels = torch.zeros(2, T, dtype=torch.long), torch.ones(2, T, dtype=torch.long)
    for batch in ((ids, labels), [ids, labels], {"input_ids": ids, "labels": labels, "x": 0}):
        got_ids, got_labels = split_batch(batch)
        assert got_ids is ids and got_labels is labels
    for keys in ({"input_ids": ids}, {"labels": labels}):
        with pytest.raises(ValueError) as error:
            split_batch(keys)
        assert str(error.value) == (
            f"a dict batch needs 'input_ids' and 'labels', got keys {sorted(keys)}; "
            "pass Trainer(..., loss_fn=...) for other batches"
        )
    with pytest.raises(ValueError) as error:
        split_batch((ids, labels, ids))
    assert str(error.value) == (
        "a batch must be (inputs, targets) or a dict with 'input_ids' and 'labels', got "
        "tuple; pass Trainer(..., loss_fn=...) for other batches"
    )

    logits = torch.randn(2, T, V)
    assert output_logits(logits) is logits
    assert output_logits({"logits": logits, "loss": None}) is logits
    assert output_logits(NamedOutput(logits)) is logits
    for output in ({"scores": logits}, {"logits": None}, object(), NamedOutput(None)):
        with pytest.raises(ValueError) as error:
            output_logits(output)
        assert str(error.value) == (
            "the model must return logits or an output with a .logits tensor, "
            f"got {type(output).__name__}"
        )


def test_training_loss_uses_label_smoothing():
    data = lm_data(8)
    model = make_lm()
    inputs, labels = data.tensors
    with torch.no_grad():
        logits = model(inputs).reshape(-1, V)
        smoothed = F.cross_entropy(logits, labels.reshape(-1), label_smoothing=0.1).item()
        plain = F.cross_entropy(logits, labels.reshape(-1)).item()
    history = run(model, data, max_steps=1, label_smoothing=0.1).history
    assert history["train_loss"].iloc[0] == pytest.approx(smoothed, rel=1e-6)
    assert abs(smoothed - plain) > 1e-3


def _nan_at_call(bad_call: int):
    calls = []

    def loss_fn(model: nn.Module, batch) -> Tensor:
        calls.append(None)
        inputs, labels = batch
        loss = F.cross_entropy(model(inputs).reshape(-1, V), labels.reshape(-1))
        return loss * math.nan if len(calls) == bad_call else loss

    return loss_fn


def test_a_nan_loss_stops_training_naming_the_step():
    trainer = Trainer(make_lm(), config(max_steps=5), lm_data(), loss_fn=_nan_at_call(3))
    with pytest.raises(FloatingPointError, match="non-finite loss nan .* at step 3"):
        trainer.fit()
    assert trainer.step == 2


def test_a_nan_loss_step_can_be_skipped():
    two_steps = run(
        make_lm(),
        lm_data(),
        max_steps=2,
        shuffle=False,
        trainer_kwargs={"loss_fn": _nan_at_call(-1)},
    )
    skipping = run(
        make_lm(),
        lm_data(),
        max_steps=3,
        shuffle=False,
        nonfinite="skip",
        trainer_kwargs={"loss_fn": _nan_at_call(3)},
    )
    history = skipping.history
    assert history["skipped"].tolist() == [False, False, True]
    assert math.isnan(history["train_loss"].iloc[2])
    assert_same_weights(skipping.model, two_steps.model)  # step 3 changed nothing
    assert skipping.optimizer.state[skipping.model.head.weight]["step"].item() == 2


# --- evaluation, early stopping, history ---------------------------------------------------------


def top2(logits: Tensor, targets: Tensor) -> float:
    keep = targets != IGNORE_INDEX
    hits = (logits.topk(2, dim=-1).indices == targets[..., None]).any(-1) & keep
    return hits.sum().item() / keep.sum().item()


def test_evaluation_metrics_match_a_hand_computation_and_fill_the_history():
    train, held_out = lm_data(32), lm_data(10, seed=1, ignore_fraction=0.3)  # batches of 8 and 2
    metrics = {"accuracy": accuracy, "top2": top2}
    trainer = run(
        make_lm(dropout=0.3),
        train,
        held_out,
        max_steps=4,
        eval_every=2,
        trainer_kwargs={"metrics": metrics},
    )
    history = trainer.history
    for column in ("eval_loss", "eval_accuracy", "eval_top2"):
        assert history[column].notna().tolist() == [False, True, False, True], column

    results = trainer.evaluate()
    assert trainer.model.training  # evaluate() puts the model back in training mode
    inputs, labels = held_out.tensors
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(inputs)  # (10, T, V)
    keep = labels != IGNORE_INDEX
    assert results["loss"] == pytest.approx(
        F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1)).item(), rel=1e-5
    )
    assert results["accuracy"] == pytest.approx(
        ((logits.argmax(-1) == labels) & keep).sum().item() / keep.sum().item()
    )
    assert results["top2"] == pytest.approx(top2(logits, labels))
    assert history["eval_loss"].iloc[-1] == pytest.approx(results["loss"], rel=1e-6)


def test_eval_batches_limits_the_evaluation():
    held_out = lm_data(16, seed=1)
    trainer = Trainer(make_lm(), config(eval_batches=1), lm_data(), held_out)
    inputs, labels = held_out.tensors
    with torch.no_grad():
        first = F.cross_entropy(trainer.model(inputs[:8]).reshape(-1, V), labels[:8].reshape(-1))
        every = F.cross_entropy(trainer.model(inputs).reshape(-1, V), labels.reshape(-1))
    assert trainer.evaluate()["loss"] == pytest.approx(first.item(), rel=1e-6)
    assert abs(first - every) > 1e-4


class _Stop(Exception):
    pass


def test_on_eval_sees_every_evaluation_and_can_end_the_run():
    seen = []
    trainer = run(
        make_lm(), lm_data(), lm_data(8, seed=1), max_steps=6, eval_every=2,
        trainer_kwargs={"on_eval": lambda step, results: seen.append((step, results))},
    )  # fmt: skip
    history = trainer.history.dropna(subset=["eval_loss"])
    assert [step for step, _ in seen] == history["step"].tolist() == [2, 4, 6]
    assert [r["loss"] for _, r in seen] == history["eval_loss"].tolist()

    def stop_at_4(step, results):  # what an Optuna pruning callback does
        if step == 4:
            raise _Stop

    stopped = Trainer(
        make_lm(), config(max_steps=6, eval_every=2), lm_data(), lm_data(8, seed=1),
        on_eval=stop_at_4,
    )  # fmt: skip
    with pytest.raises(_Stop):
        stopped.fit()
    assert stopped.step == 4 and len(stopped.history) == 4
    with pytest.raises(ValueError, match="on_eval must be callable"):
        Trainer(make_lm(), config(), lm_data(), on_eval="report")


def _classification(n: int, *, flip: bool) -> TensorDataset:
    generator = torch.Generator().manual_seed(int(flip))
    x = torch.randn(n, T, D, generator=generator)
    y = (x[:, :, 0].mean(dim=1) > 0).long()
    return TensorDataset(x, 1 - y if flip else y)


def test_early_stopping_stops_when_the_eval_loss_stops_improving():
    """The eval labels are the opposite of the training labels, so learning hurts eval."""
    patience, max_steps = 2, 40
    trainer = run(
        TinyClassifier(),
        _classification(64, flip=False),
        _classification(32, flip=True),
        max_steps=max_steps,
        eval_every=1,
        early_stopping_patience=patience,
    )
    history = trainer.history
    assert trainer.stopped_early and len(history) < max_steps
    best = history["eval_loss"].idxmin()
    assert len(history) == best + 1 + patience  # stopped right after `patience` bad evaluations
    assert trainer.best_eval_loss == history["eval_loss"].min()


def test_min_delta_sets_what_counts_as_an_improvement():
    trainer = run(
        make_lm(),
        lm_data(),
        lm_data(8, seed=1),
        max_steps=20,
        eval_every=2,
        early_stopping_patience=3,
        min_delta=100.0,
    )
    assert trainer.history["step"].iloc[-1] == 8  # first eval at 2, then 3 that are not 100 better
    assert trainer.history["eval_loss"].iloc[-1] < trainer.history["eval_loss"].iloc[1]


def test_history_columns_and_plot():
    trainer = run(make_lm(), lm_data(), lm_data(8, seed=1), max_steps=6, eval_every=3)
    history = trainer.history
    assert list(history.columns[:8]) == list(train_module.HISTORY_COLUMNS)
    assert {"eval_loss", "eval_accuracy"} <= set(history.columns)
    assert (history["tokens_per_s"] > 0).all() and history["time_s"].is_monotonic_increasing
    assert history["epoch"].tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25, 1.5])

    # a Trainer's history is what labkit.viz draws (test_viz checks the figure itself)
    ax = plot_training_curves(history).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["train_loss", "eval_loss"]
    assert len(ax.get_lines()[1].get_xdata()) == 2  # evaluations at steps 3 and 6
    matplotlib.pyplot.close("all")


def test_a_new_trainer_has_an_empty_history_with_the_columns():
    history = Trainer(make_lm(), config(), lm_data()).history
    assert history.empty and list(history.columns) == list(train_module.HISTORY_COLUMNS)


class DictBlocks(torch.utils.data.Dataset):
    """The format of labkit.data.to_lm_blocks: {"input_ids": (T,), "labels": (T,)} rows."""

    def __init__(self, data: TensorDataset) -> None:
        self.inputs, self.labels = data.tensors

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.inputs[i], "labels": self.labels[i]}


class NamedOutput(NamedTuple):
    logits: Tensor


class NamedOutputLM(TinyLM):
    """Returns its logits as a named field, like labkit and Hugging Face models."""

    def forward(self, ids: Tensor) -> NamedOutput:
        return NamedOutput(super().forward(ids))


def test_dict_batches_and_named_outputs_train_like_pairs_and_tensors(capsys):
    data = lm_data(ignore_fraction=0.2)
    plain = run(make_lm(), data, max_steps=3)
    torch.manual_seed(0)
    named = run(NamedOutputLM(), DictBlocks(data), max_steps=3, progress=True)
    assert_same_weights(named.model, plain.model, atol=1e-7)
    assert "training" in capsys.readouterr().err  # the progress bar was shown


# --- activation checkpointing ----------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_gradients_with_dropout():
    model = make_lm(n_layers=2, dropout=0.3)
    checkpointed = copy.deepcopy(model)
    assert enable_activation_checkpointing(checkpointed) == 2
    assert enable_activation_checkpointing(checkpointed) == 2  # twice is harmless
    inputs, labels = lm_data(8).tensors
    for m in (model, checkpointed):
        torch.manual_seed(5)
        F.cross_entropy(m(inputs).reshape(-1, V), labels.reshape(-1)).backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters(), strict=True):
        assert p.grad.abs().sum() > 0, name
        assert torch.equal(p.grad, q.grad), name


def test_activation_checkpointing_shrinks_saved_activations():
    n_layers, batch, length = 4, 8, 32
    model = make_lm(n_layers=n_layers)
    ids = torch.randint(0, V, (batch, length))
    plain = saved_activation_bytes(model, lambda: model(ids))
    enable_activation_checkpointing(model)
    checkpointed = saved_activation_bytes(model, lambda: model(ids))
    kept_inputs = n_layers * batch * length * D * 4  # the checkpoint keeps each block's input
    assert checkpointed + kept_inputs < plain / 3
    with torch.no_grad():  # evaluation stores nothing either way
        assert saved_activation_bytes(model, lambda: model(ids)) == 0


def test_trainer_activation_checkpointing_trains_like_without():
    data = lm_data()
    plain = run(make_lm(n_layers=2, dropout=0.1), data, max_steps=3)
    checkpointed = run(
        make_lm(n_layers=2, dropout=0.1), data, max_steps=3, activation_checkpointing=True
    )
    assert all(
        getattr(layer, "_activation_checkpointing", False) for layer in checkpointed.model.layers
    )
    assert_same_weights(checkpointed.model, plain.model)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": 2.5}, "max_steps"),
        ({"batch_size": True}, "batch_size"),
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"lr": 0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"betas": (0.9,)}, "betas"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"schedule": "linear"}, "schedule"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"min_lr": 1.0}, "min_lr"),
        ({"grad_clip": 0}, "grad_clip"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"precision": "fp8"}, "precision"),
        ({"activation_checkpointing": "yes"}, "activation_checkpointing"),
        ({"eval_every": 0}, "eval_every"),
        ({"eval_batches": -2}, "eval_batches"),
        ({"early_stopping_patience": 0}, "early_stopping_patience"),
        ({"min_delta": -1e-3}, "min_delta"),
        ({"keep_checkpoints": 0}, "keep_checkpoints"),
        ({"checkpoint_dir": 3}, "checkpoint_dir"),
        ({"device": 0}, "device"),
        ({"seed": -1}, "seed"),
        ({"batch_size": 10, "grad_accum_steps": 4}, "batch_size"),
        ({"schedule": "noam"}, "d_model"),
        ({"schedule": "noam", "d_model": 16, "warmup_steps": 0}, "warmup_steps"),
        ({"schedule": "cosine", "warmup_steps": 5}, "warmup_steps"),  # max_steps is 4
        ({"checkpoint_every": 10}, "checkpoint_every"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be .*, got"):
        config(**overrides)


def test_configs_are_frozen_and_replace_checks_again():
    cfg = config()
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'lr'"):
        cfg.lr = 1.0
    with pytest.raises(ValueError, match="TrainConfig.lr must be"):
        replace(cfg, lr=-1.0)


def test_trainer_rejects_bad_input():
    data = lm_data()
    with pytest.raises(ValueError, match="not a DataLoader"):
        Trainer(make_lm(), config(), DataLoader(data, batch_size=8))
    with pytest.raises(ValueError, match="map-style dataset"):
        Trainer(make_lm(), config(), iter(data))
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        Trainer(lambda x: x, config(), data)
    with pytest.raises(ValueError, match="32 examples, fewer than one batch"):
        Trainer(make_lm(), config(batch_size=64), data)
    with pytest.raises(ValueError, match="eval_every=2 .* need eval_data"):
        Trainer(make_lm(), config(eval_every=2), data)
    with pytest.raises(ValueError, match="early_stopping_patience=2 needs eval_every"):
        Trainer(make_lm(), config(early_stopping_patience=2), data, data)
    with pytest.raises(ValueError, match="metrics must map names"):
        Trainer(make_lm(), config(), data, data, metrics={"loss": accuracy})
    no_blocks = nn.Sequential(nn.Embedding(V, D), nn.Linear(D, V))
    with pytest.raises(ValueError, match="activation_checkpointing=True but the model has no"):
        Trainer(no_blocks, config(activation_checkpointing=True), data)
    with pytest.raises(ValueError, match="evaluate\\(\\) needs eval_data"):
        Trainer(make_lm(), config(), data).evaluate()


def test_batches_the_default_loss_cannot_read_are_explained():
    triples = TensorDataset(*lm_data().tensors, torch.zeros(32))
    with pytest.raises(ValueError, match="batch must be \\(inputs, targets\\).*loss_fn"):
        Trainer(make_lm(), config(), triples).fit()
    dicts = [{"ids": torch.zeros(T, dtype=torch.long)}] * 8
    with pytest.raises(ValueError, match="needs 'input_ids' and 'labels', got keys \\['ids'\\]"):
        Trainer(make_lm(), config(), dicts).fit()
    all_ignored = lm_data(ignore_fraction=1.0)
    with pytest.raises(ValueError, match="step 1: every target of the batch is IGNORE_INDEX"):
        Trainer(make_lm(), config(), all_ignored).fit()
