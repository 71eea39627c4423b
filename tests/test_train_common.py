"""The run folder shared by the trainers: run_config.json, metrics.jsonl, rotated checkpoints."""

import json

import pytest
import torch

from tsdfm.models.errors import CheckpointError, ConfigError
from tsdfm.models.train.common import (
    EMA,
    MetricsLog,
    check_run_config,
    checkpoint_dir,
    due,
    resume_latest,
    rotate_checkpoints,
    save_step_state,
)

RECORD = {"run": {"lr": 0.001, "steps": 8}, "teacher": "sha256:aa", "data": {"kind": "synthetic"}}


def test_run_config_is_written_once_and_accepted_again(tmp_path):
    check_run_config(tmp_path, RECORD)
    text = (tmp_path / "run_config.json").read_text()
    assert text == json.dumps(RECORD, indent=1)
    check_run_config(tmp_path, json.loads(text))  # the same record resumes
    assert (tmp_path / "run_config.json").read_text() == text


def test_changed_run_config_names_every_change_in_record_order(tmp_path):
    check_run_config(tmp_path, RECORD)
    other = {"run": {"lr": 0.01, "steps": 9}, "teacher": "sha256:bb", "data": {"kind": "corpus"}}
    with pytest.raises(ConfigError) as e:
        check_run_config(tmp_path, other, holds="a compass run", names={"data": "dataset"})
    assert str(e.value) == (
        f"{tmp_path} holds a compass run with a different config "
        "(changed: lr, steps, teacher, dataset); "
        "pass a new --out or delete the folder to start over"
    )
    assert json.loads((tmp_path / "run_config.json").read_text()) == RECORD  # not overwritten


def test_a_config_key_dropped_since_the_run_started_is_named(tmp_path):
    check_run_config(tmp_path, RECORD)
    with pytest.raises(ConfigError, match=r"different config \(changed: steps\)"):
        check_run_config(tmp_path, {**RECORD, "run": {"lr": 0.001}})


def test_unreadable_run_config_says_how_to_start_over(tmp_path):
    (tmp_path / "run_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"run_config.json is not valid JSON; delete "):
        check_run_config(tmp_path, RECORD)


def test_due_every_n_steps_and_after_the_last():
    assert [n for n in range(1, 11) if due(n, 4, 10)] == [4, 8, 10]
    assert [n for n in range(1, 5) if due(n, 1, 4)] == [1, 2, 3, 4]


def test_metrics_log_appends_and_a_resume_drops_the_lines_after_its_checkpoint(tmp_path):
    with MetricsLog(tmp_path) as log:
        for step in (1, 2, 3):
            log.write({"step": step, "loss": 1.0 / step})
            # flushed at once: a killed run keeps every line it wrote
            assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == step
    assert [m["step"] for m in log.history] == [1, 2, 3]
    with MetricsLog(tmp_path) as log:  # no resume_step: the file is kept as it is
        log.write({"step": 3, "loss": 0.3})
    with MetricsLog(tmp_path, resume_step=2) as log:
        log.write({"step": 3, "loss": 0.25})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"]) for m in lines] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert log.history == [{"step": 3, "loss": 0.25}]


def test_rotation_keeps_the_newest_two_checkpoints(tmp_path):
    for step in (1, 5, 10, 100):
        checkpoint_dir(tmp_path, step).mkdir(parents=True)
    rotate_checkpoints(tmp_path)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-0000010", "step-0000100"]


def test_step_state_resumes_model_optimizer_ema_and_generators(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ema = EMA(model, 0.9)
    gen = torch.Generator().manual_seed(5)
    for step in (1, 2, 3):
        loss = model(torch.randn(4, 3, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        save_step_state(tmp_path, step, model, opt, ema, {"data": gen.get_state()}, {"pos": step})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-0000002",
        "step-0000003",
    ]

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_ema = EMA(fresh, 0.9)
    state = resume_latest(tmp_path, fresh, fresh_opt, fresh_ema)
    assert state.step == 3 and state.extra == {"pos": 3}
    assert torch.equal(state.generators["data"], gen.get_state())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert fresh_ema.updates == 3
    assert all(torch.equal(fresh_ema.shadow[k], v) for k, v in ema.shadow.items())
    moments = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], moments)
