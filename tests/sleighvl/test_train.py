"""`sleigh train` on the demo preset, a few steps at a time (CPU):

- the differentiable GSWA bias equals the runtime's `image_attention_bias` and carries a gradient;
- the same seed gives the same weights, another seed other weights;
- `--train gswa` changes GSWA's tensors and nothing else;
- an interrupted run keeps its last saved checkpoint, and --resume from it ends where an
  uninterrupted run ends;
- bad input (missing/unreadable image, empty answer, no GSWA, existing output): one line, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sleigh.data.synth import SynthSpec, write_split
from sleigh.errors import SleighError
from sleigh.runtime.multimodal import image_attention_bias
from sleigh.sleighvl import train as train_mod
from sleigh.sleighvl.train import TrainOptions, attention_bias_rows, train
from tests.helpers import one_error_line, run_sleigh

FEW = dict(steps=2, batch=2, threads=1, quiet=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_split(tmp_path_factory.mktemp("data"), 4, seed=0, spec=SynthSpec(min_size=224, max_size=336))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_gswa_bias_rows_match_the_runtime_and_carry_a_gradient():
    img, tpv = 7, 3
    # two images (3 views, 1 view); rows 0 and 2 show image 0, row 1 image 1; text ids around them
    ids = torch.tensor([[1, 5] + [img] * 9 + [6, 2],
                        [1, 5, 5] + [img] * 3 + [6] * 7,
                        [1] + [img] * 9 + [6, 6, 6]])
    w0 = torch.tensor([0.5, 2.0, 1.0], requires_grad=True)
    w1 = torch.tensor([1.0], requires_grad=True)
    got = attention_bias_rows(ids, [w0, w1], img, tpv, 1e-4, [0, 1, 0])
    for row, w in ((0, w0), (1, w1), (2, w0)):
        ref = image_attention_bias(ids[row:row + 1].numpy(), w.detach().numpy(), img, tpv, 1e-4)
        np.testing.assert_allclose(got[row:row + 1].detach().numpy(), ref, rtol=1e-6)
    got.sum().backward()
    assert w0.grad is not None and float(w0.grad.abs().sum()) > 0


def test_shared_prefix_loss_and_gradients_equal_whole_sequences(demo_ckpt):
    """The trainer reads an image's prefix once (train.answer_logits); the reference is each row's
    whole sequence through the LLM, right-padded, as a plain causal LM would run it."""
    import torch.nn.functional as F

    from sleigh.data.synth import SynthSpec as Spec, questions, render
    from sleigh.runtime.image import tile_image
    from sleigh.runtime.prompt import PromptTokenizer
    from sleigh.sleighvl.checkpoint import load_checkpoint

    model, cfg, _ = load_checkpoint(demo_ckpt)
    tok = PromptTokenizer.from_file(demo_ckpt / "tokenizer.json")
    rng = np.random.default_rng(3)
    samples = [render(rng, Spec(min_size=224, max_size=560)) for _ in range(3)]
    tiled = [tile_image(s.image, max_tiles=cfg.image.max_tiles, size=cfg.vision.image_size, mean=cfg.image.mean,
                        std=cfg.image.std) for s in samples]
    assert len({t.num_views for t in tiled}) > 1  # prefixes of different lengths: padding is exercised
    rows = [train_mod.Row(i, tok.encode_prompt(q, t.num_views, tokens_per_view=cfg.vision.tokens_per_view),
                          tok.encode(a, add_bos=False) + [tok.im_end_id])
            for i, (s, t) in enumerate(zip(samples, tiled)) for _, q, a in questions(s, rng)][:-1]  # 3, 3, 2 rows

    def loss_and_grads(fn):
        model.zero_grad()
        vis = [model.encode_images(torch.from_numpy(t.pixel_values)) for t in tiled]
        pred, gold = fn(vis)
        loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), gold.reshape(-1), ignore_index=train_mod.IGNORE)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def whole(vis):
        seqs = [r.prompt + r.reply for r in rows]
        S = max(map(len, seqs))
        ids = torch.tensor([x + [tok.eos_id] * (S - len(x)) for x in seqs])
        gold = torch.tensor([[train_mod.IGNORE] * len(r.prompt) + r.reply + [train_mod.IGNORE] * (S - len(x))
                             for r, x in zip(rows, seqs)])
        embeds = model.embed(ids, torch.cat([vis[r.image].image_embeds.reshape(-1, cfg.llm.hidden_size) for r in rows]))
        bias = attention_bias_rows(ids, [v.gswa_weights for v in vis], cfg.prompt.img_context_token_id,
                                   cfg.vision.tokens_per_view, cfg.gswa.min_weight, [r.image for r in rows])
        positions = torch.arange(S)[None].expand_as(ids)
        logits, _ = model.llm(embeds, torch.ones_like(ids), bias, positions, model.llm.empty_cache(len(rows)),
                              logits_at=torch.ones(ids.shape, dtype=torch.bool))
        return logits.reshape(*ids.shape, -1)[:, :-1], gold[:, 1:]

    ref_loss, ref_grads = loss_and_grads(whole)
    got_loss, got_grads = loss_and_grads(lambda vis: train_mod.answer_logits(model, rows, vis, tok.eos_id))
    assert got_loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(got_grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert train_mod.shared_prefixes(rows, 3)[0] > cfg.vision.tokens_per_view * tiled[0].num_views


def test_same_seed_same_weights_other_seed_other_weights(demo_ckpt, data, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(demo_ckpt, data, tmp_path / name, TrainOptions(train="all", seed=seed, **FEW), log=lambda m: None)
    a, b, c = (weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(a[k], weights(demo_ckpt)[k]) for k in a)


def test_images_tiled_on_threads_give_the_weights_of_tiling_them_in_turn(demo_ckpt, data, tmp_path, monkeypatch):
    opts = TrainOptions(train="all", steps=4, batch=2, threads=1, quiet=True)
    train(demo_ckpt, data, tmp_path / "threads", opts, log=lambda m: None)

    class InTurn:  # an executor that tiles each image when asked, in the training thread
        def __init__(self, *a, **k):
            pass

        def shutdown(self, *a, **k):
            pass

        def map(self, fn, *iterables):
            return map(fn, *iterables)

    from sleigh.sleighvl import batches as batches_mod

    monkeypatch.setattr(batches_mod, "ThreadPoolExecutor", InTurn)
    train(demo_ckpt, data, tmp_path / "in-turn", opts, log=lambda m: None)
    a, b = weights(tmp_path / "threads"), weights(tmp_path / "in-turn")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gswa_hint_is_minus_log_of_the_object_tiles_share_and_pulls_gswa_towards_it(demo_ckpt, data, tmp_path):
    """--gswa-hint: -log of the share of the thumbnail's attention that goes to the tile holding the
    object (the tile `sleigh eval` checks GSWA's top weight against); a step down its gradient raises it."""
    from sleigh.data.qa import read_qa
    from sleigh.evaluate import top_tile_holds_object
    from sleigh.runtime.prompt import PromptTokenizer
    from sleigh.sleighvl.batches import Batches
    from sleigh.sleighvl.checkpoint import load_checkpoint

    model, cfg, _ = load_checkpoint(demo_ckpt)
    tok = PromptTokenizer.from_file(demo_ckpt / "tokenizer.json")
    opts = TrainOptions(train="all", steps=10, batch=4, gswa_hint=1.0)
    batch = Batches(read_qa(data), opts, True, cfg).make(7, 2)  # the four-tile phase
    assert batch.curriculum and all(ex.box for ex in batch.examples)
    assert any(t.num_views > 1 for t in batch.tiled)
    trainer = train_mod.Trainer(model, tok, train_mod.PARTS, opts, torch.device("cpu"), use_aux=True)

    def hint_loss():
        model.zero_grad()
        vis = [model.encode_images(torch.from_numpy(t.pixel_values)) for t in batch.tiled]
        return torch.stack(trainer._hint_terms(batch, batch.examples, batch.tiled, vis)).mean()

    hint = hint_loss()
    with torch.no_grad():  # the reference: the object's tile found by `sleigh eval`'s rule, its share by hand
        ref = []
        for ex, t in zip(batch.examples, batch.tiled):
            if t.num_views > 1:
                a = model.gswa.thumbnail_attention(model.encode_images(torch.from_numpy(t.pixel_values)).last_hidden[:, 0])
                share = (a[:-1] / a[:-1].sum()).tolist()
                hit = [i for i in range(len(share))
                       if top_tile_holds_object([float(i == j) for j in range(len(share))] + [1.0], t.grid, t.image_size, ex.box)]
                ref.append(-np.log(share[hit[0]]))
    assert hint.item() == pytest.approx(float(np.mean(ref)), rel=1e-5)
    hint.backward()
    with torch.no_grad():
        for p in model.gswa.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    assert hint_loss().item() < hint.item()
    # in a run, the hint acts in the curriculum's multi-tile steps only (of 10 steps, 2 to 4) and moves GSWA
    runs = {}
    for hint in (0.0, 1.0):
        opts = TrainOptions(train="all", steps=10, batch=2, threads=1, quiet=True, gswa_hint=hint)
        runs[hint] = train(demo_ckpt, data, tmp_path / f"hint-{hint}", opts, log=lambda m: None)
    assert runs[1.0].last["hint"] is None  # the last step reads the data
    a, b = weights(tmp_path / "hint-0.0"), weights(tmp_path / "hint-1.0")
    assert not torch.equal(a["gswa.final_qk.weight"], b["gswa.final_qk.weight"])


def test_micro_batches_give_the_whole_batchs_update(demo_ckpt, data):
    """--micro-batch: a step run in parts of 1 or 3 images has the gradients and the metrics of the
    whole batch of 4 run at once (each loss term a sum over its part over the whole batch's count), for
    every term: the answers, the auxiliary head's labels and the GSWA hint of a curriculum batch."""
    from dataclasses import replace

    from sleigh.data.qa import read_qa
    from sleigh.runtime.prompt import PromptTokenizer
    from sleigh.sleighvl.batches import Batches
    from sleigh.sleighvl.checkpoint import load_checkpoint

    tok = PromptTokenizer.from_file(demo_ckpt / "tokenizer.json")
    opts = TrainOptions(train="all", steps=10, batch=4, gswa_hint=1.0)
    cfg = load_checkpoint(demo_ckpt)[1]
    batch = Batches(read_qa(data), opts, True, cfg).make(7, 2)  # the four-tile phase: labels, boxes, several views
    assert sum(t.num_views > 1 for t in batch.tiled) >= 2
    got = {}
    for micro in (None, 1, 3):
        model = load_checkpoint(demo_ckpt)[0]
        torch.manual_seed(0)  # the auxiliary head's initial weights
        trainer = train_mod.Trainer(model, tok, train_mod.PARTS, replace(opts, micro_batch=micro), torch.device("cpu"),
                                    use_aux=True)
        metrics = trainer.step(batch, lr=0.0)  # the gradients stay on the parameters after the update
        got[micro] = metrics, {n: p.grad.clone() for n, p in trainer._named().items() if p.grad is not None}
    whole, whole_grads = got[None]
    assert whole["aux"] is not None and whole["hint"] is not None
    for micro in (1, 3):
        metrics, grads = got[micro]
        assert metrics == pytest.approx(whole, rel=1e-5), micro
        assert set(grads) == set(whole_grads)
        for name, g in whole_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7, msg=f"--micro-batch {micro}: {name}")


def test_curriculum_phases_by_fraction_or_by_steps():
    from sleigh.sleighvl.batches import Batches

    def phases(steps, **opts):
        b = Batches.__new__(Batches)
        b.curriculum, b.opts = True, TrainOptions(steps=steps, **opts)
        return [b.phase(k, k / steps) for k in range(steps)]

    # by default the run's first half, in phases of 20 / 15 / 15 % of the run
    assert phases(20) == [0] * 4 + [1] * 3 + [2] * 3 + [3] * 10
    # --curriculum-steps 10 of 17: 40 / 30 / 30 % of the curriculum, then the data
    assert phases(17, curriculum_steps=10) == [0] * 4 + [1] * 3 + [2] * 3 + [3] * 7


def test_train_gswa_changes_only_gswa(demo_ckpt, data, tmp_path):
    train(demo_ckpt, data, tmp_path / "g", TrainOptions(train="gswa", **FEW), log=lambda m: None)
    before, after = weights(demo_ckpt), weights(tmp_path / "g")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith("gswa.") for k in changed), changed
    # GSWA alone, as `sleigh convert --gswa PATH` reads it
    from sleigh.sleighvl.config import SleighVLConfig
    from sleigh.sleighvl.convert import load_gswa_file

    cfg = SleighVLConfig.load(demo_ckpt / "config.json")
    gcfg, alone = load_gswa_file(tmp_path / "g" / train_mod.GSWA_FILE, cfg)
    assert gcfg == cfg.gswa and set(changed) <= set(alone) and all(k.startswith("gswa.") for k in alone)
    assert all(torch.equal(alone[k], after[k]) for k in alone)
    # the output is a plain Sleigh checkpoint: the runtime's torch backend loads it
    from sleigh.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tmp_path / "g")
    assert pipe.generate(None, "Hi", max_new_tokens=2).result.token_ids


@pytest.mark.parametrize("save_dtype", ["float32", "float16"])
def test_interrupted_run_keeps_its_last_save_and_resume_ends_where_a_straight_run_ends(demo_ckpt, data, tmp_path,
                                                                                        monkeypatch, save_dtype):
    """float16: the weights are the float32 run's, cast (the state keeps float32 for --resume)."""
    opts = TrainOptions(train="all", steps=4, batch=2, threads=1, quiet=True, save_every=2)
    train(demo_ckpt, data, tmp_path / "straight", opts, log=lambda m: None)
    opts = TrainOptions(**{**opts.__dict__, "save_dtype": save_dtype})

    real_step, calls = train_mod.Trainer.step, []

    def interrupted(self, batch, lr):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(self, batch, lr)

    monkeypatch.setattr(train_mod.Trainer, "step", interrupted)
    said = []
    with pytest.raises(KeyboardInterrupt):
        train(demo_ckpt, data, tmp_path / "cut", opts, log=said.append)
    assert said[-1] == f"interrupted at step 3: {tmp_path / 'cut'} holds step 2; the same command with --resume goes on"
    monkeypatch.setattr(train_mod.Trainer, "step", real_step)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cut" / train_mod.STATE), "pt") as f:
        assert json.loads(f.metadata()["train"])["step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    train(demo_ckpt, data, tmp_path / "cut", TrainOptions(**{**opts.__dict__, "resume": True}), log=lambda m: None)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    dtype = getattr(torch, save_dtype)
    assert {v.dtype for v in b.values() if v.is_floating_point()} == {dtype}
    assert set(a) == set(b) and all(torch.equal(a[k].to(dtype) if a[k].is_floating_point() else a[k], b[k]) for k in a)


def test_saves_keep_what_else_the_runs_folder_holds(demo_ckpt, data, tmp_path, monkeypatch):
    """A save replaces the run's folder with a staged one: notes, evaluations and a log written beside
    the checkpoint (examples/demo-ckpt keeps its train.log there) were gone after --resume. They stay,
    with their own modes, and a log still open for appending goes on in the new folder. (The resumed run
    names its --train parts in another order: the same parts, not a refusal.)"""
    out = tmp_path / "out"
    opts = TrainOptions(steps=2, batch=2, threads=1, quiet=True, save_every=1, train="gswa,projector")
    real_step, calls = train_mod.Trainer.step, []

    def interrupted(self, batch, lr):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(self, batch, lr)

    monkeypatch.setattr(train_mod.Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(demo_ckpt, data, out, opts, log=lambda m: None)
    monkeypatch.setattr(train_mod.Trainer, "step", real_step)
    (out / "NOTES.txt").write_text("notes")
    (out / "NOTES.txt").chmod(0o600)
    (out / "evals").mkdir()
    (out / "evals" / "run1.json").write_text("{}")
    (out / "latest").symlink_to("evals/run1.json")
    with open(out / "train.log", "a") as log_file:
        log_file.write("before\n")
        log_file.flush()
        train(demo_ckpt, data, out, TrainOptions(**{**opts.__dict__, "resume": True, "train": "projector,gswa"}),
              log=lambda m: None)
        log_file.write("after\n")
    assert (out / "NOTES.txt").read_text() == "notes" and (out / "NOTES.txt").stat().st_mode & 0o777 == 0o600
    assert (out / "evals" / "run1.json").read_text() == "{}" and os.readlink(out / "latest") == "evals/run1.json"
    assert (out / "train.log").read_text() == "before\nafter\n"
    assert json.loads(load_file_meta(out)["train"])["step"] == 2  # and the checkpoint is the resumed run's


def load_file_meta(folder: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(folder / train_mod.STATE), "pt") as f:
        return f.metadata()


# -- bad input ---------------------------------------------------------------------------------------


def bad_data(tmp_path: Path, data: Path, kind: str) -> Path:
    """A copy of `data` whose second line is broken in one way."""
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    root = tmp_path / f"bad-{kind}"
    shutil.copytree(data.parent, root)
    if kind == "missing image":
        lines[1]["image"] = "train/nope.jpg"
    elif kind == "unreadable image":
        (root / "train" / "broken.jpg").write_bytes(b"not a jpeg at all")
        lines[1]["image"] = "train/broken.jpg"
    elif kind == "empty answer":
        lines[1]["answer"] = "  "
    path = root / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("kind", ["missing image", "unreadable image", "empty answer"])
def test_bad_line_is_refused_with_its_number_under_strict_and_counted_otherwise(demo_ckpt, data, tmp_path, kind):
    path = bad_data(tmp_path, data, kind)
    with pytest.raises(SleighError, match=f"train.jsonl:2 \\| {kind}"):
        train(demo_ckpt, path, tmp_path / "out", TrainOptions(strict=True, **FEW), log=lambda m: None)
    assert not (tmp_path / "out").exists()
    said = []
    r = train(demo_ckpt, path, tmp_path / "out", TrainOptions(**FEW), log=said.append)
    assert r.skipped == {kind: 1} and r.lines == 11
    assert any(f"skipped 1 of 12 lines: 1 {kind} (first on line 2)" in m for m in said), said


@pytest.mark.slow
def test_checkpoint_without_gswa_is_refused_for_train_gswa(demo_ckpt, data, tmp_path):
    no_gswa = tmp_path / "no-gswa"
    shutil.copytree(demo_ckpt, no_gswa)
    cfg = json.loads((no_gswa / "config.json").read_text())
    cfg["gswa"] = None
    (no_gswa / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in weights(demo_ckpt).items() if not k.startswith("gswa.")}, str(no_gswa / "model.safetensors"))
    line = one_error_line(run_sleigh("train", no_gswa, "--data", data, "-o", tmp_path / "out", "--steps", "1"))
    assert "has no GSWA module" in line
    assert not (tmp_path / "out").exists()


def _cut_jpeg(path: Path) -> Path:
    """A JPEG whose header is whole and whose scan is cut: it passes read_qa's check, fails to decode."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[:len(buf.getvalue()) * 2 // 3])
    return path


def test_an_undecodable_image_leaves_its_batches_and_the_rest_trains(demo_ckpt, data, tmp_path):
    """One image that fails to decode leaves the batches it is drawn in, the others in them train;
    where that leaves a batch empty the step is skipped; where no step trained, it is an error and no
    output is written that would say otherwise."""
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    root = tmp_path / "d"
    shutil.copytree(data.parent, root)
    _cut_jpeg(root / "cut.jpg")
    lines[0]["image"] = "cut.jpg"  # the first image's first question; its other lines still show it whole
    lines += [{**lines[0], "question": f"Question {i}?"} for i in range(4)]  # 5 questions: drawn 3 at a time
    (root / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    said = []
    r = train(demo_ckpt, root / "d.jsonl", tmp_path / "out", TrainOptions(**{**FEW, "steps": 4}), log=said.append)
    assert r.skipped == {"undecodable images": 1} and r.steps == 4, (r.skipped, said)
    assert sum("left out" in m and "cut.jpg" in m for m in said) == 1, said
    changed = [k for k, v in weights(tmp_path / "out").items() if not torch.equal(v, weights(demo_ckpt)[k])]
    assert changed

    # the first step draws the bad image alone: skipped, and said so by the step's 1-based number, as the
    # progress lines count (it said "step 0"), and the first step that trains still gets its progress line
    seed = next(s for s in range(100) if np.random.default_rng([s, 1_000_003, 0]).permutation(2)[0] == 0)
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps({**lines[i], "image": str(root / lines[i]["image"])}) + "\n" for i in (0, 3)))
    said = []
    r = train(demo_ckpt, two, tmp_path / "two", TrainOptions(steps=3, batch=1, threads=1, seed=seed, log_every=100),
              log=said.append)
    assert r.skipped_steps >= 1 and said[0].startswith("step 1: skipped, no image of its batch could be decoded"), said
    assert said[1].startswith("step 1: left out ") and "cut.jpg" in said[1], said
    assert any(m.startswith("step 2/3 ") for m in said), said

    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("".join(json.dumps({"image": str(root / "cut.jpg"), "question": q, "answer": "red"}) + "\n"
                                for q in ("What colour?", "Which colour?")))
    with pytest.raises(SleighError, match="no step trained: no image of any batch could be decoded") as e:
        train(demo_ckpt, only_bad, tmp_path / "none", TrainOptions(**FEW), log=lambda m: None)
    assert str(e.value).count("Expected:") == 1, str(e.value)  # the image's own remedy (sleigh run's flags) left out
    assert not (tmp_path / "none").exists()


def test_existing_output_folder_is_refused_and_left_alone(demo_ckpt, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_error_line(run_sleigh("train", demo_ckpt, "--data", data, "-o", out, "--steps", "1"))
    assert "already exists" in line and "--resume" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("opts, needle", [
    (dict(train="gswa,teeth", steps=1), "--train"),
    (dict(steps=1, minutes=1.0), "--steps/--minutes"),
    (dict(), "--steps/--minutes"),
    (dict(steps=1, save_dtype="int8"), "--save-dtype"),
    (dict(steps=1, micro_batch=0), "--micro-batch"),
    (dict(steps=1, resume=True), "train_state"),
    (dict(steps=10, curriculum_steps=10), "--curriculum-steps"),
    (dict(minutes=1.0, curriculum_steps=10), "--curriculum-steps"),
    (dict(steps=1, train="all", gswa_hint=-1.0), "--gswa-hint"),
    (dict(steps=1, train="all", gswa_hint=float("inf")), "--gswa-hint"),
    (dict(steps=1, train="projector", gswa_hint=1.0), "--gswa-hint"),
    (dict(steps=1, train="gswa", gswa_hint=1.0), "--gswa-hint"),  # no curriculum without the ViT trained
    (dict(steps=4, train="gswa", curriculum_steps=2), "--curriculum-steps .*curriculum, which is off"),  # was ignored
    (dict(steps=4, train="all", curriculum="off", curriculum_steps=2), "--curriculum-steps .*which is off"),
])
def test_bad_options(demo_ckpt, data, tmp_path, opts, needle):
    with pytest.raises(SleighError, match=needle):
        train(demo_ckpt, data, tmp_path / "out", TrainOptions(**opts), log=lambda m: None)


def test_encode_batch_equals_each_image_encoded_alone(demo_ckpt):
    """The trainer's one mlp1 call over every view of a batch gives each image's encode_images."""
    from sleigh.sleighvl.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(demo_ckpt)
    model.eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(n, 3, 112, 112, generator=g) for n in (3, 1, 7)]
    with torch.no_grad():
        batch = model.encode_batch(model.vision(torch.cat(images)), [3, 1, 7])
        for got, pixels in zip(batch, images, strict=True):
            alone = model.encode_images(pixels)
            for field in ("image_embeds", "gswa_weights", "last_hidden", "projected"):
                torch.testing.assert_close(getattr(got, field), getattr(alone, field), rtol=1e-5, atol=1e-5)


# -- found by a defect hunt (session 26) ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["a-file/sub", "a-file"])
def test_an_output_that_cannot_be_written_is_refused_before_training(demo_ckpt, data, tmp_path, where):
    """`-o FILE/sub` trained every step, then failed at the first save; `-o FILE` was called an existing
    output folder and told to --resume."""
    (tmp_path / "a-file").write_text("x")
    said = []
    with pytest.raises(SleighError, match="is a file, not a folder") as e:
        train(demo_ckpt, data, tmp_path / where, TrainOptions(**FEW), log=said.append)
    assert not said and "--resume" not in str(e.value)
    if Path("/proc/self").is_dir():  # /proc takes no folder, whatever os.access tells root
        with pytest.raises(SleighError, match="/proc"):
            train(demo_ckpt, data, Path("/proc/sleigh-out"), TrainOptions(**FEW), log=said.append)
        assert not said


def test_an_empty_output_folder_is_taken(demo_ckpt, data, tmp_path):
    (tmp_path / "out").mkdir()  # as init, export and convert take one
    assert train(demo_ckpt, data, tmp_path / "out", TrainOptions(**FEW), log=lambda m: None).steps == 2


@pytest.mark.parametrize("opts, says", [
    (dict(steps=6, lr=1e30, save_every=1), "step 2 | the loss is nan: the run diverged ({out} keeps its save of step 1)"),
    (dict(steps=3, lr=1e5, save_every=1), "step 2 | the gradients are not finite: the run diverged ({out} keeps its save of step 1)"),
    (dict(steps=1, lr=1e300), "step 1 | the weights are not finite in float32: the run diverged (nothing was saved)"),
    # finite in float32, past float16's range: a float16 save would hold inf
    (dict(steps=1, lr=1e7, save_dtype="float16"), "step 1 | the weights are not finite in float16: the run diverged (nothing was saved)"),
])
def test_a_run_that_diverges_stops_and_keeps_its_last_finite_save(demo_ckpt, data, tmp_path, opts, says):
    """--lr 1e30 saved NaN weights and exited 0 ("last loss nan"). A non-finite loss, gradient or weight
    (as saved) stops the run at the step it happened in; what it saved before stays, with no NaN or inf."""
    out = tmp_path / "out"
    with pytest.raises(SleighError) as e:
        train(demo_ckpt, data, out, TrainOptions(**{**FEW, "train": "all", **opts}), log=lambda m: None)
    assert str(e.value).startswith(says.format(out=out)) and "a smaller --lr" in str(e.value), str(e.value)
    assert out.exists() == ("keeps its save" in says)
    if out.exists():
        assert all(bool(torch.isfinite(v).all()) for v in weights(out).values() if v.is_floating_point())


def test_resume_refuses_another_run_a_finished_run_and_a_damaged_state(demo_ckpt, data, tmp_path):
    """--resume compared only some options: another --lr, --curriculum, --data or CHECKPOINT trained on
    and recorded the new ones; a finished run was saved again; a state without metadata was "unexpected
    KeyError"."""
    out = tmp_path / "out"
    opts = TrainOptions(**FEW)
    train(demo_ckpt, data, out, opts, log=lambda m: None)
    again = {**opts.__dict__, "resume": True}
    with pytest.raises(SleighError, match="already complete"):
        train(demo_ckpt, data, out, TrainOptions(**again), log=lambda m: None)
    longer = {**again, "steps": 3}
    with pytest.raises(SleighError, match="--steps 3 differs.*a new run that starts from it"):  # the schedule is the run's
        train(demo_ckpt, data, out, TrainOptions(**longer), log=lambda m: None)
    for change, words in ((dict(lr=0.5), "--lr 0.5 differs"), (dict(curriculum="on"), "--curriculum on differs")):
        with pytest.raises(SleighError, match=words):
            train(demo_ckpt, data, out, TrainOptions(**{**again, **change}), log=lambda m: None)
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text())
    with pytest.raises(SleighError, match="--data .* is not the saved run's"):
        train(demo_ckpt, other, out, TrainOptions(**again), log=lambda m: None)
    with pytest.raises(SleighError, match="CHECKPOINT .* is not the saved run's"):
        train(tmp_path, data, out, TrainOptions(**again), log=lambda m: None)
    with pytest.raises(SleighError, match=r"--minutes 1\.0 differs from the saved run's --steps 2"):  # not "--steps None"
        train(demo_ckpt, data, out, TrainOptions(**{**again, "steps": None, "minutes": 1.0}), log=lambda m: None)
    state = out / train_mod.STATE
    save_file(load_file(str(state)), str(state))  # the tensors without the run's metadata
    with pytest.raises(SleighError, match="holds no readable training state"):
        train(demo_ckpt, data, out, TrainOptions(**again), log=lambda m: None)


def test_a_run_with_no_step_trained_is_an_error_and_writes_nothing(demo_ckpt, data, tmp_path):
    with pytest.raises(SleighError, match="no step trained"):
        train(demo_ckpt, data, tmp_path / "out", TrainOptions(minutes=1e-9, batch=2, threads=1, quiet=True),
              log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_lines_past_the_context_are_left_out_as_eval_skips_them(demo_ckpt, data, tmp_path):
    lines = data.read_text().splitlines()
    long = json.loads(lines[0])
    long["question"] = "Is it red? " * 3000
    path = tmp_path / "long.jsonl"
    root = data.parent
    path.write_text("".join(json.dumps({**json.loads(x), "image": str(root / json.loads(x)["image"])}) + "\n"
                            for x in lines[:3]) + json.dumps({**long, "image": str(root / long["image"])}) + "\n")
    said = []
    r = train(demo_ckpt, path, tmp_path / "out", TrainOptions(**FEW), log=said.append)
    assert r.skipped == {"past the context": 1} and r.lines == 3, (r.skipped, said)
    with pytest.raises(SleighError, match=r"long.jsonl:4 \| question and answer take"):
        train(demo_ckpt, path, tmp_path / "strict", TrainOptions(**FEW, strict=True), log=lambda m: None)


def test_strict_names_the_line_of_an_image_that_does_not_decode(demo_ckpt, data, tmp_path):
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    root = tmp_path / "d"
    shutil.copytree(data.parent, root)
    _cut_jpeg(root / "cut.jpg")
    lines[2]["image"] = "cut.jpg"
    (root / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(SleighError, match=r"d.jsonl:3 \(image .*cut.jpg\) \| .*Expected: images that decode"):
        train(demo_ckpt, root / "d.jsonl", tmp_path / "out", TrainOptions(**{**FEW, "steps": 6, "batch": 4}, strict=True),
              log=lambda m: None)


@pytest.mark.slow
def test_a_package_of_a_trained_checkpoint_names_the_run(demo_ckpt, data, tmp_path):
    """The manifest said nothing of where its weights came from; `sleigh inspect` shows it now."""
    from sleigh.export.exporter import ExportOptions, export_package
    from sleigh.runtime.manifest import read_manifest

    train(demo_ckpt, data, tmp_path / "out", TrainOptions(**FEW), log=lambda m: None)
    export_package(tmp_path / "out", tmp_path / "pkg", ExportOptions(verify=False, quiet=True))
    source = read_manifest(tmp_path / "pkg").source
    assert source["checkpoint"] == str((tmp_path / "out").resolve())
    assert source["trained"] == {"steps": 2, "data": str(data.resolve()), "from": str(demo_ckpt.resolve()), "train": "gswa"}
    shown = run_sleigh("inspect", tmp_path / "pkg").stdout
    assert f"from {(tmp_path / 'out').resolve()} (weights sha256 {source['weights_sha256'][:12]}), trained 2 steps on" in shown
