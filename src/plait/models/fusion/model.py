"""ALBEF-style fusion model (Li et al., "Align before Fuse", NeurIPS 2021) with its pre-training
losses computed inside: ITC (momentum encoders, queue, momentum distillation), ITM (hard
negatives drawn from ITC's similarities) and MLM (tied decoder). docs/fusion.md has the data flow.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plait import distributed
from plait.models.contract import Batch, ContrastiveModel, StepOutput, apply_objective
from plait.models.fusion.encoders import (
    MINILM,
    FusionEncoder,
    ImageTokenEncoder,
    TextEncoder,
    check_minilm_shape,
    init_from_minilm,
)
from plait.models.fusion.layers import MLMHead, init_bert_
from plait.models.fusion.objectives import mask_tokens
from plait.models.fusion.pretraining import (
    PretrainStates,
    check_pretrain_batch,
    fuse_with_hard_negatives,
    itc_term,
    itm_term,
    mlm_term,
)
from plait.models.fusion.queue import FeatureQueue
from plait.models.momentum import update_momentum
from plait.models.text import WordPieceTokenizer
from plait.models.two_tower import MAX_LOGIT_SCALE, select_features
from plait.types import PairFeatures

LOSS_TERMS = ("itc", "itm", "mlm")
INITS = ("random", "minilm")


class FusionModel(ContrastiveModel):
    """Image encoder (ViT tokens), text encoder (BERT's first layers), fusion encoder (BERT's later
    layers with cross-attention to the image tokens), and ALBEF's three pre-training losses.

    Features: z_image = normalize(W_v v_cls), z_text = normalize(W_t t_cls), (B, embed_dim);
    scale = exp(logit_scale) clamped at 100 (temperature >= 0.01). Momentum copies (EMA,
    ``momentum``) of the image encoder, text encoder and both projections (with ``mlm_distill``
    also of the fusion encoder and MLM head) live in ``momentum_models``, out of the optimizer
    (requires_grad False). ``queue`` holds ``queue_size`` momentum features with their dataset
    indices. ``steps`` counts training calls of ``pretrain_step``: it drives alpha's warm-up and,
    without a generator passed in, seeds the step's random draws, so a resumed run draws the same.

    ``init="minilm"``: embeddings, text layers and the fusion layers' self-attention and MLP from
    all-MiniLM-L6-v2 (its first ``text_layers`` layers, then the next ``fusion_layers``); needs
    width 384, heads 12, text_layers + fusion_layers <= 6. ``init="random"``: BERT's init, any width.
    """

    def __init__(self, image_size: int = 32, patch: int = 8, vision_width: int = 64, vision_layers: int = 2,
                 vision_heads: int = 4, width: int = 64, heads: int = 4, text_layers: int = 2, fusion_layers: int = 2,
                 intermediate: int | None = None, max_length: int = 32, embed_dim: int = 64, init: str = "random",
                 queue_size: int = 1024, momentum: float = 0.995, alpha: float = 0.4, alpha_warmup_steps: int = 0,
                 init_temperature: float = 0.07, learn_temperature: bool = True, mlm_probability: float = 0.15,
                 mlm_distill: bool = True, itc_weight: float = 1.0, itm_weight: float = 1.0, mlm_weight: float = 1.0,
                 dropout: float = 0.0, independent: bool = False, seed: int = 0):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not (isinstance(alpha_warmup_steps, int) and alpha_warmup_steps >= 0):
            raise ValueError(f"alpha_warmup_steps must be a non-negative integer, got {alpha_warmup_steps!r}")
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be positive, got {init_temperature}")
        if text_layers < 1 or fusion_layers < 1:
            raise ValueError(f"text_layers and fusion_layers must be >= 1, got {text_layers}, {fusion_layers}")
        intermediate = intermediate or 4 * width
        if init == "minilm":
            check_minilm_shape(width, heads, intermediate, text_layers + fusion_layers, max_length)
        self.tokenizer = WordPieceTokenizer(max_length)
        self.vocab_size = self.tokenizer.vocab_size
        self.image_encoder = ImageTokenEncoder(image_size, patch, vision_width, vision_layers, vision_heads, dropout)
        self.text_encoder = TextEncoder(self.vocab_size, width, text_layers, heads, intermediate, max_length, dropout)
        self.fusion = FusionEncoder(width, vision_width, fusion_layers, heads, intermediate, dropout)
        if init == "minilm":
            init_from_minilm(self.text_encoder, self.fusion)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.vision_ind = nn.Linear(vision_width, embed_dim) if independent else None
        self.text_ind = nn.Linear(width, embed_dim) if independent else None
        self.itm_head = nn.Linear(width, 2)
        self.mlm_head = MLMHead(width, self.vocab_size)
        init_bert_(nn.ModuleList([m for m in (self.vision_proj, self.text_proj, self.vision_ind, self.text_ind,
                                              self.itm_head, self.mlm_head) if m is not None]))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learn_temperature)
        self.momentum_names = ["image_encoder", "vision_proj", "text_encoder", "text_proj"]
        self.momentum_names += ["vision_ind", "text_ind"] if independent else []
        self.momentum_names += ["fusion", "mlm_head"] if mlm_distill else []
        self.momentum_models = nn.ModuleDict({name: copy.deepcopy(getattr(self, name)) for name in self.momentum_names})
        self.momentum_models.requires_grad_(False)
        self.queue = FeatureQueue(queue_size, embed_dim)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.momentum, self.alpha, self.alpha_warmup_steps = float(momentum), float(alpha), alpha_warmup_steps
        self.mlm_probability, self.mlm_distill = float(mlm_probability), bool(mlm_distill)
        self.weights = {"itc": float(itc_weight), "itm": float(itm_weight), "mlm": float(mlm_weight)}
        self.embed_dim, self.width, self.independent, self.seed = embed_dim, width, independent, int(seed)
        self.image_size = image_size

    @classmethod
    def preset(cls, name: str, **overrides) -> FusionModel:
        """A model of a named size (``plait.models.fusion.presets.PRESETS``: tiny, small, minilm, base) with
        options overridden."""
        from plait.models.fusion.presets import preset_options  # presets.py builds on this module

        return cls(**preset_options(name, **overrides))

    @classmethod
    def from_config(cls, config: dict, inputs, *, independent: bool = False, allow_import: bool = False,
                    device=None, seed: int = 0) -> FusionModel:
        """``model.kind: fusion`` (``plait.models.fusion.presets.fusion_from_config``)."""
        from plait.models.fusion.presets import fusion_from_config  # presets.py builds on this module

        return fusion_from_config(config, inputs, independent=independent, device=device, seed=seed)

    # ------------------------------------------------------------------------------ modes, state
    def train(self, mode: bool = True):
        super().train(mode)
        self.momentum_models.eval()  # momentum targets never see dropout
        return self

    def scale(self) -> Tensor:
        """exp of the learnable log-scale, clamped at 100: 1 / temperature."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def alpha_at(self, step: int) -> float:
        """The distillation weight at ``step``: alpha * min(1, step / alpha_warmup_steps) (ALBEF ramps
        it over the first epoch); alpha itself without warm-up."""
        if self.alpha_warmup_steps == 0:
            return self.alpha
        return self.alpha * min(1.0, step / self.alpha_warmup_steps)

    def step_generator(self, step: int | None = None) -> torch.Generator:
        """The CPU generator of a step's draws (masking, hard negatives), seeded by (seed, step)."""
        step = int(self.steps) if step is None else step
        return torch.Generator().manual_seed((self.seed << 32) + step)

    def momentum_update(self) -> None:
        """theta_m <- m theta_m + (1 - m) theta for every momentum copy, buffers copied (``update_momentum``);
        call after the optimizer step."""
        for name in self.momentum_names:
            update_momentum(self.momentum_models[name], getattr(self, name), self.momentum)

    # ------------------------------------------------------------------------------ encoders
    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(ids (B, T), mask (B, T) bool) on the CPU, padded to the batch's longest caption."""
        return self.tokenizer(texts, "cpu")

    def _device(self) -> torch.device:
        return self.logit_scale.device

    def image_tokens(self, images: Tensor) -> Tensor:
        """The image encoder's tokens (B, 1 + P, vision_width); token 0 is the class token."""
        return self.image_encoder(images)

    def text_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """The text encoder's states (B, T, width) and the attention mask (B, T) bool; token 0 is [CLS]."""
        ids, mask = self.tokenize(texts)
        ids, mask = ids.to(self._device()), mask.to(self._device())
        return self.text_encoder(ids, mask), mask

    def embed_image(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(z_image (B, E), independent z^i_image or None) from the class token."""
        cls = self.image_encoder(images)[:, 0]
        ind = F.normalize(self.vision_ind(cls), dim=-1) if self.independent else None
        return F.normalize(self.vision_proj(cls), dim=-1), ind

    def embed_text(self, texts: list[str]) -> tuple[Tensor, Tensor | None]:
        cls = self.text_tokens(texts)[0][:, 0]
        ind = F.normalize(self.text_ind(cls), dim=-1) if self.independent else None
        return F.normalize(self.text_proj(cls), dim=-1), ind

    def encode_image(self, images: Tensor, features: str = "shared") -> Tensor:
        """Normalised (B, embed_dim) image features for retrieval (``features``: shared,
        independent or both, the last two with ``independent=True``)."""
        return select_features(*self.embed_image(images), features)

    def encode_text(self, texts: list[str], features: str = "shared") -> Tensor:
        return select_features(*self.embed_text(texts), features)

    encode_a, encode_b = encode_image, encode_text  # the two-tower names the evaluation suite calls

    def forward(self, images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(z_image, z_text, scale): the ITC features, as ``TwoTower.forward`` returns them."""
        return self.encode_image(images), self.encode_text(texts), self.scale()

    def fuse(self, images: Tensor, texts: list[str]) -> Tensor:
        """The fused [CLS] state (B, width) of each (image, text) pair."""
        text, mask = self.text_tokens(texts)
        return self.fusion(text, mask, self.image_encoder(images))[:, 0]

    def match_logits(self, images: Tensor, texts: list[str]) -> Tensor:
        """ITM logits (B, 2) of each pair (column 1: matched); ALBEF re-ranks retrieval with them."""
        return self.itm_head(self.fuse(images, texts))

    # ------------------------------------------------------------------------------ pre-training
    def pretrain_step(self, images: Tensor, texts: list[str], index: Tensor, *, itc_loss: nn.Module | None = None,
                      generator: torch.Generator | None = None, alpha: float | None = None,
                      return_features: bool = False):
        """One batch of ALBEF pre-training: {"loss", "itc", "itm", "mlm", stats...} (scalars).

        images (B, 3, S, S); texts B strings; index (B,) dataset indices (>= 0, for the queue's
        positives, the plugged losses' state and the same-item exclusion of hard negatives).

        - ``loss`` = itc_weight * itc + itm_weight * itm + mlm_weight * mlm; the trainer backprops it.
        - ``itc``: ``itc_loss=None`` is ``momentum_itc_loss`` over [batch; queue] (alpha from the
          warm-up unless ``alpha`` is given), and the batch's momentum features are then enqueued
          (training mode). A ``ContrastiveObjective`` is called with the ``PairFeatures`` (a=z_image,
          b=z_text, a_aug / b_aug = the momentum features); any other loss module as
          ``itc_loss(z_image, z_text, scale, index=index)`` (open_clip's convention, e.g. the gamma
          loss). A plugged loss sees the in-batch features only; the queue is neither read nor written.
        - ``itm``: cross-entropy of the matching head over 3B pairs: B positives, for each image a
          negative text and for each text a negative image drawn by ``sample_hard_negatives`` from
          the softmax of the ITC logits s z_image m_text^T (resp. s z_text m_image^T), excluding
          the positive and every item with the same caption or index (a row without any is dropped).
        - ``mlm``: cross-entropy at the masked positions (``mask_tokens``) of the text fused with its
          image; with ``mlm_distill``: (1 - alpha) CE + alpha soft CE against the momentum model.

        ``generator``: the CPU generator of masking and negatives; None derives one from (seed,
        steps). ``return_features=True`` returns (terms, PairFeatures). In training mode ``steps``
        advances by one; call ``momentum_update()`` after the optimizer step.

        The parts (``plait.models.fusion.pretraining``), in the order of the random draws and of the
        autograd graph: ``_encode_pairs``, ``itc_term``, ``fuse_with_hard_negatives``, ``itm_term``, ``mlm_term``.
        """
        index = check_pretrain_batch(images, texts, index, self._device())
        step = int(self.steps)
        generator = self.step_generator(step) if generator is None else generator
        alpha = self.alpha_at(step) if alpha is None else float(alpha)
        states = self._encode_pairs(images, texts, index, generator)
        # Under torchrun ITC runs over the global batch: every rank's features (and momentum features,
        # and indices) gathered, so the queue receives the same rows on every rank; ITM and MLM stay
        # on this rank's rows, with hard negatives from this rank's block of the ITC logits.
        features = distributed.gather_features(states.features)
        itc, logits_i2t, logits_t2i, stats = itc_term(features, itc_loss, alpha, self.queue, enqueue=self.training,
                                                      independent=self.independent)
        fused, text_ok, image_ok = fuse_with_hard_negatives(self.fusion, states, texts, index, logits_i2t, logits_t2i,
                                                            generator)
        itm, itm_stats = itm_term(self.itm_head, fused[: 3 * images.shape[0], 0], text_ok, image_ok)
        teacher = self.momentum_models if self.mlm_distill else None
        mlm, mlm_stats = mlm_term(self.mlm_head, self.text_encoder.embeddings.word.weight, fused, states, alpha, teacher)

        loss = self.weights["itc"] * itc + self.weights["itm"] * itm + self.weights["mlm"] * mlm
        with torch.no_grad():
            stats.update(alpha=torch.tensor(alpha, device=self._device()), temperature=1.0 / states.scale.detach().float(),
                         **itm_stats, **mlm_stats, queue_filled=(self.queue.index >= 0).sum().float())
        if self.training:
            self.steps += 1
        terms = {"loss": loss, "itc": itc, "itm": itm, "mlm": mlm, **stats}
        return (terms, features) if return_features else terms

    def _encode_pairs(self, images: Tensor, texts: list[str], index: Tensor, generator: torch.Generator) -> PretrainStates:
        """The encoding that ITC, ITM and MLM share: the captions tokenized (B, T) and masked for MLM
        (``mask_tokens`` with ``generator``), captions and masked captions through the text encoder in
        one call of 2B, the images through the image encoder, the ITC features
        z_image = normalize(W_v v_cls), z_text = normalize(W_t t_cls) (B, embed_dim), and the same
        through the momentum copies without gradient (with ``independent``, the independent heads' too)."""
        batch, device = images.shape[0], self._device()
        ids, mask = self.tokenize(texts)
        masked_ids, labels = mask_tokens(ids, mask, generator, vocab_size=self.vocab_size, probability=self.mlm_probability)
        both_ids, both_mask = torch.cat([ids, masked_ids]).to(device), torch.cat([mask, mask]).to(device)
        mask = mask.to(device)
        image = self.image_encoder(images)  # (B, 1 + P, D_v)
        text_both = self.text_encoder(both_ids, both_mask)  # (2B, T, D): clean, then masked
        text, text_masked = text_both[:batch], text_both[batch:]
        z_image = F.normalize(self.vision_proj(image[:, 0]), dim=-1)
        z_text = F.normalize(self.text_proj(text[:, 0]), dim=-1)
        scale = self.scale()

        slow = self.momentum_models
        with torch.no_grad():
            image_m = slow["image_encoder"](images)
            text_m_both = slow["text_encoder"](both_ids if self.mlm_distill else both_ids[:batch],
                                               both_mask if self.mlm_distill else both_mask[:batch])
            m_image = F.normalize(slow["vision_proj"](image_m[:, 0]), dim=-1)
            m_text = F.normalize(slow["text_proj"](text_m_both[:batch, 0]), dim=-1)
        features = PairFeatures(z_image.float(), z_text.float(), index, scale.float(), m_image.float(), m_text.float())
        if self.independent:
            with torch.no_grad():
                features.a_ind_aug = F.normalize(slow["vision_ind"](image_m[:, 0]), dim=-1).float()
                features.b_ind_aug = F.normalize(slow["text_ind"](text_m_both[:batch, 0]), dim=-1).float()
            features.a_ind = F.normalize(self.vision_ind(image[:, 0]), dim=-1).float()
            features.b_ind = F.normalize(self.text_ind(text[:, 0]), dim=-1).float()
        return PretrainStates(image, text, text_masked, mask, labels, image_m, text_m_both, scale, features)

    # ------------------------------------------------------------------------------ the model contract
    provides_augmented = True  # the momentum features are the regularisers' augmented views: no second view needed
    own_contrastive_term = True  # its momentum ITC (loss.name: momentum_itc)
    min_rows_per_process = 2  # ITM draws each row's negatives from the other rows of its process
    supports_grad_cache = False  # ITM and MLM are not functions of the contrastive features alone
    accepts_bank_features = False  # it keeps momentum encoders of its own (model.fusion.momentum)
    def contrastive_features(self, batch: Batch):
        """The ITC features of a batch without the momentum copies (a, b, index, scale)."""
        return PairFeatures(self.encode_image(batch.a).float(), self.encode_text(list(batch.b)).float(), batch.index,
                            self.scale().float())

    def training_step(self, batch: Batch, objective: nn.Module) -> StepOutput:
        """One pre-training batch under the trainer (``plait.models.contract``).

        ``objective`` is the run's ``ContrastiveObjective``. Without a base loss (config
        ``loss.name: momentum_itc``) ITC is the model's own (momentum distillation over batch and
        queue) and the objective's regularisers are added on the ITC features (the momentum
        features as the augmented ones), weighted by ``itc_weight``; with a base loss (gamma,
        infonce, sogclr) the objective, regularisers included, replaces ITC over the in-batch
        features and the queue is not used."""
        own_itc = getattr(objective, "base", None) is None
        terms, features = self.pretrain_step(batch.a, list(batch.b), batch.index, itc_loss=None if own_itc else objective,
                                             return_features=True)
        loss = terms.pop("loss")
        if own_itc and len(getattr(objective, "regularizers", ())):
            structure = apply_objective(objective, features)
            loss = loss + self.weights["itc"] * structure
            terms.update({f"itc/{k}": v for k, v in objective.stats.items() if torch.is_tensor(v)})
        return StepOutput(loss, {k: v.detach() for k, v in terms.items()}, features)

    def after_optimizer_step(self) -> None:
        """The momentum (EMA) update of the momentum copies, after each optimizer step taken."""
        self.momentum_update()


__all__ = ["FusionModel", "LOSS_TERMS", "MINILM"]
