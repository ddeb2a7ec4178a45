"""The tile budget: the LLM reads the K tiles GSWA weighs highest and the thumbnail.

References: the weights the vision step returns without a budget (the expected kept set is computed
here from them), the tokenizer's prompt for that many views, and the torch model's own forward
(encode_images, embed, attention_bias, llm) on the kept rows.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sleigh.errors import SleighError
from sleigh.runtime.pipeline import Pipeline
from sleigh.runtime.prompt import Turn
from tests.helpers import EXAMPLES, run_cli

QUESTION = "What is this?"
BUDGET = 4


@pytest.fixture(scope="module")
def pipelines(tiny_ckpt, tiny_pkg):
    return Pipeline.load(tiny_ckpt), Pipeline.load(tiny_pkg)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """12 tiles + the thumbnail on the tiny model."""
    path = tmp_path_factory.mktemp("budget") / "photo.png"
    Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize((1792, 1344)).save(path)
    return path


def _expected_kept(weights: np.ndarray, k: int) -> list[int]:
    """The top-k tiles by weight (views 0..T-2) and the thumbnail (view T-1), in view order."""
    tiles = len(weights) - 1
    ranked = sorted(range(tiles), key=lambda t: -weights[t])
    return sorted(ranked[:k]) + [tiles]


@pytest.mark.slow
def test_budget_drops_the_lowest_weighted_views(pipelines, photo):
    import torch

    ref_pipe, ort_pipe = pipelines
    full = ref_pipe.prefill(photo, QUESTION)
    weights = full.gswa_weights
    assert len(weights) == 13 and full.tiled.has_thumbnail
    order = np.sort(weights[:-1])[::-1]
    assert order[BUDGET - 1] - order[BUDGET] > 1e-3  # no near-tie at the cut: the kept set is well defined
    kept = _expected_kept(weights, BUDGET)

    state = ref_pipe.prefill(photo, QUESTION, tile_budget=BUDGET)
    assert state.kept_views == kept
    np.testing.assert_array_equal(state.gswa_weights, weights)  # GSWA weighed every view
    np.testing.assert_array_equal(state.image_embeds, full.image_embeds[kept])
    cfg = ref_pipe.backend.model.cfg
    ids = ref_pipe.tokenizer.encode_chat([Turn("user", QUESTION)], BUDGET + 1, system=ref_pipe.contract.prompt.system_message,
                                         tokens_per_view=cfg.vision.tokens_per_view)
    assert state.ids == ids
    assert ids.count(cfg.prompt.img_context_token_id) == (BUDGET + 1) * cfg.vision.tokens_per_view

    model = ref_pipe.backend.model  # the reference's own forward on the kept rows and their weights
    with torch.no_grad():
        vis = model.encode_images(torch.from_numpy(full.tiled.pixel_values))
        t_ids = torch.tensor([ids])
        S = t_ids.shape[1]
        logits, _ = model.llm(model.embed(t_ids, vis.image_embeds[kept].reshape(-1, cfg.llm.hidden_size)),
                              torch.ones(1, S, dtype=torch.int64), model.attention_bias(t_ids, vis.gswa_weights[kept]),
                              torch.arange(S)[None], model.llm.empty_cache())
    np.testing.assert_allclose(state.logits[0], logits[0, -1].numpy(), atol=1e-4)
    assert np.abs(state.logits - full.logits).max() > 1e-3  # dropping views changed what the LLM saw

    ref = ref_pipe.generate(photo, QUESTION, max_new_tokens=12, ignore_eos=True, tile_budget=BUDGET).result
    got = ort_pipe.generate(photo, QUESTION, max_new_tokens=12, ignore_eos=True, tile_budget=BUDGET).result
    assert got.kept_views == ref.kept_views == kept
    assert got.prompt_tokens == ref.prompt_tokens == len(ids)
    assert got.token_ids == ref.token_ids


@pytest.mark.parametrize("budget", [12, 50])
def test_a_budget_of_all_tiles_changes_nothing(pipelines, photo, budget):
    _, ort_pipe = pipelines
    plain = ort_pipe.generate(photo, QUESTION, max_new_tokens=8, ignore_eos=True).result
    got = ort_pipe.generate(photo, QUESTION, max_new_tokens=8, ignore_eos=True, tile_budget=budget).result
    assert got.kept_views == list(range(13))
    assert (got.token_ids, got.prompt_tokens, got.gswa_weights) == (plain.token_ids, plain.prompt_tokens, plain.gswa_weights)


def test_bad_budgets_one_line(pipelines, photo, monkeypatch, capsys, tiny_pkg):
    _, ort_pipe = pipelines
    for bad in (0, -1, 1.5):
        with pytest.raises(SleighError, match="^tile_budget") as e:
            ort_pipe.generate(photo, QUESTION, tile_budget=bad)
        assert "an integer >= 1" in str(e.value)
    import numpy as np  # numpy's integers are integers, as max_tiles takes them

    assert ort_pipe.prefill(photo, QUESTION, tile_budget=np.int64(2)).kept_views == \
        ort_pipe.prefill(photo, QUESTION, tile_budget=2).kept_views
    without_gswa = Pipeline(ort_pipe.backend, replace(ort_pipe.contract, gswa=None), ort_pipe.tokenizer)
    with pytest.raises(SleighError, match="^tile_budget.*no GSWA"):
        without_gswa.prefill(photo, QUESTION, tile_budget=2)
    code, err = run_cli(monkeypatch, capsys, "run", photo, "--model", tiny_pkg, "--tile-budget", "0")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --tile-budget | got 0"), err
