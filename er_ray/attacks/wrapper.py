"""textattack ModelWrapper that pads each query batch only to its longest input, truncated at max_length.

textattack's HuggingFaceModelWrapper pads every query to the tokenizer's model_max_length (512 for MiniLM), which
costs 4-6x on short texts; the logits are the same (padding is masked). `precision` (attack.precision:
auto, fp32, bf16, fp16) puts the victim's forwards under autocast on its device; the logits returned are fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from er_ray.attacks.env import prepare_textattack
from er_ray.precision import amp_for

prepare_textattack()
from textattack.models.wrappers import ModelWrapper  # noqa: E402


def _split_inputs(inputs: Sequence[str | tuple[str, ...]]) -> tuple[list[str], list[str] | None]:
    # textattack hands one string per example, or a tuple (first, second) for pair tasks
    if inputs and isinstance(inputs[0], tuple):
        return [x[0] for x in inputs], [x[1] for x in inputs]
    return [str(x) for x in inputs], None


class DynamicPaddingWrapper(ModelWrapper):
    """Logits (float, CPU) of a sequence classifier for a list of textattack inputs."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        max_length: int = 128,
        batch_size: int = 32,
        precision: str = "fp32",
    ):
        self.model = model  # textattack's validators read wrapper.model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.calls = 0  # forward passes, for the benchmark
        self.amp = amp_for(precision, next(model.parameters()).device, training=False)
        self.precision = self.amp.precision  # what runs, for the results

    def __call__(self, text_input_list: Sequence[str | tuple[str, ...]]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        outputs = []
        for start in range(0, len(text_input_list), self.batch_size):
            first, second = _split_inputs(list(text_input_list[start : start + self.batch_size]))
            enc = self.tokenizer(
                first,
                second,
                padding="longest",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.no_grad(), self.amp.autocast():
                logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits
            self.calls += 1
            outputs.append(logits.float().cpu())
        if not outputs:
            return torch.empty(0, self.model.config.num_labels)
        return torch.cat(outputs)

    def _tokenize(self, inputs: Sequence[str]) -> list[list[str]]:
        return [
            self.tokenizer.convert_ids_to_tokens(self.tokenizer(x, truncation=True)["input_ids"])
            for x in inputs
        ]
