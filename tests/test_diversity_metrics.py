"""DINO-D, CLIP-D (diversity) and PRES (prior preservation): equal to their definitions, in every output.

* DINO-D = mean over prompts (with at least two samples) of the mean over unordered pairs i < j of that prompt's
  samples of 1 - cos(DINO_i, DINO_j); CLIP-D the same with CLIP image embeddings; None when no prompt has two.
* PRES = mean over (class-prompt sample, reference photo) pairs of cos(DINO(sample), DINO(reference)).

The definitions are computed here independently of boothkit: embeddings from the transformers models on the
transformers image processors' pixels, pairs and cosines by scipy (`pdist` / `cdist`, metric "cosine").
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import cdist, pdist

from boothkit.data.images import load_image_folder, sample_subject_dir
from boothkit.evaluate.metrics import SubjectMetrics, mean_pairwise_distance
from boothkit.evaluate.outputs import SUMMARY_METRICS
from boothkit.evaluate.results import METRICS, Evaluation, MethodResults, PromptScores, Setting, best_by_dino
from boothkit.evaluate.scoring import mean_scores, score_prompts
from boothkit.evaluate.score import ScoreConfig, run_score
from boothkit.guidance.sampler import GeneratedImage, GuidedSampler
from boothkit.testing.tiny import build_tiny

NEW_METRICS = ("DINO-D", "CLIP-D", "PRES")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diversity-models")
    return {kind: build_tiny(kind, root / kind, seed=0) for kind in ("dino", "clip")}


@pytest.fixture(scope="module")
def metrics(models) -> SubjectMetrics:
    return SubjectMetrics(str(models["dino"]), str(models["clip"]), device="cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Random smooth images (generated: 4, class samples: 3, several sizes) and the sample dog's photos."""
    root = tmp_path_factory.mktemp("diversity-images")
    rng = np.random.default_rng(1)
    for name, sizes in (("generated", [(64, 48), (100, 100), (48, 80), (90, 90)]),
                        ("class", [(70, 70), (64, 96), (120, 80)])):
        (root / name).mkdir()
        for index, (width, height) in enumerate(sizes):
            base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
            Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR).save(root / name / f"{index}.png")
    return {"generated": root / "generated", "class": root / "class", "references": sample_subject_dir()}


def images_of(folder: Path) -> list[Image.Image]:
    return [image for _, image in load_image_folder(folder)]


# ---------------------------------------------------------------------------------------------------------------
# The definitions, by hand


def dino_embeddings(model_dir: Path, images: list[Image.Image]) -> np.ndarray:
    """CLS tokens of the DINO ViT on the transformers image processor's pixels (not normalized: scipy's cosine
    normalizes)."""
    from transformers import AutoImageProcessor, ViTModel

    model = ViTModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    pixels = AutoImageProcessor.from_pretrained(model_dir, backend="pil")(images=images, return_tensors="pt")
    with torch.no_grad():
        return model(pixel_values=pixels["pixel_values"]).last_hidden_state[:, 0].double().numpy()


def clip_embeddings(model_dir: Path, images: list[Image.Image]) -> np.ndarray:
    """CLIP image embeddings from the vision tower and the projection (not `get_image_features`)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    pixels = CLIPProcessor.from_pretrained(model_dir)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).double().numpy()


def diversity_by_definition(embeddings_per_prompt: list[np.ndarray]) -> float | None:
    """Mean over prompts with >= 2 samples of the mean cosine distance over the prompt's unordered pairs."""
    means = [pdist(rows, metric="cosine").mean() for rows in embeddings_per_prompt if len(rows) >= 2]
    return float(np.mean(means)) if means else None


def pres_by_definition(samples: np.ndarray, references: np.ndarray) -> float:
    """Mean cosine similarity over every (sample, reference) pair."""
    return float((1.0 - cdist(samples, references, metric="cosine")).mean())


# ---------------------------------------------------------------------------------------------------------------
# The metrics


def test_dino_d_and_clip_d_equal_definition(models, metrics, folders):
    generated, references = images_of(folders["generated"]), images_of(folders["references"])
    scores = metrics.score(generated, None, metrics.references(references))
    assert scores["DINO-D"] == pytest.approx(diversity_by_definition([dino_embeddings(models["dino"], generated)]),
                                             abs=1e-6)
    assert scores["CLIP-D"] == pytest.approx(diversity_by_definition([clip_embeddings(models["clip"], generated)]),
                                             abs=1e-6)
    assert scores["DINO-D"] > 1e-4 and scores["CLIP-D"] > 1e-4  # distinct images: a real, non-zero check


def test_pres_equals_definition(models, metrics, folders):
    samples, references = images_of(folders["class"]), images_of(folders["references"])
    pres = metrics.preservation(samples, metrics.references(references))
    expected = pres_by_definition(dino_embeddings(models["dino"], samples), dino_embeddings(models["dino"], references))
    assert pres == pytest.approx(expected, abs=1e-6)


def test_one_sample_has_no_diversity_and_identical_samples_have_none(metrics, folders):
    generated, references = images_of(folders["generated"]), metrics.references(images_of(folders["references"]))
    single = metrics.score(generated[:1], None, references)
    assert single["DINO-D"] is None and single["CLIP-D"] is None
    same = metrics.score([generated[0], generated[0].copy(), generated[0].copy()], None, references)
    assert same["DINO-D"] == pytest.approx(0.0, abs=1e-6) and same["CLIP-D"] == pytest.approx(0.0, abs=1e-6)
    assert mean_pairwise_distance(torch.empty(0, 8)) is None


def generated_images(images: list[Image.Image], counts: list[int]) -> list[GeneratedImage]:
    """`counts[p]` images of prompt p, taken in order from `images`."""
    out, taken = [], 0
    for prompt_index, count in enumerate(counts):
        for i in range(count):
            out.append(GeneratedImage(f"a sks dog {prompt_index}", prompt_index, i, i, images[taken]))
            taken += 1
    return out


@pytest.mark.parametrize("counts", [[3, 1, 2], [2, 2], [1, 1]])
def test_diversity_is_the_mean_over_prompts_with_two_samples(models, metrics, folders, counts):
    pool = images_of(folders["generated"]) + images_of(folders["class"])
    generated = generated_images(pool, counts)
    prompts = [f"a sks dog {p}" for p in range(len(counts))]
    rows = score_prompts(metrics, metrics.references(images_of(folders["references"])), prompts, generated,
                         "sks", False)
    means = mean_scores(rows)
    for metric, embed in (("DINO-D", dino_embeddings), ("CLIP-D", clip_embeddings)):
        model = models["dino" if metric == "DINO-D" else "clip"]
        per_prompt = [embed(model, [g.image for g in generated if g.prompt_index == p]) for p in range(len(counts))]
        expected = diversity_by_definition(per_prompt)
        assert (means[metric] is None) == (expected is None) == (max(counts) < 2)
        if expected is not None:
            assert means[metric] == pytest.approx(expected, abs=1e-6)
        for row, rows_of_prompt in zip(rows, per_prompt):
            assert (row.scores[metric] is None) == (len(rows_of_prompt) < 2)
    assert means["PRES"] is None  # only class-prompt samples give PRES


def test_score_prints_diversity_and_pres(run_cli, models, folders):
    args = ["score", "--images", folders["generated"], "--references", folders["references"],
            "--dino_model", models["dino"], "--clip_model", models["clip"]]
    result = run_cli(*args, "--class_images", folders["class"])
    assert result.code == 0, result.err
    printed = json.loads(result.out.strip().splitlines()[-1])
    generated, references = images_of(folders["generated"]), images_of(folders["references"])
    dino = {name: dino_embeddings(models["dino"], images_of(folders[name])) for name in folders}
    assert printed["DINO-D"] == pytest.approx(diversity_by_definition([dino["generated"]]), abs=1e-6)
    assert printed["CLIP-D"] == pytest.approx(diversity_by_definition([clip_embeddings(models["clip"], generated)]),
                                              abs=1e-6)
    assert printed["PRES"] == pytest.approx(pres_by_definition(dino["class"], dino["references"]), abs=1e-6)
    assert (printed["n_class_images"], printed["n_images"], printed["n_references"]) == (3, 4, len(references))
    without = run_cli(*args)
    assert without.code == 0, without.err
    assert not {"PRES", "n_class_images"} & set(json.loads(without.out.strip().splitlines()[-1]))


def test_score_of_one_image_prints_null_diversity_and_reads_the_class_folder_first(models, folders, tmp_path):
    from boothkit.errors import BoothkitError

    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(next(folders["generated"].iterdir()), single)
    config = ScoreConfig(images=str(single), references=str(folders["references"]), dino_model=str(models["dino"]),
                         clip_model=str(models["clip"]))
    scores = run_score(config)
    assert scores["DINO-D"] is None and scores["CLIP-D"] is None
    assert '"DINO-D": null' in json.dumps(scores)
    with pytest.raises(BoothkitError, match="class image folder .* does not exist"):
        run_score(config.model_copy(update={"class_images": str(tmp_path / "missing")}))


def test_the_best_evaluation_is_chosen_by_dino_alone():
    def evaluation(dino, diversity, pres):
        scores = {"DINO": dino, "CLIP-I": 0.5, "CLIP-T": 0.3, "DINO-D": diversity, "CLIP-D": diversity, "PRES": pres}
        return Evaluation(Setting(dino), f"k{dino}", scores, [])

    history = [evaluation(0.6, 0.01, 0.1), evaluation(0.7, 0.001, 0.9), evaluation(0.5, 0.9, 0.0)]
    assert best_by_dino(history) is history[1]


def test_every_metric_is_a_summary_column():
    assert METRICS[-3:] == NEW_METRICS and set(SUMMARY_METRICS) == set(METRICS)


def test_results_of_an_older_boothkit_still_load_and_show_dashes(tmp_path):
    """results.json written before these metrics: no class samples, three metrics; the report shows dashes."""
    from boothkit.evaluate.report import render_report

    old = {"setting": {"guidance_scale": 3.0, "omega": None}, "key": "k", "per_prompt": [],
           "scores": {"DINO": 0.5, "CLIP-I": 0.4, "CLIP-T": 0.3}, "sampler": {}}
    evaluation = Evaluation.from_json(old)
    assert evaluation.class_samples == [] and evaluation.class_images == []
    run = MethodResults.from_json({"method": "cfg", "settings": {}, "subjects": [{
        "folder": "dog", "subject": "dog", "method": "cfg", "prompts": [], "reference_dir": str(tmp_path),
        "history": [old], "best": 0}]})
    page = render_report([run])
    row = page[page.index('<tr class="best"'):]
    assert row.count("<td>—</td>") >= len(NEW_METRICS)


# ---------------------------------------------------------------------------------------------------------------
# boothkit evaluate

PROMPTS = {"subjects": ["dog"], "prompts": ["a <subject> in the jungle", "a <subject> in the snow"]}


def evaluate_args(root: Path, *extra) -> list[str]:
    return [str(arg) for arg in (
        "evaluate", "--pretrained_model_name_or_path", root / "model", "--lora_base_dir", root / "loras",
        "--instance_data_dir", root / "photos", "--evaluation_prompts_path", root / "prompts.json",
        "--output_dir", root / "eval", "--dino_model", root / "dino", "--clip_model", root / "clip",
        "--num_inference_steps", 2, "--guidance_scale", 3.0, "--num_images_per_prompt", 2, *extra)]


class Calls:
    """What GuidedSampler.generate was asked: (prompts, images per prompt, seed, guidance scale)."""

    def __init__(self, monkeypatch):
        self.seen: list[tuple] = []
        original = GuidedSampler.generate

        def generate(sampler, prompts, negative_prompt, count, seed):
            self.seen.append((list(prompts), count, seed, sampler.guidance.guidance_scale))
            return original(sampler, prompts, negative_prompt, count, seed)

        monkeypatch.setattr(GuidedSampler, "generate", generate)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sd15, sd15_lora, models) -> Path:
    root = tmp_path_factory.mktemp("diversity-evaluate")
    shutil.copytree(sd15, root / "model")
    for kind in ("dino", "clip"):
        shutil.copytree(models[kind], root / kind)
    shutil.copytree(sd15_lora, root / "loras" / "dog", ignore=shutil.ignore_patterns("checkpoint-*", "validation"))
    shutil.copytree(sample_subject_dir(), root / "photos" / "dog")
    (root / "prompts.json").write_text(json.dumps(PROMPTS))
    return root


@pytest.fixture(scope="module")
def evaluated(inputs) -> Path:
    """One evaluation with 2 images per prompt and 2 class-prompt samples per prompt (PRES)."""
    from boothkit.cli import main

    with pytest.MonkeyPatch.context() as patch:
        calls = Calls(patch)
        assert main(evaluate_args(inputs, "--class_prompt_samples", 2)) == 0
    (inputs / "calls.json").write_text(json.dumps(calls.seen))
    return inputs


def best_of(root: Path) -> Evaluation:
    data = json.loads((root / "eval" / "results.json").read_text())["methods"]["cfg"]
    return MethodResults.from_json(data).subjects[0].best


def test_evaluate_scores_equal_definition_from_the_images(evaluated):
    root, best = evaluated, best_of(evaluated)
    entry = root / "eval" / "cache" / "dog" / best.key
    dino_model, clip_model = root / "dino", root / "clip"
    per_prompt = [[Image.open(root / "eval" / "dog" / "cfg" / file) for file in row.files] for row in best.per_prompt]
    assert [len(images) for images in per_prompt] == [2, 2]
    assert best.scores["DINO-D"] == pytest.approx(
        diversity_by_definition([dino_embeddings(dino_model, images) for images in per_prompt]), abs=1e-6)
    assert best.scores["CLIP-D"] == pytest.approx(
        diversity_by_definition([clip_embeddings(clip_model, images) for images in per_prompt]), abs=1e-6)
    samples = [Image.open(entry / name) for name in best.class_images]
    references = images_of(root / "photos" / "dog")
    assert best.scores["PRES"] == pytest.approx(
        pres_by_definition(dino_embeddings(dino_model, samples), dino_embeddings(dino_model, references)), abs=1e-6)
    for row in best.class_samples:  # each class prompt's own PRES
        mine = [Image.open(entry / name) for name in row.files]
        assert row.scores["PRES"] == pytest.approx(pres_by_definition(
            dino_embeddings(dino_model, mine), dino_embeddings(dino_model, references)), abs=1e-6)


def test_class_samples_are_the_prompts_without_identifier_at_the_evaluations_setting(evaluated):
    best = best_of(evaluated)
    calls = json.loads((evaluated / "calls.json").read_text())
    assert calls == [[["a sks dog in the jungle", "a sks dog in the snow"], 2, 0, 3.0],
                     [["a dog in the jungle", "a dog in the snow"], 2, 0, 3.0]]
    assert [row.prompt for row in best.class_samples] == ["a dog in the jungle", "a dog in the snow"]
    assert [row.seeds for row in best.class_samples] == [[0, 1], [0, 1]]
    assert best.class_images == ["class_0000_a_dog_in_the_jungle.png", "class_0001_a_dog_in_the_jungle.png",
                                 "class_0002_a_dog_in_the_snow.png", "class_0003_a_dog_in_the_snow.png"]
    # Kept in the cache entry, not among the best samples copied out of it.
    assert all((evaluated / "eval" / "cache" / "dog" / best.key / name).is_file() for name in best.class_images)
    assert sorted(p.name for p in (evaluated / "eval" / "dog" / "cfg").iterdir()) == sorted(best.images)


def test_evaluate_outputs_hold_the_new_metrics(evaluated):
    from boothkit.ui.results import results_table

    out, best = evaluated / "eval", best_of(evaluated)
    assert all(best.scores[metric] is not None for metric in NEW_METRICS)
    with open(out / "evaluation_summary.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert list(row) == ["subject", "method", "num_prompts", "CLIP-I", "CLIP-T", "DINO", "DINO-D", "CLIP-D", "PRES",
                         "guidance_scale"]
    for metric in METRICS:
        assert row[metric] == f"{best.scores[metric]:.6f}"
    page = (out / "report.html").read_text(encoding="utf-8")
    table = page[page.index('<table id="summary">'):]
    table = table[:table.index("</table>")]
    assert all(f"<th>{metric}</th>" in table for metric in NEW_METRICS)
    best_row = table[table.index('<tr class="best"'):]
    best_row = best_row[:best_row.index("</tr>")]
    for metric in METRICS:
        assert f'data-value="{best.scores[metric]!r}"' in best_row
    assert "PRES" in page and "lower: less collapse" in page
    runs = list(MethodResults.from_json(data) for data in
                json.loads((out / "results.json").read_text())["methods"].values())
    headers, body = results_table(runs)
    assert headers == ["subject", "method", *METRICS, "λ"]
    assert body[0][2:2 + len(METRICS)] == [row[metric] for metric in METRICS]


@pytest.fixture
def work(evaluated, tmp_path) -> Path:
    root = tmp_path / "work"
    shutil.copytree(evaluated, root)
    return root


def test_class_prompt_samples_are_part_of_the_cache_key(work, monkeypatch):
    from boothkit.cli import main

    calls = Calls(monkeypatch)
    key = best_of(work).key
    assert main(evaluate_args(work, "--class_prompt_samples", 2)) == 0
    assert calls.seen == [] and best_of(work).key == key  # answered by the cache, PRES included
    assert best_of(work).scores["PRES"] is not None
    assert main(evaluate_args(work)) == 0  # without PRES: another entry
    without = best_of(work)
    assert len(calls.seen) == 1 and without.key != key and without.scores["PRES"] is None
    assert without.class_samples == [] and without.scores["DINO-D"] == pytest.approx(best_of_cached(work, key))
    assert main(evaluate_args(work, "--class_prompt_samples", 1)) == 0
    assert len(calls.seen) == 3 and len({key, without.key, best_of(work).key}) == 3


def best_of_cached(root: Path, key: str) -> float:
    """DINO-D of the cached entry `key` (the prompts' images do not depend on the class samples)."""
    return json.loads((root / "eval" / "cache" / "dog" / key / "scores.json").read_text())["scores"]["DINO-D"]


@pytest.mark.parametrize("damage", ["a metric missing (older boothkit)", "a class sample missing"])
def test_an_entry_without_the_new_metrics_or_class_samples_is_not_served(work, monkeypatch, damage):
    from boothkit.cli import main

    best = best_of(work)
    entry = work / "eval" / "cache" / "dog" / best.key
    if damage.startswith("a metric"):
        scores = json.loads((entry / "scores.json").read_text())
        for metric in NEW_METRICS:
            del scores["scores"][metric]
        (entry / "scores.json").write_text(json.dumps(scores))
    else:
        (entry / best.class_images[-1]).unlink()
    calls = Calls(monkeypatch)
    assert main(evaluate_args(work, "--class_prompt_samples", 2)) == 0
    assert len(calls.seen) == 2  # evaluated again: prompts and class prompts
    again = best_of(work)
    assert again.key == best.key and again.scores == pytest.approx(best.scores, abs=1e-6)
    assert json.loads((entry / "scores.json").read_text())["scores"].keys() >= set(METRICS)


def test_class_samples_round_trip_through_json():
    row = PromptScores(prompt="a dog", seeds=[0], files=["x.png"], scores={"PRES": 0.5})
    evaluation = Evaluation(Setting(1.0), "k", {metric: None for metric in METRICS}, [], class_samples=[row])
    assert Evaluation.from_json(json.loads(json.dumps(evaluation.to_json()))) == evaluation
