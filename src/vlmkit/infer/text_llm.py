"""A text-only LLM as a predictor: the base LLM of MMStar's multimodal-leakage measure.

Images are dropped from the prompt (the base LLM never saw any); the turns go through the
tokenizer's chat template when it has one, else their texts are joined by newlines. Greedy,
batched with left padding, stopped at the tokenizer's end-of-sequence token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.data.sample import Sample
from vlmkit.infer.predictor import pick_device


class TextLLMPredictor:
    def __init__(self, path: str | Path, max_new_tokens: int = 24, device: str = "auto") -> None:
        import transformers

        self.device = pick_device(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path).to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def prompt(self, sample: Sample) -> str:
        turns = sample.without_images().prompt_turns()
        if self.tokenizer.chat_template:
            messages = [{"role": t.role, "content": t.text} for t in turns]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n".join(t.text for t in turns) + "\n"

    @torch.no_grad()
    def __call__(self, samples: list[Sample]) -> list[str]:
        if not samples:
            return []
        batch = self.tokenizer([self.prompt(s) for s in samples], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(self.device)  # fmt: skip
        eos = self.tokenizer.eos_token_id
        out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id)  # fmt: skip
        answers = []
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            answers.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return answers
