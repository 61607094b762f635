"""dropkit.schedule: the documented rate at every step, the callback driving a model's layers,
and the overfitting controller on synthetic loss curves."""

import math

import pytest
from torch import nn

from dropkit import nn as dnn
from dropkit.concrete import ConcreteDropout
from dropkit.schedule import (
    Constant,
    CurriculumRamp,
    EarlyDropout,
    LateDropout,
    OverfitController,
    RateSchedule,
    ScheduleCallback,
    dropout_layers,
)


def mlp() -> nn.Sequential:
    """Srivastava-style rates: 0.2 on the input, 0.5 on the hidden layers."""
    return nn.Sequential(dnn.Dropout(0.2), nn.Linear(4, 8), nn.ReLU(), dnn.Dropout(0.5), nn.Linear(8, 8),
                         nn.ReLU(), dnn.Dropout(0.5), nn.Linear(8, 2))


def rates(model: nn.Module) -> list[float]:
    return [m.p for m in dropout_layers(model)]


# --- schedules ---------------------------------------------------------------------------------

def test_constant_is_constant():
    assert [Constant(0.3).rate(t, 10) for t in range(12)] == [0.3] * 12


def test_curriculum_exp_follows_morerio_formula():
    ramp = CurriculumRamp(0.5, gamma=0.1)
    for t in (0, 1, 7, 30, 1000):
        assert ramp.rate(t, 100) == pytest.approx(0.5 * (1 - math.exp(-0.1 * t)), abs=1e-15)
    assert ramp.rate(0, 100) == 0.0


def test_curriculum_exp_default_gamma_reaches_p_final_by_end_of_duration():
    ramp = CurriculumRamp(0.5, duration=20)
    assert ramp.rate(20, 1000) == pytest.approx(0.5 * (1 - math.exp(-10)))
    assert ramp.rate(2, 1000) == pytest.approx(0.5 * (1 - math.exp(-1)))
    # without a duration the ramp spans the whole run
    assert CurriculumRamp(0.5).rate(10, 100) == pytest.approx(0.5 * (1 - math.exp(-1)))
    values = [ramp.rate(t, 1000) for t in range(40)]
    assert all(a < b for a, b in zip(values[:20], values[1:21])) and max(values) < 0.5


def test_curriculum_linear_ramps_then_holds():
    ramp = CurriculumRamp(0.4, shape="linear", duration=8)
    assert [ramp.rate(t, 100) for t in (0, 2, 4, 8, 9, 50)] == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.4, 0.4])
    assert CurriculumRamp(0.4, shape="linear").rate(5, 10) == pytest.approx(0.2)


def test_early_dropout_constant_and_linear():
    constant = EarlyDropout(0.1, cutoff=3)
    assert [constant.rate(t, 10) for t in range(6)] == [0.1, 0.1, 0.1, 0.0, 0.0, 0.0]
    linear = EarlyDropout(0.2, cutoff=4, shape="linear")
    assert [linear.rate(t, 10) for t in range(6)] == pytest.approx([0.2, 0.15, 0.1, 0.05, 0.0, 0.0])


def test_late_dropout_starts_at_start():
    late = LateDropout(0.3, start=2)
    assert [late.rate(t, 10) for t in range(5)] == [0.0, 0.0, 0.3, 0.3, 0.3]


@pytest.mark.parametrize("make", [
    lambda: CurriculumRamp(1.5),
    lambda: CurriculumRamp(0.5, shape="cosine"),
    lambda: CurriculumRamp(0.5, shape="linear", gamma=0.1),
    lambda: CurriculumRamp(0.5, duration=0),
    lambda: EarlyDropout(0.1, cutoff=-1),
    lambda: EarlyDropout(0.1, cutoff=3, shape="step"),
    lambda: LateDropout(0.1, start=1.5),
])
def test_schedules_validate_their_settings(make):
    with pytest.raises(ValueError):
        make()


def test_schedules_satisfy_the_protocol():
    for schedule in (Constant(0.1), CurriculumRamp(0.1), EarlyDropout(0.1, 1), LateDropout(0.1, 1)):
        assert isinstance(schedule, RateSchedule)


# --- the callback --------------------------------------------------------------------------------

def test_dropout_layers_finds_dropkit_layers_only():
    model = nn.Sequential(dnn.Dropout(0.1), nn.Dropout(0.1), dnn.Dropout2d(0.2),
                          ConcreteDropout(3, weight_regularizer=0.0, dropout_regularizer=0.0))
    assert dropout_layers(model) == [model[0], model[2]]


def run_loop(cb, model, epochs, steps_per_epoch):
    """A training loop's calls; returns the model's rates seen at every step."""
    seen = []
    cb.on_train_begin(model, epochs * steps_per_epoch, epochs)
    step = 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            cb.on_step_begin(model, step, epoch)
            seen.append(rates(model))
            step += 1
        cb.on_epoch_end(model, epoch, {"train_loss": 1.0, "val_loss": 1.0})
    return seen


def test_step_unit_sets_schedule_rate_at_every_step():
    model = mlp()
    schedule = CurriculumRamp(0.5, shape="linear")
    seen = run_loop(ScheduleCallback(schedule, unit="step", proportional=False), model, epochs=2, steps_per_epoch=5)
    assert seen == [[pytest.approx(schedule.rate(s, 10))] * 3 for s in range(10)]


def test_epoch_unit_changes_rate_per_epoch():
    model = mlp()
    cb = ScheduleCallback(EarlyDropout(0.4, cutoff=2), unit="epoch", proportional=False)
    seen = run_loop(cb, model, epochs=3, steps_per_epoch=2)
    assert [s[0] for s in seen] == [0.4, 0.4, 0.4, 0.4, 0.0, 0.0]
    assert cb.current_p == 0.0


def test_proportional_keeps_input_to_hidden_ratio_and_reports_top_rate():
    model = mlp()
    cb = ScheduleCallback(CurriculumRamp(0.5, shape="linear"), unit="epoch")
    cb.on_train_begin(model, 40, 4)
    assert rates(model) == [0.0, 0.0, 0.0]
    cb.on_step_begin(model, 20, 2)
    assert rates(model) == pytest.approx([0.1, 0.25, 0.25])
    assert cb.current_p == pytest.approx(0.25)
    # a second on_train_begin must not read the ramped-down rates as the model's own
    cb.on_train_begin(model, 40, 4)
    cb.on_step_begin(model, 39, 3)
    assert rates(model) == pytest.approx([0.15, 0.375, 0.375])


def test_layers_argument_restricts_the_callback():
    model = mlp()
    hidden = dropout_layers(model)[1:]
    cb = ScheduleCallback(Constant(0.3), layers=hidden)
    cb.on_train_begin(model, 10, 1)
    assert rates(model) == [0.2, 0.3, 0.3]


def test_callback_errors():
    with pytest.raises(ValueError, match="unit"):
        ScheduleCallback(Constant(0.1), unit="batch")
    with pytest.raises(TypeError, match="rate"):
        ScheduleCallback(0.1)
    with pytest.raises(TypeError, match="dropkit dropout layers"):
        ScheduleCallback(Constant(0.1), layers=[nn.Dropout(0.1)])
    with pytest.raises(ValueError, match="no dropkit dropout layers"):
        ScheduleCallback(Constant(0.1)).on_train_begin(nn.Linear(2, 2), 10, 1)
    with pytest.raises(RuntimeError, match="on_train_begin"):
        ScheduleCallback(Constant(0.1)).on_step_begin(mlp(), 0, 0)


def test_resumed_run_gets_the_same_rates():
    schedule = CurriculumRamp(0.5, duration=6)
    full = run_loop(ScheduleCallback(schedule, unit="step"), mlp(), epochs=3, steps_per_epoch=4)
    model, cb = mlp(), ScheduleCallback(schedule, unit="step")
    cb.on_train_begin(model, 12, 3)
    resumed = []
    for step in range(8, 12):
        cb.on_step_begin(model, step, step // 4)
        resumed.append(rates(model))
    assert resumed == full[8:]


# --- the controller ------------------------------------------------------------------------------

def drive(controller, train, val, model=None):
    """Feed per-epoch losses to the controller; returns the rate after each epoch."""
    model = model or mlp()
    controller.on_train_begin(model, 10 * len(train), len(train))
    out = []
    for epoch, (t, v) in enumerate(zip(train, val)):
        controller.on_epoch_end(model, epoch, {"train_loss": t, "val_loss": v})
        out.append(controller.current_p)
    return out


def overfitting_curves(epochs):
    """Training loss keeps falling; validation loss falls for 4 epochs, then climbs."""
    train = [1.0 * 0.8**e for e in range(epochs)]
    val = [0.95 * 0.85**e if e < 4 else 0.95 * 0.85**3 * 1.06 ** (e - 3) for e in range(epochs)]
    return train, val


def test_overfitting_curves_push_p_up():
    train, val = overfitting_curves(10)
    ps = drive(OverfitController(0.3), train, val)
    assert ps[:4] == [0.3] * 4  # nothing to react to while validation improves
    assert ps[-1] > 0.3 + 0.1
    assert all(b >= a for a, b in zip(ps, ps[1:]))


def test_underfitting_curves_push_p_down_every_patience_epochs():
    train, val = [0.90] * 8, [0.88] * 8  # flat, and validation no worse than training
    ps = drive(OverfitController(0.5, patience=2), train, val)
    assert ps == pytest.approx([0.5, 0.5, 0.45, 0.45, 0.4, 0.4, 0.35, 0.35])


def test_steady_improvement_leaves_p_alone():
    train = [1.0 * 0.93**e for e in range(20)]
    val = [1.05 * 0.93**e for e in range(20)]
    controller = OverfitController(0.4)
    assert drive(controller, train, val) == [0.4] * 20
    assert controller.last_action is None


def test_wide_but_steady_gap_while_validation_improves_is_not_overfitting():
    train = [0.5 * 0.9**e for e in range(10)]
    val = [1.0 * 0.9**e for e in range(10)]
    assert drive(OverfitController(0.4), train, val) == [0.4] * 10


@pytest.mark.parametrize("mode", ["add", "mul"])
def test_p_stays_in_bounds(mode):
    train, val = overfitting_curves(60)
    ps = drive(OverfitController(0.5, p_min=0.1, p_max=0.6, step=0.2, mode=mode), train, val)
    assert max(ps) == pytest.approx(0.6) and min(ps) >= 0.5
    ps = drive(OverfitController(0.5, p_min=0.1, p_max=0.6, step=0.2, mode=mode), [1.0] * 60, [1.0] * 60)
    assert min(ps) == pytest.approx(0.1) and max(ps) <= 0.5


def test_controller_moves_the_model_layers_and_keeps_ratios():
    model = mlp()
    controller = OverfitController(patience=1)  # starts at the model's top rate, 0.5
    drive(controller, [1.0] * 3, [1.0] * 3, model)
    assert controller.current_p == pytest.approx(0.4)
    assert rates(model) == pytest.approx([0.16, 0.4, 0.4])


def test_state_dict_resumes_the_same_decisions():
    train, val = overfitting_curves(12)
    full = drive(OverfitController(0.3), train, val)
    first = OverfitController(0.3)
    drive(first, train[:6], val[:6])
    resumed = OverfitController(0.3)
    resumed.load_state_dict(first.state_dict())
    model = mlp()
    resumed.on_train_begin(model, 120, 12)
    assert resumed.current_p == full[5]
    for epoch in range(6, 12):
        resumed.on_epoch_end(model, epoch, {"train_loss": train[epoch], "val_loss": val[epoch]})
        assert resumed.current_p == full[epoch]


def test_controller_validates():
    with pytest.raises(ValueError, match="p_min"):
        OverfitController(p_min=0.6, p_max=0.5)
    with pytest.raises(ValueError, match="mul"):
        OverfitController(mode="mul")
    with pytest.raises(ValueError, match="patience"):
        OverfitController(patience=0)
    controller = OverfitController(0.3)
    with pytest.raises(RuntimeError, match="on_train_begin"):
        controller.on_epoch_end(mlp(), 0, {"train_loss": 1.0, "val_loss": 1.0})
    controller.on_train_begin(mlp(), 10, 1)
    with pytest.raises(ValueError, match="finite"):
        controller.on_epoch_end(mlp(), 0, {"train_loss": float("nan"), "val_loss": 1.0})
    with pytest.raises(KeyError):
        controller.on_epoch_end(mlp(), 0, {"loss": 1.0})


def test_step_hook_leaves_rates_alone():
    model = mlp()
    controller = OverfitController(0.3)
    controller.on_train_begin(model, 10, 1)
    before = rates(model)
    controller.on_step_begin(model, 3, 0)
    assert rates(model) == before
