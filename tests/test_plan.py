"""The plan is a pure function of the importance: these tests need no model."""

import math

import pytest

from loradrop_trainer import DropPlan, LoraDropConfig, build_plan
from loradrop_trainer.plan import NoImportanceError

KINDS = {f"layers.{i}.{k}": k for i in range(4) for k in ("q_proj", "v_proj")}


def _importance(values):
    return dict(zip(KINDS, values))


def test_kept_is_shortest_prefix_reaching_threshold():
    imp = _importance([8, 1, 7, 2, 6, 3, 5, 4])
    plan = build_plan(imp, KINDS, 0.5)
    total = sum(imp.values())
    assert math.isclose(sum(plan.importance.values()), 1.0)
    order = sorted(imp, key=lambda n: -imp[n])
    chosen = order[:3]
    assert sum(imp[n] for n in chosen) / total >= 0.5 > sum(imp[n] for n in chosen[:-1]) / total
    # layers.3.q_proj is the only q_proj left: sharing with nobody, it keeps its own LoRA, so it counts as kept
    assert plan.kept == [*chosen, "layers.3.q_proj"]
    assert plan.shared == {"v_proj": ["layers.3.v_proj", "layers.2.v_proj", "layers.1.v_proj", "layers.0.v_proj"]}
    assert math.isclose(plan.total, total)


def test_a_module_alone_in_its_kind_is_kept_when_sharing_and_dropped_when_dropping():
    imp = _importance([8, 1, 7, 2, 6, 3, 5, 4])
    assert "layers.3.q_proj" in build_plan(imp, KINDS, 0.5).kept
    dropping = build_plan(imp, KINDS, 0.5, mode="drop")
    assert dropping.shared["q_proj"] == ["layers.3.q_proj"]
    assert "layers.3.q_proj" not in dropping.kept


def test_ties_are_broken_by_name_so_every_rank_agrees():
    plan = build_plan(_importance([1] * 8), KINDS, 0.5)
    assert plan.kept == sorted(KINDS)[:4]
    reordered = dict(reversed(list(_importance([1] * 8).items())))
    assert build_plan(reordered, KINDS, 0.5).kept == plan.kept


def test_threshold_one_keeps_every_module_with_importance():
    plan = build_plan(_importance([1, 1, 1, 0, 1, 1, 1, 1]), KINDS, 1.0, mode="drop")
    assert plan.shared == {"v_proj": ["layers.1.v_proj"]}


def test_min_kept_tops_up_each_kind():
    plan = build_plan(_importance([8, 1, 7, 2, 6, 3, 5, 4]), KINDS, 0.3, min_kept=2)
    kept_v = [n for n in plan.kept if KINDS[n] == "v_proj"]
    assert kept_v == ["layers.3.v_proj", "layers.2.v_proj"]
    plan.validate()


@pytest.mark.parametrize("values", [[0] * 8, [math.nan] + [1] * 7, [math.inf] + [1] * 7])
def test_zero_or_non_finite_importance_is_refused(values):
    with pytest.raises(NoImportanceError, match="importance"):
        build_plan(_importance(values), KINDS, 0.9)


def test_json_round_trip_and_version_check():
    plan = build_plan(_importance([8, 1, 7, 2, 6, 3, 5, 4]), KINDS, 0.9, step=3)
    again = DropPlan.from_dict(plan.to_dict())
    assert again == plan
    with pytest.raises(ValueError, match="version 99"):
        DropPlan.from_dict({**plan.to_dict(), "version": 99})
    broken = plan.to_dict()
    broken["shared"]["v_proj"].append(plan.kept[0])
    with pytest.raises(ValueError, match="inconsistent"):
        DropPlan.from_dict(broken)


def test_kept_fraction_counts_one_lora_per_shared_kind():
    plan = build_plan(_importance([8, 1, 7, 2, 6, 3, 5, 4]), KINDS, 0.5)
    sizes = dict.fromkeys(KINDS, 10)
    assert plan.kept_fraction(sizes) == (3 + 2) / 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"threshold": 0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"shared_init": "zeros"}, "shared_init"),
        ({"mode": "prune"}, "mode"),
        ({"mode": "drop", "shared_init": "fresh"}, "shared_init"),
        ({"min_kept": -1}, "min_kept"),
        ({"score_every": 0}, "score_every"),
        ({"target": [""]}, "target"),
    ],
)
def test_config_rejects_bad_values_with_a_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraDropConfig(**kwargs)


def test_switch_step_is_ceil_of_alpha_times_steps():
    assert LoraDropConfig(alpha=0.1).switch_step(95) == 10
    assert LoraDropConfig(alpha=0.1).switch_step(100) == 10


def test_per_kind_normalisation_keeps_each_kinds_own_share():
    # q_proj carries almost everything; globally, v_proj would be dropped wholesale.
    imp = _importance([100, 1, 90, 2, 80, 3, 70, 4])
    assert not any(KINDS[n] == "v_proj" for n in build_plan(imp, KINDS, 0.9).kept)
    plan = build_plan(imp, KINDS, 0.7, per_kind=True, mode="drop")  # drop: a module alone in its kind is not kept
    assert [n for n in plan.kept if KINDS[n] == "q_proj"] == ["layers.0.q_proj", "layers.1.q_proj", "layers.2.q_proj"]
    assert [n for n in plan.kept if KINDS[n] == "v_proj"] == ["layers.3.v_proj", "layers.2.v_proj"]
    assert plan.shared == {"q_proj": ["layers.3.q_proj"], "v_proj": ["layers.1.v_proj", "layers.0.v_proj"]}
    assert LoraDropConfig(normalize="kind").normalize == "kind"
    with pytest.raises(ValueError, match="normalize"):
        LoraDropConfig(normalize="layer")
