"""vLLM, an optional engine for sampling on CUDA: which engine a job uses, and PPO's
rollouts on vLLM.

vLLM is not a dependency: on the CPU, and on GPUs without it, transformers samples.
"auto" picks vLLM when the device is CUDA and `import vllm` works; "vllm" asks for it
and fails with a clear message where it cannot run.

PPO on vLLM: the engine holds its own copy of the policy (in bf16, in a share of the
GPU's memory); before each step's rollouts the policy's current weights (LoRA
adapters merged) are loaded into it, and the trainer recomputes every log-probability
with its own model, so PPO's ratios stay exact whatever vLLM's numerics.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ENGINES = ("auto", "transformers", "vllm")
ROLLOUT_GPU_SHARE = 0.3  # of the GPU's memory for vLLM's weights and KV cache during PPO; the trainer has the rest


def vllm_available() -> bool:
    """Whether vLLM can be imported here (a broken install counts as missing)."""
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a vLLM built for another torch or CUDA
        return False
    return True


def choose_engine(engine: str, device: torch.device) -> str:
    """"vllm" or "transformers" for a job asking for `engine` (auto | transformers | vllm) on `device`.
    Raises ValueError with what to do instead when vLLM is asked for and cannot run here."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "vllm":
        if device.type != "cuda":
            raise ValueError(f"the vllm engine needs a CUDA GPU and this worker's device is {device.type}:"
                             " use engine auto or transformers")
        if not vllm_available():
            raise ValueError("the vllm engine was asked for but vLLM is not installed on this worker:"
                             " pip install vllm, or use engine auto (transformers when vLLM is missing)")
        return "vllm"
    if engine == "auto" and device.type == "cuda" and vllm_available():
        return "vllm"
    return "transformers"


class VllmRollouts:
    """PPO's rollouts sampled by vLLM from the policy's current weights."""

    def __init__(self, path: str, *, temperature: float, max_new_tokens: int, pad_id: int, seed: int):
        from vllm import LLM, SamplingParams

        # generation_config="vllm": the checkpoint's generation_config.json sets no sampling default; the
        # samples come from plain softmax(logits / T), the distribution the trainer's log-probs assume.
        self.llm = LLM(model=path, dtype="bfloat16", gpu_memory_utilization=ROLLOUT_GPU_SHARE, seed=seed,
                       generation_config="vllm", enable_prefix_caching=False)
        self.params = SamplingParams(temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_new_tokens,
                                     detokenize=False, skip_special_tokens=False)
        self.pad_id = pad_id

    def sync(self, policy) -> None:
        """Load the policy's current weights into vLLM (LoRA adapters merged for the copy, then unmerged)."""
        lora = hasattr(policy, "merge_adapter")
        if lora:
            policy.merge_adapter()
        try:
            core = policy.get_base_model() if lora else policy
            weights = [(name.replace(".base_layer", ""), tensor.detach())
                       for name, tensor in core.state_dict().items() if "lora_" not in name]
            self.llm.apply_model(lambda model: model.load_weights(iter(weights)))
        finally:
            if lora:
                policy.unmerge_adapter()

    def generate(self, query: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """Sampled responses to left-padded prompts (B, P): (B, R) token ids, right-padded, on query's device."""
        import torch

        from trainer.common import pad_right

        prompts = [{"prompt_token_ids": row[mask.bool()].tolist()} for row, mask in zip(query, query_mask)]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        ids, _ = pad_right([list(o.outputs[0].token_ids) or [self.pad_id] for o in outputs], self.pad_id)
        return ids.to(query.device, dtype=torch.long)
