"""The asymmetric adversarial distillation loop (METHOD.md 2), written against the Teacher protocol.

No grpc, ray or flwr here: the loop takes its teachers, RNG and device as arguments and
reports through callbacks. The generator step needs from each teacher only its logits, R(x)
and the input VJP, so in-process and remote teachers give the same gradients. With
``config.prefetch`` the Query calls of an iteration are asked ahead while the student computes
(``student_node/prefetch.py``), with the serial loop's result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Protocol, assert_never

import torch
from torch import Tensor, nn

from cdfkd.student_node.config import LossWeights, Method, StudentKind, TrainConfig
from cdfkd.student_node.errors import IncompatibleTeachers, NonFiniteLossError
from cdfkd.student_node.generator import Generator
from cdfkd.student_node.models.backbones import ConvTrunk
from cdfkd.student_node.models.multi_header import (
    MFSStudent,
    SimpleMultiHeaderStudent,
    SingleHeadStudent,
)
from cdfkd.student_node.objectives import (
    ensemble_weights,
    generator_adversarial_loss,
    generator_ideal_loss,
    student_loss,
    uses_teacher_features,
)
from cdfkd.student_node.prefetch import Ask, Lookahead, TeacherLanes
from cdfkd.student_node.replay import Batch, ReplayMemory
from cdfkd.student_node.teachers.protocol import Teacher, TeacherInfo, TeacherOutputs
from cdfkd.student_node.teachers.run_space import check_channels, default_normalization
from cdfkd.teacher_node.datasets import Normalization

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything that changes during training; checkpointed whole (never any teacher)."""

    student: nn.Module
    generator: Generator
    student_optimizer: torch.optim.Optimizer
    generator_optimizer: torch.optim.Optimizer
    student_scheduler: torch.optim.lr_scheduler.LRScheduler
    generator_scheduler: torch.optim.lr_scheduler.LRScheduler
    rng: torch.Generator
    iteration: int = 0
    #: The replay memory with cached teacher answers (``config.replay``); None: paper's loop.
    replay: ReplayMemory | None = None


@dataclass(frozen=True)
class IterationMetrics:
    """What one iteration reports (typed, so no logging key can be swapped).

    Student terms are the weighted means over the iteration's K student steps; generator
    terms are from its one generator step (zero for kd_real, which has none). With
    ``generator_objective = "ideal"``, ``adversarial_loss`` is IDEAL's student-only L_G and
    ``bn_loss`` is 0 (no teacher prior).
    """

    iteration: int
    epoch: int
    student_loss: float
    header_loss: float
    feature_loss: float
    ensemble_loss: float
    generator_loss: float
    adversarial_loss: float
    bn_loss: float
    student_lr: float
    generator_lr: float
    seconds: float


class TrainCallback(Protocol):
    """Receives the state after every completed iteration."""

    def __call__(self, state: TrainState, metrics: IterationMetrics) -> None:
        """Handle one completed iteration."""
        ...


def check_teachers(infos: Sequence[TeacherInfo]) -> TeacherInfo:
    """Return the first teacher's info after checking all agree on what must be shared.

    Teachers may differ in input height, width and normalization (the run image space bridges
    them, ``student_node/teachers/run_space.py``), not in label space or channel count.

    Raises:
        IncompatibleTeachers: classes or input channels differ.
    """
    if not infos:
        raise IncompatibleTeachers("a run needs at least one teacher")
    check_channels(infos)
    first = infos[0]
    for info in infos[1:]:
        if info.num_classes != first.num_classes:
            raise IncompatibleTeachers(
                f"teacher {info.name!r} has num_classes {info.num_classes} but {first.name!r} "
                f"has {first.num_classes}: all teachers of a run must share the label space"
            )
    return first


def build_student(config: TrainConfig, infos: Sequence[TeacherInfo]) -> nn.Module:
    """The student of ``config`` with one header per teacher (one in all for a single head)."""
    first = check_teachers(infos)
    trunk = ConvTrunk(
        first.input_shape[0],
        config.student.widths,
        config.student.strides,
        config.student.blocks_per_stage,
    )
    feature_dims = [info.feature_dim for info in infos]
    student: nn.Module
    match config.student_kind():
        case StudentKind.MFS:
            student = MFSStudent(trunk, first.num_classes, feature_dims)
        case StudentKind.SIMPLE_MULTI_HEADER:
            student = SimpleMultiHeaderStudent(trunk, first.num_classes, feature_dims)
        case StudentKind.SINGLE_HEAD:
            student = SingleHeadStudent(trunk, first.num_classes)
        case unknown:
            assert_never(unknown)
    # The trunk feeds NHWC activations (see ``to_channels_last``); the weights match them.
    return student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def init_state(
    config: TrainConfig,
    infos: Sequence[TeacherInfo],
    device: torch.device,
    image_shape: tuple[int, int, int] | None = None,
    normalization: Normalization | None = None,
) -> TrainState:
    """Fresh student, generator, optimizers and schedulers, initialized from ``config.seed``.

    ``image_shape`` and ``normalization`` are the run image space the generator makes
    (defaults: the first teacher's input shape and the teachers' normalization, as in a
    homogeneous federation); the normalization matters to a "pixel_range" generator only.
    """
    normalization = normalization or default_normalization(infos)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        student = build_student(config, infos).to(device)
        generator = Generator(
            config.generator.latent_dim,
            image_shape or infos[0].input_shape,
            config.generator.width,
            config.generator.output,
            (normalization.mean, normalization.std),
        ).to(device)
        # NHWC weights make its convolutions about twice as fast on CPU (bench/RESULTS.md).
        generator = generator.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = config.optimizer
    student_optimizer = torch.optim.SGD(
        student.parameters(),
        lr=optimizer.student_lr,
        momentum=optimizer.student_momentum,
        weight_decay=optimizer.student_weight_decay,
    )
    generator_optimizer = torch.optim.Adam(generator.parameters(), lr=optimizer.generator_lr)
    milestones = list(optimizer.milestones)
    return TrainState(
        student=student,
        generator=generator,
        student_optimizer=student_optimizer,
        generator_optimizer=generator_optimizer,
        student_scheduler=torch.optim.lr_scheduler.MultiStepLR(
            student_optimizer, milestones, optimizer.gamma
        ),
        generator_scheduler=torch.optim.lr_scheduler.MultiStepLR(
            generator_optimizer, milestones, optimizer.gamma
        ),
        rng=torch.Generator(device=device).manual_seed(config.seed + 1),
        replay=None if config.replay is None else ReplayMemory(config.replay.size),
    )


def _fan_out(
    executor: Executor | None,
    function: Callable[[Teacher], Tensor | TeacherOutputs],
    teachers: Sequence[Teacher],
) -> list:
    """Apply ``function`` to every teacher, concurrently when an executor is given."""
    if executor is None or len(teachers) == 1:
        return [function(teacher) for teacher in teachers]
    return list(executor.map(function, teachers))


def _teacher_input_grad(
    teacher: Teacher, images: Tensor, cotangent: Tensor, bn_weight: float
) -> Tensor:
    """A teacher's input VJP; its BN term only where it has one and the owner shares it.

    No call at all for a zero cotangent without a BN term.
    """
    if "bn_loss" not in teacher.info().allowed_outputs:
        bn_weight = 0.0
    if bn_weight == 0.0 and not bool(cotangent.any()):
        return torch.zeros_like(images)  # e.g. cdfkd's detached teachers: nothing to ask
    return teacher.input_grad(images, cotangent, bn_weight)


def _require_finite(value: Tensor, term: str, iteration: int) -> None:
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteLossError(term, iteration)


def _sample_latent(state: TrainState, config: TrainConfig) -> Tensor:
    device = next(state.generator.parameters()).device
    return torch.randn(
        config.batch_size, config.generator.latent_dim, generator=state.rng, device=device
    )


def student_step(
    state: TrainState,
    teachers: Sequence[Teacher],
    images: Tensor,
    config: TrainConfig,
    weights: LossWeights,
    executor: Executor | None = None,
) -> tuple[float, float, float, float]:
    """One student update on ``images`` (no gradient to G).

    Returns:
        The weighted (total, header, feature, ensemble) terms of L_S.
    """
    logits, features = _student_answers(teachers, images, config, weights, executor)
    return _student_update(state, images, logits, features, config, weights)


def _student_answers(
    teachers: Sequence[Teacher],
    images: Tensor,
    config: TrainConfig,
    weights: LossWeights,
    executor: Executor | None,
) -> tuple[list[Tensor], list[Tensor | None] | None]:
    """What a student step needs of every teacher: logits, and features where L_S uses them."""
    features = uses_teacher_features(config.method, weights)
    answers: list[TeacherOutputs] = _fan_out(
        executor, lambda t: _student_query(t, images, features), teachers
    )
    return _split(answers, features)


def _student_query(teacher: Teacher, images: Tensor, features: bool) -> TeacherOutputs:
    """A student step's Query: logits, features where L_S uses them and the owner shares them."""
    return teacher.query(
        images, features=features and "features" in teacher.info().allowed_outputs, bn_loss=False
    )


def _split(
    answers: Sequence[TeacherOutputs], features: bool
) -> tuple[list[Tensor], list[Tensor | None] | None]:
    return [a.logits for a in answers], [a.features for a in answers] if features else None


def _student_update(
    state: TrainState,
    images: Tensor,
    teacher_logits: list[Tensor],
    teacher_features: list[Tensor | None] | None,
    config: TrainConfig,
    weights: LossWeights,
) -> tuple[float, float, float, float]:
    """The student update of :func:`student_step` on given answers."""
    outputs = state.student(images)
    loss = student_loss(
        config.method,
        weights,
        outputs,
        teacher_logits,
        teacher_features,
        ensemble_weights(config, teacher_logits),
    )
    _require_finite(loss.total, "student loss", state.iteration)
    state.student_optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    state.student_optimizer.step()
    return (loss.total.item(), loss.header.item(), loss.feature.item(), loss.ensemble.item())


@dataclass(frozen=True)
class _GeneratorBatch:
    """The generator step's batch: images with their graph to G, and detached copies."""

    images: Tensor
    leaf: Tensor  # requires grad: the student path's dL_G/dx
    frozen: Tensor  # what the teachers are asked about


def _generator_batch(state: TrainState, config: TrainConfig) -> _GeneratorBatch:
    latent = _sample_latent(state, config)
    state.generator_optimizer.zero_grad(set_to_none=True)
    images = state.generator(latent)
    _require_finite(images, "generator images", state.iteration)
    leaf = images.detach().requires_grad_(True)
    return _GeneratorBatch(images, leaf, leaf.detach())


def _generator_query(
    teacher: Teacher, images: Tensor, bn_weight: float, features: bool
) -> TeacherOutputs:
    """The generator step's Query: logits, and R(x) where weighted and shared.

    Also features where the batch joins the replay memory and L_S uses them (as
    :func:`_student_query`).
    """
    info = teacher.info()
    return teacher.query(
        images,
        features=features and "features" in info.allowed_outputs,
        bn_loss=bn_weight != 0.0 and "bn_loss" in info.allowed_outputs,
        keep_for_grad=True,  # its input_grad names the batch, not resends it
    )


def _keeps_generator_batch(config: TrainConfig) -> bool:
    return config.replay is not None and config.replay.keep_generator_batch


def _generator_features(config: TrainConfig, weights: LossWeights) -> bool:
    """Whether the generator step's Query asks for features: for the memory, where L_S uses them."""
    return _keeps_generator_batch(config) and uses_teacher_features(config.method, weights)


def _fresh_batches(memory: ReplayMemory, config: TrainConfig) -> int:
    """This iteration's fresh batches: ``new_batches``, or one while the memory is empty."""
    assert config.replay is not None
    new = config.replay.new_batches
    return new if new > 0 or len(memory) > 0 else 1


def generator_step(
    state: TrainState,
    teachers: Sequence[Teacher],
    config: TrainConfig,
    weights: LossWeights,
    executor: Executor | None = None,
) -> tuple[float, float, float]:
    """One generator update: dL_G/dx = student path + sum_i teacher VJPs, then x.backward.

    With ``config.generator_objective`` "ideal" it is :func:`ideal_generator_step` instead,
    which asks no teacher.

    Returns:
        (L_G, its adversarial part, its weighted BN-prior part).
    """
    if config.generator_objective == "ideal":
        return ideal_generator_step(state, config)
    batch = _generator_batch(state, config)
    bn_weight = weights.bn / len(teachers)
    features = _generator_features(config, weights)
    answers: list[TeacherOutputs] = _fan_out(
        executor, lambda t: _generator_query(t, batch.frozen, bn_weight, features), teachers
    )
    return _generator_update(state, teachers, batch, answers, config, weights, executor)


def _generator_update(
    state: TrainState,
    teachers: Sequence[Teacher],
    batch: _GeneratorBatch,
    answers: Sequence[TeacherOutputs],
    config: TrainConfig,
    weights: LossWeights,
    executor: Executor | None,
) -> tuple[float, float, float]:
    """The update of :func:`generator_step` given the teachers' answers to its batch."""
    images, leaf, frozen = batch.images, batch.leaf, batch.frozen
    outputs = state.student(leaf)
    bn_weight = weights.bn / len(teachers)
    teacher_logits = [a.logits.detach().clone().requires_grad_(True) for a in answers]
    adversarial = generator_adversarial_loss(
        config.method, weights, outputs, teacher_logits, ensemble_weights(config, teacher_logits)
    )
    priors = [a.bn_loss for a in answers if a.bn_loss is not None]
    bn = bn_weight * torch.stack(priors).sum() if priors else adversarial.new_zeros(())
    _require_finite(adversarial + bn, "generator loss", state.iteration)
    gradients = torch.autograd.grad(adversarial, [leaf, *teacher_logits], allow_unused=True)
    grad_images = gradients[0] if gradients[0] is not None else torch.zeros_like(leaf)
    cotangents = [
        g if g is not None else torch.zeros_like(t)
        for g, t in zip(gradients[1:], teacher_logits, strict=True)
    ]
    pairs = list(zip(teachers, cotangents, strict=True))
    teacher_grads = _fan_out(
        executor,
        lambda pair: _teacher_input_grad(pair[0], frozen, pair[1], bn_weight),
        pairs,  # type: ignore[arg-type]
    )
    for grad in teacher_grads:
        grad_images = grad_images + grad
    _require_finite(grad_images, "generator input gradient", state.iteration)
    images.backward(grad_images)
    state.generator_optimizer.step()
    if _keeps_generator_batch(config):
        assert state.replay is not None
        features = _generator_features(config, weights)
        state.replay.add(
            frozen,
            [a.logits for a in answers],
            [a.features for a in answers] if features else [None] * len(answers),
        )
    return ((adversarial + bn).item(), adversarial.item(), bn.item())


def ideal_generator_step(state: TrainState, config: TrainConfig) -> tuple[float, float, float]:
    """IDEAL's generator update against the student alone: no teacher is asked anything.

    L_G of :func:`~cdfkd.student_node.objectives.generator_ideal_loss` on a fresh batch,
    back-propagated through the student (whose parameters it leaves alone) into G.

    Returns:
        (L_G, L_G, 0.0): the objective, and no BN-prior part.
    """
    latent = _sample_latent(state, config)
    state.generator_optimizer.zero_grad(set_to_none=True)
    images = state.generator(latent)
    _require_finite(images, "generator images", state.iteration)
    leaf = images.detach().requires_grad_(True)
    loss = generator_ideal_loss(config.ideal_weights(), state.student(leaf), leaf)
    _require_finite(loss.total, "generator loss", state.iteration)
    (grad_images,) = torch.autograd.grad(loss.total, [leaf])
    _require_finite(grad_images, "generator input gradient", state.iteration)
    images.backward(grad_images)
    state.generator_optimizer.step()
    total = loss.total.item()
    return (total, total, 0.0)


def _student_batch(state: TrainState, config: TrainConfig, real_images: Tensor | None) -> Tensor:
    """A student step's batch: fresh from the generator, or drawn real images for kd_real."""
    if config.method is Method.KD_REAL:
        if real_images is None:
            raise ValueError("kd_real needs real_images")
        chosen = torch.randint(
            0,
            real_images.shape[0],
            (config.batch_size,),
            generator=state.rng,
            device=state.rng.device,
        )
        return real_images[chosen.to(real_images.device)]
    with torch.no_grad():
        images = state.generator(_sample_latent(state, config))
    _require_finite(images, "generator images", state.iteration)
    return images


def _replay_batches(state: TrainState, memory: ReplayMemory, config: TrainConfig) -> list[Batch]:
    """The K student steps' batches drawn from the memory (after this iteration's fresh ones)."""
    replay = config.replay
    assert replay is not None
    steps = config.student_steps_per_generator_step
    if replay.sampling == "newest":
        fresh = memory.newest(steps * config.batch_size)
        return [
            memory.part(fresh, start, config.batch_size)
            for start in range(0, steps * config.batch_size, config.batch_size)
        ]
    return [memory.sample(config.batch_size, state.rng) for _ in range(steps)]


def _replay_steps(
    state: TrainState,
    memory: ReplayMemory,
    teachers: Sequence[Teacher],
    config: TrainConfig,
    weights: LossWeights,
    executor: Executor | None,
) -> list[tuple[float, float, float, float]]:
    """The K student steps with a replay memory: fresh batches asked once, steps from memory."""
    for _ in range(_fresh_batches(memory, config)):
        images = _student_batch(state, config, None)
        logits, features = _student_answers(teachers, images, config, weights, executor)
        memory.add(images, logits, features or [None] * len(teachers))
    uses_features = uses_teacher_features(config.method, weights)
    return [
        _student_update(state, images, logits, features if uses_features else None, config, weights)
        for images, logits, features in _replay_batches(state, memory, config)
    ]


_StudentTerms = tuple[float, float, float, float]
_GeneratorTerms = tuple[float, float, float]


def _pipelined_iteration(
    state: TrainState,
    teachers: Sequence[Teacher],
    config: TrainConfig,
    weights: LossWeights,
    real_images: Tensor | None,
    executor: Executor | None,
    lanes: TeacherLanes,
) -> tuple[list[_StudentTerms], _GeneratorTerms]:
    """One iteration with the Query calls asked ``config.prefetch`` batches ahead.

    The batches are made in the serial loop's order (the generator's forwards, its BatchNorm
    statistics and the RNG advance as there) and the updates are the same, so the result is
    the serial loop's bit for bit (``student_node/prefetch.py``). Without a memory, the K
    student batches and then the generator step's batch are asked ahead of the student
    steps; with one, the fresh batches are asked ahead of each other, and the generator
    step's batch while the K student steps run on the memory.
    """
    depth = config.prefetch
    features = uses_teacher_features(config.method, weights)
    bn_weight = weights.bn / len(teachers)
    steps = config.student_steps_per_generator_step
    has_generator = config.method is not Method.KD_REAL
    # IDEAL's generator step asks no teacher: nothing of it to ask ahead.
    asks_generator = has_generator and config.generator_objective != "ideal"
    terms: list[_StudentTerms] = []
    generator_terms: _GeneratorTerms = (0.0, 0.0, 0.0)

    def student_item(index: int) -> tuple[Tensor | _GeneratorBatch, Ask]:
        images = _student_batch(state, config, real_images)
        return images, lambda t: _student_query(t, images, features)

    generator_features = _generator_features(config, weights)

    def generator_item(index: int) -> tuple[Tensor | _GeneratorBatch, Ask]:
        batch = _generator_batch(state, config)
        return batch, lambda t: _generator_query(t, batch.frozen, bn_weight, generator_features)

    def update_generator(ahead: Lookahead[Tensor | _GeneratorBatch]) -> _GeneratorTerms:
        batch, answers = ahead.take()
        assert isinstance(batch, _GeneratorBatch)
        return _generator_update(state, teachers, batch, answers, config, weights, executor)

    memory = state.replay
    if memory is None:

        def produce(index: int) -> tuple[Tensor | _GeneratorBatch, Ask]:
            return student_item(index) if index < steps else generator_item(index)

        count = steps + (1 if asks_generator else 0)
        with Lookahead(lanes, teachers, produce, count, depth) as ahead:
            for _ in range(steps):
                images, answers = ahead.take()
                assert isinstance(images, Tensor)
                logits, cached = _split(answers, features)
                terms.append(_student_update(state, images, logits, cached, config, weights))
            if asks_generator:
                generator_terms = update_generator(ahead)
        if has_generator and not asks_generator:
            generator_terms = ideal_generator_step(state, config)
        return terms, generator_terms

    fresh = _fresh_batches(memory, config)
    with Lookahead(lanes, teachers, student_item, fresh, depth) as ahead:
        for _ in range(fresh):
            images, answers = ahead.take()
            assert isinstance(images, Tensor)
            logits, cached = _split(answers, features)
            memory.add(images, logits, cached or [None] * len(teachers))
    batches = _replay_batches(state, memory, config)

    def learn_from_memory() -> None:
        for images, logits, cached in batches:
            terms.append(
                _student_update(
                    state, images, logits, cached if features else None, config, weights
                )
            )

    if not asks_generator:
        learn_from_memory()
        return terms, ideal_generator_step(state, config)
    with Lookahead(lanes, teachers, generator_item, 1, depth) as ahead:
        ahead.prime()  # answered while the student steps below run
        learn_from_memory()
        generator_terms = update_generator(ahead)
    return terms, generator_terms


def run_iteration(
    state: TrainState,
    teachers: Sequence[Teacher],
    config: TrainConfig,
    real_images: Tensor | None = None,
    executor: Executor | None = None,
    lanes: TeacherLanes | None = None,
) -> IterationMetrics:
    """K student steps then one generator step (kd_real: K steps on real batches, no generator).

    With ``config.prefetch`` > 0 the teachers' answers are asked ahead on ``lanes`` (one
    thread per teacher; made for this iteration when not given), with the same result.
    """
    started = time.perf_counter()
    weights = config.loss_weights()
    state.student.train()
    state.generator.train()
    steps = config.student_steps_per_generator_step
    all_terms: list[_StudentTerms] = []
    generator_terms: _GeneratorTerms = (0.0, 0.0, 0.0)
    if config.prefetch > 0:
        with ExitStack() as stack:
            if lanes is None:
                lanes = stack.enter_context(TeacherLanes(len(teachers)))
            all_terms, generator_terms = _pipelined_iteration(
                state, teachers, config, weights, real_images, executor, lanes
            )
    else:
        if state.replay is not None:
            all_terms = _replay_steps(state, state.replay, teachers, config, weights, executor)
        for _ in range(steps if state.replay is None else 0):
            images = _student_batch(state, config, real_images)
            all_terms.append(student_step(state, teachers, images, config, weights, executor))
        if config.method is not Method.KD_REAL:
            generator_terms = generator_step(state, teachers, config, weights, executor)
    sums = [0.0, 0.0, 0.0, 0.0]
    for terms in all_terms:
        sums = [a + b for a, b in zip(sums, terms, strict=True)]
    state.iteration += 1
    if state.iteration % config.iterations_per_epoch == 0:
        state.student_scheduler.step()
        if config.method is not Method.KD_REAL:
            state.generator_scheduler.step()
    return IterationMetrics(
        iteration=state.iteration,
        epoch=state.iteration // config.iterations_per_epoch,
        student_loss=sums[0] / steps,
        header_loss=sums[1] / steps,
        feature_loss=sums[2] / steps,
        ensemble_loss=sums[3] / steps,
        generator_loss=generator_terms[0],
        adversarial_loss=generator_terms[1],
        bn_loss=generator_terms[2],
        student_lr=state.student_optimizer.param_groups[0]["lr"],
        generator_lr=state.generator_optimizer.param_groups[0]["lr"],
        seconds=time.perf_counter() - started,
    )


def train(
    state: TrainState,
    teachers: Sequence[Teacher],
    config: TrainConfig,
    *,
    real_images: Tensor | None = None,
    callbacks: Sequence[TrainCallback] = (),
    should_stop: Callable[[], bool] | None = None,
    executor: Executor | None = None,
) -> TrainState:
    """Run iterations from ``state.iteration`` up to ``config.total_iterations``.

    Args:
        state: Initial or resumed state; updated in place and returned.
        teachers: One per header, in header order.
        config: The loop's configuration.
        real_images: Normalized real training images, for kd_real only.
        callbacks: Called after every iteration (logging, evaluation, checkpoints).
        should_stop: Polled after every iteration; True ends training early (time budgets).
        executor: Runs the per-teacher calls concurrently when given (with ``config.prefetch``
            the Query calls run on the loop's own thread per teacher; the executor then serves
            the generator step's InputGrad calls).

    Raises:
        NonFiniteLossError: a loss, image batch or gradient became NaN/Inf (step not applied).
        RemoteTeacherError: a teacher refused or failed; with ``config.prefetch`` it is raised
            where the serial loop raises it, after the queries under way have ended.
    """
    if len(teachers) == 0:
        raise IncompatibleTeachers("a run needs at least one teacher")
    with ExitStack() as stack:
        lanes = stack.enter_context(TeacherLanes(len(teachers))) if config.prefetch > 0 else None
        while state.iteration < config.total_iterations:
            metrics = run_iteration(state, teachers, config, real_images, executor, lanes)
            for callback in callbacks:
                callback(state, metrics)
            if should_stop is not None and should_stop():
                break
    return state
