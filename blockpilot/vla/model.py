"""Vision-language(-action) model: the decoder LM plus an optional Qwen2.5-VL vision tower.

The module tree (``lm.*``, ``visual.*``) is what :mod:`blockpilot.vla.checkpoint` maps Qwen2.5-VL
checkpoints onto. A forward mirrors :class:`DecoderLM`'s (cache, start, mode, block_size,
write_kv); images enter only through the token embeddings and the 3-D RoPE positions.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .lm import DecoderLM
from .modes import AttentionMode
from .rope_index import mrope_positions
from .vision import VisionTower


def rope_continuation(start: int, length: int, deltas: torch.Tensor) -> torch.Tensor:
    """Positions ``(3, B, length)`` of slots ``start ..`` on the deltas' device: the torch form of
    :func:`blockpilot.vla.rope_index.continuation_positions`, so a step on an accelerator copies nothing."""
    slots = torch.arange(start, start + length, device=deltas.device)
    return (slots[None, :] + deltas.reshape(-1, 1))[None].expand(3, -1, -1)


class VLAModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.lm = DecoderLM(config.lm)
        self.visual = VisionTower(config.vision) if config.vision is not None else None

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        return self.lm.new_cache(capacity, batch)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision features ``(num_image_tokens, hidden)`` for all images, in prompt order."""
        if self.visual is None:
            raise ValueError("this model has no vision tower (text-only config); it cannot take images")
        return self.visual(pixel_values, grid_thw)

    def _image_token_id(self) -> int:
        image_id = self.config.tokens.image
        if image_id is None:
            raise ValueError("config.tokens.image is not set; the model cannot place image features")
        return image_id

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``(B, T, hidden)`` with ``image_features`` written over the image tokens.

        Features fill image-token positions in reading order (row by row across the batch).
        """
        x = self.lm.embed_tokens(input_ids)
        if image_features is None:
            return x
        slots = input_ids == self._image_token_id()
        n_tokens = int(slots.sum())
        if n_tokens != image_features.shape[0]:
            raise ValueError(f"the prompt holds {n_tokens} image token(s) but the images give "
                             f"{image_features.shape[0]} feature(s)")
        return x.masked_scatter(slots[..., None], image_features.to(x.dtype))

    def rope_index(self, input_ids: torch.Tensor,
                   grid_thw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """3-D positions ``(3, B, T)`` and rope deltas ``(B,)`` on ``input_ids``' device; see
        :func:`~blockpilot.vla.rope_index.mrope_positions` (numpy, the one implementation)."""
        if self.config.lm.mrope_section is None:
            raise ValueError("rope_index needs a multimodal-RoPE LM (lm.mrope_section is not set)")
        merge = self.config.vision.spatial_merge_size if self.config.vision is not None else 1
        grids = None if grid_thw is None else grid_thw.cpu().numpy()
        positions, deltas = mrope_positions(input_ids.cpu().numpy(), grids, self._image_token_id(), merge)
        return torch.from_numpy(positions).to(input_ids.device), torch.from_numpy(deltas).to(input_ids.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        mode: AttentionMode = AttentionMode.CAUSAL,
        block_size: int | None = None,
        write_kv: bool = True,
        kv_end: int | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states ``(B, T, hidden)``; see :meth:`logits`.

        With ``pixel_values`` (and ``grid_thw``) the images are encoded and scattered into the
        image tokens of ``input_ids``; unless ``position_ids`` is given, the 3-D positions are
        computed for a prompt that starts at slot 0. Tokens after a prompt with images need
        explicit positions (:func:`rope_continuation`). ``attn_mask``
        overrides the mode's mask (see :meth:`DecoderLM.forward`).
        """
        if pixel_values is not None:
            if input_ids is None or grid_thw is None:
                raise ValueError("pixel_values need input_ids (with image tokens) and grid_thw")
            if position_ids is None:
                if start != 0:
                    raise ValueError(f"a prompt with images at start={start} needs explicit position_ids")
                position_ids, _ = self.rope_index(input_ids, grid_thw)
            inputs_embeds = self.embed(input_ids, self.encode_images(pixel_values, grid_thw))
            input_ids = None
        return self.lm(input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, cache=cache,
                       start=start, mode=mode, block_size=block_size, write_kv=write_kv, kv_end=kv_end,
                       attn_mask=attn_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.logits(hidden)
