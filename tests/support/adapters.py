"""Random PEFT adapters on the tiny Llama, and PEFT itself as the reference the engines are checked against."""

from pathlib import Path
from typing import Any

import numpy as np
import torch

from apa.engines.base import AdapterRef
from apa.model import BaseModel, forward_last_hidden, score_hidden
from tests.conftest import load_tiny

K = 3
R = 4
ALPHA = 16
LOGIT_TOL = 1e-4
SAME_ATOL = 1e-6  # one engine, same effective weights: equal up to float noise
SHARED_TOL = 1e-5  # fp32: the prefix once vs inside every full forward


def make_adapter(model_dir: Path, folder: Path, seed: int, r: int = R) -> Path:
    """A PEFT LoRA with random A and B (B is zero at init; here it is not), saved PEFT's way."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(load_tiny(model_dir).model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(str(folder))
    return folder


def refs(paths: list[Path]) -> list[AdapterRef]:
    return [AdapterRef(shard=k, version=1, path=p) for k, p in enumerate(paths)]


def peft_reference(model_dir: Path, adapter: Path) -> tuple[BaseModel, Any]:
    from peft import PeftModel

    base = load_tiny(model_dir)
    model = PeftModel.from_pretrained(base.model, str(adapter))
    model.eval()
    return base, model


def peft_outputs(base: BaseModel, model: Any, texts: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    """PEFT's last hidden states [n, hidden] and p(yes) [n]."""
    hidden = forward_last_hidden(base, texts, batch_size=4, model=model)
    return hidden, score_hidden(base, hidden, model=model).numpy()


def full_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """All-vocabulary logits at the last prompt token: [n, vocab]."""
    with torch.no_grad():
        return model.get_output_embeddings()(hidden)


def one_hot(n: int, k: int, shard: int) -> np.ndarray:
    return np.eye(k)[[shard] * n]
