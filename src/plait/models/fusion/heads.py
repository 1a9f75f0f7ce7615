"""Fine-tuning heads on a pre-trained fusion backbone: VQA, visual reasoning, visual entailment.

Each task reads the fused [CLS] state h = Fusion(Text(question), Image(image))[:, 0] (B, D):

- ``vqa``: classification over an answer vocabulary, MLP(h) -> (B, num_answers);
- ``reasoning`` (NLVR2-style: two images, one statement): h_1, h_2 of the text fused with each
  image, MLP([h_1; h_2]) -> (B, 2) (true / false);
- ``entailment`` (SNLI-VE: image premise, text hypothesis): MLP(h) -> (B, 3).

The MLP is ALBEF's classifier: Linear(in, 2D) - ReLU - Linear(2D, classes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from plait.models.fusion.layers import init_bert_

TASK_CLASSES = {"vqa": None, "reasoning": 2, "entailment": 3}
TASK_ALIASES = {"nlvr": "reasoning", "nlvr2": "reasoning", "ve": "entailment", "snli-ve": "entailment"}


class FusionClassifier(nn.Module):
    """A task head on ``backbone`` (a ``FusionModel``): ``forward(images, texts) -> logits (B, classes)``.

    ``images`` is (B, 3, S, S), or for ``reasoning`` a pair of such tensors (or one (B, 2, 3, S, S)).
    The classifier holds the backbone's image encoder, text encoder and fusion encoder (the same
    modules, not copies: deep-copy the backbone first to keep it); its momentum copies, queue and
    pre-training heads are left behind. ``num_classes`` is required for vqa (the answer count).
    """

    def __init__(self, backbone: nn.Module, task: str, num_classes: int | None = None, hidden: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        task = TASK_ALIASES.get(task.lower(), task.lower())
        if task not in TASK_CLASSES:
            raise ValueError(f"unknown fusion task {task!r}; valid: {', '.join([*TASK_CLASSES, *TASK_ALIASES])}")
        num_classes = num_classes or TASK_CLASSES[task]
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"task {task!r} needs num_classes >= 2 (the answer vocabulary's size), got {num_classes!r}")
        self.task, self.num_classes = task, num_classes
        self.tokenizer = backbone.tokenizer
        self.image_encoder, self.text_encoder, self.fusion = backbone.image_encoder, backbone.text_encoder, backbone.fusion
        width = backbone.width
        in_dim = 2 * width if task == "reasoning" else width
        hidden = hidden or 2 * width
        self.head = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        init_bert_(self.head)

    def forward(self, images, texts: list[str]) -> Tensor:
        device = self.head[0].weight.device
        ids, mask = self.tokenizer(texts, device)
        text = self.text_encoder(ids, mask)
        if self.task != "reasoning":
            return self.head(self.fusion(text, mask, self.image_encoder(images))[:, 0])
        if torch.is_tensor(images):
            if images.dim() != 5 or images.shape[1] != 2:
                raise ValueError(f"reasoning takes two images per statement: a pair of (B, 3, S, S) or (B, 2, 3, S, S), "
                                 f"got {tuple(images.shape)}")
            first, second = images[:, 0], images[:, 1]
        else:
            first, second = images
        batch = len(texts)
        tokens = self.image_encoder(torch.cat([first, second]))  # both images in one pass
        fused = self.fusion(torch.cat([text, text]), torch.cat([mask, mask]), tokens)[:, 0]
        return self.head(torch.cat([fused[:batch], fused[batch:]], dim=1))
