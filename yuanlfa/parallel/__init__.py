"""How the model is spread over devices: the mesh, :func:`parallelize` (the one entry point from
the single-device model to this rank's piece), and one folder per dimension: ``tp/`` (layers,
the plan, communication), ``pp/`` (stages, runner, tied embedding), ``dp/`` (gradient buckets,
ZeRO-1). Gradients are finished through :mod:`yuanlfa.parallel.grad_sync`."""

from yuanlfa.parallel.mesh import Mesh, build_mesh
from yuanlfa.parallel.parallelize import parallelize
from yuanlfa.parallel.tp.plan import apply_tensor_parallel, shard_full_tensor

__all__ = ["Mesh", "apply_tensor_parallel", "build_mesh", "parallelize", "shard_full_tensor"]
