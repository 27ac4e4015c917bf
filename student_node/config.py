"""Typed, validated configuration of the student side (STYLE.md 5)."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cdfkd.student_node.models.aggregator import AttentionConfig
from cdfkd.teacher_node.datasets import Normalization


class Method(enum.StrEnum):
    """Distillation methods sharing one loop (METHOD.md 2)."""

    CDFKD_MFS = "cdfkd_mfs"
    CDFKD = "cdfkd"
    DFAD = "dfad"
    KD_REAL = "kd_real"


class StudentKind(enum.StrEnum):
    """Student families (METHOD.md 1)."""

    MFS = "mfs"
    SIMPLE_MULTI_HEADER = "simple_multi_header"
    SINGLE_HEAD = "single_head"


_FROZEN = ConfigDict(extra="forbid", frozen=True)


class StudentConfig(BaseModel):
    """The student's architecture.

    ``kind`` None picks the method's own student: MFS for cdfkd_mfs and kd_real, the simple
    multi-header student for cdfkd, a single head for dfad.
    """

    model_config = _FROZEN

    kind: StudentKind | None = None
    widths: tuple[int, ...] = (16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2)
    blocks_per_stage: int = Field(default=0, ge=0, le=8)

    @model_validator(mode="after")
    def _check(self) -> StudentConfig:
        if not self.widths or len(self.widths) != len(self.strides):
            raise ValueError("widths and strides need the same, non-zero length")
        if any(w < 1 for w in self.widths) or any(s not in (1, 2) for s in self.strides):
            raise ValueError("widths must be positive and strides 1 or 2")
        return self


GeneratorOutput = Literal["batchnorm", "pixel_range"]


class GeneratorConfig(BaseModel):
    """The generator's size (METHOD.md 2: latent 256; width is the authors' ngf) and output.

    ``output`` "batchnorm" is the authors' last layer (a BN without affine; it bounds no
    pixel); "pixel_range" keeps every pixel in [0, 1] (``student_node/generator.py``).
    """

    model_config = _FROZEN

    latent_dim: int = Field(default=256, ge=1, le=4096)
    width: int = Field(default=16, ge=1, le=512)
    output: GeneratorOutput = "batchnorm"


class LossWeights(BaseModel):
    """w_s, w_f, w_e, w_g, w_bn of METHOD.md 2, applied in one place (the trainer's loss functions).

    For ``cdfkd`` the header and ensemble weights multiply KL terms; its authors' defaults are
    header 1, ensemble 1, feature unused. ``default_for`` returns each method's defaults.
    """

    model_config = _FROZEN

    header: float = Field(default=1.0, ge=0.0)
    feature: float = Field(default=0.2, ge=0.0)
    ensemble: float = Field(default=5.0, ge=0.0)
    generator: float = Field(default=1.0, ge=0.0)
    bn: float = Field(default=0.1, ge=0.0)

    @classmethod
    def default_for(cls, method: Method) -> LossWeights:
        """The authors' defaults for ``method``."""
        match method:
            case Method.CDFKD_MFS | Method.KD_REAL:
                return cls()
            case Method.CDFKD:
                return cls(header=1.0, feature=0.0, ensemble=1.0, generator=1.0, bn=0.1)
            case Method.DFAD:
                return cls(header=1.0, feature=0.0, ensemble=0.0, generator=1.0, bn=0.0)


class OptimizerConfig(BaseModel):
    """Student SGD and generator Adam with MultiStepLR, stepped once per epoch."""

    model_config = _FROZEN

    student_lr: float = Field(default=0.1, gt=0.0, le=10.0)
    student_momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    student_weight_decay: float = Field(default=5e-4, ge=0.0, le=1.0)
    generator_lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    milestones: tuple[int, ...] = (100, 200)
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> OptimizerConfig:
        if list(self.milestones) != sorted(set(self.milestones)) or any(
            m < 1 for m in self.milestones
        ):
            raise ValueError("milestones must be strictly increasing positive epochs")
        return self


class ReplayConfig(BaseModel):
    """A replay memory of generated images with the teachers' answers cached beside them.

    Each iteration generates ``new_batches`` fresh batches, asks every teacher about each once
    and adds them (with the answers) to a memory of ``size`` samples (oldest overwritten
    first); the iteration's K student steps then draw their batches from the memory and cost
    no teacher query. ``sampling`` ``uniform`` draws each batch uniformly (with replacement)
    from the whole memory; ``newest`` takes the fresh batches in order, step k the k-th
    (``new_batches`` must then equal K; with ``size`` = K x batch it is the paper's loop, with
    the answers asked in the same order). The generator step is unchanged (it needs the
    teachers' input gradients on its own fresh batch; with ``generator_objective = "ideal"``
    it asks no teacher at all).

    ``keep_generator_batch`` also adds the generator step's batch, which the teachers are
    asked about anyway, to the memory with their answers (its Query then also asks for the
    features where the student loss uses them): one more fresh batch per iteration at no
    teacher image. With it ``new_batches`` may be 0, so each iteration costs a teacher two
    batches (the generator step's Query and input gradient) instead of ``new_batches`` + 2;
    an iteration that finds the memory empty (a run's first) then asks one fresh batch.
    """

    model_config = _FROZEN

    size: int = Field(default=4096, ge=2, le=10_000_000, description="samples kept")
    new_batches: int = Field(default=1, ge=0, le=100, description="fresh batches per iteration")
    sampling: Literal["uniform", "newest"] = "uniform"
    keep_generator_batch: bool = Field(
        default=False, description="the generator step's batch and answers join the memory"
    )

    @model_validator(mode="after")
    def _check(self) -> ReplayConfig:
        if self.new_batches == 0 and not self.keep_generator_batch:
            raise ValueError(
                "replay.new_batches 0 needs keep_generator_batch: the memory would get nothing"
            )
        if self.keep_generator_batch and self.sampling == "newest":
            raise ValueError(
                "replay.keep_generator_batch needs sampling 'uniform': 'newest' is the paper's "
                "loop, one fresh batch per student step"
            )
        return self


class IdealConfig(BaseModel):
    """The student-only generator objective of IDEAL (Zhang et al., ICLR 2023), ``[train.ideal]``.

    With ``generator_objective = "ideal"`` the generator step asks no teacher anything: with
    S the student's prediction (the mean of its header logits, its inference output, METHOD.md
    1), L_G = w_c CE(S(x), argmax S(x)) - w_b H(mean_batch softmax S(x)): samples the student
    classifies confidently, spread over all classes (H the entropy, natural log, of the
    batch-mean prediction). These are DAFL's one-hot and information-entropy losses with the
    student in the teacher's place; ``balance`` 5 is DAFL's MNIST weight.

    ``disagreement`` w_d adds - w_d D, D the headers' disagreement (mean over samples of
    (1/N) sum_i ||softmax s_i - mean_j softmax s_j||_1): the generator also seeks samples on
    which the student's headers disagree, the teacher-free adversary of DisGUIDE (AAAI 2023)
    and Dual Students (ICLR 2023) with the headers as the clones. Still no teacher query;
    0 (the default) is IDEAL as published, and a one-header student has D = 0.

    ``moments`` w_m adds + w_m M, M the batch's per-channel distance from the run
    normalization's mean and std (standardized images: mean 0, std 1), the owners' published
    first two moments of their data. It is meant with ``generator.output = "pixel_range"``:
    that output keeps pixels in [0, 1], this term keeps the batch's brightness and contrast
    at the owners'; the authors' affine-free BN output fixes both moments exactly but lets
    pixels leave [0, 1]. 0 (the default) is IDEAL as published.
    """

    model_config = _FROZEN

    confidence: float = Field(default=1.0, ge=0.0, le=1000.0, description="w_c")
    balance: float = Field(default=5.0, ge=0.0, le=1000.0, description="w_b")
    disagreement: float = Field(default=0.0, ge=0.0, le=1000.0, description="w_d")
    moments: float = Field(default=0.0, ge=0.0, le=1000.0, description="w_m")

    @model_validator(mode="after")
    def _check(self) -> IdealConfig:
        if not (self.confidence or self.balance or self.disagreement or self.moments):
            raise ValueError(
                "ideal.confidence, ideal.balance, ideal.disagreement and ideal.moments are "
                "all 0: L_G would be 0"
            )
        return self


class TrainConfig(BaseModel):
    """The distillation loop: one iteration = K student steps then one generator step."""

    model_config = _FROZEN

    method: Method = Method.CDFKD_MFS
    batch_size: int = Field(default=256, ge=2, le=65536)
    student_steps_per_generator_step: int = Field(default=5, ge=1, le=100)
    epochs: int = Field(default=300, ge=1, le=100_000)
    iterations_per_epoch: int = Field(default=50, ge=1, le=1_000_000)
    seed: int = 0
    weights: LossWeights | None = None
    optimizer: OptimizerConfig = OptimizerConfig()
    student: StudentConfig = StudentConfig()
    generator: GeneratorConfig = GeneratorConfig()
    attention: AttentionConfig = AttentionConfig()
    image_shape: tuple[int, int, int] | None = Field(
        default=None,
        description="(C, H, W) of the run image space; None: the largest teacher input (H*W)",
    )
    normalization: Normalization | None = Field(
        default=None,
        description="mean and std that map the generator's standardized images to [0, 1] "
        "pixels; None: the teachers' own when they agree, else their per-channel average",
    )
    replay: ReplayConfig | None = Field(
        default=None,
        description="a replay memory with cached teacher answers; None: the paper's loop "
        "(every student step on a fresh batch, asked of every teacher)",
    )
    generator_objective: Literal["adversarial", "ideal"] = Field(
        default="adversarial",
        description="adversarial: the paper's L_G, through the student and every teacher "
        "(a logits-only teacher's input gradient is a zeroth-order estimate, q + 1 queries "
        "per image); ideal: IDEAL's student-only L_G ([train.ideal]), no teacher query at all",
    )
    ideal: IdealConfig | None = Field(
        default=None,
        description="the IDEAL objective's weights; None: IdealConfig()'s defaults",
    )
    ensemble_weighting: Literal["equal", "confidence"] = Field(
        default="equal",
        description="equal: the teachers' ensemble is the mean of their logits (the paper); "
        "confidence: a per-sample mean weighted by each teacher's confidence on the sample",
    )
    confidence_temperature: float = Field(
        default=0.1, gt=0.0, le=100.0, description="tau of the confidence weights"
    )
    prefetch: int = Field(
        default=0,
        ge=0,
        le=16,
        description="batches whose teacher queries are asked ahead while the student "
        "computes (the generator is fixed between its steps, so the result is the same); "
        "0: the serial loop, each batch asked when its step begins",
    )

    @model_validator(mode="after")
    def _check_image_space(self) -> TrainConfig:
        if self.image_shape is not None and (
            self.image_shape[0] < 1 or min(self.image_shape[1:]) < 8
        ):
            raise ValueError(f"image_shape {self.image_shape} must be (C>=1, H>=8, W>=8)")
        if self.normalization is not None:
            mean, std = self.normalization.mean, self.normalization.std
            if not mean or len(mean) != len(std) or min(std) <= 0:
                raise ValueError("normalization needs one mean and one positive std per channel")
            if self.image_shape is not None and len(mean) != self.image_shape[0]:
                raise ValueError(
                    f"normalization has {len(mean)} channels, image_shape {self.image_shape[0]}"
                )
        return self

    @model_validator(mode="after")
    def _check_replay(self) -> TrainConfig:
        replay = self.replay
        if replay is None:
            return self
        if self.method is Method.KD_REAL:
            raise ValueError("replay needs generated images: kd_real learns from real ones")
        fresh = max(replay.new_batches, 1)
        if replay.size < fresh * self.batch_size:
            raise ValueError(
                f"replay.size {replay.size} is smaller than one iteration's fresh samples "
                f"({fresh} x batch_size {self.batch_size})"
            )
        if replay.keep_generator_batch and self.generator_objective == "ideal":
            raise ValueError(
                "replay.keep_generator_batch needs the teachers' answers to the generator's "
                "batch: generator_objective 'ideal' asks them nothing"
            )
        steps = self.student_steps_per_generator_step
        if replay.sampling == "newest" and replay.new_batches != steps:
            raise ValueError("replay.sampling 'newest' needs new_batches = K, one per student step")
        return self

    @model_validator(mode="after")
    def _check_generator_objective(self) -> TrainConfig:
        if self.generator_objective == "ideal" and self.method is Method.KD_REAL:
            raise ValueError(
                "generator_objective 'ideal' trains the generator: kd_real learns from real "
                "images and has no generator"
            )
        if self.ideal is not None and self.generator_objective != "ideal":
            raise ValueError(
                "[train.ideal] sets the IDEAL generator objective's weights, but "
                "generator_objective is 'adversarial': set generator_objective = 'ideal' or "
                "drop the table"
            )
        return self

    @model_validator(mode="after")
    def _check_ensemble_weighting(self) -> TrainConfig:
        if self.ensemble_weighting == "equal" or self.method is Method.DFAD:
            return self  # dfad's one target is the teachers' ensemble
        if self.loss_weights().ensemble == 0.0:
            raise ValueError(
                f"ensemble_weighting 'confidence' weighs the teachers' ensemble, which "
                f"{self.method.value} uses only in its ensemble term, and weights.ensemble is 0"
            )
        return self

    @property
    def total_iterations(self) -> int:
        """Epochs * iterations_per_epoch."""
        return self.epochs * self.iterations_per_epoch

    def ideal_weights(self) -> IdealConfig:
        """The configured IDEAL weights, or their defaults."""
        return self.ideal if self.ideal is not None else IdealConfig()

    def loss_weights(self) -> LossWeights:
        """The configured weights, or the method's defaults."""
        return self.weights if self.weights is not None else LossWeights.default_for(self.method)

    def student_kind(self) -> StudentKind:
        """The configured student family, or the method's own."""
        if self.student.kind is not None:
            return self.student.kind
        match self.method:
            case Method.CDFKD_MFS | Method.KD_REAL:
                return StudentKind.MFS
            case Method.CDFKD:
                return StudentKind.SIMPLE_MULTI_HEADER
            case Method.DFAD:
                return StudentKind.SINGLE_HEAD
