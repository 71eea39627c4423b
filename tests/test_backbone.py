import pytest
import torch

from tsdfm.models.backbone import Backbone, BackboneConfig
from tsdfm.models.errors import ConfigError
from tsdfm.models.flow_model import FlowModel, student_from_teacher, teacher_config


def test_shapes_and_time_conditioning():
    torch.manual_seed(0)
    cfg = BackboneConfig(
        vocab_in=11,
        vocab_out=10,
        max_len=16,
        d_model=32,
        n_layers=2,
        n_heads=4,
        cond_dim=32,
        time_conditioning=True,
    )
    net = Backbone(cfg)
    for p in net.parameters():  # leave adaLN-zero init so that t actually matters
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 11, (3, 16))
    a = net(x, torch.full((3,), 0.1))
    b = net(x, torch.full((3,), 0.9))
    assert a.shape == (3, 16, 10)
    assert (a - b).abs().max() > 1e-3
    # bidirectional: changing the last token changes the first position's output
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 11
    assert (net(y, torch.full((3,), 0.1))[:, 0] - a[:, 0]).abs().max() > 1e-4


def test_scalar_head_gives_one_value_per_sequence():
    cfg = BackboneConfig(
        vocab_in=5,
        vocab_out=5,
        max_len=8,
        d_model=16,
        n_layers=1,
        n_heads=2,
        cond_dim=16,
        head="scalar",
    )
    out = Backbone(cfg)(torch.randint(0, 5, (4, 8)), torch.rand(4))
    assert out.shape == (4,)


def test_student_starts_as_the_teacher():
    torch.manual_seed(1)
    teacher = FlowModel(teacher_config(10, 12, d_model=32, n_layers=2, n_heads=2)).eval()
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.05)
    student = student_from_teacher(teacher).eval()
    assert student.config.role == "student" and student.config.backbone.step_conditioning
    x = torch.randint(0, 11, (5, 12))
    t = torch.rand(5)
    out_t = teacher(x, t)
    for h in (1.0, 0.125):
        torch.testing.assert_close(student(x, t, torch.full((5,), h)), out_t)
    assert not student.time_invariant and teacher.time_invariant


def test_bad_backbone_configs():
    with pytest.raises(ConfigError, match="not divisible by n_heads"):
        BackboneConfig(vocab_in=5, vocab_out=5, max_len=8, d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="n_layers=0 must be a positive integer"):
        BackboneConfig(vocab_in=5, vocab_out=5, max_len=8, n_layers=0)
