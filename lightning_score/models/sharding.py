"""A CLIP model ready for FSDP: FSDP2 shards it per residual block, FSDP1 wraps it per residual block.

* FSDP2 (``ModelParallelStrategy``): :class:`ShardedBlocks` gives a LightningModule the ``configure_model`` that
  Lightning requires under that strategy: ``fully_shard`` on every residual block of the image encoder, then on the
  image encoder, then on the whole module (the frozen text tower and the rest; the scalar ``logit_scale``, which
  FSDP cannot shard, is kept whole on every rank), over the mesh's data-parallel dimension. Under any other
  strategy it does nothing, so a recipe switches strategy in YAML alone.
* FSDP1 (``FSDPStrategy``, ``strategy: fsdp`` in YAML): the same ``configure_model`` sets the strategy's auto-wrap
  policy to those blocks (the backbone's, :meth:`Backbone.block_types`; open_clip's :data:`CLIP_BLOCKS`) unless one
  is given, and leaves the scalar ``logit_scale`` unsharded (:func:`fsdp1_options`); :data:`CLIP_BLOCKS` also
  serves as ``activation_checkpointing_policy``.

The state-dict keys stay the unwrapped module's, so task vectors of sharded and unsharded fits merge together.
"""

from __future__ import annotations

from open_clip.transformer import ResidualAttentionBlock
from torch import nn

__all__ = ["CLIP_BLOCKS", "ShardedBlocks", "fsdp1_options"]

CLIP_BLOCKS: set[type[nn.Module]] = {ResidualAttentionBlock}
"""The modules FSDP shards one by one in a CLIP model: open_clip's residual attention blocks."""


def fsdp1_options(strategy: object, module: nn.Module) -> None:
    """Under ``FSDPStrategy`` (FSDP1), before it wraps ``module``: what a CLIP model needs of it.

    The auto-wrap policy is the residual blocks of the module's backbone unless one is given, and the
    0-dimensional parameters (CLIP's ``logit_scale``, which FSDP1 cannot shard: "FSDP doesn't support scalar
    parameters") are added to its ``ignored_states``: every rank keeps them whole. Under any other strategy it does
    nothing.
    """
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if not isinstance(strategy, FSDPStrategy):
        return
    strategy.kwargs.setdefault("auto_wrap_policy", ModuleWrapPolicy(set(_block_types(module))))
    ignored = list(strategy.kwargs.get("ignored_states") or [])
    scalars = [param for param in module.parameters() if param.dim() == 0 and not any(param is p for p in ignored)]
    if scalars:
        strategy.kwargs["ignored_states"] = ignored + scalars


def _block_types(module: object) -> tuple[type[nn.Module], ...]:
    """The residual blocks of ``module``'s backbone (its ``backbone.block_types()``), else :data:`CLIP_BLOCKS`."""
    backbone = getattr(module, "backbone", None)
    return tuple(backbone.block_types()) if backbone is not None else tuple(CLIP_BLOCKS)


class ShardedBlocks:
    """Mixin of a LightningModule with an ``image_encoder``: FSDP2's ``fully_shard`` per residual block.

    Example (what ``CLIPExpert`` and ``MergeModule`` do under ``Trainer(strategy=ModelParallelStrategy())``)::

        trainer = Trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
        trainer.fit(CLIPExpert("ViT-H-14"), datamodule)  # configure_model shards every block
    """

    def configure_model(self) -> None:
        """FSDP2: shard each residual block, the image encoder, then the module (once); FSDP1: :func:`fsdp1_options`."""
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            fsdp1_options(trainer.strategy, self)  # type: ignore[arg-type]
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy only
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self, FSDPModule):  # fit, then test: sharded once
            return
        if "data_parallel" in (mesh.mesh_dim_names or ()):
            mesh = mesh["data_parallel"]
        encoder: nn.Module = self.image_encoder  # type: ignore[attr-defined]
        for block in encoder.modules():
            if isinstance(block, _block_types(self)):
                fully_shard(block, mesh=mesh)
        fully_shard(encoder, mesh=mesh)
        scalars = {param for param in self.parameters() if param.dim() == 0}  # type: ignore[attr-defined]
        fully_shard(self, mesh=mesh, ignored_params=scalars)  # type: ignore[arg-type]  # kept whole (logit_scale)
