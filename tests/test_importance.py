"""Importance equals `sum ||scaling * B A x||^2` over real tokens, counted once per training micro-batch."""

import pytest
import torch
from helpers import TokenDataset, lora_and_frozen_norms, random_lora_b, tiny_llama, training_args
from torch.utils.data import default_collate
from transformers import Trainer

from loradrop_trainer import LoraDropCallback, find_lora_layers
from loradrop_trainer.importance import ImportanceCollector


def _reference(model, batch):
    """The LoRA term of each module (its output minus its frozen layer's output), squared and summed over the mask."""
    return lora_and_frozen_norms(model, batch)[0]


def _batch(n=6, seed=3):
    data = TokenDataset(n=n, seed=seed)
    batch = default_collate([data[i] for i in range(n)])
    assert (batch["attention_mask"] == 0).any(), "the batch must hold padding for this test to mean anything"
    return batch


def test_matches_hand_computed_reference_on_padded_batch():
    model = random_lora_b(tiny_llama())
    batch = _batch()
    expected = _reference(model, batch)
    model.train()
    collector = ImportanceCollector(model, find_lora_layers(model))
    model(**batch).loss.backward()
    got = collector.totals()
    collector.remove()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-4)
    unmasked = ImportanceCollector(model, find_lora_layers(model))
    model(input_ids=batch["input_ids"], labels=batch["labels"])
    assert sum(unmasked.totals().values()) > sum(expected.values()) * 1.01, "padding must be what the mask removes"


@pytest.mark.parametrize("reentrant", [False, True])
def test_counted_once_under_activation_checkpointing(reentrant):
    model = random_lora_b(tiny_llama())
    batch = _batch()
    expected = _reference(model, batch)
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    recomputed = []
    layer = next(iter(find_lora_layers(model).values()))
    layer.lora_B["default"].register_forward_hook(lambda *a: recomputed.append(1))
    collector = ImportanceCollector(model, find_lora_layers(model))
    model(**batch).loss.backward()
    assert len(recomputed) == 2, "checkpointing must recompute the forward for this test to mean anything"
    got = collector.totals()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-4)


def test_not_counted_in_eval_mode_or_without_grad():
    model = random_lora_b(tiny_llama())
    batch = _batch()
    collector = ImportanceCollector(model, find_lora_layers(model))
    model.eval()
    model(**batch)
    model.train()
    with torch.no_grad():
        model(**batch)
    assert set(collector.totals().values()) == {0.0}


def test_score_every_scores_one_forward_in_k():
    model = random_lora_b(tiny_llama())
    batch = _batch()
    expected = _reference(model, batch)
    model.train()
    collector = ImportanceCollector(model, find_lora_layers(model), score_every=3)
    for _ in range(4):
        model(**batch)
    name = next(iter(expected))
    assert collector.totals()[name] == pytest.approx(2 * expected[name], rel=1e-4)


def _trainer_total(tmp_path, with_eval: bool, **args):
    """Collect over exactly one epoch with a learning rate of 0: the total is then independent of batch order."""
    data = TokenDataset(n=32, seed=5)
    callback = LoraDropCallback(alpha=0.5)
    overrides = dict(max_steps=8, learning_rate=0.0, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer = Trainer(
        model=random_lora_b(tiny_llama()),
        args=training_args(tmp_path, **overrides, **args),
        train_dataset=data,
        eval_dataset=TokenDataset(n=8, seed=9) if with_eval else None,
        callbacks=[callback],
    )
    trainer.train()
    raw = {n: v * callback.plan.total for n, v in callback.plan.importance.items()}
    reference = random_lora_b(tiny_llama())
    expected = dict.fromkeys(raw, 0.0)
    for i in range(0, 32, 8):
        for name, value in _reference(reference, default_collate([data[j] for j in range(i, i + 8)])).items():
            expected[name] += value
    return raw, expected


@pytest.mark.parametrize(
    "args",
    [{}, {"activation_checkpointing": True}, {"eval_strategy": "steps", "eval_steps": 1}],
    ids=["grad-accumulation", "checkpointing+accumulation", "eval-during-collection"],
)
def test_trainer_counts_each_micro_batch_once(tmp_path, args):
    raw, expected = _trainer_total(tmp_path, with_eval="eval_strategy" in args, **args)
    for name in expected:
        assert raw[name] == pytest.approx(expected[name], rel=1e-4)


def test_20_1_removed_hooks_score_nothing_and_attach_goes_on_from_the_totals():
    """The overhead benchmark times the same model with and without the hooks: `remove` must leave a plain model and
    `attach` continue the totals, without scoring a forward twice."""
    model = random_lora_b(tiny_llama())
    batch = _batch()
    expected = _reference(model, batch)
    model.train()
    collector = ImportanceCollector(model, find_lora_layers(model))
    model(**batch)
    collector.remove()
    model(**batch)  # no hooks: not counted
    collector.attach()
    collector.attach()  # already attached: no second set of hooks
    model(**batch)
    got = collector.totals()
    collector.remove()
    for name in expected:
        assert got[name] == pytest.approx(2 * expected[name], rel=1e-4)
    lora_b = [layer.lora_B["default"] for layer in find_lora_layers(model).values()]
    assert not any(b._forward_pre_hooks or "forward" in b.__dict__ for b in lora_b)


def test_20_1_a_copy_of_the_model_made_while_collecting_computes_with_its_own_weights():
    """`lora_B` passes its input on from a wrapper of its `forward`, not a hook (a hook costs ~1 ms a forward at 224
    modules): the wrapper is a method of the module, so a deep copy (an EMA model, say) runs the copy's weights."""
    import copy

    model = random_lora_b(tiny_llama())
    batch = _batch()
    model.train()
    collector = ImportanceCollector(model, find_lora_layers(model))
    twin = copy.deepcopy(model)
    for layer in find_lora_layers(twin).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    collector.remove()
    with torch.no_grad():
        got = twin(**batch).logits
        for layer in find_lora_layers(twin).values():
            del layer.lora_B["default"].forward  # the copy's wrapper taken off: plain PEFT on the same weights
        expected = twin(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(expected, model(**batch).logits)


def test_20_1_a_forward_another_library_set_is_called_and_given_back():
    """accelerate's hooks replace a module's `forward` by an instance attribute: the collector wraps that one, and
    `remove` puts it back. A wrapper that something else wrapped in turn cannot be taken off: it stays, inert, and an
    attachment after it does not count a forward twice."""
    model = random_lora_b(tiny_llama())
    batch = _batch()
    expected = _reference(model, batch)
    model.train()
    layers = find_lora_layers(model)
    lora_b = layers[next(iter(layers))].lora_B["default"]
    calls = []

    def theirs(x, original=lora_b.forward):
        calls.append(1)
        return original(x)

    lora_b.forward = theirs
    collector = ImportanceCollector(model, layers)
    model(**batch)
    assert calls == [1]
    collector.remove()
    assert lora_b.forward is theirs
    collector.attach()
    ours = lora_b.forward
    lora_b.forward = lambda x: ours(x)  # wrapped in turn, after the collector
    collector.remove()
    collector.attach()
    model(**batch)
    collector.remove()
    got = collector.totals()
    for name in expected:
        assert got[name] == pytest.approx(2 * expected[name], rel=1e-4)
    assert len(calls) == 2
