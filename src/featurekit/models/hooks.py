"""Hook contexts on plain PyTorch hooks: capture activations, replace them (splice), add to them (steer).

Every site is a (B, T, d) tensor at the input or output side of one module (see `sites`). Input
sides use forward pre-hooks registered ``with_kwargs=True`` (HF passes ``hidden_states`` either
positionally or as a keyword); output sides use forward hooks and read element 0 when a module
returns a tuple. Each hook closure does one job (store, stop or edit), and every context removes
its hooks on exit, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from featurekit.errors import FeaturekitError
from featurekit.models.sites import HookPoint, blocks, body_model, parse_site, resolve, unwrap


class StopForward(Exception):
    """Raised by a hook after the deepest needed block to end a forward pass early (internal)."""


# --- reading and writing the tensor of a hook point -------------------------------------------

def _read_input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise FeaturekitError("cannot find the input tensor of a hooked module (no positional argument and "
                          "no 'hidden_states' keyword); this transformers version calls it differently.")


def _write_input(args: tuple, kwargs: dict, value: Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _read_output(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _write_output(output: Any, value: Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _on_read(point: HookPoint, store: Callable[[Tensor], None]) -> RemovableHandle:
    """Call ``store(tensor)`` whenever the hook point's tensor is computed."""
    if point.side == "input":
        return point.module.register_forward_pre_hook(
            lambda module, args, kwargs: store(_read_input(args, kwargs)), with_kwargs=True)
    return point.module.register_forward_hook(lambda module, args, output: store(_read_output(output)))


def _on_edit(point: HookPoint, edit: Callable[[Tensor], Tensor]) -> RemovableHandle:
    """Replace the hook point's tensor by ``edit(tensor)`` (runs before other hooks on the module)."""
    if point.side == "input":
        def pre_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return _write_input(args, kwargs, edit(_read_input(args, kwargs)))

        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)

    def hook(module: Any, args: tuple, output: Any) -> Any:
        return _write_output(output, edit(_read_output(output)))

    return point.module.register_forward_hook(hook, prepend=True)


def _stop(module: Any, args: tuple, output: Any) -> None:
    raise StopForward


# --- public API -------------------------------------------------------------------------------

def capture_activations(model: Any, input_ids: Tensor, sites: Sequence[str],
                        attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Run one forward pass and return ``{site: (B, T, d) tensor}`` for every site.

    Only the body model runs (no LM head, ``use_cache=False``), under ``torch.inference_mode``, and
    the pass stops with StopForward right after the deepest block that a site needs: later blocks,
    the final norm and the head never run. Tensors keep the model's dtype and device.
    """
    device = next(unwrap(model).parameters()).device
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    return capture_forward(model, sites, lambda: body_model(model)(**kwargs))


def capture_forward(model: Any, sites: Sequence[str], forward: Callable[[], Any]) -> dict[str, Tensor]:
    """`capture_activations` for any forward call: ``forward()`` runs the model (e.g. a vision model on
    ``pixel_values``) under ``torch.inference_mode``, stopped after the deepest block a site needs."""
    points: dict[str, HookPoint] = {}
    for site in sites:
        point = resolve(model, site)  # before parse_site: resolve's errors also list the valid sites
        points[str(parse_site(site))] = point
    names = list(points)
    if not names:
        raise FeaturekitError("capture_activations needs at least one site, e.g. sites=['resid_post.0'].")
    deepest = max(parse_site(name).layer for name in names)
    acts: dict[str, Tensor] = {}
    handles = [_on_read(point, lambda t, name=name: acts.__setitem__(name, t)) for name, point in points.items()]
    handles.append(blocks(model)[deepest].register_forward_hook(_stop))  # after the readers
    try:
        with torch.inference_mode():
            forward()
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in acts]
    if missing:
        raise FeaturekitError(f"sites {missing} were not reached in the forward pass; this model's blocks "
                              "do not call the hooked modules as featurekit expects.")
    return {name: acts[name] for name in names}


def gradient_key(site: str) -> str:
    """The name under which the LM-loss gradient at `site` travels beside its activation (cache, batches)."""
    return f"{parse_site(site)}@grad"


def capture_gradients(model: Any, input_ids: Tensor, sites: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Activations at `sites` and the gradient of the model's next-token loss with respect to them.

    One full forward (to the logits) and one backward. A zero tensor δ that requires grad is added at
    each site (a + δ), and the gradient is taken with respect to the δs only (no parameter gradient is
    kept; the path through a later site stays connected, so upstream sites get their full gradient). The loss is the SUM over
    positions t < T−1 of CE(logits_t, input_ids_{t+1}) — one context's total loss — so the gradient
    at token t holds its effect on every later prediction, not divided by the context length.
    Returns ({site: (B, T, d) activation}, {site: (B, T, d) gradient}), in the model's dtype.
    """
    points = {str(parse_site(site)): resolve(model, site) for site in sites}
    if not points:
        raise FeaturekitError("capture_gradients needs at least one site, e.g. sites=['resid_post.0'].")
    acts: dict[str, Tensor] = {}
    leaves: dict[str, Tensor] = {}

    def make_leaf(name: str, act: Tensor) -> Tensor:
        acts[name] = act.detach()
        leaves[name] = torch.zeros_like(act, requires_grad=True)
        return act + leaves[name]

    handles = [_on_edit(point, lambda t, name=name: make_leaf(name, t)) for name, point in points.items()]
    device = next(unwrap(model).parameters()).device
    ids = input_ids.to(device)
    try:
        with torch.enable_grad():
            logits = unwrap(model)(input_ids=ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
            names = list(leaves)
            missing = [name for name in points if name not in leaves]
            if missing:
                raise FeaturekitError(f"sites {missing} were not reached in the forward pass; this model's blocks "
                                      "do not call the hooked modules as featurekit expects.")
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    grads = [torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)]
    return {n: acts[n] for n in points}, {n: g.detach() for n, g in zip(names, grads)}


@contextmanager
def capture(model: Any, *sites: str) -> Iterator[dict[str, Tensor]]:
    """Within the context, every forward pass stores ``{site: (B, T, d) tensor}`` in the yielded dict
    (the last pass wins). Nothing is changed and nothing stops: use it around a full forward when
    its output is needed too; `capture_activations` is the early-stopping form for harvesting."""
    acts: dict[str, Tensor] = {}
    handles = [_on_read(resolve(model, site), lambda t, name=str(parse_site(site)): acts.__setitem__(name, t.detach()))
               for site in sites]
    try:
        yield acts
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _editing(model: Any, site: str, edit: Callable[[Tensor], Tensor]) -> Iterator[None]:
    handle = _on_edit(resolve(model, site), edit)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def replace(model: Any, site: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the context, the (B, T, d) activation ``a`` at ``site`` is replaced by ``fn(a)``.

    ``fn`` must return the same shape; the result is cast to ``a``'s dtype (so a float32
    reconstruction can be spliced into a bfloat16 model).
    """
    def edit(act: Tensor) -> Tensor:
        new = fn(act)
        if tuple(new.shape) != tuple(act.shape):
            raise FeaturekitError(f"replace({site!r}) fn returned shape {tuple(new.shape)}, expected "
                                  f"{tuple(act.shape)}: return a tensor shaped like its input.")
        return new.to(device=act.device, dtype=act.dtype)

    with _editing(model, site, edit):
        yield


@contextmanager
def transform(model: Any, fns: Mapping[str, Callable[[Tensor], Tensor]]) -> Iterator[None]:
    """`replace` at several sites at once: within the context, the activation ``a`` at each ``site``
    of ``fns`` becomes ``fns[site](a)`` (same shape, cast back to ``a``'s dtype), e.g. a top-k of
    the MLP neurons at every layer. Every hook is removed on exit, also when a site fails to resolve."""
    with ExitStack() as stack:
        for site, fn in fns.items():
            stack.enter_context(replace(model, site, fn))
        yield


@contextmanager
def add(model: Any, site: str, vector: Tensor, scale: float = 1.0,
        positions: int | slice | Sequence[int] | Tensor | None = None) -> Iterator[None]:
    """Within the context, ``a[:, positions] += scale * vector`` at ``site`` (all positions if None).

    ``vector`` is (d,). Positions index the time axis of each forward call (with a KV cache during
    generation, that is the new tokens only).
    """
    vector = torch.as_tensor(vector).detach()
    if vector.ndim != 1:
        raise FeaturekitError(f"add() needs a 1-d vector of width d, got shape {tuple(vector.shape)}.")

    def edit(act: Tensor) -> Tensor:
        if act.shape[-1] != vector.shape[0]:
            raise FeaturekitError(f"add({site!r}) vector has width {vector.shape[0]} but the site has width "
                                  f"{act.shape[-1]}: use a vector of the site's width.")
        delta = scale * vector.to(device=act.device, dtype=act.dtype)
        if positions is None:
            return act + delta
        out = act.clone()
        out[:, positions] += delta
        return out

    with _editing(model, site, edit):
        yield
