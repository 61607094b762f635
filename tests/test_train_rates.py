"""dropkit.lab.train with moving rates: schedules, the overfitting controller (--p auto), Concrete Dropout."""

import pytest

from dropkit.lab.train import ADAPTIVE_START_P, TrainConfig, model_p, train

SMALL = dict(limit_train=800, limit_test=200, val_size=200, batch_size=100)


def _ps(result):
    return [row["p"] for row in result.history]


def test_adaptive_rates_start_low_unless_given_a_start():
    assert model_p(TrainConfig()) is None  # a fixed rate keeps the model's default
    assert model_p(TrainConfig(p=0.3)) == 0.3
    assert model_p(TrainConfig(rate="auto")) == model_p(TrainConfig(rate="concrete")) == ADAPTIVE_START_P == 0.1
    assert model_p(TrainConfig(rate="auto", p=0.4)) == 0.4
    first = train(TrainConfig(**SMALL, epochs=1, rate="auto"), quiet=True).history[0]
    assert first["p"] == ADAPTIVE_START_P  # the controller moves p only after an epoch's losses


def test_early_and_late_schedules_record_the_documented_p():
    early = train(TrainConfig(**SMALL, p=0.4, epochs=3, drop_schedule="early", drop_cutoff=2), quiet=True)
    assert _ps(early) == pytest.approx([0.4, 0.2, 0.0])
    late = train(TrainConfig(**SMALL, p=0.4, epochs=3, drop_schedule="late", drop_cutoff=1), quiet=True)
    assert _ps(late) == pytest.approx([0.0, 0.4, 0.4])


def test_curriculum_ramps_up_towards_p():
    ps = _ps(train(TrainConfig(**SMALL, p=0.5, epochs=3, drop_schedule="curriculum"), quiet=True))
    assert 0 < ps[0] < ps[1] <= ps[2] <= 0.5


def test_auto_resumes_with_the_controller_state(tmp_path):
    config = TrainConfig(**SMALL, epochs=3, rate="auto")
    straight = train(config, tmp_path / "a", quiet=True)
    train(TrainConfig(**SMALL, epochs=1, rate="auto"), tmp_path / "b", quiet=True)
    resumed = train(config, tmp_path / "b", resume=True, quiet=True)
    drop = {"seconds", "eval_seconds", "peak_rss_mib", "saved_mib"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.history] == \
           [{k: v for k, v in r.items() if k not in drop} for r in straight.history]


def test_concrete_learns_p_and_records_it():
    result = train(TrainConfig(**SMALL, epochs=2, rate="concrete", weight_decay=1e-3), quiet=True)
    rates = result.history[-1]["concrete_p"]
    assert rates and all(0 < p < 1 for p in rates.values())
    assert result.history[-1]["p"] == max(rates.values())
    assert result.history[-1]["p"] != pytest.approx(0.5, abs=1e-6)  # moved from its start


@pytest.mark.parametrize("bad, message", [
    (dict(drop_schedule="early", drop_cutoff=0, epochs=3), r"drop_cutoff must be in \[1, epochs=3\)"),
    (dict(rate="auto", val_size=0), "val_size must be > 0"),
    (dict(rate="concrete", drop_schedule="late", drop_cutoff=1, epochs=2), "applies to a fixed rate"),
    (dict(rate="sometimes"), "rate must be one of"),
])
def test_bad_rate_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**SMALL, **bad}).validate()
