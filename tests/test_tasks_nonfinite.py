"""The non-finite policy on its own (tasks/nonfinite.py): NonFiniteGuard without a trainer. The policy in
a real fit (stop, skip, warn, checkpoints, DDP) is tested in tests/test_reliability.py."""

from __future__ import annotations

import pytest
import torch

from lightning_convnets.tasks.nonfinite import NonFiniteGuard, NonFiniteLossError, monitor_report


def _optimizer(grad: float = 0.0) -> torch.optim.Optimizer:
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.full((2,), grad)
    return torch.optim.SGD([p], lr=0.1)


def test_stop_raises_at_the_check_naming_the_first_bad_step_and_its_loss():
    guard = NonFiniteGuard("stop", owner="Task")
    guard.note_loss(torch.tensor(1.0))
    assert guard.before_optimizer_step(_optimizer(), step=0) is False
    guard.check()  # nothing bad yet
    guard.note_loss(torch.tensor(float("inf")))
    guard.before_optimizer_step(_optimizer(), step=4)
    guard.note_loss(torch.tensor(float("nan")))
    guard.before_optimizer_step(_optimizer(), step=5)
    with pytest.raises(
        NonFiniteLossError, match=r"Task: non-finite training loss at optimizer step 4: loss inf"
    ):
        guard.check()


def test_a_bad_gradient_under_a_finite_loss_is_named_as_such():
    guard = NonFiniteGuard("stop")
    guard.note_loss(torch.tensor(2.0))
    guard.before_optimizer_step(_optimizer(float("nan")), step=7)
    with pytest.raises(
        NonFiniteLossError, match=r"gradient \(the loss was finite\) at optimizer step 7: loss 2"
    ):
        guard.check(report=lambda: "; Monitor: module 'x'")


def test_gradient_accumulation_keeps_the_bad_micro_batch_loss():
    guard = NonFiniteGuard("stop")
    for value in (float("nan"), 1.0, 2.0):  # three micro-batches of one optimizer step
        guard.note_loss(torch.tensor(value))
    guard.before_optimizer_step(_optimizer(), step=2)
    with pytest.raises(NonFiniteLossError, match="loss nan"):
        guard.check()


def test_skip_drops_the_gradients_counts_and_stops_after_max_in_a_row():
    guard = NonFiniteGuard("skip", max_skipped_steps=2)
    optimizer = _optimizer()
    guard.note_loss(torch.tensor(float("nan")))
    with pytest.warns(UserWarning, match="optimizer step 0 skipped"):
        assert guard.before_optimizer_step(optimizer, step=0) is True
    assert optimizer.param_groups[0]["params"][0].grad is None and guard.skipped == 1
    guard.note_loss(torch.tensor(1.0))
    assert guard.before_optimizer_step(_optimizer(), step=1) is False  # a good step resets the run
    guard.note_loss(torch.tensor(float("nan")))
    with pytest.warns(UserWarning):
        guard.before_optimizer_step(_optimizer(), step=2)
    guard.note_loss(torch.tensor(float("nan")))
    with pytest.warns(UserWarning), pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        guard.before_optimizer_step(_optimizer(), step=3)
    assert guard.skipped == 3


def test_warn_warns_once():
    guard = NonFiniteGuard("warn")
    guard.note_loss(torch.tensor(float("nan")))
    guard.before_optimizer_step(_optimizer(), step=1)
    with pytest.warns(UserWarning, match="training goes on"):
        guard.check()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.check()  # said once


def test_every_rank_sees_the_first_bad_step_of_any_rank():
    guard = NonFiniteGuard("stop")
    guard.note_loss(torch.tensor(float("nan")))
    guard.before_optimizer_step(_optimizer(), step=5)
    with pytest.raises(
        NonFiniteLossError, match="at optimizer step 3: loss nan"
    ):  # rank 1's step, its loss unknown
        guard.check(gather=lambda t: torch.stack([t, torch.tensor(3), torch.tensor(-1)]))


def test_options_are_checked_and_the_monitor_report_reads_any_callback_with_nonfinite():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        NonFiniteGuard("ignore")
    with pytest.raises(ValueError, match="max_skipped_steps must be >= 1"):
        NonFiniteGuard("skip", max_skipped_steps=0)

    class Monitor:
        nonfinite = {"layer": "backbone.layer2", "step": 3}

    assert "first non-finite activation came from module 'backbone.layer2' at step 3" in monitor_report(
        [Monitor()]
    )
    assert monitor_report([object()]) == ""
