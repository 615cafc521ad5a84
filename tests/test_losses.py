"""Training losses against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from sparsedist.config.schema import DistillConfig, ScheduleConfig
from sparsedist.train.losses import TopK, distill_kl, training_loss
from sparsedist.train.optim import lr_factor


def test_distillation_kl_matches_its_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    t = 2.0
    p = torch.softmax(teacher / t, -1)
    expected = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    torch.testing.assert_close(distill_kl(student, teacher, t), expected)
    assert float(distill_kl(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_chunked_kl_equals_the_whole_and_has_the_same_gradient():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 11, requires_grad=True), torch.randn(3, 5, 11)
    whole = distill_kl(student, teacher, 1.5, chunk=10_000)
    (grad_whole,) = torch.autograd.grad(whole, student)
    chunked = distill_kl(student, teacher, 1.5, chunk=4)  # 15 tokens: chunks of 4, 4, 4, 3
    (grad_chunked,) = torch.autograd.grad(chunked, student)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_chunked, grad_whole)


def test_training_loss_mixes_kl_and_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    labels = torch.randint(0, 7, (2, 3))
    cfg = DistillConfig(weight=0.25, temperature=1.0)
    loss, parts = training_loss(student, labels, teacher, cfg)
    assert float(loss) == pytest.approx(0.25 * float(parts["kd"]) + 0.75 * float(parts["ce"]), rel=1e-6)
    plain, parts = training_loss(student, labels, None, cfg)
    assert set(parts) == {"ce"} and float(plain) == pytest.approx(float(parts["ce"]))


def test_lr_schedule_warms_up_then_follows_a_cosine_to_the_floor():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(50, 110, ScheduleConfig(kind="constant", warmup_steps=10)) == 1.0


def test_topk_teacher_kl_is_the_full_kl_when_k_is_the_vocabulary():
    student, teacher = torch.randn(2, 5, 13), torch.randn(2, 5, 13)
    full = distill_kl(student, teacher, 2.0)
    for k, exact in ((13, True), (4, False)):
        top = torch.log_softmax(teacher / 2.0, -1).topk(k, -1)
        value = distill_kl(student, TopK(top.values, top.indices.int()), 2.0, chunk=3)
        assert (float(value) == pytest.approx(float(full), rel=1e-5)) == exact, k
