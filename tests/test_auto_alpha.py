"""alpha="auto": switch once the plan stops changing, at the latest at max_alpha; the same after a resume."""

import pytest
import torch
from helpers import TokenDataset, random_lora_b, tiny_llama, training_args
from scipy.stats import kendalltau
from transformers import Trainer

from loradrop_trainer import DropPlan, LoraDropCallback, LoraDropConfig, plan_keeping
from loradrop_trainer.stability import StabilityTracker, kendall_tau

NAMES = [f"m{i}" for i in range(12)]


def test_kendall_tau_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.randint(0, 4, (30,), generator=g).tolist()
        b = torch.rand(30, generator=g).round(decimals=1).tolist()
        assert kendall_tau(a, b) == pytest.approx(kendalltau(a, b).statistic, abs=1e-12)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 1, 1], [1, 2, 3]) == 0.0


def _tracker_switch(windows, patience=3, min_tau=0.9, min_overlap=1.0):
    """The window (1-based) at which the tracker first says switch, or None."""
    tracker = StabilityTracker(patience, min_tau, min_overlap)
    for w, importance in enumerate(windows, start=1):
        kept = sorted(importance, key=importance.get, reverse=True)[:4]
        if tracker.update(w, importance, kept):
            return w, tracker
    return None, tracker


def test_tracker_switches_on_a_stable_ranking():
    base = {name: float(i + 1) for i, name in enumerate(NAMES)}
    windows = [{n: v * (w + 1) for n, v in base.items()} for w in range(10)]
    step, tracker = _tracker_switch(windows, patience=3)
    assert step == 4, "the first window has nothing to compare with; the next three are stable"
    assert [r["stable"] for r in tracker.history] == [False, True, True, True]
    assert tracker.history[1]["tau"] == 1.0 and tracker.history[1]["overlap"] == 1.0


def test_tracker_does_not_switch_on_a_changing_ranking():
    g = torch.Generator().manual_seed(1)
    windows = [dict(zip(NAMES, torch.rand(len(NAMES), generator=g).tolist())) for _ in range(30)]
    step, tracker = _tracker_switch(windows)
    assert step is None
    assert max(r["tau"] for r in tracker.history[1:]) < 0.9


def test_tracker_thresholds_decide():
    base = {name: float(i + 1) for i, name in enumerate(NAMES)}
    swapped = dict(base, m7=base["m8"], m8=base["m7"])  # m8 leaves the top 4, m7 enters it; tau stays high
    windows = [base, swapped, base, swapped, base]
    assert _tracker_switch(windows, patience=2)[0] is None
    assert _tracker_switch(windows, patience=2, min_overlap=0.5)[0] == 3
    assert _tracker_switch(windows, patience=2, min_overlap=0.5, min_tau=1.0)[0] is None


def test_tracker_state_round_trip_takes_the_same_decisions():
    base = {name: float(i + 1) for i, name in enumerate(NAMES)}
    first = StabilityTracker(3, 0.9)
    first.update(1, base, ["m11"])
    first.update(2, base, ["m11"])
    second = StabilityTracker(3, 0.9)
    second.load_state_dict(first.state_dict())
    assert second.update(3, base, ["m11"]) is False and second.update(4, base, ["m11"]) is True
    assert second.history == [*first.history, *second.history[2:]]


class _Repeated(torch.utils.data.Dataset):
    """The same padded batch every step: with learning rate 0 every step adds the same importance."""

    def __init__(self, n=32):
        self.row = TokenDataset(n=1, seed=4)[0]
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.row


def _run(tmp_path, callback, data, max_steps=40, resume_from=None, save_steps=None, **args):
    args = training_args(
        tmp_path,
        max_steps=max_steps,
        warmup_steps=0,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        **args,
    )
    model = random_lora_b(tiny_llama())
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train(resume_from)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_auto_switches_once_the_ranking_is_stable(tmp_path):
    config = LoraDropConfig(alpha="auto", auto_window=0.05, auto_patience=3, max_alpha=0.5)
    callback = LoraDropCallback(config)
    _run(tmp_path, callback, _Repeated(), learning_rate=0.0)
    assert config.window_steps(40) == 2
    assert callback.plan.step == 8, "windows end at steps 2, 4, 6, 8; the last three are stable"
    assert [r["step"] for r in callback.plan.stability] == [2, 4, 6, 8]
    assert DropPlan.from_dict(callback.plan.to_dict()).stability == callback.plan.stability


class _ChangingPlan(LoraDropCallback):
    """Keeps a different module every time a plan is made: the kept set never settles."""

    def make_plan(self, importance, kinds, step):
        names = sorted(kinds)
        kept = [names[step % len(names)]]
        return plan_keeping(importance, kinds, kept, self.config.threshold, step=step)


def test_auto_falls_back_to_max_alpha_when_the_plan_keeps_changing(tmp_path):
    callback = _ChangingPlan(LoraDropConfig(alpha="auto", auto_window=0.05, max_alpha=0.5))
    _run(tmp_path, callback, _Repeated(), learning_rate=0.0)
    assert callback.plan.step == 20
    assert not any(r["stable"] for r in callback.plan.stability)


@pytest.mark.parametrize("checkpoint", [4, 6])
def test_resume_before_an_auto_switch_is_exact(tmp_path, checkpoint):
    config = dict(alpha="auto", auto_window=0.05, auto_min_overlap=0.85, max_alpha=0.5)
    full = LoraDropCallback(**config)
    full_lora = _run(tmp_path / "full", full, TokenDataset(n=40), save_steps=2)
    assert checkpoint < full.plan.step < 20, "the test needs an early switch after the checkpoint"
    resumed = LoraDropCallback(**config)
    resumed_lora = _run(
        tmp_path / "resumed",
        resumed,
        TokenDataset(n=40),
        resume_from=str(tmp_path / "full" / "out" / f"checkpoint-{checkpoint}"),
    )
    assert resumed.plan == full.plan
    assert all(torch.equal(resumed_lora[name], full_lora[name]) for name in full_lora)


def test_config_validates_the_auto_settings():
    assert LoraDropConfig(alpha="auto").switch_step(100) == 30
    for kwargs, message in [
        ({"alpha": "automatic"}, "alpha"),
        ({"max_alpha": 1.0}, "max_alpha"),
        ({"auto_window": 0}, "auto_window"),
        ({"auto_patience": 0}, "auto_patience"),
        ({"auto_min_tau": 1.5}, "auto_min_tau"),
        ({"auto_min_overlap": 0}, "auto_min_overlap"),
        ({"score": "norm"}, "score"),
        ({"aggregate": "mean"}, "aggregate"),
        ({"restart": "yes"}, "restart"),
    ]:
        with pytest.raises(ValueError, match=message):
            LoraDropConfig(**kwargs)
