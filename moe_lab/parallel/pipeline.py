"""Pipeline parallelism with ``torch.distributed.pipelining``: stages cut at decoder layers.

    model = parallelize(model, ParallelDims(pp=2, ep=2, pp_schedule="interleaved_1f1b"))
    model.pipeline                      # this rank's Pipeline: its stage modules and schedule
    train_step(model, optimizer, micro_batches, runtime)   # runs runtime.pipeline.forward_backward

The model is cut into ``pp × virtual`` stages of consecutive decoder layers (balanced: the
first ``num_layers % stages`` stages hold one layer more). Stage 0 also holds the embedding,
the last stage the final norm and the LM head. Rank ``r`` of the ``pp`` group runs the
stages ``r, r + pp, ...`` (one stage for ``gpipe`` and ``1f1b``, two for
``interleaved_1f1b``, the looped order :class:`~torch.distributed.pipelining.ScheduleInterleaved1F1B`
expects). Every rank *prunes* its model in place: the decoder layers of other stages become
parameterless :class:`OnOtherStage` markers and the embedding / final norm / LM head become
None where they live elsewhere, so the model's parameters, the optimizer and the state dict
of a rank are its stages' own, under their one-process names (``layers.3.attn.q_proj.weight``).

One optimizer step is one call of the schedule: the pipeline's micro-batches *are* the step's
micro-batches (gradient accumulation), concatenated and split again by the schedule along the
batch dimension, so each one is exactly what one process would run (all micro-batches of a
step need the same shape; stages are built once per shape, with static shapes, so no
metadata-inference forward ever runs). The schedule does not scale the gradients
(``scale_grads=False``): as in one process, each micro-batch's loss is its share of the
step's loss.

Losses, counted once (as Megatron-Core's MoE aux-loss auto-scaler):

- the LM loss is the schedule's ``loss_fn`` on the last stage: ``CE_sum / labels_total``
  (the step's global label count), from the logits with ``StepSettings.loss_sum_fn`` (the
  fused LM-head loss, ``head_loss_fn``, is not used here);
- each stage computes the aux-loss share of its own MoE layers
  (:func:`moe_lab.training.losses.routing_losses`) and attaches it to its output activation
  with :class:`AttachAuxLoss`, an identity whose backward also feeds ``d(aux) = 1``; so the
  gradient of every stage's aux loss flows in that stage's backward and no loss value
  crosses stages;
- routing statistics (expert counts, lb/z shares, dropped fractions, selections) and the
  loss values stay on their stage during the step and are summed over the ``pp`` group at
  its end (each stage fills its own layers' rows), so every rank's StepStats equal one
  process's.

What is refused (``moe_lab.dims``): ``dp_shard > 1`` or ``tp > 1`` with ``pp > 1``, tied
embeddings (the embedding and the LM head live on different stages), and the
``global_batch`` balancing scope (its selection pre-pass is a whole-model forward). Exactness
needs no dropout and no router jitter (RNG streams differ per stage); fp16's GradScaler is not
supported (bf16 autocast is). Evaluation runs the stages one after another without a
schedule (:meth:`Pipeline.forward`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..dims import PIPELINE_SCHEDULES
from ..errors import DistributedError
from ..training.losses import StepTotals, routing_losses

#: schedule name (``ParallelDims.pp_schedule``) -> its torch.distributed.pipelining class
SCHEDULE_CLASSES: Dict[str, str] = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
}


def virtual_stages(schedule: str) -> int:
    """Stages per rank of a schedule (DistributedError naming the choices for an unknown one)."""
    if schedule not in PIPELINE_SCHEDULES:
        raise DistributedError(f"unknown pipeline schedule {schedule!r}; expected one of {sorted(PIPELINE_SCHEDULES)}")
    return PIPELINE_SCHEDULES[schedule]


def stage_layers(num_layers: int, num_stages: int) -> List[range]:
    """The decoder layers of each stage: consecutive, balanced (the first ``num_layers %
    num_stages`` stages hold one more)."""
    if num_layers < num_stages:
        raise DistributedError(f"num_layers ({num_layers}) must be at least the number of pipeline stages ({num_stages})")
    base, extra = divmod(num_layers, num_stages)
    out, lo = [], 0
    for s in range(num_stages):
        hi = lo + base + (1 if s < extra else 0)
        out.append(range(lo, hi))
        lo = hi
    return out


class AttachAuxLoss(torch.autograd.Function):
    """``out`` unchanged; its backward also gives ``aux`` the gradient 1 (× ``scale``), so a
    stage's aux loss joins the step loss without crossing stages."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, aux: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype, ctx.scale = aux.shape, aux.dtype, scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, None]:
        d_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_out.device)
        return grad_out, d_aux, None


class OnOtherStage(nn.Module):
    """Marks a decoder layer held by another pipeline stage (no parameters). It keeps the
    layer's index and kind, so ``model.moe_layer_indices`` still names every MoE layer; its
    ``mlp.router`` is None (nothing to update here)."""

    def __init__(self, layer_idx: int, is_moe: bool, stage: int) -> None:
        super().__init__()
        self.layer_idx, self.is_moe, self.stage = layer_idx, is_moe, stage
        self.mlp = _NoMLP()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise DistributedError(f"decoder layer {self.layer_idx} lives on pipeline stage {self.stage}, not on this rank")


class _NoMLP(nn.Module):
    router = None
    experts = None


@dataclass
class _StepRecord:
    """What this rank's stages measured during one step (summed over its micro-batches)."""

    labels_total: float = 1.0
    real_total: float = 1.0
    totals: Optional[StepTotals] = None
    ce_sum: Optional[torch.Tensor] = None
    aux_sum: Optional[torch.Tensor] = None
    #: MoE-layer position (in config.moe_layer_indices) -> [lb, z, dropped] and [E] counts, selections
    layer_3: Dict[int, torch.Tensor] = field(default_factory=dict)
    counts_E: Dict[int, torch.Tensor] = field(default_factory=dict)
    selections_E: Dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, attr: str, value: torch.Tensor) -> None:
        old = getattr(self, attr)
        setattr(self, attr, value if old is None else old + value)

    def add_layer(self, table: Dict[int, torch.Tensor], pos: int, value: torch.Tensor) -> None:
        table[pos] = value if pos not in table else table[pos] + value


class StageModule(nn.Module):
    """One pipeline stage of a model: decoder layers ``layers`` (their original modules),
    with the embedding on the first stage and the final norm + LM head on the last.

    ``forward(x, attention_mask)``: ``x`` is ``input_ids`` [B, S] on the first stage, else
    the hidden states [B, S, D]; returns hidden states, or logits [B, S, V] on the last stage.
    """

    def __init__(self, model: nn.Module, index: int, num_stages: int, layers: range, pipeline: "Pipeline") -> None:
        super().__init__()
        self.index, self.first, self.last = index, index == 0, index == num_stages - 1
        self.layer_ids = list(layers)
        self.config = model.config
        self.embed_tokens = model.embed_tokens if self.first else None
        self.embed_dropout = model.embed_dropout
        self.rotary = model.rotary
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in self.layer_ids})
        self.norm = model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        moe_index = {layer: pos for pos, layer in enumerate(model.config.moe_layer_indices)}
        self.moe_positions = [moe_index[i] for i in self.layer_ids if i in moe_index]
        self._collect_routing_info = model._collect_routing_info  # the model's own packing of layer stats
        self._pipeline = pipeline  # not a submodule: where the step's record lives

    def run(self, x: torch.Tensor, attention_mask_BS: torch.Tensor) -> Tuple[torch.Tensor, Optional[Dict[str, Any]], Optional[torch.Tensor]]:
        """``(output, routing_info of this stage's MoE layers or None, token_mask)``; as
        :meth:`moe_lab.MoEModel.forward` does, stage by stage."""
        from ..model.transformer import build_attention_mask

        b, s = attention_mask_BS.shape
        mask = None if bool(attention_mask_BS.all()) else attention_mask_BS
        if mask is not None:
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            position_ids = torch.arange(s, device=attention_mask_BS.device).expand(b, s)
        cos, sin = self.rotary(position_ids)
        attn_mask = build_attention_mask(mask, s) if mask is not None else None
        token_mask = mask.bool() if mask is not None else None
        if self.first:
            x = self.embed_dropout(self.embed_tokens(x.long()))  # [B, S, D]
        infos = []
        for i in self.layer_ids:
            x, info = self.layers[str(i)](x, cos, sin, attn_mask, token_mask)
            if info is not None:
                infos.append(info)
        routing = None
        if infos:
            routing = self._collect_routing_info(infos, token_mask, b * s, x.device)
        if self.last:
            x = self.lm_head(self.norm(x))  # [B, S, V]
        return x, routing, token_mask

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Training forward of one micro-batch: the output with this stage's aux-loss share
        attached (:class:`AttachAuxLoss`); its statistics go into the step's record."""
        pipe = self._pipeline
        rec = pipe.record
        with pipe.settings.autocast():
            out, routing, _ = self.run(x, attention_mask)
        if routing is None:
            return out
        aux, lb_L, z_L = routing_losses(routing, self.config, pipe.all_reduce_sum, rec.totals)
        w_local = float(attention_mask.sum()) / max(rec.real_total, 1.0)  # this micro-batch's share of the step's tokens
        dropped = routing["dropped_fraction"].detach().float() * w_local
        for j, pos in enumerate(self.moe_positions):
            rec.add_layer(rec.layer_3, pos, torch.stack([lb_L[j].detach().float(), z_L[j].detach().float(), dropped[j]]))
            rec.add_layer(rec.counts_E, pos, routing["expert_counts"][j].detach())
            rec.add_layer(rec.selections_E, pos, routing["selection_counts"][j].detach())
        rec.add("aux_sum", aux.detach().float())
        return AttachAuxLoss.apply(out, aux)


def _schedule_class(name: str) -> Any:
    import torch.distributed.pipelining as pipelining

    return getattr(pipelining, SCHEDULE_CLASSES[name])


class Pipeline:
    """This rank's pipeline stages and the schedule that runs them (see the module docstring).

    Built by :func:`apply_pipeline`; ``train_step`` calls :meth:`forward_backward` through the
    runtime (``runtime.pipeline``), evaluation calls :meth:`forward`."""

    def __init__(self, model: nn.Module, pmesh: Any, schedule: str, device: torch.device) -> None:
        self.pmesh = pmesh
        self.pp = pmesh.size("pp")
        self.pp_rank = pmesh.local_rank("pp")
        self.group = pmesh.group("pp")
        self.schedule_name = schedule
        self.num_stages = self.pp * virtual_stages(schedule)
        self.device = device
        self.config = model.config
        layers = stage_layers(model.config.num_layers, self.num_stages)
        self.stage_of_layer = {i: s for s, r in enumerate(layers) for i in r}
        self.stage_ids = list(range(self.pp_rank, self.num_stages, self.pp))
        self.stages = [StageModule(model, s, self.num_stages, layers[s], self) for s in self.stage_ids]
        self.num_moe_layers = len(model.config.moe_layer_indices)
        self.record = _StepRecord()
        self.settings: Any = None
        self.all_reduce_sum: Any = None
        self._schedules: Dict[Tuple[Any, ...], Any] = {}

    # ---- pruning -------------------------------------------------------------------
    def prune(self, model: nn.Module) -> None:
        """Drop every module of the other stages from ``model`` (in place)."""
        mine = {i for st in self.stages for i in st.layer_ids}
        for i in range(len(model.layers)):
            if i not in mine:
                layer = model.layers[i]
                model.layers[i] = OnOtherStage(i, bool(layer.is_moe), self.stage_of_layer[i])
        if 0 not in self.stage_ids:
            model.embed_tokens = None
        if self.num_stages - 1 not in self.stage_ids:
            model.norm = None
            model.lm_head = None

    def rank_of_stage(self, stage: int) -> int:
        """The global rank that runs ``stage`` in this rank's pipeline."""
        return dist.get_global_rank(self.group, stage % self.pp)

    # ---- one optimizer step ----------------------------------------------------------
    def _schedule(self, num_micro: int, ids_shape: Tuple[int, int], hidden_dtype: torch.dtype,
                  logits_dtype: torch.dtype) -> Any:
        """The schedule (and its stages) for ``num_micro`` micro-batches of ``ids_shape``,
        built once per shape with static stage shapes."""
        from torch.distributed.pipelining import PipelineStage

        key = (num_micro, ids_shape, hidden_dtype, logits_dtype, self.device)
        if key not in self._schedules:
            b, s = ids_shape
            d, v = self.config.hidden_size, self.config.vocab_size
            # requires_grad: the stage shapes say which activations carry gradients back
            hidden = torch.empty(b, s, d, dtype=hidden_dtype, device=self.device, requires_grad=True)
            stages = []
            for st in self.stages:
                inp = torch.empty(b, s, dtype=torch.long, device=self.device) if st.first else hidden
                out = torch.empty(b, s, v, dtype=logits_dtype, device=self.device) if st.last else hidden
                stages.append(PipelineStage(st, st.index, self.num_stages, self.device, input_args=(inp,),
                                            output_args=(out,), group=self.group))
            cls = _schedule_class(self.schedule_name)
            first = stages if virtual_stages(self.schedule_name) > 1 else stages[0]
            self._schedules[key] = cls(first, num_micro, loss_fn=self._loss, scale_grads=False)
        return self._schedules[key]

    def _loss(self, logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one micro-batch: its CE sum over the step's label count."""
        ce_sum = self.settings.loss_sum_fn(logits_BSV, labels_BS)
        self.record.add("ce_sum", ce_sum.detach().float())
        return ce_sum / max(self.record.labels_total, 1.0)

    def forward_backward(self, model: nn.Module, micro_batches: List[Dict[str, torch.Tensor]], labels_total: float,
                         real_total: float, totals: StepTotals, settings: Any, runtime: Any) -> Tuple[list, list, list, list, list]:
        """Forward and backward of the step's micro-batches through the schedule; returns the
        step's ``(losses, ce_sums, layer_stats_3L, expert_counts_LE, selections_LE)`` lists
        (one entry each, summed over the micro-batches and the stages; every pp rank gets the
        same values), as ``train_step``'s own loop does."""
        if settings.scaler is not None:
            raise DistributedError("pipeline parallelism does not support fp16 with a GradScaler; use bf16 or fp32")
        self.device = settings.device
        n = len(micro_batches)
        if self.schedule_name == "1f1b" and n < self.pp:
            raise DistributedError(f"the 1f1b schedule needs at least pp ({self.pp}) micro-batches per step "
                                   f"(gradient_accumulation_steps), got {n}")
        shapes = {tuple(b["input_ids"].shape) for b in micro_batches}
        if len(shapes) != 1:
            raise DistributedError(f"pipeline parallelism needs micro-batches of one shape per step, got {sorted(shapes)}")
        dev = settings.device
        ids = torch.cat([b["input_ids"] for b in micro_batches]).to(dev)
        mask = torch.cat([b["attention_mask"] for b in micro_batches]).to(dev)
        labels = torch.cat([b["labels"] for b in micro_batches]).to(dev)
        param = next(p for p in model.parameters() if p.is_floating_point())
        logits_dtype = settings.amp_dtype or param.dtype
        schedule = self._schedule(n, shapes.pop(), param.dtype, logits_dtype)
        self.settings, self.all_reduce_sum = settings, runtime.all_reduce_sum
        self.record = _StepRecord(labels_total, real_total, totals)
        args = (ids,) if 0 in self.stage_ids else ()
        last = self.num_stages - 1 in self.stage_ids
        schedule.step(*args, attention_mask=mask, target=labels if last else None, return_outputs=False)
        return self._gathered()

    def _gathered(self) -> Tuple[list, list, list, list, list]:
        """This step's record summed over the pp group: every rank gets every stage's values."""
        rec, e, nl = self.record, self.config.num_experts, self.num_moe_layers
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        scalars = torch.stack([rec.ce_sum if rec.ce_sum is not None else zero, rec.aux_sum if rec.aux_sum is not None else zero])
        layer_3L = torch.zeros(3, nl, dtype=torch.float32, device=self.device)
        counts_LE = torch.zeros(nl, e, dtype=torch.float64, device=self.device)
        sel_LE = torch.zeros(nl, e, dtype=torch.float64, device=self.device)
        for pos, v in rec.layer_3.items():
            layer_3L[:, pos] = v
        for pos, v in rec.counts_E.items():
            counts_LE[pos] = v.double()
        for pos, v in rec.selections_E.items():
            sel_LE[pos] = v.double()
        flat = torch.cat([scalars.double(), layer_3L.reshape(-1).double(), counts_LE.reshape(-1), sel_LE.reshape(-1)])
        flat = self._pp_sum(flat)
        ce_sum, aux = flat[0].float(), flat[1].float()
        layer_3L = flat[2:2 + 3 * nl].view(3, nl).float()
        counts_LE = flat[2 + 3 * nl:2 + 3 * nl + nl * e].view(nl, e).long()
        sel_LE = flat[2 + 3 * nl + nl * e:].view(nl, e).long()
        loss = ce_sum / max(rec.labels_total, 1.0) + aux
        return [loss], [ce_sum], [layer_3L], [counts_LE], [sel_LE]

    def _pp_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.to(self._comm_device(), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out.to(t.device)

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                settings: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Logits [B, S, V] (on every pp rank) and ``{"expert_counts": [L, E], "dropped_fraction":
        [L]}`` of one batch: the stages run one after another, activations sent point to point
        over the pp group (no schedule; for evaluation). A collective over the pp group."""
        self.device = settings.device
        b, s = attention_mask.shape
        param = next(p for p in model.parameters() if p.is_floating_point())
        nl, e = self.num_moe_layers, self.config.num_experts
        counts_LE = torch.zeros(nl, e, dtype=torch.float64, device=self.device)
        dropped_L = torch.zeros(nl, dtype=torch.float64, device=self.device)
        mine = {st.index: st for st in self.stages}
        comm = self._comm_device()
        x: Optional[torch.Tensor] = input_ids
        logits = torch.empty(b, s, self.config.vocab_size, dtype=torch.float32, device=comm)
        for stage in range(self.num_stages):
            if stage in mine:
                if stage > 0 and self.rank_of_stage(stage - 1) != dist.get_rank():
                    buf = torch.empty(b, s, self.config.hidden_size, dtype=torch.float32, device=comm)
                    dist.recv(buf, src=self.rank_of_stage(stage - 1), group=self.group)
                    x = buf.to(self.device, param.dtype)
                with settings.autocast():
                    x, routing, _ = mine[stage].run(x, attention_mask)
                if routing is not None:
                    for j, pos in enumerate(mine[stage].moe_positions):
                        counts_LE[pos] = routing["expert_counts"][j].double()
                        dropped_L[pos] = routing["dropped_fraction"][j].double()
                if stage < self.num_stages - 1 and self.rank_of_stage(stage + 1) != dist.get_rank():
                    dist.send(x.float().to(comm).contiguous(), dst=self.rank_of_stage(stage + 1), group=self.group)
                if stage == self.num_stages - 1:
                    logits = x.float().to(comm)
        dist.broadcast(logits, src=self.rank_of_stage(self.num_stages - 1), group=self.group)
        stats = self._pp_sum(torch.cat([counts_LE.reshape(-1), dropped_L]))
        info = {"expert_counts": stats[: nl * e].view(nl, e).long(), "dropped_fraction": stats[nl * e:].float()}
        return logits.to(self.device), info

    # ---- full state ----------------------------------------------------------------------
    def gather(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Every stage's ``tensors`` (name -> CPU tensor) on every pp rank, in the model's
        order (a collective over the pp group)."""
        meta = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()]
        metas: List[Any] = [None] * self.pp
        dist.all_gather_object(metas, meta, group=self.group)
        comm = self._comm_device()
        out: Dict[str, torch.Tensor] = {}
        for src, entries in enumerate(metas):
            for name, shape, dtype in entries:
                if src == self.pp_rank:
                    t = tensors[name].to(comm).contiguous()
                else:
                    t = torch.empty(shape, dtype=getattr(torch, dtype), device=comm)
                dist.broadcast(t, src=dist.get_global_rank(self.group, src), group=self.group)
                out[name] = t.cpu()
        return {k: out[k] for k in sorted(out, key=module_order)}

    def gather_optimizer_meta(self, meta: Dict[str, Any]) -> Dict[str, Any]:
        """The optimizer metadata of every stage merged: each group's parameter names and the
        per-parameter scalars of all stages (a collective over the pp group)."""
        metas: List[Any] = [None] * self.pp
        dist.all_gather_object(metas, meta, group=self.group)
        groups = [dict(g) for g in meta["param_groups"]]
        for i, g in enumerate(groups):
            names = [n for m in metas for n in m["param_groups"][i]["params"]]
            g["params"] = sorted(names, key=module_order)
        scalars: Dict[str, Any] = {}
        for m in metas:
            scalars.update(m.get("scalars", {}))
        return {**meta, "param_groups": groups, "scalars": scalars}


_LAYER = re.compile(r"^layers\.(\d+)\.")


def module_order(name: str) -> Tuple[int, int, str]:
    """Sort key of a (state or optimizer) name in one-process model order: embedding,
    decoder layers by index, then the final norm and LM head."""
    m = _LAYER.match(name)
    if m:
        return (1, int(m.group(1)), "")
    if name.startswith("embed_tokens"):
        return (0, 0, "")
    return (2, 0, "")  # the final norm, then the LM head: sorted() keeps their order


def apply_pipeline(model: nn.Module, pmesh: Any, schedule: str, device: torch.device) -> "Pipeline":
    """Cut ``model`` into this rank's stages, prune the rest (in place) and set
    ``model.pipeline``. After expert parallelism has sharded the experts."""
    pipe = Pipeline(model, pmesh, schedule, device)
    pipe.prune(model)
    model.pipeline = pipe
    return pipe
