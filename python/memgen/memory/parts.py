"""MemGen's own small tensors as the engine runs them: the two projections
between reasoner and weaver space, the folded query latents, the trigger head.

Built once from a `memgen.checkpoint.MemGenCheckpoint`, on the engine's device
and dtype. The query latents `LayerNorm(Q) * scale` do not depend on the input,
so they are folded here once instead of at every weaver call. The trigger head is
applied by the backend's fused trigger scoring (memory.controller).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PROMPT, INFERENCE = "prompt", "inference"


@dataclass
class MemGenParts:
    r2w_weight: torch.Tensor      # [Hw, Hr]
    r2w_bias: torch.Tensor        # [Hw]
    w2r_weight: torch.Tensor      # [Hr, Hw]
    w2r_bias: torch.Tensor        # [Hr]
    queries: dict[str, torch.Tensor]   # kind -> [K, Hw], LayerNorm(Q) * scale
    head_weight: torch.Tensor     # [2, Ht]; class 1 = insert
    head_bias: torch.Tensor       # [2]
    trigger_active: bool
    max_inference_aug_num: int
    # an inactive trigger is the constant head weight 0, bias [0, 1] (the reference's
    # constant logits), scored like an active one on this one-wide zero input
    head_input: torch.Tensor | None = None

    @classmethod
    def from_checkpoint(cls, ckpt, dtype: torch.dtype, device) -> "MemGenParts":
        def put(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        active = bool(ckpt.settings.trigger_active)
        if active:
            head_weight, head_bias, head_input = ckpt.trigger_head["weight"], ckpt.trigger_head["bias"], None
        else:
            head_weight, head_bias = torch.zeros(2, 1), torch.tensor([0.0, 1.0])
            head_input = put(torch.zeros(1))
        return cls(
            r2w_weight=put(ckpt.reasoner_to_weaver["weight"]), r2w_bias=put(ckpt.reasoner_to_weaver["bias"]),
            w2r_weight=put(ckpt.weaver_to_reasoner["weight"]), w2r_bias=put(ckpt.weaver_to_reasoner["bias"]),
            queries={kind: put(ckpt.folded_query_latents(kind)) for kind in (PROMPT, INFERENCE)},
            head_weight=put(head_weight), head_bias=put(head_bias), trigger_active=active,
            max_inference_aug_num=int(ckpt.settings.max_inference_aug_num), head_input=head_input,
        )

    def num_latents(self, kind: str) -> int:
        return self.queries[kind].shape[0]

    def to_weaver(self, x: torch.Tensor) -> torch.Tensor:
        """Reasoner-space input embeddings -> the weaver's input space."""
        return F.linear(x, self.r2w_weight, self.r2w_bias)

    def to_reasoner(self, h: torch.Tensor) -> torch.Tensor:
        """The weaver's post-norm states at the query positions -> latents."""
        return F.linear(h, self.w2r_weight, self.w2r_bias)
