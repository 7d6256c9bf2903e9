"""PLACEHOLDER until the incremental version lands (branch `sampling`)."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""
        self._stopped = False

    def push(self, token_id: int) -> bool:
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            self._stopped = True
            return True
        self.text = text
        return False

    def safe_text(self) -> str:
        if self._stopped:
            return self.text
        end = len(self.text)
        while end and self.text[end - 1] == "\ufffd":
            end -= 1
        if self.stop:
            end = max(0, end - (max(len(s) for s in self.stop) - 1))
        return self.text[:end]
