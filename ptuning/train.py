"""P-tuning on a frozen model: only the prompt encoder (and, for encoder
models, the task's linear head) gets gradients.

Classification minimises cross-entropy over the label scores the server
computes (ptcore/scoring.py, the same code); generation minimises the LM loss
on the target tokens only. After every epoch the encoder runs once, the dev
set is scored with that table, and the best epoch's table is kept; training
stops early when the dev metric has not improved for `patience` epochs. A dev
set of fewer than `min_dev_examples` is not trusted to pick an epoch (16
examples move accuracy in steps of 6 points): then every epoch runs and the
last one is kept; its dev figures are still reported.

Defaults per model family (`default_template`): causal LMs `[P:3]{input}[P:3]`;
masked LMs and encoders the same between the tokenizer's own CLS, MASK and SEP
tokens. `from_prompt` starts from a manual text prompt instead: every run of
literal words becomes as many pseudo tokens as it has tokens, started at those
tokens' embeddings, so epoch 0 is exactly the manual prompt (see
`prompt_from_text`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prompt_store.artifact import PromptArtifact, make_artifact
from prompt_store.template import parse_template, render, tokenize_text
from ptcore.errors import InvalidRequest
from ptcore.inputs import embed, on_device, pack
from ptcore.model import LoadedModel
from ptcore.scoring import LabelQuery, LabelScorer
from ptcore.task_prompt import TaskPrompt, check_classify_input, task_prompt

from .config import TrainConfig  # defined torch-free for the command line; importable from here as before
from .data import DataError, Example
from .encoder import PromptEncoder
from .events import Done, EpochEnd, Note, Scored, Step  # what steps() yields
from .starting_template import default_template, prompt_from_text

PassSize = Callable[[], int | None] | None  # steps()' pass_size: examples the next forward pass may take

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    artifact: PromptArtifact
    history: list[dict] = field(default_factory=list)  # one entry per epoch


@dataclass
class _Item:
    ids: list[int]  # rendered input
    target: int | list[int]  # label index (classify) or target token ids (generate)

    @property
    def tokens(self) -> int:
        """Tokens a training pass feeds the model for this item (generate: the target too)."""
        return len(self.ids) + (len(self.target) if isinstance(self.target, list) else 0)


class PromptTrainer:
    def __init__(self, loaded: LoadedModel, config: TrainConfig, going_on: PromptArtifact | None = None):
        """going_on: a trained prompt to go on training (a task's stored
        version): its rows start the table and its head the head, so epoch 0
        is that prompt. config's template, task type and labels must be its own."""
        self.loaded = loaded
        self.config = config
        self.going_on = going_on
        self.V = loaded.vocab_size
        start_ids: list[int | None] = []
        if config.from_prompt is not None:
            self.template_source, start_ids = prompt_from_text(config.from_prompt, loaded.tokenizer)
        else:
            self.template_source = config.template or default_template(loaded)
        self.template = parse_template(self.template_source)
        if loaded.family != "causal" and config.task_type == "generate":
            raise InvalidRequest(f"a {loaded.family} model cannot be trained to generate; use a causal LM")
        self.labels = dict(config.labels or {})
        # the server's own checks, on a stand-in artifact: refuse now what it would refuse at upload
        self.check_prompt = self._server_view(loaded)
        self.label_ids = self.check_prompt.label_ids
        self.scorer = LabelScorer(loaded)
        self.eos = sorted(loaded.eos_token_ids)[:1]

        torch.manual_seed(config.seed)
        weight = loaded.model.get_input_embeddings().weight
        start = torch.randint(0, self.V, (self.template.num_virtual_tokens,), generator=self._generator(0))
        if start_ids:  # from_prompt: its words' own tokens (random ones for its own [P:n] holes)
            start = torch.tensor([r if t is None else t for t, r in zip(start_ids, start.tolist())])
        # start from embeddings of vocabulary tokens: the scale the model expects
        init = weight[start].float() if going_on is None else self._going_on_rows(going_on)
        self.encoder = PromptEncoder(config.encoder, init).to(loaded.device)
        self.head = None
        if loaded.family == "encoder":
            self.head = nn.Linear(weight.shape[1], len(self.labels)).to(loaded.device)
            if going_on is not None and going_on.head is not None:
                with torch.no_grad():
                    self.head.weight.copy_(going_on.head[0])
                    self.head.bias.copy_(going_on.head[1])
        # weight decay on the encoder's networks and the head; the prompt vectors themselves keep their scale
        groups = []
        if config.train_prompt:
            nets = [p for name, p in self.encoder.named_parameters() if name != "table"]
            groups.append(dict(params=[self.encoder.table], lr=config.lr, weight_decay=0.0))
            groups.append(dict(params=nets, lr=config.lr, weight_decay=config.weight_decay))
        if self.head is not None:
            groups.append(dict(params=list(self.head.parameters()), lr=config.head_lr,
                               weight_decay=config.weight_decay))  # fmt: skip
        if not groups:
            raise InvalidRequest("nothing to train: train_prompt is off and the model has no head")
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]])

    def _going_on_rows(self, artifact: PromptArtifact) -> torch.Tensor:
        ours = (self.template_source, self.config.task_type, self.labels or None)
        its = (artifact.meta["template"], artifact.task_type, artifact.labels)
        if ours != its:
            raise InvalidRequest(f"a prompt trained further keeps its template, task type and labels: {ours} "
                                 f"differs from its {its}")  # fmt: skip
        return artifact.embeddings.float()

    def _server_view(self, loaded: LoadedModel) -> TaskPrompt:
        m, H = self.template.num_virtual_tokens, loaded.info["hidden_size"]
        L = len(self.labels)
        head = (torch.zeros(L, H), torch.zeros(L)) if loaded.family == "encoder" else None
        stand_in = make_artifact(torch.zeros(m, H), template=self.template_source, task_type=self.config.task_type,
                                 labels=self.labels or None, base_model=loaded.info, head=head,
                                 **self._pooling_meta())  # fmt: skip
        return task_prompt("training", 0, stand_in, loaded)

    def _pooling_meta(self) -> dict:
        return {"head_pooling": self.config.head_pooling} if self.loaded.family == "encoder" else {}

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

    def score(self, rows: torch.Tensor, examples: list[Example]) -> dict:
        """Dev figures of a prompt table `rows` [m, H] with this trainer's template on `examples`."""
        return _last(self.scoring(rows, examples))

    def scoring(self, rows: torch.Tensor, examples: list[Example], pass_size: PassSize = None):
        """`score`, one forward pass at a time: yields a Scored after each, returns the figures."""
        rows = rows.to(self.loaded.device, self.loaded.dtype)
        return (yield from self._evaluating(rows, self._items(examples), 0, pass_size))

    def check(self, examples: list[Example], max_tokens: int | None = None) -> None:
        """Refuse examples this trainer (and the server, at upload) would refuse,
        naming the line, before any training runs; with `max_tokens`, also an
        example whose training pass would feed the model more tokens."""
        for ex, item in zip(examples, self._items(examples)):
            if max_tokens is not None and item.tokens > max_tokens:
                raise DataError(f"line {ex.line}: {item.tokens} tokens (input and output, rendered); the limit is "
                                f"{max_tokens}")  # fmt: skip

    def _rows(self) -> torch.Tensor:
        return self.encoder().to(self.loaded.dtype)  # [m, H]

    def _head_copy(self):
        return None if self.head is None else tuple(p.detach().clone() for p in self._head())

    def _head(self):
        return None if self.head is None else (self.head.weight, self.head.bias)

    def _losses(self, rows: torch.Tensor, batch: list[_Item]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (mean loss, predicted label per item or None for generate)."""
        if self.config.task_type == "classify":
            pooling = self.config.head_pooling
            queries = [LabelQuery(it.ids, rows, self.label_ids, self._head(), pooling) for it in batch]
            scores = torch.stack(self.scorer(queries))  # [B, L]
            gold = on_device([it.target for it in batch], scores.device)
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
            labels[b, T - k :] = on_device(list(it.target), ids.device)
        loss = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100)
        return loss, None

    def _loss_weight(self, items: list[_Item]) -> int:
        """What a batch's mean loss averages over: examples (classify) or target tokens (generate)."""
        return len(items) if self.config.task_type == "classify" else sum(len(it.target) for it in items)

    def evaluate(self, rows: torch.Tensor, items: list[_Item]) -> dict:
        """dev_loss: mean over examples (classify) or over target tokens (generate),
        so it does not depend on the batch size."""
        return _last(self._evaluating(rows, items, 0))

    def _evaluating(self, rows: torch.Tensor, items: list[_Item], epoch: int, pass_size: PassSize = None):
        """`evaluate`, one forward pass of up to pass_size() examples (None:
        batch_size) at a time: yields a Scored after each, returns the figures."""
        total, weight, correct, done = 0.0, 0, 0, 0
        while done < len(items):
            batch = items[done : done + ((pass_size and pass_size()) or self.config.batch_size)]
            with torch.no_grad():
                loss, predicted = self._losses(rows, batch)
            n = self._loss_weight(batch)
            total, weight = total + float(loss) * n, weight + n
            if predicted is not None:
                correct += sum(int(p) == it.target for p, it in zip(predicted.tolist(), batch))
            done += len(batch)
            yield Scored(epoch, done, len(items))
        metrics = {"dev_loss": total / weight}
        if self.config.task_type == "classify":
            metrics["dev_accuracy"] = correct / len(items)
        return metrics

    def better(self, metrics: dict, best: dict | None) -> bool:
        """Whether dev figures `metrics` beat `best` (accuracy, then loss, for classify; loss for generate)."""
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
            return next(event.result for event in self.steps(train, dev) if isinstance(event, Done))
        finally:
            torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)

    def steps(self, train: list[Example], dev: list[Example],
              pass_size: PassSize = None) -> Iterator[Step | Scored | EpochEnd | Done]:  # fmt: skip
        """The training, one forward pass at a time: a Step after each forward and
        backward pass, a Scored after each pass of the dev set's scoring, an
        EpochEnd after each epoch's evaluation (and first for the starting
        prompt), a Note for what the user should know, Done last. Whoever drives it decides when the next pass runs
        (`fit` runs them back to back, with PyTorch's deterministic kernels on).

        `pass_size()`, asked before each pass, is how many examples it may take
        (None: micro_batch_size, or batch_size for scoring and when that is 0);
        gradients add up over an optimizer step's batch whatever the passes."""
        cfg = self.config
        micro = cfg.micro_batch_size or cfg.batch_size
        train_items, dev_items = self._items(train), self._items(dev)
        order_gen = self._generator(1)
        # epoch 0: the starting prompt, before any step (with from_prompt: the manual prompt itself)
        with torch.no_grad():
            rows = self._rows().detach().clone()
        start = {"epoch": 0, **(yield from self._evaluating(rows, dev_items, 0, pass_size)), "seconds": 0.0}
        history: list[dict] = [start]
        # the manual prompt, or the trained prompt this run goes on from, competes with the trained ones: a
        # trained table must beat it on dev to be kept (not a manual prompt with a head: an untrained head
        # answers nothing the manual prompt says)
        manual = (cfg.from_prompt is not None and self.head is None) or self.going_on is not None
        best: dict | None = start if manual else None
        best_rows, best_head, stale = rows, self._head_copy(), 0
        self._show(start, manual)
        yield EpochEnd(start, manual)
        trust_dev = len(dev_items) >= cfg.min_dev_examples
        if not trust_dev:
            note = (f"{len(dev_items)} dev examples are fewer than {cfg.min_dev_examples}: too few to pick an epoch; "
                    f"all {cfg.epochs} epochs run and the last is kept")  # fmt: skip
            self._say(note)
            yield Note(note)
        for epoch in range(1, cfg.epochs + 1):
            began = time.perf_counter()
            order = torch.randperm(len(train_items), generator=order_gen).tolist()
            batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
            bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress, leave=False)
            running = None
            for n, idx in enumerate(bar, 1):
                batch = [train_items[i] for i in idx]
                weight = self._loss_weight(batch)
                self.optimizer.zero_grad()
                batch_loss, done = 0.0, 0
                while done < len(batch):
                    chunk = batch[done : done + ((pass_size and pass_size()) or micro)]
                    loss, _ = self._losses(self._rows(), chunk)
                    share = self._loss_weight(chunk) / weight  # of the batch's mean loss; one chunk: exactly 1
                    (loss * share).backward()
                    batch_loss += loss.item() * share
                    done += len(chunk)
                    if done == len(batch):
                        self.optimizer.step()
                        running = batch_loss if running is None else 0.9 * running + 0.1 * batch_loss
                        bar.set_postfix(loss=f"{running:.4f}")
                    yield Step(epoch, n, len(batches), done, len(batch), running)
            with torch.no_grad():
                rows = self._rows().detach().clone()  # the encoder runs once per epoch
            scored = yield from self._evaluating(rows, dev_items, epoch, pass_size)
            metrics = {"epoch": epoch, "train_loss": running, **scored}
            metrics["seconds"] = time.perf_counter() - began
            history.append(metrics)
            if trust_dev:
                improved = self.better(metrics, best)
            else:  # the last epoch, unless the manual prompt does better on dev
                improved = epoch == cfg.epochs and (not manual or self.better(metrics, start))
            self._show(metrics, improved)
            yield EpochEnd(metrics, improved)
            if improved:
                best, best_rows, stale = metrics, rows, 0
                best_head = self._head_copy()
            elif trust_dev:
                stale += 1
                if stale >= cfg.patience:
                    break
        if best["epoch"] == 0:
            kept = "the manual prompt" if self.going_on is None else "the prompt it went on from"
            self._say(f"no trained epoch beat {kept} on dev: keeping {kept}")
        trained = history[1:]
        figures = {k: v for k, v in best.items() if k not in ("seconds", "train_loss")}
        figures.update({f"start_{k}": v for k, v in start.items() if k.startswith("dev_")})
        figures.update(
            best_epoch=best["epoch"],
            epochs_run=len(trained),
            seconds_per_epoch=sum(h["seconds"] for h in trained) / len(trained),
            train_examples=len(train_items),
            # tokens through the model in training passes (OpenAI's trained_tokens): every epoch sees every example
            trained_tokens=len(trained) * sum(it.tokens for it in train_items),
            dev_examples=len(dev_items),
            selection="best dev epoch" if trust_dev else f"last epoch (dev < {cfg.min_dev_examples} examples)",
            encoder=cfg.encoder if cfg.train_prompt else "frozen",
            lr=cfg.lr,
            seed=cfg.seed,
        )
        if self.head is not None:
            figures.update(head_lr=cfg.head_lr)
        if cfg.from_prompt is not None:
            figures.update(from_prompt=cfg.from_prompt)
        kept = {}  # going on: what the version said about itself stays (its sampling defaults, its description)
        if self.going_on is not None:
            kept = {k: self.going_on.meta[k] for k in ("generation", "description") if k in self.going_on.meta}
            if "from_prompt" in self.going_on.meta.get("metrics", {}):
                figures.setdefault("from_prompt", self.going_on.meta["metrics"]["from_prompt"])
        artifact = make_artifact(
            best_rows.float(),
            template=self.template_source,
            task_type=cfg.task_type,
            labels=self.labels or None,
            base_model=self.loaded.info,
            head=None if best_head is None else tuple(t.float() for t in best_head),
            metrics=figures,
            **(self._pooling_meta() if best_head is not None else {}),
            **kept,
        )
        yield Done(TrainResult(artifact=artifact, history=history))

    def _say(self, message: str) -> None:
        """A note the user should see once: on the terminal with progress output
        (`ptserve train`, whose log also reaches the terminal), else in the log."""
        if self.config.progress:
            print(message, flush=True)
        else:
            log.warning(message)

    def _show(self, metrics: dict, best: bool) -> None:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        note = " (manual prompt)" if metrics["epoch"] == 0 and self.config.from_prompt is not None else ""
        note += " (best)" if best else ""
        log.info("epoch %d: %s%s", metrics["epoch"], shown, note)
        if self.config.progress:
            print(f"epoch {metrics['epoch']}: {shown}{note}", flush=True)


def _last(passes: Generator):
    """Run a generator of passes to its end; -> what it returns."""
    while True:
        try:
            next(passes)
        except StopIteration as end:
            return end.value
