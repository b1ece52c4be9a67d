"""Any Hugging Face LLaVA-format model as a predictor, so the evaluation harness is not only for
vlmkit's own checkpoints (``vlmkit eval --hf-model PATH``).

The model's own processor does everything model-specific: its chat template renders the turns
(images as ``{"type": "image"}`` content items, in the order they appear), its image processor
prepares the pixels and expands ``<image>``. Generation is greedy and batched (left padding),
and stops at the generation config's end tokens. A vlmkit checkpoint exported with
``vlmkit export --format hf-llava`` answers exactly as the checkpoint itself does (tested).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.data.images import load_image
from vlmkit.data.sample import Sample, Turn
from vlmkit.infer.predictor import pick_device


def hf_messages(turns: list[Turn]) -> list[dict]:
    """vlmkit turns -> transformers' content-list messages (text and image items in order)."""
    messages = []
    for turn in turns:
        content = [{"type": "image"} if p.is_image else {"type": "text", "text": p.text} for p in turn.parts]
        messages.append({"role": turn.role, "content": content})
    return messages


class HFLlavaPredictor:
    """Batched greedy answers from a ``LlavaForConditionalGeneration`` and its processor."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None, max_new_tokens: int = 24,
                 device: str = "auto") -> None:  # fmt: skip
        import transformers

        self.device = pick_device(device)
        self.processor = transformers.AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.image_root = Path(image_root) if image_root is not None else None
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, samples: list[Sample]) -> list[str]:
        if not samples:
            return []
        texts, images = [], []
        for s in samples:
            turns = s.prompt_turns()
            texts.append(self.processor.apply_chat_template(hf_messages(turns), add_generation_prompt=True,
                                                            tokenize=False))  # fmt: skip
            images += [load_image(s.images[i], self.image_root) for i in s.image_order()]
        inputs = self.processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        pad = self.processor.tokenizer.pad_token_id
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  eos_token_id=self.stop_ids or None, pad_token_id=pad)  # fmt: skip
        answers = []
        for row in out[:, inputs["input_ids"].shape[1] :].tolist():
            for k, tok in enumerate(row):
                if tok in self.stop_ids:
                    row = row[:k]
                    break
            answers.append(self.processor.tokenizer.decode(row, skip_special_tokens=True).strip())
        return answers


def load_hf_llava_predictor(path: str | Path, image_root=None, max_new_tokens: int = 24, device: str = "auto"):
    """(predictor, model info) for a Hugging Face LLaVA directory or hub name."""
    predictor = HFLlavaPredictor(path, image_root, max_new_tokens, device)
    info = {
        "hf_model": str(path),
        "parameters": sum(p.numel() for p in predictor.model.parameters()),
        "device": str(predictor.device),
    }
    return predictor, info
