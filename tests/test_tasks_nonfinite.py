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


# ------------------------------------------------------------------------ skip / rollback decisions
def test_the_decision_is_taken_on_the_sum_over_ranks_and_read_once():
    # another rank's bad loss (its flag arrives through the reduce) makes this healthy rank skip too
    guard = NonFiniteGuard("skip")
    guard.note_loss(torch.tensor(1.0))
    seen = []

    def other_rank_bad(flags):
        seen.append(flags.clone())
        return flags + torch.tensor([1.0, 1.0, 0.0, float("nan"), 1.0])

    with pytest.warns(UserWarning, match="optimizer step 5 skipped: non-finite loss"):
        assert guard.before_optimizer_step(_optimizer(), step=5, reduce=other_rank_bad) is True
    assert len(seen) == 1 and seen[0].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # one small vector
    assert guard.held and guard.skipped_steps == [5]
    guard.note_loss(torch.tensor(1.0))
    assert guard.before_optimizer_step(_optimizer(), step=6) is False and not guard.held


def test_the_spike_rule_uses_median_and_mad_and_keeps_spikes_out_of_its_history():
    from lightning_convnets.tasks.rollback import LossSpikeRule

    rule = LossSpikeRule(k=5, window=8, min_history=4)
    assert [rule.check(v) for v in (9.0, 1.0, 1.1, 0.9)] == [False] * 4  # too little history to judge
    assert rule.check(1.05) is False and rule.check(50.0) is True
    assert 50.0 not in rule.history and len(rule.history) == 5
    median, sd = rule.band()
    assert median == 1.05 and sd == pytest.approx(1.4826 * 0.05)  # the 9.0 moves neither
    for _ in range(10):  # a flat history: the floor keeps tiny wiggles from being spikes
        rule.check(1.0)
    assert rule.check(1.0001) is False and rule.check(2.0) is True
    with pytest.raises(ValueError, match="spike_threshold must be > 0"):
        LossSpikeRule(k=0)


def test_a_spike_under_skip_is_skipped_and_named():
    guard = NonFiniteGuard("skip", spike_threshold=5)
    guard.spike.min_history = 3
    for step, value in enumerate((1.0, 1.1, 0.9, 1.0)):
        guard.note_loss(torch.tensor(value))
        assert guard.before_optimizer_step(_optimizer(), step=step) is False
    guard.note_loss(torch.tensor(30.0))
    with pytest.warns(UserWarning, match=r"step 4 skipped: loss spike \(30 > median 1"):
        assert guard.before_optimizer_step(_optimizer(), step=4) is True
    assert guard.state_dict()["spike"]["history"] == pytest.approx([1.0, 1.1, 0.9, 1.0])


def test_rollback_options_are_checked():
    with pytest.raises(ValueError, match="spike_threshold=3 needs nonfinite='skip' or 'rollback'"):
        NonFiniteGuard("stop", spike_threshold=3)
    with pytest.raises(ValueError, match="max_rollbacks must be >= 0"):
        NonFiniteGuard("rollback", max_rollbacks=-1)
    from lightning_convnets.tasks.nonfinite import check_rollback_options

    with pytest.raises(ValueError, match="rollback_lr_factor must be in"):
        check_rollback_options(0.0, 10)
    with pytest.raises(ValueError, match="snapshot_every_n_steps must be >= 1"):
        check_rollback_options(0.5, 0)


def test_snapshot_restores_weights_buffers_and_optimizer_state_but_keeps_the_learning_rate():
    from lightning_convnets.tasks.optim import scale_learning_rate
    from lightning_convnets.tasks.rollback import BatchNormBuffers, TrainingSnapshot, invalid_buffers

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(8, 3)).sum().backward()
    opt.step()
    snapshot, buffers = TrainingSnapshot(), BatchNormBuffers(net)
    snapshot.take(net, opt, step=1)
    kept = {k: v.clone() for k, v in net.state_dict().items()}
    adam = {k: v.clone() for k, v in opt.state[net[0].weight].items()}
    for _ in range(3):  # train on, then break the BN statistics
        net(torch.randn(8, 3)).sum().backward()
        opt.step()
    net[1].running_var.fill_(-1.0)
    assert bool(invalid_buffers([net[1]]))
    scale_learning_rate(opt, [], 0.5)
    assert snapshot.restore(net, opt) == 1
    for key, value in net.state_dict().items():
        assert torch.equal(value, kept[key]), key
    for key, value in opt.state[net[0].weight].items():
        assert torch.equal(value, adam[key]), key
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05) and not bool(invalid_buffers([net[1]]))
    opt.step()  # the restored state is the optimizer's own again, not the snapshot's (which stays)
    net(torch.randn(8, 3))
    assert snapshot.restore(net, opt) == 1 and torch.equal(
        net.state_dict()["1.running_mean"], kept["1.running_mean"]
    )
    assert buffers.layers == [net[1]]
