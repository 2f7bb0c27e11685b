"""Choosing the sampling engine: vLLM on CUDA when installed, transformers otherwise, and a clear
message when vLLM is asked for where it cannot run. (The vLLM paths themselves run in
scripts/gpu-check.sh on a GPU machine with vLLM.)"""

import pytest
import torch

from trainer.configs import PPOConfig
from trainer.sampling import load_sampler
from trainer.ppo import train_ppo
from trainer.vllm_engine import choose_engine, vllm_available

pytestmark = pytest.mark.skipif(vllm_available(), reason="these tests are about a machine without vLLM")


def test_without_vllm_auto_falls_back_to_transformers_even_on_cuda():
    for device in ("cpu", "cuda"):
        assert choose_engine("auto", torch.device(device)) == "transformers"
        assert choose_engine("transformers", torch.device(device)) == "transformers"


def test_asking_for_vllm_where_it_cannot_run_says_why():
    with pytest.raises(ValueError, match="vLLM is not installed on this worker: pip install vllm"):
        choose_engine("vllm", torch.device("cuda"))
    with pytest.raises(ValueError, match="needs a CUDA GPU and this worker's device is cpu"):
        choose_engine("vllm", torch.device("cpu"))
    with pytest.raises(ValueError, match="engine must be one of auto, transformers, vllm"):
        choose_engine("fast", torch.device("cpu"))


def test_the_generation_sampler_falls_back_and_refuses_clearly(tiny_model_dir):
    sampler = load_sampler(str(tiny_model_dir), torch.device("cpu"), torch.float32, "auto")
    assert sampler.engine == "transformers"
    with pytest.raises(ValueError, match="vllm engine needs a CUDA GPU"):
        load_sampler(str(tiny_model_dir), torch.device("cpu"), torch.float32, "vllm")


def test_ppo_asking_for_vllm_rollouts_on_the_cpu_fails_before_loading_models(tmp_path):
    config = PPOConfig(rollout_engine="vllm", device="cpu", steps=1, batch_size=2, mini_batch_size=2)
    with pytest.raises(ValueError, match="vllm engine needs a CUDA GPU"):
        train_ppo(config, [[{"role": "user", "content": "Hi"}]], policy_path=tmp_path / "missing",
                  reference_path=tmp_path / "missing",
                  reward_path=tmp_path / "missing", output_dir=tmp_path / "out")
