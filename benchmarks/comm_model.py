"""What DeepSpeed ZeRO sends per optimizer step, as read from the installed DeepSpeed
(0.19: runtime/engine.py ``allreduce_gradients``, runtime/zero/stage_1_and_2.py,
stage3.py, partitioned_param_coordinator.py), and the time those bytes take on a cluster.

With ``P_t`` trainable parameters, ``P`` all parameters, ``P_s`` the ZeRO-3 persistent
ones (``<= stage3_param_persistence_threshold`` elements, kept whole on every rank),
``g`` micro-batches per optimizer step (``gradient_accumulation_steps``), ``n`` ranks:

* ZeRO-1: gradients are reduced once per optimizer step, on the accumulation boundary
  (``reduce_ready_partitions_and_remove_grads`` waits for the boundary unless gradients are
  partitioned); ZeRO-2: in the backward hooks of every micro-batch (the engine calls
  ``overlapping_partition_gradients_reduce_epilogue`` on every backward). Both reduce a
  bucket with one ``all_reduce`` (``use_multi_rank_bucket_allreduce`` is on by default),
  or with one ``reduce`` per owning rank when it is off. After the update each rank
  all-gathers its parameter partition once (``all_gather_into_tensor``, its ``P_t/n``).
* ZeRO-3: every micro-batch reduce-scatters the gradients (``reduce_scatter_tensor``)
  and all-gathers the non-persistent parameters on the forward pass; the backward pass
  reuses them while ``stage3_max_reuse_distance`` covers the model (the shipped 1e9 does),
  else gathers them again. The optimizer step re-partitions everything; the persistent
  parameters are all-gathered once after it. Frozen parameters are gathered too.

Logged bytes (what ``comms_logger`` records: an all-gather's local shard, a reduction's
whole buffer) per optimizer step, element size ``b``:

    ZeRO-1   all_reduce P_t b            + all_gather P_t b / n
    ZeRO-2   all_reduce g P_t b          + all_gather P_t b / n
    ZeRO-3   reduce_scatter g P_t b      + all_gather (g (1 + r) (P - P_s) + P_s) b / n,  r = backward re-gather (0/1)

Bytes on the wire per GPU (ring): all-reduce ``2 (n-1)/n``, reduce-scatter, reduce and
all-gather ``(n-1)/n`` of the full buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REDUCE_RING = {"all_reduce": 2.0, "reduce": 1.0, "reduce_scatter_tensor": 1.0}
DEFAULT_PERSISTENCE = 100_000  # DeepSpeed's stage3_param_persistence_threshold default
DEFAULT_REUSE = 1_000_000_000  # DeepSpeed's stage3_max_reuse_distance default


@dataclass(frozen=True)
class ParamCounts:
    trainable: int  # elements with requires_grad: reduced and updated
    total: int  # every parameter: ZeRO-3 partitions and gathers these
    persistent: int  # ZeRO-3: parameters small enough to stay whole on every rank

    @classmethod
    def of_model(cls, model, persistence_threshold: int = DEFAULT_PERSISTENCE) -> "ParamCounts":
        sizes = [(p.numel(), p.requires_grad) for p in model.parameters()]
        return cls(
            trainable=sum(n for n, grad in sizes if grad),
            total=sum(n for n, _ in sizes),
            persistent=sum(n for n, _ in sizes if n <= persistence_threshold),
        )

    @classmethod
    def of_preset(cls, preset: str, persistence_threshold: int = DEFAULT_PERSISTENCE) -> "ParamCounts":
        from pixelbert_dist.model import build_model

        return cls.of_model(build_model(preset, device="meta"), persistence_threshold)


def zero_settings(ds: dict) -> dict:
    """The few DeepSpeed settings the traffic depends on, with DeepSpeed's defaults."""
    zo = ds.get("zero_optimization", {})
    return {
        "stage": int(zo.get("stage", 0)),
        "grad_accum": int(ds.get("gradient_accumulation_steps", 1)),
        "multi_rank_allreduce": zo.get("use_multi_rank_bucket_allreduce", True) or not zo.get("reduce_scatter", True),
        "persistence": int(zo.get("stage3_param_persistence_threshold", DEFAULT_PERSISTENCE)),
        "reuse": int(zo.get("stage3_max_reuse_distance", DEFAULT_REUSE)),
    }


def logged_elements(counts: ParamCounts, ds: dict, world: int) -> dict[str, float]:
    """{collective: elements logged per optimizer step per rank} (see the module doc)."""
    s = zero_settings(ds)
    g, stage = s["grad_accum"], s["stage"]
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage {stage}: the model covers stages 1, 2 and 3")
    if stage == 3:
        regather = 0 if s["reuse"] >= counts.total else 1
        gathered = g * (1 + regather) * (counts.total - counts.persistent) + counts.persistent
        return {"reduce_scatter_tensor": g * counts.trainable, "all_gather_into_tensor": gathered / world}
    reduce_op = "all_reduce" if s["multi_rank_allreduce"] else "reduce"
    reductions = 1 if stage == 1 else g
    return {reduce_op: reductions * counts.trainable, "all_gather_into_tensor": counts.trainable / world}


def predict_logged_bytes(counts: ParamCounts, ds: dict, world: int, elem_bytes: int) -> dict[str, float]:
    return {op: n * elem_bytes for op, n in logged_elements(counts, ds, world).items()}


def wire_bytes(logged: dict[str, float], world: int) -> float:
    """Bytes each GPU sends per optimizer step for logged collectives over ``world`` ranks."""
    total = 0.0
    for op, size in logged.items():
        full = size * world if op == "all_gather_into_tensor" else size
        total += REDUCE_RING.get(op, 1.0) * (world - 1) / world * full
    return total


@dataclass
class Cluster:
    gpus_per_node: int = 8
    intra_gbs: float = 360.0  # NVLink bus bandwidth per GPU achieved by NCCL, GB/s (H100 SXM)
    inter_gbs: float = 40.0  # per GPU across nodes: one 400 Gb/s NIC per GPU at ~80% = 40 GB/s
    alpha_inter_us: float = 5.0  # latency of a ring hop between nodes
    alpha_intra_us: float = 1.0  # latency of a ring hop over NVLink

    def ring_latency(self, gpus: int) -> float:
        """Seconds of one pass round a ring that visits each node's GPUs in a row (as NCCL
        orders it): one network hop per node, NVLink hops for the rest."""
        nodes = math.ceil(gpus / self.gpus_per_node)
        inter = nodes if nodes > 1 else 0
        return (inter * self.alpha_inter_us + (gpus - inter) * self.alpha_intra_us) * 1e-6

    def bandwidth(self, gpus: int, group: int | None = None) -> float:
        """Bytes/s of a ring over ``gpus`` ranks (``group``: ranks in one node only)."""
        inside = (group or gpus) <= self.gpus_per_node
        return (self.intra_gbs if inside else min(self.intra_gbs, self.inter_gbs)) * 1e9


def phase_seconds(
    volume_bytes: float, factor: float, gpus: int, calls: int, cluster: Cluster, group: int | None = None
) -> float:
    """One collective phase: ``factor (n-1)/n`` of ``volume_bytes`` on the ring's bandwidth,
    plus ``factor`` passes round the ring per call."""
    n = group or gpus
    if n <= 1:
        return 0.0
    send = factor * (n - 1) / n * volume_bytes
    return send / cluster.bandwidth(gpus, group) + calls * factor * cluster.ring_latency(n)


@dataclass
class Setting:
    stage: int
    grad_accum: int
    elem_bytes: int = 2  # bf16 parameters and gradients
    bucket: float = 5e7  # reduce / all-gather / prefetch bucket, elements
    overlap: float = 0.5  # share of the compute window that hides the collective (overlap_comm)
    multi_rank_allreduce: bool = True  # ZeRO-1/2 gradient all-reduce vs one reduce per owner
    regather: bool = False  # ZeRO-3 backward gathers again (stage3_max_reuse_distance < model)
    hpz: int = 1  # ZeRO-3 hpZ: secondary partition size (8: backward gathers stay in the node)
    quantized_weights: bool = False  # ZeRO++ qwZ: int8 parameter all-gather (half of bf16)
    quantized_gradients: bool = False  # ZeRO++ qgZ: int4 gradient reduce-scatter, hierarchical

    def label(self) -> str:
        extra = [] if self.stage == 3 else ([] if self.multi_rank_allreduce else ["reduce/owner"])
        extra += ["bwd re-gather"] if self.stage == 3 and self.regather else []
        extra += [f"hpZ{self.hpz}"] if self.hpz > 1 else []
        extra += ["qwZ"] if self.quantized_weights else []
        extra += ["qgZ"] if self.quantized_gradients else []
        return f"ZeRO-{self.stage} ga{self.grad_accum} bucket {self.bucket:.0e} overlap {self.overlap:.0%}" + (
            " " + "+".join(extra) if extra else ""
        )


def exposed_comm_seconds(counts: ParamCounts, s: Setting, gpus: int, t_micro: float, cluster: Cluster) -> float:
    """Communication time left after overlap, per optimizer step, for ``s`` on ``gpus``."""
    if gpus <= 1:
        return 0.0
    t_fwd, t_bwd, b, g = t_micro / 3, 2 * t_micro / 3, s.elem_bytes, s.grad_accum
    calls = lambda elems: max(1, math.ceil(elems / s.bucket))  # noqa: E731
    grads = counts.trainable * b
    gather_all = phase_seconds(counts.trainable * b, 1.0, gpus, calls(counts.trainable), cluster)
    if s.stage in (1, 2):
        # one all-reduce per bucket, or one reduce per owning rank (a bucket spans many owners)
        factor, n_calls = (
            (2.0, calls(counts.trainable)) if s.multi_rank_allreduce else (1.0, calls(counts.trainable) + gpus - 1)
        )
        reduce = phase_seconds(grads, factor, gpus, n_calls, cluster)
        if s.stage == 1:  # once, in the last backward (overlap_comm) or after it
            return max(0.0, reduce - s.overlap * t_bwd) + gather_all
        return g * max(0.0, reduce - s.overlap * t_bwd) + gather_all
    sharded = counts.total - counts.persistent
    wbytes = 1 if s.quantized_weights else b
    fwd_gather = phase_seconds(sharded * wbytes, 1.0, gpus, calls(sharded), cluster)
    gbytes = 0.5 if s.quantized_gradients else b  # qgZ: int4 across nodes after an intra-node step
    reduce = phase_seconds(counts.trainable * gbytes, 1.0, gpus, calls(counts.trainable), cluster)
    if s.quantized_gradients:
        reduce += phase_seconds(grads, 1.0, gpus, calls(counts.trainable), cluster, group=cluster.gpus_per_node)
    if s.regather:  # hpZ keeps a secondary shard per node: the backward gathers stay inside it
        reduce += phase_seconds(
            sharded * wbytes, 1.0, gpus, calls(sharded), cluster, group=min(s.hpz, gpus) if s.hpz > 1 else None
        )
    persist = phase_seconds(counts.persistent * b, 1.0, gpus, 1, cluster)
    return g * (max(0.0, fwd_gather - s.overlap * t_fwd) + max(0.0, reduce - s.overlap * t_bwd)) + persist


def efficiency(counts: ParamCounts, s: Setting, gpus: int, t_micro: float, cluster: Cluster) -> dict:
    compute = s.grad_accum * t_micro
    comm = exposed_comm_seconds(counts, s, gpus, t_micro, cluster)
    return {
        "compute_ms": compute * 1e3,
        "exposed_comm_ms": comm * 1e3,
        "step_ms": (compute + comm) * 1e3,
        "efficiency": compute / (compute + comm),
    }
