"""`sleigh train`: fine-tune GSWA (or more) on image/question/answer JSONL, on the PyTorch reference.

    JSONL ─group by image─► batch of B images ─tile_image (as the runtime)─► encode_images (ViT, mlp1, GSWA)
      each image's questions ─internlm2-chat prompt + answer + <|im_end|>─► one sequence each (right-padded)
      ─embed─► LLM with GSWA's log-weights as a differentiable attention bias ─► loss on answer tokens only
      (+ for synthetic data and a trained ViT: an auxiliary colour/shape loss on max-pooled patch tokens;
       + with --gswa-hint, in the curriculum: a loss on which tile GSWA's thumbnail attends to)

Why the curriculum and the auxiliary loss (FACTS.md, "Training a toy SleighVL on 2 CPU cores"): from
scratch, an LLM that reads ~100 image tokens with near-uniform attention never finds one small object
and the answer loss stays at chance. Easy views first (one or two tiles, large objects, drawn on the
fly by the synthetic task) plus a loss that asks the ViT directly for the object's colour and shape
get it started. Both are training-only: the saved checkpoint is a plain Sleigh checkpoint.

Reproducible: step k's batch and curriculum samples come from rng(seed, k), so the same seed gives the
same weights (on the same device and thread count), and --resume continues the same stream.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sleigh import staging
from sleigh.data.qa import read_qa
from sleigh.data.synth import COLOURS, SHAPES
from sleigh.errors import SleighError, check_seed, first_line, flag
from sleigh.runtime.image import max_views, object_tile
from sleigh.runtime.prompt import PromptTokenizer
from sleigh.sleighvl.batches import CURRICULUM, Batch, Batches, labels_of
from sleigh.sleighvl.checkpoint import TOKENIZER, load_checkpoint, save_checkpoint
from sleigh.sleighvl.step_memory import LineTokens, available_for, check_step_memory

PARTS = ("gswa", "projector", "vision", "llm")
STATE = "train_state.safetensors"
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
GSWA_FILE = "gswa.safetensors"
IGNORE = -100
WARMUP_STEPS = 50


@dataclass(frozen=True)
class TrainOptions:
    train: str = "gswa"
    steps: int | None = None
    minutes: float | None = None
    lr: float = 1e-3
    batch: int = 16
    micro_batch: int | None = None  # images a step runs at once (None: the whole batch); the same update either way
    seed: int = 0
    resume: bool = False
    curriculum: str = "auto"  # auto (on for synthetic data when the ViT trains), on, off
    curriculum_steps: int | None = None  # the curriculum's length in steps (None: the run's first half)
    aux_weight: float = 1.0
    gswa_hint: float = 0.0  # weight of the curriculum's loss on where GSWA's thumbnail looks (0: off)
    save_every: int = 200
    log_every: int = 25
    strict: bool = False
    questions_per_image: int = 3
    threads: int | None = None
    quiet: bool = False
    save_dtype: str = "float32"  # the checkpoint's float weights; the training state keeps float32 for --resume


def parse_parts(train: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in train.split(",") if p.strip())
    if parts == ("all",):
        return PARTS
    bad = [p for p in parts if p not in PARTS]
    if not parts or bad:
        raise SleighError("--train", f"got {train!r}", f"all, or a comma list of {', '.join(PARTS)} (e.g. gswa,projector)")
    return parts


def check_options(out: Path, opts: TrainOptions) -> tuple[str, ...]:
    parts = parse_parts(opts.train)
    if (opts.steps is None) == (opts.minutes is None):
        raise SleighError("--steps/--minutes", "give exactly one", "e.g. --steps 2000 or --minutes 20")
    if opts.steps is not None and opts.steps < 1:
        raise SleighError("--steps", f"got {opts.steps}", "a number of steps >= 1")
    if opts.minutes is not None and not (math.isfinite(opts.minutes) and opts.minutes > 0):
        raise SleighError("--minutes", f"got {opts.minutes}", "a positive, finite number of minutes")
    for name, value in (("--batch", opts.batch), ("--micro-batch", 1 if opts.micro_batch is None else opts.micro_batch),
                        ("--save-every", opts.save_every)):
        if value < 1:
            raise SleighError(name, f"got {value}", "an integer >= 1")
    if not (math.isfinite(opts.lr) and opts.lr > 0):
        raise SleighError("--lr", f"got {opts.lr}", "a positive, finite learning rate, e.g. 1e-3")
    check_seed("--seed", opts.seed)
    if opts.threads is not None and opts.threads < 1:
        raise SleighError("--threads", f"got {opts.threads}", "an integer >= 1")
    if opts.curriculum not in ("auto", "on", "off"):
        raise SleighError("--curriculum", f"got {opts.curriculum!r}", "auto, on or off")
    if opts.curriculum_steps is not None:
        if opts.steps is None:
            raise SleighError("--curriculum-steps", "needs --steps (with --minutes the curriculum follows the clock)",
                              "--steps N with --curriculum-steps below N")
        if not 0 < opts.curriculum_steps < opts.steps:
            raise SleighError("--curriculum-steps", f"got {opts.curriculum_steps} for {opts.steps} steps",
                              "a number of steps between 1 and --steps - 1")
    if not (math.isfinite(opts.gswa_hint) and opts.gswa_hint >= 0):
        raise SleighError("--gswa-hint", f"got {opts.gswa_hint}", "a weight >= 0 (0: off; e.g. 1)")
    if opts.gswa_hint and "gswa" not in parts:
        raise SleighError("--gswa-hint", f"needs GSWA trained, got --train {opts.train}", "--train all, or a list with gswa")
    if opts.save_dtype not in SAVE_DTYPES:
        raise SleighError("--save-dtype", f"got {opts.save_dtype!r}", " or ".join(SAVE_DTYPES))
    out = Path(out)
    if opts.resume:
        if not (out / STATE).is_file():
            raise SleighError(str(out), f"has no {STATE} to resume from", "the -o folder of an earlier `sleigh train`")
    elif out.is_dir() and any(out.iterdir()):
        raise SleighError(str(out), "output folder already exists", "a new folder, or --resume to continue training it")
    staging.check_output_dir(out)  # now, not at the first save after minutes of training
    return parts


# -- the differentiable pieces ---------------------------------------------------------------------


def attention_bias_rows(input_ids: torch.Tensor, weights: list[torch.Tensor], img_context_id: int,
                        tokens_per_view: int, min_weight: float, image_of_row: list[int]) -> torch.Tensor:
    """GSWA's attention bias (runtime.multimodal.image_attention_bias) with gradients: row j gets
    log(max(w_t, min_weight)) of its image's views on its <IMG_CONTEXT> positions, 0 elsewhere."""
    bias = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    rows = []
    for j, i in enumerate(image_of_row):
        per_token = torch.log(weights[i].float().clamp(min=min_weight)).repeat_interleave(tokens_per_view)
        is_img = input_ids[j] == img_context_id
        rows.append(torch.zeros_like(bias[j]).masked_scatter(is_img, per_token))
    return torch.stack(rows) if rows else bias


class AuxHead(nn.Module):
    """Training only: colour and shape of the object from the max over an image's patch tokens."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, len(COLOURS) + len(SHAPES))

    def forward(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """last_hidden (T, 1 + patches, Cv) -> logits (6 + 3,)."""
        return self.head(self.norm(last_hidden[:, 1:].amax(dim=(0, 1))))


@dataclass(frozen=True)
class Row:
    """One question about one image: its prompt ids, then the answer's ids (the loss reads these)."""
    image: int
    prompt: list[int]
    reply: list[int]


def shared_prefixes(rows: list[Row], images: int) -> list[int]:
    """Per image, how many leading ids all its rows share (system, image tokens, ...), stopping
    before each row's last prompt id, whose logits predict the first answer id."""
    out = []
    for i in range(images):
        mine = [r.prompt for r in rows if r.image == i]
        limit = min(len(p) for p in mine) - 1
        n = 0
        while n < limit and all(p[n] == mine[0][n] for p in mine):
            n += 1
        out.append(n)
    return out


def answer_logits(model, rows: list[Row], vis: list, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) for every row's answer, equal to running each row's whole sequence through
    the LLM (right-padded) but reading an image's shared prefix once: the prefixes run first (their
    keys and values kept, padding masked), then every row's rest attends over its image's prefix as
    cache slots. An image's 3 questions cost its ~100 image tokens once instead of three times.

    -> pred (N, V), gold (N,): the N positions of the rows' rests whose next id is an answer id, row
    by row (the LM head reads only those)."""
    cfg, dev = model.cfg, next(model.parameters()).device
    img, D = cfg.prompt.img_context_token_id, cfg.llm.hidden_size
    P = shared_prefixes(rows, len(vis))
    if any(img in r.prompt[P[r.image]:] for r in rows):
        raise SleighError("training prompt", "an image token follows the question", "the image before the question")
    longest = max(P)
    ids = torch.tensor([next(r.prompt for r in rows if r.image == i)[:n] + [pad] * (longest - n) for i, n in enumerate(P)],
                       device=dev)  # (I, P)
    mask = (torch.arange(longest, device=dev)[None] < torch.tensor(P, device=dev)[:, None]).long()
    bias = torch.zeros(ids.shape, device=dev)
    if cfg.gswa is not None and cfg.gswa.apply == "attention":
        bias = attention_bias_rows(ids, [v.gswa_weights for v in vis], img, cfg.vision.tokens_per_view,
                                   cfg.gswa.min_weight, list(range(len(vis))))
    embeds = model.embed(ids, torch.cat([v.image_embeds.reshape(-1, D) for v in vis]))
    positions = torch.arange(longest, device=dev)[None].expand_as(ids)
    _, kv = model.llm(embeds, mask, bias, positions, model.llm.empty_cache(len(vis), device=dev))

    of = torch.tensor([r.image for r in rows], device=dev)
    rest = [r.prompt[P[r.image]:] + r.reply for r in rows]
    labels = [[IGNORE] * (len(r.prompt) - P[r.image]) + r.reply for r in rows]
    S = max(map(len, rest))
    ids = torch.tensor([x + [pad] * (S - len(x)) for x in rest], device=dev)  # right padding: never attended by real ids
    gold = torch.tensor([x + [IGNORE] * (S - len(x)) for x in labels], device=dev)
    past = [(k.index_select(0, of), v.index_select(0, of)) for k, v in kv]
    mask = torch.cat([mask.index_select(0, of), torch.ones_like(ids)], dim=1)
    bias = torch.cat([bias.index_select(0, of), torch.zeros(ids.shape, device=dev)], dim=1)
    positions = torch.tensor(P, device=dev).index_select(0, of)[:, None] + torch.arange(S, device=dev)[None]
    scored = torch.cat([gold[:, 1:] != IGNORE, torch.zeros_like(gold[:, :1], dtype=torch.bool)], dim=1)  # (R, S)
    logits, _ = model.llm(model.embed(ids, torch.zeros(0, D, device=dev)), mask, bias, positions, past, logits_at=scored)
    return logits, gold[:, 1:][scored[:, :-1]]


# -- the loop --------------------------------------------------------------------------------------


class Diverged(Exception):
    """A step whose loss or gradients are not finite, or weights that are not (in the dtype they are
    saved in): what it would write is not a model. `step`: the run's step (1-based) it happened in."""

    def __init__(self, message: str, step: int = 0):
        super().__init__(message)
        self.step = step


class Trainer:
    def __init__(self, model, tok: PromptTokenizer, parts: tuple[str, ...], opts: TrainOptions, device: torch.device,
                 use_aux: bool):
        self.model, self.tok, self.opts, self.device = model, tok, opts, device
        cfg = model.cfg
        self.cfg = cfg
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in parts)
        self.aux = AuxHead(cfg.vision.hidden_size).to(device) if use_aux else None
        params = [p for p in model.parameters() if p.requires_grad]
        if self.aux is not None:
            params += list(self.aux.parameters())
        self.params = params
        # fused: one kernel for every parameter, 4 against 16 ms a step for the demo preset (benchmarks/RESULTS.md,
        # "A shorter recipe for 20 minutes"); CUDA and CPU both have it
        self.optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.01, fused=True)

    def lr_at(self, step: int, frac: float) -> float:
        warm = min(1.0, (step + 1) / WARMUP_STEPS)
        return self.opts.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    def step(self, batch: Batch, lr: float) -> dict:
        """One update from `batch`, run in parts of at most --micro-batch images, each part's gradients
        added up before the update: every loss term is a sum over its part divided by the whole batch's
        count (answer tokens, labelled images, images with a hint), so the update is the whole batch's
        at any part size, to float rounding. The parts share nothing but the weights."""
        self.model.train()
        examples, tiled = batch.examples, batch.tiled
        rows = [Row(i, self.tok.encode_prompt(question, t.num_views, tokens_per_view=self.cfg.vision.tokens_per_view),
                    self.tok.encode(answer, add_bos=False) + [self.tok.im_end_id])
                for i, (ex, t) in enumerate(zip(examples, tiled, strict=True)) for question, answer in ex.qas]
        counts = {"loss": sum(len(r.reply) for r in rows),  # every answer id is scored (answer_logits)
                  "aux": sum(ex.labels is not None for ex in examples) if self.aux is not None else 0,
                  "hint": sum(self._hinted(batch, ex, t) for ex, t in zip(examples, tiled, strict=True))}
        weights = {"loss": 1.0, "aux": self.opts.aux_weight, "hint": self.opts.gswa_hint}
        sums = dict.fromkeys(counts, 0.0) | {"correct": 0}
        self.optimizer.zero_grad(set_to_none=True)
        size = min(self.opts.micro_batch or len(examples), len(examples))
        for start in range(0, len(examples), size):
            part = self._part_sums(batch, range(start, min(start + size, len(examples))), rows)
            loss = sum(weights[k] * part[k] / counts[k] for k in counts if part[k] is not None)
            value = loss.item()
            if not math.isfinite(value):
                raise Diverged(f"the loss is {value}")
            loss.backward()
            for k, v in part.items():
                sums[k] += v.item() if isinstance(v, torch.Tensor) else v or 0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        try:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0, error_if_nonfinite=True)
        except RuntimeError:
            raise Diverged("the gradients are not finite") from None
        self.optimizer.step()
        mean = {k: sums[k] / counts[k] if counts[k] else None for k in ("aux", "hint")}
        return {"loss": sums["loss"] / counts["loss"], **mean, "token_acc": sums["correct"] / counts["loss"]}

    def _part_sums(self, batch: Batch, part: range, rows: list[Row]) -> dict:
        """The images `part` of `batch`: their loss terms as sums (tensors with gradients; None where the
        part has none of a term) and the count of answer ids predicted right."""
        model, dev = self.model, self.device
        examples, tiled = batch.examples[part.start:part.stop], batch.tiled[part.start:part.stop]
        # one ViT call for every view of the part (each view is encoded alone), then mlp1 and GSWA per image
        hidden = model.vision(torch.from_numpy(np.concatenate([t.pixel_values for t in tiled])).to(dev))
        vis = model.encode_batch(hidden, [t.num_views for t in tiled])
        hints = self._hint_terms(batch, examples, tiled, vis)
        aux = []
        if self.aux is not None:
            for v, ex in zip(vis, examples, strict=True):
                if ex.labels is not None:
                    logits = self.aux(v.last_hidden)
                    aux.append(F.cross_entropy(logits[:len(COLOURS)][None], torch.tensor([ex.labels[0]], device=dev))
                               + F.cross_entropy(logits[len(COLOURS):][None], torch.tensor([ex.labels[1]], device=dev)))
        mine = [Row(r.image - part.start, r.prompt, r.reply) for r in rows if r.image in part]
        pred, gold = answer_logits(model, mine, vis, pad=self.tok.eos_id)
        with torch.no_grad():
            correct = int((pred.argmax(-1) == gold).sum())
        return {"loss": F.cross_entropy(pred, gold, reduction="sum"), "aux": torch.stack(aux).sum() if aux else None,
                "hint": torch.stack(hints).sum() if hints else None, "correct": correct}

    def _hint_terms(self, batch: Batch, examples: list, tiled: list, vis: list) -> list[torch.Tensor]:
        """-log of the share of GSWA's thumbnail attention that goes to the object's tile, for each of
        `examples` (encoded as `vis`) that takes the hint (`_hinted`)."""
        out = []
        for v, ex, t in zip(vis, examples, tiled, strict=True):
            if self._hinted(batch, ex, t):
                a = self.model.gswa.thumbnail_attention(v.last_hidden[:, 0])[:-1]  # the tiles
                out.append(-torch.log(a[object_tile(t.grid, t.image_size, ex.box)] / a.sum()))
        return out

    def _hinted(self, batch: Batch, ex, t) -> bool:
        """Whether image `ex` (tiled `t`) of `batch` takes the --gswa-hint term: cross-entropy of where
        GSWA's thumbnail looks among the tiles (its attention, before the gate alpha) against the tile
        holding the object's centre, for the curriculum's multi-tile samples. It breaks GSWA's symmetry
        at start (alpha = 0 passes no gradient to the attention); how much the LLM leans on those
        weights (alpha) is still learned from the answers."""
        return bool(self.opts.gswa_hint) and batch.curriculum and ex.box is not None and t.num_views > 1

    # -- state ---------------------------------------------------------------------------------------

    def _named(self) -> dict[str, nn.Parameter]:
        named = dict(self.model.named_parameters())
        if self.aux is not None:
            named.update({f"aux.{n}": p for n, p in self.aux.named_parameters()})
        return named

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The auxiliary head and AdamW's moments, by parameter name (safetensors, never pickle), and
        with --save-dtype float16 the model's float32 weights (so --resume continues exactly)."""
        named = self._named()
        out = {n: p.detach().cpu().contiguous() for n, p in named.items() if n.startswith("aux.")}
        if self.opts.save_dtype != "float32":
            out.update({f"weights.{n}": t.detach().cpu().contiguous() for n, t in self.model.state_dict().items()
                        if t.is_floating_point()})
        for name, p in named.items():
            st = self.optimizer.state.get(p)
            if st:
                out[f"opt.{name}.exp_avg"] = st["exp_avg"].detach().cpu().contiguous()
                out[f"opt.{name}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().contiguous()
                out[f"opt.{name}.step"] = torch.as_tensor(st["step"]).reshape(1).float().cpu()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        named = self._named()
        with torch.no_grad():
            for name, p in named.items():
                if name.startswith("aux."):
                    p.copy_(state[name])
            for name, t in self.model.state_dict().items():
                if f"weights.{name}" in state:  # the float32 weights behind a float16 checkpoint
                    t.copy_(state[f"weights.{name}"])
        for name, p in named.items():
            if f"opt.{name}.exp_avg" in state and p.requires_grad:
                self.optimizer.state[p] = {
                    "step": state[f"opt.{name}.step"].reshape(()).to(torch.float32),
                    "exp_avg": state[f"opt.{name}.exp_avg"].to(self.device),
                    "exp_avg_sq": state[f"opt.{name}.exp_avg_sq"].to(self.device),
                }


@dataclass
class TrainResult:
    steps: int
    seconds: float
    last: dict
    skipped: dict
    lines: int
    images: int
    curriculum: bool
    device: str
    skipped_steps: int = 0  # of `steps`: steps whose batch had no image that decoded (no update)


# What a resumed run must share with the run it continues (the rest, --save-every, --threads,
# --strict, --save-dtype, --micro-batch (the same update in other parts), may change between sittings)
RESUMED_OPTIONS = ("train", "batch", "seed", "steps", "minutes", "lr", "curriculum", "curriculum_steps", "gswa_hint")


def train(ckpt: Path, data: Path, out: Path, opts: TrainOptions, log=print) -> TrainResult:
    """Train, saving `out` (a Sleigh checkpoint + train_state.safetensors) every `save_every` steps and at the end."""
    from safetensors.torch import save_file

    from sleigh.progress import bars_enabled, progress
    from sleigh.sleighvl.checkpoint import read_safetensors

    out = Path(out)
    parts = check_options(out, opts)
    saved = _saved_run(out, opts, ckpt, data) if opts.resume else None
    source = out if opts.resume else Path(ckpt)
    model, cfg, generation = load_checkpoint(source)
    if "gswa" in parts and cfg.gswa is None:
        raise SleighError(str(ckpt), "has no GSWA module to train (gswa is null in config.json)",
                          "a checkpoint with GSWA: `sleigh convert --gswa identity`, or --train without gswa")
    tok = PromptTokenizer.from_file(source / TOKENIZER)
    qa = read_qa(data, strict=opts.strict)
    texts = _leave_out_past_context(qa, tok, cfg, opts.strict)
    if qa.skipped:
        log(f"skipped {sum(qa.skipped.values())} of {sum(qa.skipped.values()) + len(qa.items)} lines: {qa.skipped_text()}")
    if not qa.items:
        raise SleighError(str(data), "no line left to train on", "lines whose question and answer fit the model's context")

    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(opts.seed)
    model = model.to(device)
    synthetic = any(labels_of(x) is not None for x in qa.items[:50])
    curriculum = opts.curriculum == "on" or (opts.curriculum == "auto" and synthetic and "vision" in parts)
    for option in ("gswa_hint", "curriculum_steps"):
        if getattr(opts, option) and not curriculum:
            raise SleighError(flag(option), "acts only during the curriculum, which is off for this run",
                              "synthetic data (sleigh data synth) with --train all, or --curriculum on")
    trainer = Trainer(model, tok, parts, opts, device, use_aux=synthetic and "vision" in parts)
    training = {q.image: qa.sizes[q.image] for q in qa.items if q.image in qa.sizes}  # the lines left in
    tight = check_step_memory(cfg, parts, training, opts.batch, opts.micro_batch, sum(p.numel() for p in trainer.params),
                              *available_for(device), curriculum=curriculum, texts=texts)
    if tight:
        log(tight)
    batches = Batches(qa, opts, curriculum, cfg)
    if len(batches.groups) < opts.batch:
        log(f"--batch {opts.batch} is more than the {len(batches.groups)} images of {qa.path}: each step repeats images")

    step, elapsed_before, skipped_before = 0, 0.0, 0
    provenance = {"data": str(Path(qa.path).resolve()), "source": str(Path(ckpt).resolve())}
    if saved is not None:
        step, elapsed_before = int(saved["step"]), float(saved["seconds"])
        skipped_before = int(saved.get("skipped_steps", 0))
        provenance = {"data": saved["data"], "source": saved["source"]}  # the run's, not this sitting's paths
        trainer.load_state(read_safetensors(out / STATE))
        log(f"resuming {out} at step {step}")
    last_saved = step if saved is not None else None

    def save(step: int, seconds: float, skipped_steps: int) -> None:
        nonlocal last_saved
        top = torch.finfo(SAVE_DTYPES[opts.save_dtype]).max  # past it a float16 save holds inf
        if not all(bool(torch.isfinite(p).all()) and float(p.detach().abs().max()) <= top for p in trainer.params):
            raise Diverged(f"the weights are not finite in {opts.save_dtype}", step)
        meta = {"step": step, "seconds": seconds, "skipped_steps": skipped_steps, "options": asdict(opts), **provenance}

        def write_state(folder: Path) -> None:
            save_file(trainer.state_tensors(), str(folder / STATE), metadata={"train": json.dumps(meta)})
            if cfg.gswa is not None:  # GSWA alone, for `sleigh convert --gswa PATH`
                g = cfg.gswa
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith("gswa.")},
                          str(folder / GSWA_FILE), metadata={"num_heads": str(g.num_heads), "apply": g.apply,
                                                             "layer_norm_eps": str(g.layer_norm_eps)})

        save_checkpoint(out, model, tok.tokenizer, generation, force=True, extra=write_state,
                        dtype=SAVE_DTYPES[opts.save_dtype], keep_others=True)  # a run's log, notes... stay
        last_saved = step

    total = opts.steps if opts.steps is not None else None
    budget_s = None if opts.minutes is None else 60.0 * opts.minutes
    t0 = time.perf_counter()
    last: dict = {}
    bad_batches = 0
    shown = False  # a progress line of this sitting yet
    show_lines = not opts.quiet and not bars_enabled(opts.quiet)
    try:
        with progress("train", total if total else budget_s, opts.quiet, lines=False) as bar, batches:
            while True:
                seconds = elapsed_before + time.perf_counter() - t0
                frac = step / total if total else seconds / budget_s
                if frac >= 1:
                    break
                phase = batches.phase(step, frac)
                known, at = len(batches.undecodable), step
                try:
                    batch = batches.make(step, phase)
                except SleighError as e:  # every image of the batch passed the header check but cannot be decoded
                    if opts.strict:
                        raise
                    bad_batches += 1
                    log(f"step {step + 1}: skipped, {e.problem}")  # 1-based, as the progress lines count
                    step += 1
                    continue
                finally:
                    for source in list(batches.undecodable)[known:]:  # each image once: it leaves every batch it is drawn in
                        log(f"step {at + 1}: left out {source}: {batches.undecodable[source]}")
                try:
                    last = trainer.step(batch, trainer.lr_at(step, frac))
                except Diverged as e:
                    raise Diverged(str(e), step + 1) from None
                step += 1
                now = elapsed_before + time.perf_counter() - t0
                speed = step / max(now, 1e-9)
                aux = "" if last["aux"] is None else f" aux {last['aux']:.3f}"
                aux += "" if last["hint"] is None else f" hint {last['hint']:.3f}"
                text = (f"train [{_phase_name(phase)}] loss {last['loss']:.3f}{aux} answer-token acc {last['token_acc']:.2f}"
                        f" {speed:.2f} steps/s")
                bar.advance(1 if total else now - seconds, description=text)
                if show_lines and (step % opts.log_every == 0 or not shown):  # and the sitting's first step trained
                    shown = True
                    log(f"step {step}{'/' + str(total) if total else ''} {now:.0f} s: {text[6:]}")
                if step % opts.save_every == 0:
                    save(step, now, skipped_before + bad_batches)
        seconds = elapsed_before + time.perf_counter() - t0
        if not last and bad_batches:  # every batch was skipped: saving would call unchanged weights trained
            first = next(iter(batches.undecodable.items()), ("", ""))
            raise SleighError(str(data), f"no step trained: no image of any batch could be decoded ({len(batches.undecodable)} "
                              f"images; first {first[0]}: {first[1]})", "images that decode (--strict stops at the first bad one)")
        if not last:
            raise SleighError(f"--minutes {opts.minutes:g}", f"no step trained in {seconds:.1f} s (the first step had not "
                              "begun when the time was up)", "a budget of at least a step's time, e.g. --minutes 1")
        save(step, seconds, skipped_before + bad_batches)
    except KeyboardInterrupt:
        log(f"interrupted at step {step}: " + (f"{out} holds step {last_saved}; the same command with --resume goes on"
                                               if last_saved is not None else "nothing was saved"))
        raise
    except Diverged as e:
        kept = f"{out} keeps its save of step {last_saved}" if last_saved is not None else "nothing was saved"
        raise SleighError(f"step {e.step}", f"{e}: the run diverged ({kept})",
                          f"a smaller --lr than {opts.lr:g}, or fewer parts trained (--train)") from None
    skipped = dict(qa.skipped)
    if batches.undecodable:
        skipped["undecodable images"] = len(batches.undecodable)
    return TrainResult(step, seconds, last, skipped, len(qa.items), len(batches.groups), curriculum, str(device),
                       skipped_before + bad_batches)


def _saved_run(out: Path, opts: TrainOptions, ckpt: Path, data: Path) -> dict:
    """The metadata of the run saved in `out`, checked against this sitting: a damaged state file, a
    finished run, or other options, checkpoint or data than the run's are one line each."""
    state = out / STATE
    try:
        meta = run_record(state)
        int(meta["step"]), float(meta["seconds"]), meta["options"].items()
    except Exception as e:  # noqa: BLE001 - safetensors' and json's errors, a key missing: the file is not a run's
        raise SleighError(str(state), f"holds no readable training state ({type(e).__name__}: {first_line(e)})",
                          "the -o folder of an earlier `sleigh train`, as it saved it") from None
    saved_options = {key: meta["options"].get(key, getattr(TrainOptions(), key)) for key in RESUMED_OPTIONS}  # runs
    if (saved_options["steps"] is None) != (opts.steps is None):  # saved before an option existed: its default
        def schedule(o):
            return f"--steps {o['steps']}" if o["steps"] is not None else f"--minutes {o['minutes']}"

        raise SleighError(f"--resume {out}", f"{schedule(asdict(opts))} differs from the saved run's {schedule(saved_options)}",
                          "the options of the run being resumed")
    for key in RESUMED_OPTIONS:
        saved = saved_options[key]
        if key == "train" and _same_parts(saved, opts.train):
            continue
        if saved != getattr(opts, key):
            longer = (f"; to train past its end, a new run that starts from it (sleigh train {out} --data ... -o NEW; "
                      "its optimizer starts afresh)") if key in ("steps", "minutes") else ""
            raise SleighError(f"--resume {out}", f"{flag(key)} {getattr(opts, key)} differs from the saved run's "
                              f"{saved}", f"the options of the run being resumed{longer}")
    for what, given in (("CHECKPOINT", Path(ckpt)), ("--data", Path(data))):
        recorded = meta.get("source" if what == "CHECKPOINT" else "data")
        # a relative path (a run saved before absolute ones were) is relative to a folder not recorded
        if recorded is not None and Path(recorded).is_absolute() and not _same_path(given, Path(recorded), jsonl=what == "--data"):
            raise SleighError(f"--resume {out}", f"{what} {given} is not the saved run's {recorded}",
                              "the checkpoint and data of the run being resumed")
    step, seconds = int(meta["step"]), float(meta["seconds"])
    if (opts.steps is not None and step >= opts.steps) or (opts.minutes is not None and seconds >= 60 * opts.minutes):
        raise SleighError(f"--resume {out}", f"the run is already complete ({step} steps, {seconds / 60:.1f} min)",
                          f"a new run that starts from it: sleigh train {out} --data ... -o NEW")
    return meta


def _same_parts(a: str, b: str) -> bool:
    """Two --train values that train the same parts (gswa,projector and projector,gswa; all and every part)."""
    try:
        return set(parse_parts(a)) == set(parse_parts(b))
    except SleighError:
        return False


def _same_path(given: Path, recorded: Path, jsonl: bool) -> bool:
    """Whether two paths name the same file. A data folder names its one .jsonl."""
    from sleigh.data.qa import resolve_jsonl

    def real(p: Path) -> Path:
        try:
            return (resolve_jsonl(p) if jsonl else p).resolve()
        except SleighError:
            return p.absolute()

    return real(given) == real(recorded)


def _leave_out_past_context(qa, tok: PromptTokenizer, cfg, strict: bool) -> dict:
    """Lines whose prompt and answer would run past the model's context with an image of the model's most
    views are left out (counted in `qa.skipped`; `sleigh eval` skips a line on its own image's views,
    so it may keep a long line with a small image); under --strict, refused. -> per image, what the
    memory guard reads of its lines (step_memory.LineTokens)."""
    context, views = cfg.llm.max_position_embeddings, max_views(cfg.image.max_tiles, cfg.image.thumbnail)
    template = len(tok.encode_prompt("", views, tokens_per_view=cfg.vision.tokens_per_view))  # BOS, turns, image
    kept, lines = [], {}
    for item in qa.items:  # the question's and the answer's ids (within a token of the template's joins) and <|im_end|>
        question, answer = tok.encode(item.question, add_bos=False), len(tok.encode(item.answer, add_bos=False))
        n = template + len(question) + answer + 1
        if n <= context:
            kept.append(item)
            lines.setdefault(item.image, LineTokens()).add(question, answer)  # not every line's ids held
            continue
        if strict:
            raise SleighError(f"{qa.path}:{item.line}", f"question and answer take {n} tokens with "
                              f"{views} views, past the model's context of {context}", "shorter lines")
        qa.skipped["past the context"] += 1
        qa.first_skipped.setdefault("past the context", item.line)
    qa.items[:] = kept
    return {image: mine.counts() for image, mine in lines.items()}


def _phase_name(phase: int) -> str:
    if phase >= len(CURRICULUM):
        return "data"
    _, tiles, (lo, hi) = CURRICULUM[phase]
    return f"warm-up {phase + 1}/{len(CURRICULUM)}: {tiles} tile{'s' if tiles > 1 else ''}, {lo}-{hi} px"


def run_record(state: Path) -> dict:
    """What `sleigh train` saved beside its state (step, seconds, options, data, source): any failure to
    read it is the caller's to word (KeyError where the file has none)."""
    from safetensors import safe_open

    with safe_open(str(state), "pt") as f:
        return json.loads((f.metadata() or {})["train"])
