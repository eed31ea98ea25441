"""How the model is spread over devices: mesh, tensor/sequence parallelism, gradient handling."""

from yuanlfa.parallel.mesh import Mesh, build_mesh
from yuanlfa.parallel.tp.plan import apply_tensor_parallel, shard_full_tensor

__all__ = ["Mesh", "apply_tensor_parallel", "build_mesh", "shard_full_tensor"]
