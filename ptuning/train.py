"""P-tuning on a frozen model: only the prompt encoder (and, for encoder
models, the task's linear head) gets gradients.

Classification minimises cross-entropy over the label scores the server
computes (server/scoring.py, the same code); generation minimises the LM loss
on the target tokens only. After every epoch the encoder runs once, the dev
set is scored with that table, and the best epoch's table is kept; training
stops early when the dev metric has not improved for `patience` epochs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prompt_store.artifact import PromptArtifact, make_artifact
from prompt_store.errors import InvalidRequest
from prompt_store.template import parse_template, render, tokenize_text
from server.model import LoadedModel
from server.prompts import TaskPrompt, check_classify_input, task_prompt
from server.runner import eos_token_ids
from server.scoring import LabelQuery, LabelScorer, embed, pack

from .data import DataError, Example
from .encoder import EncoderKind, PromptEncoder

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    task_type: str = "classify"  # "classify" | "generate"
    template: str = "[P:3]{input}[P:3]"  # the paper's (3, x, 3) layout
    labels: dict[str, str] | None = None  # classify: label -> verbalizer, in order
    encoder: str = "lstm"  # lstm (the paper's) | mlp | none (plain prompt tuning)
    epochs: int = 20
    lr: float = 1e-2  # AdamW; the encoder is small, so a far larger rate than for fine-tuning
    batch_size: int = 16
    seed: int = 0
    patience: int = 5  # epochs without a better dev metric before stopping
    train_prompt: bool = True  # False: the prompt stays at its start (a head-only baseline for encoders)
    progress: bool = True  # a progress bar with the running loss

    def __post_init__(self):
        EncoderKind(self.encoder)  # raises on an unknown encoder, naming it
        if self.task_type not in ("classify", "generate"):
            raise InvalidRequest(f"task_type must be classify or generate, got {self.task_type!r}")
        if self.task_type == "classify":
            if not isinstance(self.labels, dict) or not self.labels:
                raise InvalidRequest("a classify task needs labels: a JSON object label -> verbalizer text")
            bad = {k: v for k, v in self.labels.items() if not isinstance(v, str) or not v}
            if bad:
                raise InvalidRequest(f"every verbalizer must be a non-empty string; got {bad}")
        elif self.labels:
            raise InvalidRequest("labels are only for --task-type classify")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise InvalidRequest("epochs and batch_size must be >= 1 and lr > 0")


@dataclass
class TrainResult:
    artifact: PromptArtifact
    history: list[dict] = field(default_factory=list)  # one entry per epoch


@dataclass
class _Item:
    ids: list[int]  # rendered input
    target: int | list[int]  # label index (classify) or target token ids (generate)


class PromptTrainer:
    def __init__(self, loaded: LoadedModel, config: TrainConfig):
        self.loaded = loaded
        self.config = config
        self.template = parse_template(config.template)
        self.V = loaded.vocab_size
        if loaded.family != "causal" and config.task_type == "generate":
            raise InvalidRequest(f"a {loaded.family} model cannot be trained to generate; use a causal LM")
        self.labels = dict(config.labels or {})
        # the server's own checks, on a stand-in artifact: refuse now what it would refuse at upload
        self.check_prompt = self._server_view(loaded)
        self.label_ids = self.check_prompt.label_ids
        self.scorer = LabelScorer(loaded)
        self.eos = sorted(eos_token_ids(loaded))[:1]

        torch.manual_seed(config.seed)
        weight = loaded.model.get_input_embeddings().weight
        start = torch.randint(0, self.V, (self.template.num_virtual_tokens,), generator=self._generator(0))
        # start from embeddings of random vocabulary tokens: the scale the model expects
        self.encoder = PromptEncoder(config.encoder, weight[start].float()).to(loaded.device)
        self.head = None
        if loaded.family == "encoder":
            self.head = nn.Linear(weight.shape[1], len(self.labels)).to(loaded.device)
        params = list(self.encoder.parameters()) if config.train_prompt else []
        params += list(self.head.parameters()) if self.head else []
        if not params:
            raise InvalidRequest("nothing to train: train_prompt is off and the model has no head")
        self.optimizer = torch.optim.AdamW(params, lr=config.lr)

    def _server_view(self, loaded: LoadedModel) -> TaskPrompt:
        m, H = self.template.num_virtual_tokens, loaded.info["hidden_size"]
        L = len(self.labels)
        head = (torch.zeros(L, H), torch.zeros(L)) if loaded.family == "encoder" else None
        stand_in = make_artifact(torch.zeros(m, H), template=self.config.template, task_type=self.config.task_type,
                                 labels=self.labels or None, base_model=loaded.info, head=head)  # fmt: skip
        return task_prompt("training", 0, stand_in, loaded)

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + salt)

    def _items(self, examples: list[Example]) -> list[_Item]:
        tok = self.loaded.tokenizer
        names = list(self.labels)
        items = []
        limit = self.loaded.max_positions
        for ex in examples:
            try:
                ids = render(self.template, tok, ex.fields, self.V)
                if self.config.task_type == "classify":
                    check_classify_input(self.check_prompt, ids, self.loaded)
                    items.append(_Item(ids, names.index(ex.target)))
                    continue
                target = tokenize_text(tok, ex.target) + self.eos
                if limit is not None and len(ids) + len(target) > limit:
                    raise InvalidRequest(f"input plus output is {len(ids) + len(target)} tokens; the model has {limit}")
                items.append(_Item(ids, target))
            except InvalidRequest as e:
                raise DataError(f"line {ex.line}: {e}") from None
        return items

    def _rows(self) -> torch.Tensor:
        return self.encoder().to(self.loaded.dtype)  # [m, H]

    def _head(self):
        return None if self.head is None else (self.head.weight, self.head.bias)

    def _losses(self, rows: torch.Tensor, batch: list[_Item]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (mean loss, predicted label per item or None for generate)."""
        if self.config.task_type == "classify":
            queries = [LabelQuery(it.ids, rows, self.label_ids, self._head()) for it in batch]
            scores = torch.stack(self.scorer(queries))  # [B, L]
            gold = torch.tensor([it.target for it in batch], device=scores.device)
            return nn.functional.cross_entropy(scores, gold), scores.argmax(dim=1)
        seqs = [it.ids + it.target for it in batch]
        ids, mask, positions = pack(seqs, [0] * len(seqs), self.V, self.loaded.device)
        embeds = embed(self.loaded.model.get_input_embeddings(), ids, rows, self.V)
        logits = self.loaded.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        # target token j of a row sits at T-k+j and is predicted at T-k+j-1
        T = ids.shape[1]
        labels = torch.full_like(ids, -100)
        for b, it in enumerate(batch):
            k = len(it.target)
            labels[b, T - k :] = torch.tensor(it.target, device=ids.device)
        loss = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100)
        return loss, None

    @torch.no_grad()
    def evaluate(self, rows: torch.Tensor, items: list[_Item]) -> dict:
        """dev_loss: mean over examples (classify) or over target tokens (generate),
        so it does not depend on the batch size."""
        total, weight, correct = 0.0, 0, 0
        for start in range(0, len(items), self.config.batch_size):
            batch = items[start : start + self.config.batch_size]
            loss, predicted = self._losses(rows, batch)
            n = len(batch) if predicted is not None else sum(len(it.target) for it in batch)
            total, weight = total + float(loss) * n, weight + n
            if predicted is not None:
                correct += sum(int(p) == it.target for p, it in zip(predicted.tolist(), batch))
        metrics = {"dev_loss": total / weight}
        if self.config.task_type == "classify":
            metrics["dev_accuracy"] = correct / len(items)
        return metrics

    def _better(self, metrics: dict, best: dict | None) -> bool:
        if best is None:
            return True
        if self.config.task_type == "classify":
            key = (metrics["dev_accuracy"], -metrics["dev_loss"])
            return key > (best["dev_accuracy"], -best["dev_loss"])
        return metrics["dev_loss"] < best["dev_loss"]

    def fit(self, train: list[Example], dev: list[Example]) -> TrainResult:
        """Train; the same seed gives the same artifact on the same machine and
        torch build (deterministic kernels are switched on while training)."""
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return self._fit(train, dev)
        finally:
            torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)

    def _fit(self, train: list[Example], dev: list[Example]) -> TrainResult:
        cfg = self.config
        train_items, dev_items = self._items(train), self._items(dev)
        order_gen = self._generator(1)
        history: list[dict] = []
        best: dict | None = None
        best_rows, best_head, stale = None, None, 0
        for epoch in range(1, cfg.epochs + 1):
            start = time.perf_counter()
            order = torch.randperm(len(train_items), generator=order_gen).tolist()
            batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
            bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress, leave=False)
            running = None
            for idx in bar:
                loss, _ = self._losses(self._rows(), [train_items[i] for i in idx])
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
                bar.set_postfix(loss=f"{running:.4f}")
            with torch.no_grad():
                rows = self._rows().detach().clone()  # the encoder runs once per epoch
            metrics = {"epoch": epoch, "train_loss": running, **self.evaluate(rows, dev_items)}
            metrics["seconds"] = time.perf_counter() - start
            history.append(metrics)
            improved = self._better(metrics, best)
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            log.info("epoch %d: %s%s", epoch, shown, " (best)" if improved else "")
            if cfg.progress:
                print(f"epoch {epoch}: {shown}{' (best)' if improved else ''}", flush=True)
            if improved:
                best, best_rows, stale = metrics, rows, 0
                best_head = None if self.head is None else tuple(p.detach().clone() for p in self._head())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        figures = {k: v for k, v in best.items() if k not in ("seconds", "train_loss")}
        figures.update(
            best_epoch=best["epoch"],
            epochs_run=len(history),
            seconds_per_epoch=sum(h["seconds"] for h in history) / len(history),
            train_examples=len(train_items),
            dev_examples=len(dev_items),
            encoder=cfg.encoder if cfg.train_prompt else "frozen",
            lr=cfg.lr,
            seed=cfg.seed,
        )
        artifact = make_artifact(
            best_rows.float(),
            template=cfg.template,
            task_type=cfg.task_type,
            labels=self.labels or None,
            base_model=self.loaded.info,
            head=None if best_head is None else tuple(t.float() for t in best_head),
            metrics=figures,
        )
        return TrainResult(artifact=artifact, history=history)
