"""Forward hooks that are in the model only on recorded steps, and compiled models.

Owns :class:`HookSpec` (one registered hook: installed on recorded steps, out of its module on quiet
ones), the :class:`ForwardHooks` part of :class:`~lightning_convnets.callbacks.core.MonitorCallback`
(``add_hook``, ``install_hooks``, ``uninstall_hooks``, ``remove_hooks``) and what a compiled model needs
(:func:`is_compiled`, :func:`forget_compiled_graphs`). Which steps are recorded is
:mod:`lightning_convnets.callbacks.schedule`'s business; the guard the hooks run under is the core's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

__all__ = ["ForwardHooks", "HookSpec", "forget_compiled_graphs", "is_compiled"]


class ForwardHooks:
    """The forward hooks of a monitor (a base of :class:`~lightning_convnets.callbacks.core.MonitorCallback`,
    which provides ``hook_error``).

    Example:
        >>> from lightning_convnets.callbacks import MonitorCallback
        >>> issubclass(MonitorCallback, ForwardHooks)
        True
    """

    _attached: bool

    def __init__(self) -> None:
        super().__init__()
        self._handles: list[Any] = []  # installed hooks' handles (removable handles)
        self._hook_specs: list[HookSpec] = []  # every hook registered with add_hook, installed or not
        self._hooks_installed = False
        self._hooks_pinned = False  # a compiled model: hooks stay in (a graph keeps the hooks it traced)

    def add_hook(
        self,
        module: nn.Module,
        hook: Callable[..., Any],
        *,
        pre: bool = False,
        with_kwargs: bool = False,
        guard: bool = True,
    ) -> HookSpec:
        """Register a forward (or forward-pre) hook on ``module``, under the guard; removed at teardown.

        An exception inside the hook switches the monitor off (or is raised with ``strict=True``); the
        forward it observed goes on untouched. ``guard=False`` registers ``hook`` as it is: for hooks that
        run on every forward of many modules and guard their own body (``try`` around it, the exception to
        :meth:`hook_error`), one Python frame less per forward.

        The hook is installed only while the monitor records (:meth:`records`): the core takes it out of
        the module after a recorded step and puts it back before the next one (in order, so hooks keep
        their relative order). Returns a :class:`HookSpec`; its ``remove()`` drops the hook for good."""

        def failed(err: Exception) -> None:
            self.hook_error(module, err, pre)

        if not guard:
            fn = hook
        # fixed signatures where they suffice: a hook runs on every forward of a hooked module, and packing
        # *args/**kwargs is a measurable part of it on networks with hundreds of hooked modules
        elif with_kwargs:

            def fn(*args: Any, **kwargs: Any) -> Any:
                try:
                    return hook(*args, **kwargs)
                except Exception as err:
                    failed(err)
                    return None

        elif pre:

            def fn(mod: nn.Module, args: Any) -> Any:  # type: ignore[misc]
                try:
                    return hook(mod, args)
                except Exception as err:
                    failed(err)
                    return None

        else:

            def fn(mod: nn.Module, args: Any, output: Any) -> Any:  # type: ignore[misc]
                try:
                    return hook(mod, args, output)
                except Exception as err:
                    failed(err)
                    return None

        spec = HookSpec(self, module, fn, pre, with_kwargs)
        self._hook_specs.append(spec)
        spec.install()
        self._hooks_installed = True
        return spec

    def install_hooks(self) -> None:
        """Put every registered forward hook into its module (a recorded step begins)."""
        if not self._hooks_installed:
            for spec in self._hook_specs:
                spec.install()
            self._hooks_installed = True

    def uninstall_hooks(self) -> None:
        """Take the forward hooks out of the modules until the next recorded step: a step the schedule
        skips runs exactly the model's own forward (no hook dispatch at all). Kept in for compiled models."""
        if self._hooks_installed and not self._hooks_pinned:
            for spec in self._hook_specs:
                spec.uninstall()
            self._hooks_installed = False

    def remove_hooks(self) -> None:
        """Drop every hook of the monitor for good (teardown, or the monitor switched off)."""
        for spec in self._hook_specs:
            spec.uninstall()
        self._hook_specs.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooks_installed = False
        self._attached = False


class HookSpec:
    """One forward (pre-)hook a monitor registered: installed in its module on recorded steps, out of it
    on quiet ones (:meth:`MonitorCallback.uninstall_hooks`). ``remove()`` drops it for good."""

    __slots__ = ("fn", "handle", "module", "owner", "pre", "removed", "with_kwargs")

    def __init__(
        self, owner: ForwardHooks, module: nn.Module, fn: Callable[..., Any], pre: bool, with_kwargs: bool
    ) -> None:
        self.owner, self.module, self.fn, self.pre, self.with_kwargs = owner, module, fn, pre, with_kwargs
        self.handle: Any = None
        self.removed = False

    def install(self) -> None:
        if self.handle is None and not self.removed:
            register = self.module.register_forward_pre_hook if self.pre else self.module.register_forward_hook
            self.handle = register(self.fn, with_kwargs=self.with_kwargs)

    def uninstall(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def remove(self) -> None:
        """Drop the hook for good (now and on every later recorded step)."""
        self.uninstall()
        self.removed = True
        if self in self.owner._hook_specs:
            self.owner._hook_specs.remove(self)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` runs compiled graphs (Lightning's ``from_compiled``, or a compiled submodule)."""
    if getattr(model, "_compiler_ctx", None):
        return True
    return any(type(m).__name__ == "OptimizedModule" for m in model.modules())


_COMPILE_NOTICE = [False]


def forget_compiled_graphs(who: str) -> None:
    """A model compiled before the monitors attach may already hold graphs traced without their hooks,
    and dynamo does not guard on hooks added to inner modules later (it would reuse those graphs and the
    hooks would never run). ``torch.compiler.reset()`` drops every cached graph, so the next call traces
    the model again with the hooks in; said once per process."""
    torch.compiler.reset()
    if not _COMPILE_NOTICE[0]:
        _COMPILE_NOTICE[0] = True
        rank_zero_info(
            f"{who}: the model is compiled; its graphs are traced again with the monitors' hooks in "
            "(torch.compiler.reset(): other compiled functions recompile on their next call)"
        )
