"""Running a training step through torch.distributed.pipelining's schedules.

Every rank passes the same keyword inputs (position ids for RoPE on every stage, labels for the
loss on the last); the first stage also gets the token ids, the last the loss mask as target.
The loss of microbatch i is sum(losses_i * mask_i) / tokens_of_global_batch, so the gradient
summed over microbatches, and then over data-parallel ranks, is that of the global-batch mean
(hence ``scale_grads=False``).
"""

from __future__ import annotations

import time

import torch
from torch.distributed import pipelining
from torch.distributed.pipelining import PipelineStage

from yuanlfa.config import ConfigError
from yuanlfa.layout import PipelineLayout
from yuanlfa.layout.schedules import schedule_spec
from yuanlfa.parallel.pp.pacing import Pacer
from yuanlfa.parallel.pp.stage import StageModule


class PipelineRunner:
    def __init__(
        self,
        modules: list[StageModule],
        stage_ids: list[int],
        layout: PipelineLayout,
        pp_group,
        device: torch.device,
        *,
        schedule: str,
        num_microbatches: int,
        micro_batch_size: int,
        seq_length: int,
        hidden_size: int,
        hidden_dtype: torch.dtype,
        seq_shards: int = 1,
        pacer: Pacer | None = None,
    ) -> None:
        """``seq_shards``: tp under sequence parallelism (stages exchange sequence shards);
        ``pacer``: stretch each op to an emulated device's time (:mod:`.pacing`)."""
        if pacer is not None and (device.type != "cpu" or torch.get_num_threads() != 1):
            raise ConfigError(
                f"emulate.pace: paces ops by their thread CPU time, on CPU with one torch thread; "
                f"this rank runs on {device.type} with {torch.get_num_threads()} threads: set "
                "train.device=cpu and OMP_NUM_THREADS=1"
            )
        self.pacer = pacer
        self.num_microbatches = num_microbatches
        self.is_first = 0 in stage_ids
        self.is_last = layout.num_stages - 1 in stage_ids
        self.num_tokens: torch.Tensor | None = None
        b, s = micro_batch_size, seq_length
        # Example tensors give the shapes to exchange; requires_grad tells torch that the
        # hidden states (not the token ids) carry gradients back to the previous stage.
        hidden = torch.empty(
            s // seq_shards, b, hidden_size, dtype=hidden_dtype, device="meta", requires_grad=True
        )
        tokens = torch.empty(b, s, dtype=torch.long, device="meta")
        losses = torch.empty(b, s, dtype=torch.float32, device="meta", requires_grad=True)
        self.stages = [
            PipelineStage(
                module,
                stage,
                layout.num_stages,
                device,
                input_args=(tokens if layout.is_first(stage) else hidden,),
                output_args=(losses if layout.is_last(stage) else hidden,),
                group=pp_group,
            )
            for module, stage in zip(modules, stage_ids, strict=True)
        ]
        self._cpu_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        for stage in self.stages:
            self._time_compute(stage, device)
        # The spec names torch's class and refuses, as a ConfigError, what torch would refuse.
        spec = schedule_spec(schedule)
        spec.check(layout.pp, layout.virtual_stages, num_microbatches)
        if layout.placement != spec.placement:
            raise ValueError(
                f"layout placed {layout.placement}, but {schedule} places {spec.placement}"
            )
        cls = getattr(pipelining, spec.torch_class)
        common = {"loss_fn": self._loss, "scale_grads": False}
        if spec.single_stage:
            if len(self.stages) != 1:
                raise ValueError(f"schedule {schedule} runs one stage per rank")
            self.schedule = cls(self.stages[0], num_microbatches, **common)
        else:
            self.schedule = cls(self.stages, num_microbatches, **common)
        # torch's runtime walks its whole lowered order under eval() too, backward actions
        # included, and the V-shaped ones fail there at the V's turn (the local gradient
        # hand-off between the two stages of the last rank): evaluate with the forward part of
        # the order instead (its sends and receives keep their order, so no new waits).
        self._eval_order = None
        if spec.placement == "v":
            lowered = self.schedule.pipeline_order_with_comms
            self._eval_order = {rank: _forward_only(order) for rank, order in lowered.items()}

    def _time_compute(self, stage: PipelineStage, device: torch.device) -> None:
        """Record the time this rank spends computing (forward, backward, weight gradients);
        the rest of a step is waiting for other stages (the bubble). See :attr:`busy_s`.

        The stage's methods are wrapped per instance; torch's schedules call exactly these. On
        CUDA, events bracket each call, so timing adds no synchronization inside the step.
        """
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            method = getattr(stage, name, None)
            if method is None:
                continue
            if self.pacer is not None:
                method = self.pacer.wrap(method)

            def timed(*args, _method=method, **kwargs):
                if device.type == "cuda":
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    try:
                        return _method(*args, **kwargs)
                    finally:
                        end.record()
                        self._events.append((start, end))
                began = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self._cpu_s += time.perf_counter() - began

            setattr(stage, name, timed)

    @property
    def busy_s(self) -> float:
        """Compute seconds of the last step (waits for this rank's queued GPU work)."""
        if self._events:
            self._events[-1][1].synchronize()
        return self._cpu_s + sum(s.elapsed_time(e) for s, e in self._events) / 1e3

    def _loss(self, losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (losses * mask).sum() / self.num_tokens

    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
        args = (batch["tokens"],) if self.is_first else ()
        kwargs = {"position_ids": batch["position_ids"], "labels": batch["labels"]}
        return args, kwargs

    def train_step(
        self, batch: dict[str, torch.Tensor], num_tokens: torch.Tensor
    ) -> torch.Tensor | None:
        """Forward and backward of this rank's share of the batch ([local batch, s] tensors).

        Returns the summed microbatch losses on the rank holding the last stage, else None.
        """
        self.num_tokens = num_tokens
        self._cpu_s, self._events = 0.0, []
        if self.pacer is not None:
            self.pacer.reset()
        args, kwargs = self._inputs(batch)
        losses: list[torch.Tensor] = []
        self.schedule.step(
            *args, target=batch["loss_mask"], losses=losses, return_outputs=False, **kwargs
        )
        if not self.is_last:
            return None
        return torch.stack([x.detach() for x in losses]).sum()

    @torch.no_grad()
    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Forward only: the masked sum of per-token losses over this rank's batch, on the rank
        holding the last stage, else None."""
        self.num_tokens = torch.ones((), device=batch["loss_mask"].device)
        args, kwargs = self._inputs(batch)
        losses: list[torch.Tensor] = []
        train_order = self.schedule.pipeline_order_with_comms if self._eval_order else None
        if self._eval_order:
            self.schedule.pipeline_order_with_comms = self._eval_order
        try:
            self.schedule.eval(*args, target=batch["loss_mask"], losses=losses, **kwargs)
        finally:
            if train_order is not None:
                self.schedule.pipeline_order_with_comms = train_order
        return torch.stack(losses).sum() if self.is_last else None


_FORWARD_ACTIONS = frozenset({"FORWARD", "SEND_F", "RECV_F"})


def _forward_only(order: list) -> list:
    """The forward computations of one rank's lowered torch schedule, with their sends and
    receives (an overlapped forward+backward action contributes its forward)."""
    return [
        part
        for action in order
        for part in (action.sub_actions or (action,))
        if part.computation_type.name in _FORWARD_ACTIONS
    ]
