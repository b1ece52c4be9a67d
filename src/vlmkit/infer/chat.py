"""`vlmkit chat`: one answer, or an interactive multi-turn session, with a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

from vlmkit.data.sample import ImageRef, Part, Sample, Turn

HELP = "commands: /image PATH (attach an image to your next message), /reset, /quit"


class ChatSession:
    """Keeps the conversation; each `ask` renders it with the shared chat template."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.turns: list[Turn] = []
        self.images: list[ImageRef] = []
        self.pending_images: list[str] = []

    def attach(self, path: str) -> None:
        self.pending_images.append(str(Path(path).resolve()))

    def reset(self) -> None:
        self.turns, self.images, self.pending_images = [], [], []

    def ask(self, text: str) -> str:
        parts = []
        for path in self.pending_images:
            parts.append(Part(image=len(self.images)))
            self.images.append(ImageRef(path=path))
            parts.append(Part(text="\n"))
        self.pending_images = []
        parts.append(Part(text=text))
        self.turns.append(Turn("user", parts))
        sample = Sample("chat", list(self.turns), list(self.images))
        answer = self.predictor([sample])[0]
        self.turns.append(Turn.of_text("assistant", answer))
        return answer


def chat_main(
    checkpoint: str,
    images: list[str],
    prompt: str | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
) -> int:
    from vlmkit.infer.predictor import load_predictor

    predictor, _ = load_predictor(
        checkpoint, image_root=None, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
    )
    session = ChatSession(predictor)
    for path in images:
        if not Path(path).exists():
            print(f"error: image {path} not found", file=sys.stderr)
            return 2
        session.attach(path)
    if prompt is not None:
        print(session.ask(prompt))
        return 0
    print(HELP)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            if not Path(path).exists():
                print(f"no such image: {path}")
            else:
                session.attach(path)
            continue
        print("vlm>", session.ask(line))
