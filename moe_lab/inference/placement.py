"""``device_map``: which device each part of a model runs on.

    placement, experts = resolve_device_map("auto", model, torch.bfloat16)   # {module prefix: device}
    place_model(model, placement)          # move the weights; hidden states follow at layer boundaries
    plan_device_map(sizes, {"cuda:0": 40 << 30, "cuda:1": 40 << 30})        # pure planning function

Accepted forms (``OptimizedMoEModel(device_map=...)``):

- ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or a ``torch.device``): the whole model on that device.
- ``"auto"``: without CUDA, the CPU. With CUDA, :func:`plan_device_map` over the visible GPUs'
  free memory: the whole model on the first GPU when it fits; otherwise the decoder layers,
  in order, split across the GPUs (embeddings with the first layer, final norm and head with
  the last); and when even that does not hold every expert, each MoE layer keeps fewer
  experts on its GPU and the rest stay in host memory behind the expert cache
  (``experts_in_memory`` of the plan).
- ``{module prefix: device}``: an explicit map, e.g. ``{"embed_tokens": "cuda:0", "layers.0":
  "cuda:0", "layers.1": "cuda:1", "norm": "cuda:1", "lm_head": "cuda:1"}``. A tensor goes to
  the device of its longest matching prefix (``""`` matches everything). Every prefix must
  name a module of the model, every device must be valid, and every weight must be covered.

Experts are not placed here: the expert cache puts each MoE layer's device slots where that
layer's router is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..devices import resolve_device
from ..errors import ConfigError

logger = logging.getLogger(__name__)

DeviceMapLike = Union[str, torch.device, Mapping[str, Union[str, int, torch.device]]]


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


@dataclass
class ModelSizes:
    """Bytes of a model's parts, in the compute dtype (what :func:`plan_device_map` packs)."""

    embed_bytes: int  #: embeddings (and the head when tied)
    head_bytes: int  #: final norm + lm_head (0 when tied to the embeddings)
    layer_bytes: List[int]  #: each decoder layer without its routed experts
    expert_bytes: List[int]  #: one routed expert of each decoder layer (0: a dense layer)
    num_experts: int

    def total(self, experts: Optional[int] = None) -> int:
        """Bytes with ``experts`` experts per MoE layer (default: all)."""
        k = self.num_experts if experts is None else experts
        return self.embed_bytes + self.head_bytes + sum(d + k * e for d, e in zip(self.layer_bytes, self.expert_bytes))


def model_sizes(model: nn.Module, dtype: torch.dtype) -> ModelSizes:
    """The :class:`ModelSizes` of a :class:`~moe_lab.model.MoEModel` (its weights may be on
    the meta device), counting floating tensors in ``dtype``."""
    item = torch.empty((), dtype=dtype).element_size()

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * (item if t.is_floating_point() else t.element_size())

    n = len(model.layers)
    layer, expert = [0] * n, [0] * n
    embed = head = 0
    tied = model.lm_head.weight is model.embed_tokens.weight
    seen = set()
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            if _is_expert(name):
                expert[i] += nbytes(t) // model.config.num_experts
            else:
                layer[i] += nbytes(t)
        elif name.startswith(("norm.", "lm_head.")) and not tied:
            head += nbytes(t)
        else:
            embed += nbytes(t)
    return ModelSizes(embed, head, layer, expert, model.config.num_experts)


@dataclass
class DevicePlan:
    """The outcome of :func:`plan_device_map`."""

    device_map: Dict[str, str]  #: module prefix -> device
    experts_in_memory: int  #: routed experts per MoE layer on the device (the rest in host memory)
    num_experts: int
    bytes_per_device: Dict[str, int] = field(default_factory=dict)

    @property
    def devices(self) -> List[str]:
        return list(dict.fromkeys(self.device_map.values()))


def _pack(sizes: ModelSizes, budgets: List[Tuple[str, int]], experts: int, tied: bool) -> Optional[DevicePlan]:
    """Fill the devices in order (embeddings, layers 0..n-1, head); None when it does not fit."""
    left = [b for _, b in budgets]
    used = [0] * len(budgets)
    d = 0
    plan: Dict[str, str] = {}

    def put(prefix: str, size: int) -> bool:
        nonlocal d
        while d < len(left) and size > left[d]:
            d += 1
        if d == len(left):
            return False
        left[d] -= size
        used[d] += size
        plan[prefix] = budgets[d][0]
        return True

    if not put("embed_tokens", sizes.embed_bytes):
        return None
    plan["rotary"] = plan["embed_tokens"]
    for i, (dense, one) in enumerate(zip(sizes.layer_bytes, sizes.expert_bytes)):
        if not put(f"layers.{i}", dense + (experts if one else 0) * one):
            return None
    if tied:  # the head shares the embedding matrix: it runs where the embeddings are
        plan["norm"] = plan["lm_head"] = plan["embed_tokens"]
    else:
        if not put("norm", sizes.head_bytes):
            return None
        plan["lm_head"] = plan["norm"]
    per_device = {name: u for (name, _), u in zip(budgets, used) if u}
    return DevicePlan(plan, experts, sizes.num_experts, per_device)


def plan_device_map(sizes: ModelSizes, free_bytes: Mapping[str, int], headroom: float = 0.85,
                    tied: bool = False) -> DevicePlan:
    """Decide where each part goes, given each device's free bytes (a pure function).

    Args:
        sizes: the model's :class:`ModelSizes`.
        free_bytes: ``{device: free bytes}`` in the order devices are filled (e.g. the visible
            GPUs); empty: the CPU.
        headroom: fraction of each device's free bytes that weights may take (the rest is
            for the KV cache and activations).
        tied: the head shares the embedding matrix.

    Returns:
        The whole model on the first device when it fits there; else the decoder layers in
        order across the devices, with every expert when that fits, otherwise with the most
        experts per MoE layer that fit (``experts_in_memory``; the rest stay in host memory
        behind the expert cache).

    Raises:
        ConfigError: not even one expert per MoE layer fits beside the dense weights.
    """
    if not 0 < headroom <= 1:
        raise ConfigError(f"headroom must be in (0, 1], got {headroom!r}")
    if not free_bytes:
        return DevicePlan({"": "cpu"}, sizes.num_experts, sizes.num_experts, {"cpu": sizes.total()})
    budgets = [(str(name), int(free * headroom)) for name, free in free_bytes.items()]
    first, budget = budgets[0]
    if sizes.total() <= budget:
        return DevicePlan({"": first}, sizes.num_experts, sizes.num_experts, {first: sizes.total()})
    for k in range(sizes.num_experts, 0, -1):
        plan = _pack(sizes, budgets, k, tied)
        if plan is not None:
            return plan
    raise ConfigError(
        f"the model does not fit the devices {dict(free_bytes)} (free bytes, {headroom:.0%} usable): its dense weights "
        f"and one expert per MoE layer take {sizes.total(1)} bytes; use device_map='cpu' or more devices"
    )


# ---------------------------------------------------------------------------------------
# resolving and applying a device_map
# ---------------------------------------------------------------------------------------


def device_for(name: str, placement: Mapping[str, torch.device]) -> torch.device:
    """The device of tensor/module ``name``: that of its longest matching prefix."""
    best, dev = -1, None
    for prefix, d in placement.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, dev = len(prefix), d
    if dev is None:
        raise ConfigError(f"device_map places no device for {name!r}")
    return dev


def validate_device_map(device_map: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.device]:
    """Check an explicit ``{module prefix: device}`` map against ``model``; returns it resolved.

    Raises:
        ConfigError: an unknown prefix, a bad device, a weight no prefix covers, or tied
            embeddings split across devices (the message names the value).
    """
    if not device_map:
        raise ConfigError("device_map is an empty dict; give {module prefix: device}, e.g. {'': 'cuda:0'}")
    modules = dict(model.named_modules())
    placement: Dict[str, torch.device] = {}
    for prefix, dev in device_map.items():
        if not isinstance(prefix, str) or (prefix and prefix not in modules):
            examples = [n for n in modules if n and n.count(".") <= 1][:8]
            raise ConfigError(f"device_map: unknown module prefix {prefix!r}; expected '' or a module name such as "
                              f"{examples}")
        if isinstance(dev, int) and not isinstance(dev, bool):
            dev = f"cuda:{dev}"
        placement[prefix] = resolve_device(dev, f"device_map[{prefix!r}]")

    def covered(name: str) -> bool:
        return any(p == "" or name == p or name.startswith(p + ".") for p in placement)

    if not covered("rotary.inv_freq") and covered("embed_tokens.weight"):  # RoPE tables: with the embeddings
        placement["rotary"] = device_for("embed_tokens.weight", placement)
    uncovered = []
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if not covered(name):
            module = name.rsplit(".", 1)[0]
            if module not in uncovered:
                uncovered.append(module)
    if uncovered:
        raise ConfigError(f"device_map covers no device for modules {uncovered[:8]}; add them (or a '' entry)")
    for i in range(len(model.layers)):  # hidden states move at layer boundaries, not inside a layer
        names = [f"layers.{i}.{n}" for n, _ in model.layers[i].named_parameters() if not _is_expert(f".{n}")]
        split = sorted({str(device_for(n, placement)) for n in names})
        if len(split) > 1:
            raise ConfigError(f"device_map splits decoder layer layers.{i} across {split}; a layer runs on one device")
    if model.lm_head.weight is model.embed_tokens.weight and \
            device_for("lm_head.weight", placement) != device_for("embed_tokens.weight", placement):
        raise ConfigError("device_map: lm_head is tied to embed_tokens; both must be on the same device")
    return placement


def resolve_device_map(device_map: DeviceMapLike, model: Optional[nn.Module], dtype: Optional[torch.dtype],
                       headroom: float = 0.85) -> Tuple[Dict[str, torch.device], Optional[int]]:
    """``(placement {prefix: device}, experts per MoE layer the plan keeps on the device or None)``.

    ``model`` (its names and shapes are read; the experts may be on the meta device) is
    needed for a dict and for "auto" on a CUDA machine; a plain device needs none. See the
    module docstring for the accepted forms.
    """
    if isinstance(device_map, Mapping):
        assert model is not None, "a dict device_map is checked against the model"
        return validate_device_map(device_map, model), None
    if not (isinstance(device_map, str) and device_map == "auto"):
        return {"": resolve_device(device_map, "device_map")}, None
    if not torch.cuda.is_available():
        return {"": torch.device("cpu")}, None
    assert model is not None, "device_map='auto' on a CUDA machine plans with the model's sizes"
    free = {f"cuda:{i}": torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    tied = model.lm_head.weight is model.embed_tokens.weight
    plan = plan_device_map(model_sizes(model, dtype or torch.float32), free, headroom, tied=tied)
    logger.info("device_map=auto: %s, %d of %d experts per MoE layer on the device (weights per device: %s)",
                plan.device_map, plan.experts_in_memory, plan.num_experts, plan.bytes_per_device)
    return {k: torch.device(v) for k, v in plan.device_map.items()}, plan.experts_in_memory


def _to_device_hook(device: torch.device) -> Any:
    def hook(module: nn.Module, args: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
        if not any(isinstance(a, torch.Tensor) and a.device != device for a in args):
            return None
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    return hook


def place_model(model: nn.Module, placement: Mapping[str, torch.device]) -> List[torch.device]:
    """Move ``model``'s (non-meta) weights to their devices; with several devices, hidden
    states (and masks, RoPE tables) move to each decoder layer's device as it starts, and to
    the head's device before the final norm. Returns the devices used, in layer order."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        dev = device_for(name, placement)
        if not t.is_meta and t.device != dev:
            t.data = t.data.to(dev)
    devices = [device_for("embed_tokens", placement)] + [device_for(f"layers.{i}", placement)
                                                         for i in range(len(model.layers))]
    devices.append(device_for("norm", placement))
    used = list(dict.fromkeys(devices))
    if len(used) > 1:
        for i, layer in enumerate(model.layers):
            layer.register_forward_pre_hook(_to_device_hook(devices[i + 1]))
        model.norm.register_forward_pre_hook(_to_device_hook(devices[-1]))
        model.lm_head.register_forward_pre_hook(_to_device_hook(device_for("lm_head", placement)))
    return used
