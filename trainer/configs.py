"""The settings of each kind of training run, defined once.

One dataclass per job kind (SFT, reward model, PPO), read by its trainer and
stored with every job and checkpoint. A field a user may set from a form or the
API is made with `setting(...)`: its metadata holds the label, the help text and
the allowed range (`ge`, `le`) or `choices`; the web app derives its forms, the
API's settings listing and its validation from that metadata (as TRL's configs
carry their help in `field(metadata={"help": ...})`). The other fields keep
their defaults. No torch here: the web process imports this module.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINTING = ("auto", "on", "off")
# How a run launched as several processes spreads the trained models (trainer/distributed.py): single: one
# process only; ddp: a full copy each; fsdp: weights, gradients and optimizer state sharded; zero2, zero3:
# DeepSpeed ZeRO (needs deepspeed). One process trains the same way whichever is chosen (but single).
STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3")


def strategy_setting() -> Any:
    return setting("ddp", label="Distributed strategy", choices=STRATEGIES,
                   help="when launched as several processes: ddp copies the model, fsdp and zero3 shard it")


def setting(default: Any, *, label: str = "", help: str = "", ge: float | None = None, le: float | None = None,
            choices: tuple[str, ...] = ()) -> Any:
    """A field a user may set: a number in [ge, le], one of `choices`, or a flag."""
    return field(default=default, metadata={"label": label, "help": help, "ge": ge, "le": le, "choices": choices})


def gradient_checkpointing_setting() -> Any:
    """Recompute each layer's activations in the backward pass instead of keeping them (every trainer;
    trainer/common.py applies it, trainer/memory.py estimates it)."""
    return setting("auto", label="Gradient checkpointing", choices=CHECKPOINTING,
                   help="keep only each layer's input and recompute the rest in the backward pass (slower, much"
                        " less memory); auto: on for models over 1B parameters")


def adam_8bit_setting() -> Any:
    """AdamW's two moments in 8 bits (bitsandbytes): 2 bytes per trained weight instead of 8."""
    return setting(False, label="8-bit AdamW", help="optimizer state in 8 bits; needs bitsandbytes and CUDA")


def check_settings(config: Any, checks: dict[str, bool], what: str, hints: dict[str, str] | None = None) -> None:
    """Raise ValueError naming every setting whose check failed, with its value (and its
    hint, where one is given)."""
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        extra = "".join(f" ({hints[n]})" for n in bad if hints and n in hints)
        raise ValueError(f"invalid {what} settings: {', '.join(f'{n}={getattr(config, n)!r}' for n in bad)}{extra}")


def epoch_training_checks(config: Any) -> dict[str, bool]:
    """The checks every epoch-based trainer (SFT, reward model) makes of its settings."""
    return {
        "epochs": config.epochs >= 1,
        "batch_size": config.batch_size >= 1,
        "gradient_accumulation_steps": config.gradient_accumulation_steps >= 1,
        "learning_rate": config.learning_rate > 0,
        "lr_schedule": config.lr_schedule in SCHEDULES,
        "warmup_ratio": 0 <= config.warmup_ratio < 1,
        "max_length": config.max_length >= 8,
        "eval_batch_size": config.eval_batch_size >= 1,
        "lora_r": config.lora_r >= 0,
        "gradient_checkpointing": config.gradient_checkpointing in CHECKPOINTING,
        "strategy": config.strategy in STRATEGIES,
    }


@dataclass
class SFTConfig:
    epochs: int = setting(1, ge=1, le=100)  # passes over the training demonstrations
    # rows per forward pass (examples, or packed rows of examples)
    batch_size: int = setting(8, help="examples per step", ge=1, le=1024)
    gradient_accumulation_steps: int = setting(1, label="Gradient accumulation", ge=1, le=1024)  # passes per step
    # full fine-tuning of a ~100M model; LoRA wants ~1e-4, tiny test models ~1e-3
    learning_rate: float = setting(2e-5, ge=1e-8, le=1.0)
    lr_schedule: str = setting("cosine", label="Schedule", choices=SCHEDULES)  # after warmup, decaying to 0
    warmup_ratio: float = setting(0.03, ge=0.0, le=0.99)  # fraction of optimizer steps spent warming up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping
    max_length: int = setting(512, help="tokens", ge=16, le=32_768)  # prompt + response (and a packed row)
    # several whole examples per row; no padding, same loss
    packing: bool = setting(False, help="several examples per row")
    eval_batch_size: int = 8  # examples per forward pass when computing the validation loss
    seed: int = setting(0, ge=0, le=2**31 - 1)
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 ...
    mixed_precision: bool = True  # bf16 autocast on CUDA; ignored elsewhere
    gradient_checkpointing: str = gradient_checkpointing_setting()
    adam_8bit: bool = adam_8bit_setting()
    strategy: str = strategy_setting()
    # 0: train every weight; > 0: LoRA of that rank (needs peft), merged into the saved weights
    lora_r: int = setting(0, label="LoRA rank", help="0 = full fine-tuning", ge=0, le=1024)
    lora_alpha: int = setting(16, label="LoRA alpha", ge=1, le=4096)
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_settings(self, epoch_training_checks(self) | {"max_grad_norm": self.max_grad_norm > 0}, "SFT")


@dataclass
class RewardConfig:
    # at most this many passes; early stopping ends sooner and keeps the best epoch (docs/reward-models.md)
    epochs: int = setting(4, help="at most; early stopping keeps the best epoch", ge=1, le=100)
    # annotations per forward pass; each brings its K responses
    batch_size: int = setting(8, help="annotations, K responses each", ge=1, le=1024)
    gradient_accumulation_steps: int = setting(1, label="Gradient accumulation", ge=1, le=1024)  # passes per step
    # of the trunk; InstructGPT's 6B RM used 9e-6; tiny test models want ~1e-3
    learning_rate: float = setting(1e-5, help="of the trunk", ge=1e-8, le=1.0)
    # the fresh scalar head starts far from its optimum; the pretrained trunk must move little
    head_lr_multiplier: float = setting(
        10.0, label="Head learning-rate multiplier", ge=1.0, le=10_000.0,
        help="the scalar head learns this many times faster than the trunk")
    # evaluations without a lower validation loss before stopping; the best evaluation's weights are saved
    early_stopping_patience: int = setting(
        1, label="Early-stopping patience", ge=0, le=100,
        help="epochs without a lower validation loss before stopping (0: run every epoch); the weights of"
             " the best epoch are kept either way")
    # fit the head on the base model's frozen last-token features before fine-tuning (LP-FT)
    probe_init: bool = setting(True, label="Start the head from a linear probe",
                               help="fitted on the base model's frozen features first")
    # the loss treats each label as right with probability 1 - label_smoothing (for noisy labels)
    label_smoothing: float = setting(0.0, ge=0.0, le=0.49, help="for noisy labels; 0.1 = labels 90% right")
    # accuracy of linear probes fitted on 25/50/100% of the training rankings, beside the labelers' agreement
    learning_curve: bool = setting(
        True, label="Learning curve",
        help="validation accuracy on 25, 50 and 100% of the data (linear probes, seconds): is data short?")
    lr_schedule: str = setting("cosine", label="Schedule", help="after warmup, to 0", choices=SCHEDULES)
    warmup_ratio: float = setting(0.05, help="share of steps", ge=0.0, le=0.99)  # of the optimizer steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping
    # tokens of prompt + response; longer ones lose the START of the prompt
    max_length: int = setting(512, help="tokens of prompt + response", ge=16, le=32_768)
    eval_batch_size: int = 16  # annotations per forward pass when evaluating and normalising
    seed: int = setting(0, ge=0, le=2**31 - 1)
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 ...
    # bf16 autocast on CUDA; ignored elsewhere
    mixed_precision: bool = setting(True, label="Mixed precision", help="bf16 on CUDA")
    gradient_checkpointing: str = gradient_checkpointing_setting()
    adam_8bit: bool = adam_8bit_setting()
    strategy: str = strategy_setting()
    # 0: train every weight; > 0: LoRA of that rank (needs peft)
    lora_r: int = setting(0, label="LoRA rank", help="0 = full fine-tuning", ge=0, le=1024)
    lora_alpha: int = setting(16, label="LoRA alpha", ge=1, le=4096)
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_settings(self, epoch_training_checks(self) | {
            "head_lr_multiplier": self.head_lr_multiplier > 0,
            "early_stopping_patience": self.early_stopping_patience >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 0.5,
        }, "reward")


@dataclass
class PPOConfig:
    # PPO iterations; each samples batch_size responses
    steps: int = setting(10, help="each samples one batch", ge=1, le=100_000)
    batch_size: int = setting(8, help="prompts per step", ge=1, le=4096)  # prompts (rollouts) per iteration
    # rollouts per gradient step; batch_size must be a multiple
    mini_batch_size: int = setting(4, help="divides the batch", ge=1, le=4096)
    ppo_epochs: int = setting(4, label="PPO epochs", help="passes per batch", ge=1, le=100)  # over each batch
    # 1e-6..1e-5 for real models; the tiny test models want ~1e-4
    learning_rate: float = setting(1e-6, ge=1e-10, le=1.0)
    # linear | cosine | constant: annealed to 0 over the run
    lr_schedule: str = setting("linear", label="Schedule", help="annealed to 0", choices=SCHEDULES)
    warmup_steps: int = 0  # optimizer steps of linear warmup
    max_grad_norm: float = 1.0  # gradient clipping over policy and value together
    # AdamW's (torch's default, 0.01, is nobody's choice here), as the RM and SFT trainers
    weight_decay: float = setting(0.0, help="AdamW's, on policy and value", ge=0.0, le=10.0)
    # response length limit: the ranking sets' default, so few default-model answers are cut
    max_new_tokens: int = setting(
        128, label="Response length", ge=1, le=4096,
        help="tokens; as long as the ranking sets' responses (128 by default), or most rollouts are cut and"
             " pay the missing-EOS penalty")
    max_prompt_length: int = 256  # longer prompts keep their last tokens
    temperature: float = setting(0.7, ge=0.01, le=5.0)  # sampling temperature; log-probs use the same
    kl_coef: float = setting(0.05, label="KL coefficient (beta)", ge=0.0, le=100.0)  # the (initial) beta
    # adapt beta toward target_kl (Ziegler et al. 2019)
    adaptive_kl: bool = setting(False, label="Adaptive KL", help="steer beta toward the target KL")
    # nats per response, for the adaptive controller
    target_kl: float = setting(6.0, label="Target KL", help="nats per response", ge=0.001, le=1000.0)
    # the adaptive controller's horizon, in samples
    kl_horizon: int = setting(
        160, label="KL horizon", ge=1, le=10_000_000,
        help="samples; beta moves at most 0.2 x batch size / horizon per step. Ziegler et al. used 10000 at"
             " batch 512 (about 20 steps); 160 is as many steps at batch 8. Lower it to steer faster")
    # k1: log p - log q (unbiased); k3: (q/p - 1) - log(q/p), never negative
    kl_estimator: str = setting("k1", label="KL estimator", choices=("k1", "k3"))
    cliprange: float = setting(0.2, label="Policy clip range", ge=0.001, le=10.0)  # policy ratio clip
    # value prediction clip around the rollout's values
    cliprange_value: float = setting(0.2, label="Value clip range", ge=0.001, le=1000.0)
    vf_coef: float = setting(0.1, label="Value loss coefficient", ge=0.0, le=100.0)  # weight of the value loss
    # first PPO steps that train only the value model (OpenRLHF's freezing_actor_steps)
    value_warmup_steps: int = setting(0, label="Value warm-up steps", help="first steps train the value model only",
                                      ge=0, le=100_000)
    gamma: float = setting(1.0, ge=0.0, le=1.0)  # discount
    lam: float = setting(0.95, label="Lambda (GAE)", ge=0.0, le=1.0)  # GAE lambda
    whiten_advantages: bool = setting(True, label="Whiten advantages")
    # > 0: normalise the RM score anew on the reference's samples of this many rl prompts, drawn with these
    # sampling settings (mean 0, std 1 at step 1); 0: the RM's stored normalisation, made on responses sampled
    # with the ranking set's settings
    normalisation_prompts: int = setting(
        64, label="Normalisation prompts", ge=0, le=100_000,
        help="the reward is normalised anew on the reference's samples of this many rl prompts, drawn with"
             " these settings; 0 = the reward model's stored normalisation (made on the ranking set's"
             " responses, sampled with other settings)")
    # subtracted from the (normalised) score of a response without EOS
    missing_eos_penalty: float | None = setting(1.0, label="Missing-EOS penalty", help="blank = none",
                                                ge=0.0, le=100.0)
    # held-out prompts sampled before and after (the first ones given); their mean reward, with a 95%
    # interval, is the run's figure
    validation_samples: int = setting(64, label="Validation prompts", ge=0, le=100_000,
                                      help="held-out (validation-split) prompts sampled before and after")
    # weight of the SFT language-modelling loss (InstructGPT's PPO-ptx); needs sft_data
    ptx_coef: float = setting(0.0, label="Pretraining-loss coefficient (ptx)", help="needs demonstration sets",
                              ge=0.0, le=100.0)
    seed: int = setting(0, ge=0, le=2**31 - 1)
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda ...
    # bf16 autocast on CUDA; ignored elsewhere
    mixed_precision: bool = setting(True, label="Mixed precision", help="bf16 on CUDA")
    gradient_checkpointing: str = gradient_checkpointing_setting()
    adam_8bit: bool = adam_8bit_setting()
    # auto: vLLM on CUDA when it is installed (the policy's weights loaded into it each step), else transformers
    rollout_engine: str = setting("auto", label="Rollout engine", choices=("auto", "transformers", "vllm"),
                                  help="auto: vLLM on CUDA when installed, else transformers")
    strategy: str = strategy_setting()
    # 0: full fine-tuning; > 0: LoRA on policy and value (needs peft)
    lora_r: int = setting(0, label="LoRA rank", help="0 = full fine-tuning", ge=0, le=1024)
    lora_alpha: int = setting(16, label="LoRA alpha", ge=1, le=4096)
    lora_dropout: float = 0.0

    @staticmethod
    def joint_problems(values: Mapping[str, Any]) -> dict[str, str]:
        """The rules that tie settings together, as {field: message} (the forms show the
        message beside the field). A rule is skipped while one of its fields is not a
        whole number yet: that field's own check speaks for it."""
        problems: dict[str, str] = {}
        batch, mini = values.get("batch_size"), values.get("mini_batch_size")
        if isinstance(batch, int) and isinstance(mini, int) and mini >= 1 and (mini > batch or batch % mini):
            problems["mini_batch_size"] = f"must divide the batch size ({batch})"
        steps, warmup = values.get("steps"), values.get("value_warmup_steps")
        if isinstance(steps, int) and isinstance(warmup, int) and warmup >= steps:
            problems["value_warmup_steps"] = (f"must be below the number of steps ({steps}):"
                                              " the policy would never train")
        return problems

    def __post_init__(self) -> None:
        joint = self.joint_problems(vars(self))
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "mini_batch_size": self.mini_batch_size >= 1 and "mini_batch_size" not in joint,
            "ppo_epochs": self.ppo_epochs >= 1,
            "learning_rate": self.learning_rate > 0,
            "weight_decay": self.weight_decay >= 0,
            "lr_schedule": self.lr_schedule in SCHEDULES,
            "max_new_tokens": self.max_new_tokens >= 1,
            "max_prompt_length": self.max_prompt_length >= 1,
            "temperature": self.temperature > 0,
            "kl_coef": self.kl_coef >= 0,
            "target_kl": self.target_kl > 0,
            "kl_horizon": self.kl_horizon >= 1,
            "kl_estimator": self.kl_estimator in ("k1", "k3"),
            "cliprange": self.cliprange > 0,
            "cliprange_value": self.cliprange_value > 0,
            "value_warmup_steps": self.value_warmup_steps >= 0 and "value_warmup_steps" not in joint,
            "gamma": 0 <= self.gamma <= 1,
            "lam": 0 <= self.lam <= 1,
            "ptx_coef": self.ptx_coef >= 0,
            "normalisation_prompts": self.normalisation_prompts >= 0,
            "validation_samples": self.validation_samples >= 0,
            "lora_r": self.lora_r >= 0,
            "gradient_checkpointing": self.gradient_checkpointing in CHECKPOINTING,
            "rollout_engine": self.rollout_engine in ("auto", "transformers", "vllm"),
            "strategy": self.strategy in STRATEGIES,
        }
        check_settings(self, checks, "PPO", joint)


DPO_LOSSES = ("listwise", "sigmoid", "ipo")


@dataclass
class DPOConfig:
    # listwise: Plackett-Luce over the whole ranking (K responses, one pass); sigmoid: the DPO paper's pairwise
    # loss; ipo: Azar et al. 2023's squared loss. All read each ranking's K responses once (trainer/dpo.py).
    loss: str = setting("listwise", label="Loss", choices=DPO_LOSSES,
                        help="listwise: the whole ranking at once (Plackett-Luce); sigmoid: DPO's pairs; ipo: IPO's")
    # the implicit reward is beta * log(policy / reference); DPO's paper used 0.1, IPO's tau is 1 / (2 beta)
    beta: float = setting(0.1, label="Beta", help="strength of the pull toward the reference", ge=0.001, le=100.0)
    epochs: int = setting(1, help="passes over the training rankings", ge=1, le=100)
    batch_size: int = setting(8, help="rankings per step, K responses each", ge=1, le=1024)
    # 5e-7..5e-6 for real models (Zephyr used 5e-7); tiny test models want ~1e-3
    learning_rate: float = setting(1e-6, ge=1e-10, le=1.0)
    lr_schedule: str = setting("linear", label="Schedule", help="after warmup, to 0", choices=SCHEDULES)
    warmup_ratio: float = setting(0.1, help="share of steps", ge=0.0, le=0.99)  # of the optimizer steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping
    # prompt + response; a longer prompt loses its start, then the response its end
    max_length: int = setting(512, help="tokens of prompt + response", ge=16, le=32_768)
    eval_batch_size: int = 16  # rankings per forward pass for the reference log-probs and validation
    # held-out prompts sampled before and after (samples side by side, KL from the reference)
    validation_samples: int = setting(16, label="Validation prompts", ge=0, le=100_000,
                                      help="held-out prompts sampled before and after each epoch: samples and KL")
    max_new_tokens: int = setting(128, label="Sample length", help="tokens", ge=1, le=4096)
    temperature: float = setting(0.7, ge=0.01, le=5.0)  # of the samples
    seed: int = setting(0, ge=0, le=2**31 - 1)
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda ...
    mixed_precision: bool = setting(True, label="Mixed precision", help="bf16 on CUDA")
    # No gradient checkpointing: the policy runs in eval mode (no dropout), where transformers does not
    # checkpoint, and the responses read the prompt's cached keys and values, which checkpointing drops.
    adam_8bit: bool = adam_8bit_setting()
    strategy: str = strategy_setting()
    # 0: full fine-tuning; > 0: LoRA (needs peft); with the policy's own weights as reference, the reference
    # is the policy with its adapters off
    lora_r: int = setting(0, label="LoRA rank", help="0 = full fine-tuning", ge=0, le=1024)
    lora_alpha: int = setting(16, label="LoRA alpha", ge=1, le=4096)
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_settings(self, {
            "loss": self.loss in DPO_LOSSES,
            "beta": self.beta > 0,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0,
            "lr_schedule": self.lr_schedule in SCHEDULES,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "max_length": self.max_length >= 8,
            "eval_batch_size": self.eval_batch_size >= 1,
            "validation_samples": self.validation_samples >= 0,
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature > 0,
            "lora_r": self.lora_r >= 0,
            "strategy": self.strategy in STRATEGIES,
        }, "DPO")


@dataclass
class BestOfNConfig:
    # responses sampled per prompt; the KL of best-of-N from the policy is log N - (N - 1) / N
    n: int = setting(8, label="N", help="responses sampled per prompt; the best by reward is kept", ge=2, le=256)
    max_new_tokens: int = setting(128, label="Response length", help="tokens", ge=1, le=4096)
    temperature: float = setting(0.7, ge=0.01, le=5.0)
    top_p: float = setting(1.0, label="Top-p", ge=0.01, le=1.0)
    batch_size: int = setting(16, help="sequences per generation pass", ge=1, le=4096)
    max_prompts: int = setting(256, label="Prompts", help="at most this many of the split's prompts", ge=1,
                               le=1_000_000)
    seed: int = setting(0, ge=0, le=2**31 - 1)
    device: str = "auto"
    mixed_precision: bool = True

    def __post_init__(self) -> None:
        check_settings(self, {
            "n": self.n >= 2, "max_new_tokens": self.max_new_tokens >= 1, "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1, "batch_size": self.batch_size >= 1, "max_prompts": self.max_prompts >= 1,
        }, "best-of-N")


@dataclass
class EvalFiguresConfig:
    """The automatic figures of an evaluation set (trainer/eval_figures.py). Nothing is
    sampled: the set's stored responses are scored, so there is nothing to tune."""

    batch_size: int = 8  # responses per forward pass (reward scores and log-probs)
    max_length: int = 512  # tokens of prompt + response the reward model reads, as it was trained (the end is kept)
    device: str = "auto"

    def __post_init__(self) -> None:
        check_settings(self, {"batch_size": self.batch_size >= 1, "max_length": self.max_length >= 8},
                       "evaluation figures")
