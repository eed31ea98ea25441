"""torch.distributed.checkpoint planners that write and read explicit blocks of global tensors.

Saving: each rank emits one write item per block it owns; DCP's coordinator merges them into the
checkpoint's metadata (global shape and chunk list per tensor) and checks they tile each tensor.
Loading: each rank asks for the blocks its layout needs; DCP's resharding computes the overlaps
with the saved chunks, whatever layout wrote them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from yuanlfa.checkpoint.blocks import Block, LazyTensor
from yuanlfa.checkpoint.errors import CheckpointError
from yuanlfa.checkpoint.prefetch import Prefetcher


def _index(block: Block) -> tuple[str, tuple[int, ...]]:
    return block.key, tuple(block.offsets)


class BlockSavePlanner(DefaultSavePlanner):
    def __init__(self, blocks: list[Block]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.blocks = {_index(b): b for b in blocks}

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict = state_dict
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for b in self.blocks.values():
            offsets = torch.Size(b.offsets)
            items.append(
                WriteItem(
                    index=MetadataIndex(b.key, offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=offsets, sizes=b.tensor.size()),
                        properties=TensorProperties.create_from_tensor(b.tensor),
                        size=torch.Size(b.global_shape),
                    ),
                )
            )
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        block = self.blocks[(write_item.index.fqn, tuple(write_item.index.offset))]
        return block.tensor.detach().contiguous()


class BlockLoadPlanner(DefaultLoadPlanner):
    """Several destinations may read the same saved region (e.g. a parameter and the
    distributed optimizer's fp32 master slice both from ``model.<name>``): each read item's
    destination is its block's position in the list, not the tensor name."""

    def __init__(self, blocks: list[Block]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.block_list = list(blocks)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        saved = self.metadata.state_dict_metadata
        for i, b in enumerate(self.block_list):
            chunk = ChunkStorageMetadata(torch.Size(b.offsets), b.tensor.size())
            for item in create_read_items_for_chunk_list(b.key, saved[b.key], [chunk]):
                dest = MetadataIndex(f"block{i}", item.dest_index.offset)
                items.append(dataclasses.replace(item, dest_index=dest))
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        block = self.block_list[int(read_item.dest_index.fqn.removeprefix("block"))]
        view = block.tensor
        for dim, (start, length) in enumerate(
            zip(read_item.dest_offsets, read_item.lengths, strict=True)
        ):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, read_item: ReadItem, value) -> None:
        # DCP's default unpickles byte items with weights_only=False; our checkpoints hold only
        # tensors, so a byte item is refused rather than run.
        raise ValueError(f"{read_item.dest_index.fqn}: checkpoint holds a non-tensor item")


class LazySavePlanner(DefaultSavePlanner):
    """Saves whole tensors that are read from elsewhere one at a time through DCP's own writer:
    the reference that :func:`yuanlfa.checkpoint.dcp_write.write_dcp` (what the conversions
    use) is tested against."""

    def __init__(self, tensors: list[LazyTensor]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.tensors = {t.key: t for t in tensors}
        # The next tensor is read while this one is written (when both fit in the largest).
        self.prefetch = Prefetcher(
            list(self.tensors),
            lambda key: self.tensors[key].load(),
            lambda key: math.prod(self.tensors[key].shape) * self.tensors[key].dtype.itemsize,
        )

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict = state_dict
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for t in self.tensors.values():
            offsets = torch.Size([0] * len(t.shape))
            items.append(
                WriteItem(
                    index=MetadataIndex(t.key, offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(t.shape)),
                        properties=TensorProperties(dtype=t.dtype),
                        size=torch.Size(t.shape),
                    ),
                )
            )
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        lazy = self.tensors[write_item.index.fqn]
        tensor = self.prefetch.get(lazy.key)
        # The metadata was planned from the declared shape: a converter that produced anything
        # else would store bytes that read back as another tensor.
        if tuple(tensor.shape) != tuple(lazy.shape) or tensor.dtype != lazy.dtype:
            raise CheckpointError(
                f"{write_item.index.fqn}: the source gives {tuple(tensor.shape)} {tensor.dtype} "
                f"where the model has {tuple(lazy.shape)} {lazy.dtype}; the source does not match "
                "its config"
            )
        return tensor.contiguous()
