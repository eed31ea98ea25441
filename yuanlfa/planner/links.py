"""Link costs: the alpha-beta model of point-to-point transfers and ring collectives.

A :class:`Link` is one direction of a connection between two devices: ``gbps`` GB/s (1e9 bytes
per second) of payload and ``latency_s`` per message (alpha: wire, switch and software, e.g. the
time a collective library needs to post, match and complete one send). A transfer of B bytes
takes alpha + B / bandwidth. Ring collectives over n ranks (NCCL's and gloo's algorithm for
large buffers) move data in n - 1 steps per phase, each step a send of 1/n of the buffer to the
next rank while receiving from the previous one, every rank at once:

- reduce-scatter or all-gather of a B-byte buffer: (n - 1) alpha + (n - 1) / n * B / bw;
- all-reduce = reduce-scatter + all-gather: 2 (n - 1) alpha + 2 (n - 1) / n * B / bw.

On a host the collective library's own work (copying each message between tensors and socket
buffers, summing what arrives) runs on the same cores as the model. ``cpu_gbps`` is that work's
throughput in bytes sent per second (None: free, as on a GPU with a DMA engine); every byte a
transfer sends pays ``B / cpu_gbps`` on top of ``B / bw`` (the work is serial with the wire:
a message is packed before it is sent and summed after it arrives). It is a property of the
host and its load, fitted on a measured step (:mod:`.calibrate`), not of the wire.

A ring is as fast as its slowest hop, so a group whose ranks span nodes runs at the inter-node
link's figures (:mod:`.topology` decides which link a group uses).
"""

from __future__ import annotations

from dataclasses import dataclass

from yuanlfa.config import ConfigError
from yuanlfa.layout.traffic import ring_reduce_scatter_bytes

GB = 1e9


@dataclass(frozen=True)
class Link:
    gbps: float  # payload GB/s in one direction
    latency_s: float = 0.0  # per message
    cpu_gbps: float | None = None  # the collective library's host-side throughput (see above)

    def __post_init__(self) -> None:
        if not self.gbps > 0:
            raise ConfigError(f"link bandwidth must be > 0 GB/s, got {self.gbps}")
        if not self.latency_s >= 0:
            raise ConfigError(f"link latency must be >= 0 s, got {self.latency_s}")
        if self.cpu_gbps is not None and not self.cpu_gbps > 0:
            raise ConfigError(f"collective CPU throughput must be > 0 GB/s, got {self.cpu_gbps}")

    def seconds(self, nbytes: float) -> float:
        """Bandwidth time of ``nbytes`` (no latency): the wire's, plus the host's work on them."""
        cpu = nbytes / (self.cpu_gbps * GB) if self.cpu_gbps is not None else 0.0
        return nbytes / (self.gbps * GB) + cpu

    def transfer_s(self, nbytes: float) -> float:
        """One point-to-point message of ``nbytes``."""
        return self.latency_s + self.seconds(nbytes)

    def scaled(self, efficiency: float = 1.0, latency_s: float | None = None) -> Link:
        """This link delivering ``efficiency`` of its rate (protocol overhead), optionally with
        another per-message latency."""
        latency = self.latency_s if latency_s is None else latency_s
        return Link(self.gbps * efficiency, latency, self.cpu_gbps)


def ring_reduce_scatter_s(nbytes: float, n: int, link: Link) -> float:
    """Reduce-scatter of an ``nbytes`` buffer (the unscattered size) over ``n`` ranks."""
    if n <= 1:
        return 0.0
    return (n - 1) * link.latency_s + link.seconds(ring_reduce_scatter_bytes(nbytes, n))


def ring_all_gather_s(nbytes: float, n: int, link: Link) -> float:
    """All-gather into an ``nbytes`` buffer (the gathered size) over ``n`` ranks."""
    return ring_reduce_scatter_s(nbytes, n, link)


def ring_all_reduce_s(nbytes: float, n: int, link: Link) -> float:
    """All-reduce of an ``nbytes`` buffer over ``n`` ranks (reduce-scatter + all-gather)."""
    return 2 * ring_reduce_scatter_s(nbytes, n, link)
