"""Shattered gradients (Balduzzi et al. 2017, "The Shattered Gradients Problem").

:func:`shattering_profile` walks a line of inputs x(t) = x_a + t (x_b - x_a), takes the directional
derivative s(t) of the output by autograd and its autocorrelation rho(k); rho(1) inside the white-noise
band +-1.96/sqrt(K) means shattered gradients. It leaves the model exactly as it found it.
:class:`GradientShatteringMonitor` runs it on a fixed probe line every few hundred steps and finds the
network, inputs and prediction of any LightningModule by itself. The method in full: ``docs/monitors.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_convnets.batch import batch_inputs, describe_batch

from . import diagnosis, plots
from .core import (
    DEFAULT_MAX_HISTORY,
    MonitorCallback,
    MonitorConfigError,
    _cached_state_key,
    observers_paused,
)
from .diagnosis import Finding

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl
    from matplotlib.figure import Figure

__all__ = ["GradientShatteringMonitor", "ShatteringProfile", "autocorrelation", "shattering_profile"]

BNMode = Literal["eval", "batch"]
_BN_MODES = ("eval", "batch")


@dataclass
class ShatteringProfile:
    """The gradient along one probe line and its autocorrelation.

    Attributes:
        t: the K positions on the line, ``linspace(0, 1, K)``.
        s: s(t) = <grad_x f(x(t)), d>, the derivative of f along the line (K values).
        autocorrelation: rho(k) for k = 0..K-1 (rho(0) = 1); all NaN when s(t) is constant.
        lag1: rho(1). Near 1: smooth ("brown noise"); inside +-``white_noise_band``: shattered.
        correlation_length: the first lag k >= 1 with rho(k) below the white-noise band, in points
            (1 for white noise; K when rho never drops into the band).
        neighbour_cosine: mean cosine between the full input gradients at neighbouring points,
            cos(grad f(x(t_i)), grad f(x(t_{i+1}))); it sees all input dimensions, not only the line's.
        white_noise_band: 1.96 / sqrt(K).
        target_class: the output class whose logit is f (``None`` when ``output_fn`` defines f or the
            output has a single value per sample).
        bn_mode: ``"eval"`` or ``"batch"``.
    """

    t: Tensor
    s: Tensor
    autocorrelation: Tensor
    lag1: float
    correlation_length: int
    neighbour_cosine: float
    white_noise_band: float
    target_class: int | None = None
    bn_mode: str = "eval"

    @property
    def num_points(self) -> int:
        return int(self.s.numel())

    @property
    def shattered(self) -> bool:
        """True when rho(1) lies inside the white-noise band (gradients look like white noise)."""
        return bool(abs(self.lag1) <= self.white_noise_band)

    def summary(self) -> dict[str, float]:
        """The scalar numbers, ready for a logger."""
        return {
            "lag1": float(self.lag1),
            "correlation_length": float(self.correlation_length),
            "neighbour_cosine": float(self.neighbour_cosine),
            "white_noise_band": float(self.white_noise_band),
        }


def autocorrelation(s: Tensor) -> Tensor:
    """rho(k) = sum_t (s_t - m)(s_{t+k} - m) / sum_t (s_t - m)^2 for k = 0..K-1, in float64.

    The sum in the numerator runs over the K - k available pairs while the denominator keeps all K terms
    (the usual biased estimator: |rho(k)| <= 1 and rho shrinks towards 0 at large lags). A constant series
    has no defined autocorrelation and gives NaN everywhere.
    """
    if s.dim() != 1 or s.numel() < 2:
        raise ValueError(
            f"autocorrelation: expected a 1-D series of at least 2 values, got shape {tuple(s.shape)}"
        )
    x = s.detach().to(torch.float64).cpu()
    x = x - x.mean()
    n = x.numel()
    denom = (x * x).sum()
    # O(K log K) through the FFT of the zero-padded series (power spectrum -> autocovariance).
    spec = torch.fft.rfft(x, n=2 * n)
    acov = torch.fft.irfft(spec * spec.conj(), n=2 * n)[:n]
    if denom <= 0:
        return torch.full((n,), float("nan"), dtype=torch.float64)
    return acov / denom


def _eager_module(model: nn.Module) -> tuple[nn.Module, Callable[[Tensor], Any]]:
    """The plain module behind DDP / ``torch.compile`` wrappers, and an eager call of its forward.

    The probe never enters the DDP wrapper (its forward may broadcast buffers, a collective that would
    hang when only one rank probes) nor a compiled graph (a new batch size and input gradients would
    trigger a recompile, minutes with inductor).
    """
    seen = 0
    while seen < 8:  # DDP(compile(module)) and similar nestings
        seen += 1
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            break
    ctx = getattr(model, "_compiler_ctx", None)  # Lightning's from_compiled keeps the eager forward here
    if isinstance(ctx, dict) and callable(ctx.get("original_forward")):
        return model, ctx["original_forward"]
    return model, model


class _LocalBatchNorm(_BatchNorm):
    """SyncBatchNorm seen as a local BatchNorm: no collective while only this rank probes."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


@contextmanager
def _observer_state(model: nn.Module, bn_mode: str, device: torch.device) -> Iterator[list[_BatchNorm]]:
    """Put the model in probe state and give everything back afterwards, whatever happens inside.

    Every module goes to eval mode (dropout off). In ``"batch"`` mode the BatchNorm layers alone go back to
    train mode so that they normalise with the probe's statistics; their running buffers are snapshot and
    restored, so the probe leaves them bit-identical. Every monitor's hooks are paused meanwhile: the
    probe's forwards are not training forwards.
    """
    flags = {m: m.training for m in model.modules()}
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = {}
    swapped = []
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices), observers_paused():
        try:
            model.eval()
            if bn_mode == "batch":
                for bn in bns:
                    saved[bn] = {k: v.detach().clone() for k, v in bn._buffers.items() if v is not None}
                    if isinstance(bn, nn.SyncBatchNorm):
                        swapped.append((bn, bn.__class__))
                        bn.__class__ = _LocalBatchNorm
                    bn.train()
            yield bns
        finally:
            with torch.no_grad():
                for bn, buffers in saved.items():
                    for k, v in buffers.items():
                        bn._buffers[k].copy_(v)
            for bn, cls in swapped:
                bn.__class__ = cls
            for m, flag in flags.items():
                m.training = flag


OUTPUT_KEYS = ("logits", "out", "output", "outputs", "pred", "preds", "prediction", "y_hat", "heatmap")
"""Keys (dict keys or attributes) tried in order for the prediction in a model's structured output."""

_SCORE_KEYS = ("scores", "logits")  # per-sample dicts of a detector (torchvision: boxes/scores/labels)


def _select_output(output: Any, key: str | int | None = None) -> Callable[[Any], Any]:
    """A function that picks the prediction out of ``output``'s structure (applied to every chunk).

    ``key`` names it (a dict key, an attribute such as ``"logits"``, or a sequence index). By default: a
    tensor is itself; a list of tensors gives its last element (one output per stack or refinement, the
    final one last); a tuple gives its first (``(logits, aux, ...)``, HF's ``return_dict=False``); a
    dict or an object gives the first of :data:`OUTPUT_KEYS` it has, else a dict's first floating tensor
    with a batch dimension; a list of per-sample dicts (detections) stays as it is.
    """
    if key is not None:
        if isinstance(output, dict):
            if key not in output:
                raise KeyError(f"output_key={key!r} is not in the model's output (keys: {list(output)})")
            return lambda out: out[key]
        if isinstance(output, list | tuple) and isinstance(key, int):
            return lambda out: out[key]
        if isinstance(key, str) and hasattr(output, key):
            return lambda out: getattr(out, key)
        raise KeyError(f"output_key={key!r} does not select anything in a {type(output).__name__} output")
    if isinstance(output, Tensor):
        return lambda out: out
    if isinstance(output, list) and output and all(isinstance(o, dict) for o in output):
        return lambda out: out  # detections, one dict per sample
    if isinstance(output, list | tuple) and output:
        index = 0 if isinstance(output, tuple) else len(output) - 1
        inner = _select_output(output[index])
        return lambda out: inner(out[index])
    if isinstance(output, dict):
        for name in OUTPUT_KEYS:
            if name in output:
                inner = _select_output(output[name])
                return lambda out: inner(out[name])
        for name, value in output.items():
            if isinstance(value, Tensor) and value.is_floating_point() and value.dim() >= 1:
                return lambda out: out[name]
    else:
        for name in OUTPUT_KEYS:
            if isinstance(getattr(output, name, None), Tensor):
                return lambda out: getattr(out, name)
    raise TypeError(
        f"shattering_profile: cannot find the prediction in the model's {type(output).__name__} output; "
        "pass output_key=... (a dict key, attribute or index) or output_fn=... mapping the output to one value "
        "per input point, e.g. a logit or a per-sample loss"
    )


def _default_objective(output: Any) -> tuple[Callable[[Tensor], Tensor], int | None]:
    """f = the logit of the class predicted at x_a (the first row of ``output``), kept fixed along the line.

    Keeping the class fixed makes f one smooth function of x; re-taking the argmax at each point would add
    jumps where the decision changes that have nothing to do with the gradient's structure. Dense outputs
    (N, C, *positions) use the class map predicted at x_a and average the chosen logits over positions.
    Detections (a list of per-sample dicts) give each sample's highest score (0 without a detection).
    ``output`` is the prediction already selected by :func:`_select_output`.
    """
    if isinstance(output, list) and output and all(isinstance(o, dict) for o in output):
        key = next((k for k in _SCORE_KEYS if isinstance(output[0].get(k), Tensor)), None)
        if key is None:
            raise TypeError(
                "shattering_profile: the model returned per-sample dicts without 'scores'; pass output_fn="
            )

        def top_score(out: list[dict[str, Tensor]]) -> Tensor:
            tops = [d[key].amax() if d[key].numel() else d[key].sum() for d in out]
            return torch.stack(tops).float()

        return top_score, None
    if not isinstance(output, Tensor):
        raise TypeError(
            f"shattering_profile: the prediction is a {type(output).__name__}, not a Tensor; pass output_key= "
            "or output_fn=... mapping the output to one value per input point, e.g. a logit or a per-sample loss"
        )
    if output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1):
        return (lambda out: out.reshape(out.shape[0])), None
    if output.dim() == 2:
        cls = int(output[0].detach().argmax())
        return (lambda out: out[:, cls]), cls
    class_map = output[0].detach().argmax(dim=0, keepdim=True)  # (1, *positions)

    def dense(out: Tensor) -> Tensor:
        picked = out.gather(1, class_map.unsqueeze(0).expand(out.shape[0], *class_map.shape))
        return picked.flatten(1).mean(dim=1)

    return dense, None


def _per_point(values: Any, n: int) -> Tensor:
    if not isinstance(values, Tensor) or values.numel() != n:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(
            f"shattering_profile: output_fn must return one value per input point (shape ({n},)), got {shape}; "
            "with a loss use reduction='none'"
        )
    return values.reshape(n)


def shattering_profile(
    model: nn.Module,
    start: Tensor,
    end: Tensor | None = None,
    num_points: int = 256,
    bn_mode: BNMode = "eval",
    output_fn: Callable[[Any], Tensor] | None = None,
    *,
    output_key: str | int | None = None,
    chunk_size: int = 64,
    seed: int = 0,
) -> ShatteringProfile:
    """Gradient of ``model`` along the line from ``start`` to ``end`` and how fast it decorrelates.

    The K = ``num_points`` points x(t_i) = start + t_i d, t_i = i / (K - 1), d = end - start, go through
    the model; s(t_i) = <grad_x f(x(t_i)), d> comes from autograd with respect to the inputs only (no
    parameter ``.grad`` is touched), in the parameters' dtype (fp32 for a normal model) with autocast off.

    BatchNorm:
      * ``"eval"``: running statistics, the function the model computes at inference. Points are
        independent, so they go through in chunks of ``chunk_size``. (BN layers that keep no running
        statistics normalise with whatever batch they see; then all K points go as one batch.)
      * ``"batch"``: the K points form one batch and BN normalises with their statistics, as in training
        and in the paper's experiments. The gradient of f at each point then includes, as in training, its
        influence on every other point through the batch statistics (autograd of sum_i f(x_i)). Running
        buffers are restored afterwards; SyncBatchNorm runs locally, so no collective is entered.

    f is ``output_fn(model(x))`` (one value per point, e.g. a loss with ``reduction="none"``) or, by
    default, the logit of the class predicted at ``start``, that class kept fixed along the line.

    Args:
        model: any ``nn.Module`` (a LightningModule, its network, or a DDP / ``torch.compile`` wrapper,
            which is unwrapped and run eagerly) whose forward takes a batch of inputs.
        start: x_a, one input without the batch dimension (e.g. ``(3, 32, 32)`` or ``(1,)``).
        end: x_b, same shape as ``start``; ``None`` walks along a random direction d (seeded by ``seed``)
            whose elements have the root-mean-square of ``start`` (the data's scale).
        num_points: K, at least 3.
        bn_mode: ``"eval"`` or ``"batch"`` (see above).
        output_fn: maps the model's output for a batch of B points to B values (overrides the default f).
        output_key: where the prediction sits in a structured output (dict key, attribute such as
            ``"logits"``, or index); default: see :func:`_select_output` (tensors, lists, tuples, dicts
            with ``logits``/``out``..., objects with ``.logits``, per-sample detection dicts).
        chunk_size: points per forward/backward in eval mode (bounds memory).
        seed: seed of the random direction when ``end`` is ``None`` (a private generator: the global RNG
            is untouched either way).

    Returns:
        A :class:`ShatteringProfile`.

    Raises:
        ValueError: on a bad ``bn_mode``, ``num_points``, shape mismatch or ``output_fn`` result.
        TypeError: when the model's output is not a tensor and no ``output_fn`` is given.
        RuntimeError: when called under ``torch.inference_mode()``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1))
        >>> p = shattering_profile(net, torch.tensor([-2.0]), torch.tensor([2.0]), num_points=64)
        >>> p.autocorrelation.shape, p.lag1 > 0.5
        (torch.Size([64]), True)
    """
    if bn_mode not in _BN_MODES:
        raise ValueError(f"shattering_profile: bn_mode must be one of {_BN_MODES}, got {bn_mode!r}")
    if not isinstance(num_points, int) or num_points < 3:
        raise ValueError(f"shattering_profile: num_points must be an int >= 3, got {num_points!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"shattering_profile: chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(start, Tensor) or not start.is_floating_point():
        raise ValueError(
            "shattering_profile: start must be a floating-point tensor (one input, no batch dim)"
        )
    if end is not None and (not isinstance(end, Tensor) or end.shape != start.shape):
        got = tuple(end.shape) if isinstance(end, Tensor) else type(end).__name__
        raise ValueError(
            f"shattering_profile: end must be a tensor shaped like start {tuple(start.shape)}, got {got}"
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError("shattering_profile needs autograd; it cannot run under torch.inference_mode()")

    module, forward = _eager_module(model)
    ref = next(iter(module.parameters()), None)
    if ref is None:
        ref = next(iter(module.buffers()), None)
    device = ref.device if ref is not None else start.device
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32

    x_a = start.detach().to(device=device, dtype=dtype)
    if end is None:
        gen = torch.Generator().manual_seed(int(seed))
        d = torch.randn(start.shape, generator=gen, dtype=torch.float64)
        scale = float(x_a.double().pow(2).mean().sqrt()) or 1.0
        d = (d / d.pow(2).mean().sqrt() * scale).to(device=device, dtype=dtype)
    else:
        d = end.detach().to(device=device, dtype=dtype) - x_a
    k = num_points
    t = torch.linspace(0.0, 1.0, k, device=device, dtype=dtype)

    s_parts: list[Tensor] = []
    cos_sum = torch.zeros((), device=device, dtype=torch.float64)
    target_class: int | None = None
    with (
        _observer_state(module, bn_mode, device) as bns,
        torch.enable_grad(),
        torch.autocast(device.type, enabled=False),
    ):
        stateless_bn = any(bn.running_mean is None for bn in bns)
        step = k if bn_mode == "batch" or stateless_bn else min(chunk_size, k)
        objective: Callable[[Tensor], Tensor] | None = None
        select: Callable[[Any], Any] = lambda out: out  # noqa: E731
        prev_grad: Tensor | None = None
        for lo in range(0, k, step):
            tt = t[lo : lo + step]
            x = (x_a.unsqueeze(0) + tt.view(-1, *([1] * x_a.dim())) * d.unsqueeze(0)).requires_grad_(True)
            out = forward(x)
            if output_fn is not None:
                f = _per_point(output_fn(out), x.shape[0])
            else:
                if objective is None:
                    select = _select_output(out, output_key)
                    objective, target_class = _default_objective(select(out))
                f = _per_point(objective(select(out)), x.shape[0])
            (grad,) = torch.autograd.grad(f.sum(), x, allow_unused=True)
            if grad is None:  # f does not depend on x at all (e.g. no detection anywhere)
                grad = torch.zeros_like(x)
            g = grad.detach().flatten(1).to(torch.float64)
            s_parts.append(g @ d.flatten().to(torch.float64))
            rows = g if prev_grad is None else torch.cat([prev_grad, g])
            cos_sum += nn.functional.cosine_similarity(rows[:-1], rows[1:], dim=1, eps=1e-30).sum()
            prev_grad = g[-1:]
            del out, f, grad, x

    s = torch.cat(s_parts).cpu()
    rho = autocorrelation(s)
    band = 1.96 / math.sqrt(k)
    below = (rho[1:] < band).nonzero()
    corr_len = int(below[0, 0]) + 1 if below.numel() else k
    return ShatteringProfile(
        t=t.detach().cpu().to(torch.float64),
        s=s,
        autocorrelation=rho,
        lag1=float(rho[1]),
        correlation_length=corr_len,
        neighbour_cosine=float(cos_sum) / (k - 1),
        white_noise_band=band,
        target_class=target_class,
        bn_mode=bn_mode,
    )


# ----------------------------------------------------------------------------------------------------
# The monitor
# ----------------------------------------------------------------------------------------------------

DEFAULT_EVERY_N_STEPS = None
"""Probe interval of :class:`GradientShatteringMonitor` by default: ``None``, derived from the batch size
(:func:`default_probe_interval`) so that a probe costs at most ~1% of the training between probes."""

PROBE_BUDGET = 0.01
"""Share of the training time between probes that one default-scheduled probe may cost."""

PROBE_POINT_COST = 1.35
"""CPU cost of one probe point in training samples (forward, backward and SGD of one image): a probe of K
points costs ``PROBE_POINT_COST * K / batch`` training steps. Measured (``bench_monitors.py --sweep``,
one thread, batch 16, K = 256): 0.69 to 1.31 across preact ResNet-18..200 and ResNet-152 at 32 and 64 px;
the constant takes the worst with a margin."""


def default_probe_interval(num_points: int, batch_size: int, accumulate_grad_batches: int = 1) -> int:
    """Optimizer steps between probes such that one probe of ``num_points`` costs at most
    ``PROBE_BUDGET`` of the training between probes: ``PROBE_POINT_COST * num_points / (batch_size *
    accumulate_grad_batches) / PROBE_BUDGET``, rounded up to a multiple of 100 (at least 100).

    Example:
        >>> default_probe_interval(256, 16), default_probe_interval(256, 64), default_probe_interval(256, 128)
        (2200, 600, 300)
    """
    if batch_size < 1 or accumulate_grad_batches < 1:
        raise ValueError(
            f"default_probe_interval: batch_size and accumulate_grad_batches must be >= 1, got {batch_size}, "
            f"{accumulate_grad_batches}"
        )
    steps = PROBE_POINT_COST * num_points / (batch_size * accumulate_grad_batches) / PROBE_BUDGET
    return max(100, math.ceil(steps / 100 - 1e-9) * 100)


_RECENT_PROBES = 3  # the diagnosis judges the mean rho(1) of this many latest probes

def _submodule(pl_module: nn.Module, path: str | None, option: str = "module") -> nn.Module:
    if not path:
        return pl_module
    try:
        return pl_module.get_submodule(path)
    except AttributeError as err:
        names = [n for n, _ in pl_module.named_children()]
        raise MonitorConfigError(
            f"GradientShatteringMonitor: {option}={path!r} is not a submodule of {type(pl_module).__name__} "
            f"(children: {names})"
        ) from err


def _overrides_forward(module: nn.Module) -> bool:
    """Whether ``module`` (or what it wraps) has a forward of its own, not nn.Module's/Lightning's stub."""
    module, _ = _eager_module(module)
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            stub = cls is nn.Module or cls.__module__.split(".")[0] in ("lightning", "pytorch_lightning")
            return not stub
    return False


def _network_candidates(pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of ``pl_module`` that hold parameters (metrics and loss modules without parameters
    are no networks), largest first."""
    found = []
    for name, child in pl_module.named_children():
        if type(child).__module__.startswith("torchmetrics"):
            continue
        count = sum(p.numel() for p in child.parameters())
        if count:
            found.append((name, child, count))
    return [(n, c) for n, c, _ in sorted(found, key=lambda t: -t[2])]


class GradientShatteringMonitor(MonitorCallback):
    """Every ``every_n_steps`` optimizer steps, how shattered the input gradient of the model is.

    A fixed probe line x(t) = x_a + t (x_b - x_a) between two training inputs (the first two of the first
    training batch, unless ``probe`` gives them) is walked in ``num_points`` steps and
    :func:`shattering_profile` measures the autocorrelation of the directional derivative s(t) along it
    (Balduzzi et al. 2017). The probe runs on global rank zero only, between training steps, without
    entering the DDP wrapper or any collective (SyncBatchNorm runs locally during the probe), so the other
    ranks simply wait at their next gradient all-reduce; it changes nothing that training sees
    (parameters, ``.grad``, BN buffers, RNG, train/eval flags), and other monitors' hooks are paused
    during it. Under ``torch.compile`` the probe calls the eager forward: compiled graphs are untouched.

    Logged (one dict to every logger, rank zero): ``shattering/lag1`` (rho(1)),
    ``shattering/correlation_length`` (points until rho enters the white-noise band),
    ``shattering/neighbour_cosine``, ``shattering/white_noise_band`` (1.96/sqrt(K)) and
    ``shattering/probe_seconds``. History (bounded by ``max_history``), the probe itself and the first and
    latest profiles are checkpointed, so a resumed run continues on the same line. At the end of fit: a
    figure (autocorrelation with the white-noise band, s(t), rho(1) over training) and findings for the
    shared diagnosis: rho(1) inside the band means the gradient is white noise.

    Healthy: rho(1) well above the band (close to 1 for shallow or well-normalised residual nets).
    Unhealthy: rho(1) near 0, correlation length 1 (a deep plain network).

    Cost: a probe is one forward and one backward of ``num_points`` inputs (in chunks of ``chunk_size`` in
    ``"eval"`` mode, one batch in ``"batch"`` mode); the backward computes input gradients only. Measured
    in process CPU time (one thread) at 32x32 against training steps of batch 64 (forward, backward, SGD),
    one probe of 256 points costs 2.8 (``"eval"``) / 3.2 (``"batch"``) steps of a CIFAR-stem ResNet-18
    of width 16 and 2.2 / 2.1 steps of a timm ResNet-18: a probe costs ~``1.35 * num_points / batch`` steps
    at worst. So by default the interval is derived from the batch size of the first batch
    (:func:`default_probe_interval`): ~1% of the training between probes whatever the batch (2200 steps
    at batch 16, 600 at 64, 300 at 128; fixed for the run and checkpointed), plus one probe at the end of
    fit so the diagnosis judges the final network. An explicit ``every_n_steps`` wins (no end probe).

    Args:
        every_n_steps: optimizer steps between probes (the first probe runs before the first update);
            ``None`` (default): derived from the batch size, see above.
        num_points: K, the points on the line.
        bn_mode: ``"eval"`` (running statistics: the function used at inference; points go in chunks) or
            ``"batch"`` (BN normalises over the K points, as in training and the paper).
        probe: the line: a tensor of two inputs ``(2, *input_shape)`` or a pair ``(start, end)`` with
            ``end=None`` for a random direction; ``None`` takes the first training batch's inputs.
        line: with ``probe=None``: ``"pair"`` (first two inputs of the batch) or ``"random"`` (the first
            input plus a random direction of the data's scale).
        output_fn: maps the module's output for B points to B values (default: the logit of the class
            predicted at x_a).
        module: dotted name of the network to probe (e.g. ``"net"``, ``"model.backbone"``). Default: the
            LightningModule itself when it defines ``forward`` and that forward takes the batch's inputs;
            otherwise its one child holding parameters (metrics and losses aside); among several, the
            one whose forward takes the inputs. Two or more that do are ambiguous: one warning naming them
            and this option, and the monitor steps aside.
        input_key: where the inputs sit in a batch (dict key or tuple index). Default: the batch if it
            is a tensor, a dict's ``image``/``pixel_values``/``input``... key, else the first floating
            tensor with a batch dimension; a list of images (detection) is stacked.
        output_key: where the prediction sits in the output (dict key, attribute such as ``"logits"``,
            or index). Default: a tensor; a list's last element; a tuple's first; a dict's or object's
            ``logits``/``out``/``pred``...; detections' highest score per sample.
        probe_module: older name of ``module``.
        chunk_size: points per forward/backward in ``"eval"`` mode (bounds the probe's memory).
        shattered_margin: rho(1) below this (but above the band) is reported as partly shattered.
        max_history: history entries kept (and checkpointed).
        seed: seed of the random direction.
        strict: re-raise unexpected exceptions instead of switching off (see
            :class:`~lightning_convnets.callbacks.core.MonitorCallback`).

    The probe touches neither the optimizers' state nor any parameter's ``.grad`` (input gradients only),
    so manual optimization, several optimizers, gradient accumulation, mixed precision (the probe runs in
    the parameters' dtype with autocast off) and ``torch.compile`` (the eager forward is probed) are safe.

    Raises:
        ValueError: for a bad ``every_n_steps``, ``bn_mode``, ``line`` or ``probe``; in ``setup``, a
            ``module`` the model does not have.

    Example:
        >>> monitor = GradientShatteringMonitor(every_n_steps=200, bn_mode="batch", module="net")
        >>> # Trainer(callbacks=[monitor]).fit(model, datamodule); then, e.g. for a healthy ResNet,
        >>> # monitor.history[-1]["shattering/lag1"] is near 0.9
    """

    monitor_name: ClassVar[str] = "shattering"

    def __init__(
        self,
        every_n_steps: int | None = DEFAULT_EVERY_N_STEPS,
        num_points: int = 256,
        bn_mode: BNMode = "eval",
        probe: Tensor | tuple[Tensor, Tensor | None] | None = None,
        line: Literal["pair", "random"] = "pair",
        output_fn: Callable[[Any], Tensor] | None = None,
        module: str | None = None,
        input_key: str | int | None = None,
        output_key: str | int | None = None,
        probe_module: str | None = None,
        chunk_size: int = 64,
        shattered_margin: float = 0.5,
        max_history: int = DEFAULT_MAX_HISTORY,
        seed: int = 0,
        strict: bool | None = None,
    ) -> None:
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise MonitorConfigError(
                f"GradientShatteringMonitor: every_n_steps must be an int >= 1 or None (derived from the batch "
                f"size), got {every_n_steps!r}"
            )
        if bn_mode not in _BN_MODES:
            raise MonitorConfigError(
                f"GradientShatteringMonitor: bn_mode must be one of {_BN_MODES}, got {bn_mode!r}"
            )
        if line not in ("pair", "random"):
            raise MonitorConfigError(f"GradientShatteringMonitor: line must be 'pair' or 'random', got {line!r}")
        if not isinstance(num_points, int) or num_points < 3:
            raise MonitorConfigError(f"GradientShatteringMonitor: num_points must be an int >= 3, got {num_points!r}")
        if module is not None and probe_module is not None and module != probe_module:
            raise MonitorConfigError(
                f"GradientShatteringMonitor: module={module!r} and probe_module={probe_module!r} disagree; "
                "pass module= only"
            )
        super().__init__(log_every_n_steps=every_n_steps, max_history=max_history, strict=strict)
        self.every_n_steps = every_n_steps
        self.num_points = num_points
        self.bn_mode = bn_mode
        self.line = line
        self.output_fn = output_fn
        self.probe_module = module if module is not None else probe_module
        self.input_key = input_key
        self.output_key = output_key
        self.network_name: str | None = None  # the probed network ("" = the LightningModule), once found
        self.chunk_size = chunk_size
        self.shattered_margin = shattered_margin
        self.seed = seed
        self.start: Tensor | None = None
        self.end: Tensor | None = None
        if probe is not None:
            self.start, self.end = self._split_probe(probe)
        self.first_profile: dict[str, Any] | None = None
        self.last_profile: dict[str, Any] | None = None
        self._last_probe_step = -1
        self.probe_interval: int | None = every_n_steps  # the schedule in force (derived at the first batch)

    @staticmethod
    def _split_probe(probe: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(probe, Tensor) and probe.dim() >= 2 and probe.shape[0] == 2:
            return probe[0].detach().cpu().clone(), probe[1].detach().cpu().clone()
        if isinstance(probe, list | tuple) and len(probe) == 2 and isinstance(probe[0], Tensor):
            start, end = probe
            if end is not None and (not isinstance(end, Tensor) or end.shape != start.shape):
                raise MonitorConfigError(
                    "GradientShatteringMonitor: probe=(start, end) needs end shaped like start or None"
                )
            return start.detach().cpu().clone(), None if end is None else end.detach().cpu().clone()
        got = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
        raise MonitorConfigError(
            f"GradientShatteringMonitor: probe must be a tensor of two inputs (2, *input_shape) or a pair "
            f"(start, end | None), got {got}"
        )

    # ----------------------------------------------------------------------------- probing
    def attach(self, trainer: pl.Trainer | None, pl_module: nn.Module) -> None:
        # no hooks: only check, before training, that a named network exists
        _submodule(pl_module, self.probe_module)

    def failure_hint(self, hook: str, error: BaseException) -> str:
        return (
            "tell the probe where things are: module='net' (the network), input_key='image' (the inputs in a "
            "batch), output_key='logits' or output_fn=... (one value per input from the output)"
        )

    def capture_probe(self, batch: Any) -> None:
        """Keep the line's end points from a training batch (copies on the CPU)."""
        inputs = batch_inputs(batch, self.input_key, max_images=2).detach()
        self.start = inputs[0].cpu().clone()
        pair = self.line == "pair" and inputs.shape[0] >= 2
        self.end = inputs[1].cpu().clone() if pair else None

    def find_network(self, pl_module: nn.Module) -> str | None:
        """The dotted name of the network to probe (``""``: the LightningModule itself), or ``None`` when
        the choice is ambiguous (then the monitor warns once and steps aside). See ``module`` in the class
        docstring for the rule."""
        if self.probe_module is not None:
            return self.probe_module
        if self.start is None:
            raise RuntimeError("GradientShatteringMonitor.find_network: no probe inputs yet")
        candidates: list[tuple[str, nn.Module]] = []
        if _overrides_forward(pl_module):
            candidates.append(("", pl_module))
        children = _network_candidates(pl_module)
        if not candidates and len(children) == 1:
            return children[0][0]
        candidates += children
        working = [name for name, net in candidates if self._takes_inputs(net)]
        if working and working[0] == "":
            return ""  # the module's own forward takes the inputs
        if len(working) == 1:
            return working[0]
        names = [n or type(pl_module).__name__ for n, _ in candidates]
        if not working:
            raise RuntimeError(
                f"no network of {type(pl_module).__name__} takes the batch's inputs "
                f"({describe_batch(self.start.unsqueeze(0))}); tried {names}"
            )
        message = (
            f"GradientShatteringMonitor: {len(working)} networks of {type(pl_module).__name__} take the "
            f"batch's inputs ({working}); name the one to probe with module='{working[0]}'"
        )
        if self.strict:
            raise MonitorConfigError(message)
        self.fail("probe", MonitorConfigError(message))
        return None

    def _takes_inputs(self, net: nn.Module) -> bool:
        """A trial forward of two probe points through ``net``'s eager forward, in probe state (eval mode,
        no gradient, RNG and BN buffers untouched, other monitors paused): does it give a prediction?"""
        module, forward = _eager_module(net)
        ref = next(iter(module.parameters()), None)
        device = ref.device if ref is not None else self.start.device
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        x = torch.stack([self.start, self.start if self.end is None else self.end]).to(device, dtype)
        try:
            with _observer_state(module, "eval", device), torch.no_grad():
                out = forward(x)
                if self.output_fn is not None:
                    _per_point(self.output_fn(out), 2)
                else:
                    _default_objective(_select_output(out, self.output_key)(out))
        except Exception:
            return False
        return True

    def probe(self, pl_module: nn.Module) -> ShatteringProfile:
        """Run :func:`shattering_profile` on the kept line now (any rank; no collective)."""
        if self.start is None:
            raise RuntimeError(
                "GradientShatteringMonitor.probe: no probe yet (it is taken from the first batch)"
            )
        if self.network_name is None:
            self.network_name = self.find_network(pl_module)
            if self.network_name is None:
                raise RuntimeError("GradientShatteringMonitor.probe: no unambiguous network to probe")
            if self.probe_module is None and self.network_name:
                rank_zero_info(
                    f"GradientShatteringMonitor: probing {type(pl_module).__name__}.{self.network_name} "
                    f"(module={self.network_name!r})"
                )
        return shattering_profile(
            _submodule(pl_module, self.network_name),
            self.start,
            self.end,
            num_points=self.num_points,
            bn_mode=self.bn_mode,
            output_fn=self.output_fn,
            output_key=self.output_key,
            chunk_size=self.chunk_size,
            seed=self.seed,
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # no call to the base: this monitor has no hooks to gate and nothing to all-gather.
        # The first probe runs before the first update: the network at initialisation is the reference.
        if not self.enabled:
            return
        if self.start is None:
            self.capture_probe(batch)
        if self.probe_interval is None:  # fixed once, from the first batch; checkpointed
            size = int(batch_inputs(batch, self.input_key).shape[0])
            accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
            self.probe_interval = default_probe_interval(self.num_points, size, accumulate)
        if self._last_probe_step < 0:
            self._probe_and_record(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # with gradient accumulation several micro-batches share a global_step: probe once per step
        every = self.probe_interval or self.every_n_steps or 1
        if self.enabled and step != self._last_probe_step and step % every == 0:
            self._probe_and_record(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every probe is logged when it runs. With the derived schedule (``every_n_steps=None``) one last
        probe judges the network the fit ends with, unless the latest probe was at this very step."""
        if (
            self.every_n_steps is None
            and self.enabled
            and self.start is not None
            and self._last_probe_step >= 0
            and trainer.global_step != self._last_probe_step
        ):
            self._probe_and_record(trainer, pl_module)

    def _probe_and_record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_probe_step = trainer.global_step
        if not trainer.is_global_zero:  # rank zero alone probes; no collective, so nobody waits on it
            return
        begin = time.perf_counter()
        profile = self.probe(pl_module)
        if self.active:
            self.record(trainer, profile, time.perf_counter() - begin)

    def record(
        self, trainer: pl.Trainer, profile: ShatteringProfile, seconds: float = math.nan
    ) -> dict[str, float]:
        """Log a profile's numbers (rank zero), add them to the history and keep its curves for the plots."""
        step = int(trainer.global_step)
        metrics = {f"{self.monitor_name}/{k}": v for k, v in profile.summary().items()}
        metrics[f"{self.monitor_name}/probe_seconds"] = float(seconds)
        self.append_history({"step": float(step), **metrics})
        self.log_metrics(trainer, metrics, step=step)
        curves = {
            "step": step,
            "autocorrelation": profile.autocorrelation.float(),
            "s": profile.s.float(),
            **profile.summary(),
        }
        if self.first_profile is None:
            self.first_profile = curves
        self.last_profile = curves
        return metrics

    # ----------------------------------------------------------------------------- diagnosis and plots
    def diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        """The verdict on the latest probes (rules of :mod:`lightning_convnets.callbacks.diagnosis`): a
        non-finite or constant gradient, else shattered / partly shattered / smooth judged on the mean
        rho(1) of the last few probes (one line of K points is a noisy sample), and a fall of rho(1) since
        the first probe."""
        p = self.last_profile
        if p is None:
            return []
        where = [self.network_name or self.probe_module or type(pl_module).__name__]
        lag1, band, step = p["lag1"], p["white_noise_band"], p["step"]
        k = int(p["s"].numel())
        key = f"{self.monitor_name}/lag1"
        recent = [h[key] for h in self.history[-_RECENT_PROBES:] if math.isfinite(h.get(key, math.nan))]
        verdict = sum(recent) / len(recent) if recent else lag1
        values = {
            key: float(p[key])
            for key in ("lag1", "correlation_length", "neighbour_cosine", "white_noise_band")
        }
        values["lag1_recent_mean"] = float(verdict)
        numbers = (
            f"rho(1) = {verdict:.2f} over the last {max(len(recent), 1)} probe(s) (latest {lag1:.2f} at step "
            f"{step}; white-noise band +-{band:.2f}, K = {k}, bn_mode={self.bn_mode}), correlation length "
            f"{int(p['correlation_length'])} point(s), neighbour gradient cosine {p['neighbour_cosine']:.2f}"
        )
        first = (
            diagnosis.nonfinite_gradient(bool(torch.isfinite(p["s"]).all()), where, step, values)
            or diagnosis.constant_gradient(lag1, where, step, values)
            or diagnosis.shattering_verdict(
                verdict, band, numbers, where, step, values, self.shattered_margin
            )
        )
        findings = [first]
        if self.first_profile is not None:
            findings.append(
                diagnosis.shattering_decline(
                    self.first_profile["lag1"], self.first_profile["step"], lag1, step, where
                )
            )
        return [f for f in findings if f is not None]

    def figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Figure]:
        if self.last_profile is None:
            return {}
        profiles = [self.first_profile, self.last_profile]
        if self.first_profile is self.last_profile or self.first_profile["step"] == self.last_profile["step"]:
            profiles = [self.last_profile]
        key = f"{self.monitor_name}/lag1"
        history = [(h["step"], h[key]) for h in self.history if key in h]
        return {
            "profile": plots.shattering_profiles(profiles, self.last_profile["white_noise_band"], history)
        }

    def tables(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[dict[str, Any]]]:
        """Every probe of the run (the history): step, rho(1) and its verdict, correlation length, neighbour
        gradient cosine, white-noise band, probe time."""
        prefix, rows = f"{self.monitor_name}/", []
        for entry in self.history:
            row = {"step": int(entry["step"])}
            row.update({k[len(prefix) :]: v for k, v in entry.items() if k.startswith(prefix)})
            lag1, band = row.get("lag1", math.nan), row.get("white_noise_band", math.nan)
            smooth = "smooth" if lag1 >= self.shattered_margin else "partly shattered"
            row["verdict"] = "shattered" if abs(lag1) <= band else smooth if math.isfinite(lag1) else "-"
            rows.append(row)
        return {"probes (rho(1) over training)": rows} if rows else {}

    # ----------------------------------------------------------------------------- checkpointing
    @property
    def state_key(self) -> str:
        # two shattering monitors (e.g. one per bn_mode) can share a checkpoint
        return _cached_state_key(
            self,
            monitor=self.monitor_name,
            every=self.every_n_steps,
            bn_mode=self.bn_mode,
            num_points=self.num_points,
            probe_module=self.probe_module,
        )

    def extra_state(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "first_profile": self.first_profile,
            "last_profile": self.last_profile,
            "last_probe_step": self._last_probe_step,
            "probe_interval": self.probe_interval,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("start") is not None:
            self.start, self.end = state["start"], state.get("end")
        self.first_profile = state.get("first_profile")
        self.last_profile = state.get("last_profile")
        self._last_probe_step = int(state.get("last_probe_step", -1))
        if self.every_n_steps is None and state.get("probe_interval") is not None:
            self.probe_interval = int(state["probe_interval"])  # the schedule the run started with
