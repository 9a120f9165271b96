"""Generated kernels that live only around their use: ``remat_kernels(fun)``.

With ``make_tables(spec, where="device", inverse=False, remat=True)``, ``generate_params``
marks every generated kernel. ``remat_kernels(fun)`` traces ``fun`` to a jaxpr and
evaluates it again with each marked kernel replaced by a generation fused into every
operation that uses it (a convolution, a ``dot_general``, a jitted ``einsum``...), under a
custom VJP that saves only the ring and the operation's other inputs. The backward pass
generates the kernel again from the ring where it needs it, takes the operation's VJP and
scatter-adds the kernel's gradient into the ring, so no kernel and no kernel gradient
outlives its layer in either pass: peak memory holds the ring, its optimizer state, the
activations and a few kernels. Works for any model (Linen, NNX, plain functions), because
it acts on the traced program, not on modules.

Why not ``jax.checkpoint``: a whole-loss checkpoint regenerates every kernel at the start
of the backward pass, where memory peaks anyway, and XLA:CPU drops the optimization
barriers that keep a rematerialised value from being merged with its forward copy
(measured: no saving at all). Here the regeneration depends on the incoming cotangent
through ``device_map.zero_of``, which XLA can neither fold nor merge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jex

from rpg_jax import device_map, generator

# Operations that only re-lay a kernel out: carried along with it, not a use.
_LAYOUT_OPS = frozenset({"convert_element_type", "reshape", "transpose", "squeeze",
                         "expand_dims", "copy", "copy_p"})


@dataclasses.dataclass(frozen=True)
class _Lazy:
    """A kernel not generated yet: its static description, its ring and layout ops."""

    static: tuple  # (key, layer, leaf) of generator._device_kernel
    ring: Any
    ops: tuple = ()  # jaxpr equations applied to the generated kernel, in order

    def generate(self, ring, shift):
        """(kernel, its encoded forward indices)."""
        return generator.device_kernel(*self.static, ring, shift)

    def relayout(self, kernel):
        for eqn in self.ops:
            kernel = _bind(eqn, [kernel])[0]
        return kernel


def _bind(eqn, invals: list) -> list:
    # As jax.core.eval_jaxpr evaluates an equation (same on jax 0.10 and 0.12).
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _marker_of(eqn) -> tuple | None:
    """(key, layer, leaf) if ``eqn`` is a marked kernel generation, else None."""
    if eqn.primitive.name != "custom_vjp_call":
        return None
    jaxpr = eqn.params.get("call_jaxpr")
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    if jaxpr is None or not jaxpr.eqns or jaxpr.eqns[-1].primitive.name != "name":
        return None
    return generator.kernel_of_marker(jaxpr.eqns[-1].params.get("name", ""))


def _fused_use(eqn, invals: list, chain: dict) -> list:
    """``eqn`` applied to its inputs, the lazy ones generated inside a custom VJP.

    The rings are threaded through the uses in program order (``chain``: ring id -> its
    latest link). Each use passes its rings on unchanged, and its backward pass
    scatter-adds its kernels' gradients into the cotangent of the next link, in place, so
    one ring-sized gradient exists at a time instead of one per use (XLA fuses a chain of
    additions into one, which would keep all of them alive until the end).
    """
    lazy_at = [i for i, x in enumerate(invals) if isinstance(x, _Lazy)]
    lazies = [invals[i] for i in lazy_at]
    other_at = [i for i, x in enumerate(invals) if not isinstance(x, _Lazy)]
    ring_ids = list(dict.fromkeys(id(lz.ring) for lz in lazies))
    slot = [ring_ids.index(id(lz.ring)) for lz in lazies]

    def apply(kernels, others):
        args = list(invals)
        for i, lz, k in zip(lazy_at, lazies, kernels, strict=True):
            args[i] = lz.relayout(k)
        for i, x in zip(other_at, others, strict=True):
            args[i] = x
        return tuple(_bind(eqn, args))

    @jax.custom_vjp
    def use(rings, others):
        shift = device_map.zero_of(others)  # generated when the other inputs are ready
        kernels = [lz.generate(rings[j], shift)[0] for lz, j in zip(lazies, slot, strict=True)]
        return apply(kernels, others), rings

    def use_fwd(rings, others):
        return use(rings, others), (rings, others)

    def use_bwd(residuals, cotangents):
        rings, others = residuals
        out_grads, ring_grads = cotangents
        shift = device_map.zero_of(out_grads)  # generated again when the gradient arrives
        made = [lz.generate(rings[j], shift) for lz, j in zip(lazies, slot, strict=True)]
        _, vjp = jax.vjp(apply, [k for k, _ in made], others)
        kernel_grads, other_grads = vjp(out_grads)
        ring_grads = list(ring_grads)
        for lz, j, (_, forward), g in zip(lazies, slot, made, kernel_grads, strict=True):
            ring_grads[j] = generator.scatter_kernel_grad(lz.static[2], ring_grads[j],
                                                          forward, g)
        return tuple(ring_grads), other_grads

    use.defvjp(use_fwd, use_bwd)
    first = {id(lz.ring): lz.ring for lz in lazies}
    rings = tuple(chain.get(i, first[i]) for i in ring_ids)
    outs, links = use(rings, [invals[i] for i in other_at])
    chain.update(zip(ring_ids, links, strict=True))
    return list(outs)


def _materialize(x):
    return x.relayout(x.generate(x.ring, None)[0]) if isinstance(x, _Lazy) else x


def _evaluate(jaxpr, consts: list, args: list) -> list:
    env: dict = {}
    chain: dict = {}  # id of a ring -> its latest link (see _fused_use)

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        static = _marker_of(eqn)
        if static is not None:
            outs = [_Lazy(static, invals[-1])]
        elif not any(isinstance(x, _Lazy) for x in invals):
            outs = _bind(eqn, invals)
        elif eqn.primitive.name in _LAYOUT_OPS and len(invals) == 1:
            outs = [dataclasses.replace(invals[0], ops=invals[0].ops + (eqn,))]
        else:
            outs = _fused_use(eqn, invals, chain)
        for v, x in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jex.DropVar):
                env[v] = x
    return [_materialize(read(v)) for v in jaxpr.outvars]


def remat_kernels(fun: Callable) -> Callable:
    """``fun`` with every marked generated kernel made at its uses and again in the
    backward pass (see the module docstring). Same values and gradients as ``fun``.

    The kernels must come from ``generate_params`` with
    ``make_tables(spec, where="device", inverse=False, remat=True)``; other values are
    computed as in ``fun``. Use it on the function that is differentiated (the loss).
    """
    def wrapped(*args, **kwargs):
        closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args, **kwargs)
        flat = jax.tree.leaves((args, kwargs))
        out = _evaluate(closed.jaxpr, list(closed.consts), flat)
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped
