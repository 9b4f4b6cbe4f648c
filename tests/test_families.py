"""Model families: options given at construction, warnings about long prompts and about options a family ignores."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from diffusers import SanaPipeline, StableDiffusionPipeline

from boothkit.data.images import sample_subject_dir
from boothkit.families import FamilyOptions, load_family
from boothkit.families import base as family_base
from boothkit.families.sana import DEFAULT_CHI
from boothkit.guidance.config import SampleConfig
from boothkit.train.config import TrainConfig

CPU = torch.device("cpu")
SD_LONG = "a sks dog " * 30  # 90 words, each one token of the tiny CLIP tokenizer; + BOS + EOS = 92 tokens
SD_AT_LIMIT = "a sks dog " * 25  # 75 words + BOS + EOS = 77 tokens: all read


@pytest.fixture
def family_warnings(monkeypatch) -> list[str]:
    """Warnings of `boothkit.families.*`, with a fresh once-per-process memo of prompts."""
    monkeypatch.setattr(family_base, "_seen_prompts", set())
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.WARNING:
                messages.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("boothkit.families")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(previous)


# Options ------------------------------------------------------------------------------------------------

def test_options_come_from_a_config_and_know_what_the_user_set(tmp_path):
    required = {"pretrained_model_name_or_path": "m", "instance_data_dir": str(tmp_path),
                "instance_prompt": "a sks dog", "output_dir": str(tmp_path / "o")}
    options = FamilyOptions.from_config(TrainConfig(**required, weighting_scheme="mode", mode_scale=0.5))
    assert (options.weighting_scheme, options.mode_scale, options.logit_std) == ("mode", 0.5, 1.0)
    assert options.explicit == {"weighting_scheme", "mode_scale"}
    sample = SampleConfig(pretrained_model_name_or_path="m", prompt=["x"], output_dir=str(tmp_path / "s"),
                          max_sequence_length=120)
    options = FamilyOptions.from_config(sample)  # sampling has no training options: they keep their defaults
    assert (options.max_sequence_length, options.weighting_scheme, options.explicit) == (120, "none",
                                                                                        {"max_sequence_length"})
    assert options.with_text(40, False) == FamilyOptions(max_sequence_length=40, complex_human_instruction=False,
                                                         explicit=frozenset({"max_sequence_length"}))


def test_with_options_shares_the_pipeline_and_embeds_with_the_new_options(sana):
    family = load_family(str(sana))
    plain = family.with_options(FamilyOptions(max_sequence_length=40, complex_human_instruction=False))
    assert plain.pipeline is family.pipeline and type(plain) is type(family)
    pipe = SanaPipeline.from_pretrained(sana)
    for which, chi, length in ((family, list(DEFAULT_CHI), 300), (plain, None, 40)):
        embeds, mask, _, _ = pipe.encode_prompt("a sks dog", do_classifier_free_guidance=False, device=CPU,
                                                max_sequence_length=length, complex_human_instruction=chi)
        got = which.encode_prompts(["a sks dog"], CPU).tensors
        assert torch.equal(got["encoder_hidden_states"], embeds) and torch.equal(got["encoder_attention_mask"], mask)
        assert which.pipeline_kwargs()["max_sequence_length"] == length
        assert which.pipeline_kwargs()["complex_human_instruction"] == chi


def test_an_option_the_family_ignores_warns_only_when_the_user_set_it(sd15, sana, family_warnings):
    load_family(str(sd15), options=FamilyOptions(weighting_scheme="logit_normal"))
    assert family_warnings == []
    load_family(str(sd15), options=FamilyOptions(weighting_scheme="logit_normal", complex_human_instruction=False,
                                                 explicit=frozenset({"weighting_scheme",
                                                                     "complex_human_instruction"})))
    assert family_warnings == [
        "--no_complex_human_instruction applies to SANA; SD prompts have no complex human instruction",
        "--weighting_scheme applies to flow-matching models (SANA); SD trains with DDPM timesteps"]
    family_warnings.clear()
    load_family(str(sana), options=FamilyOptions(weighting_scheme="logit_normal", logit_mean=0.5,
                                                 explicit=frozenset({"weighting_scheme", "logit_mean"})))
    assert family_warnings == []
    load_family(str(sana), options=FamilyOptions(logit_mean=0.5, explicit=frozenset({"logit_mean"})))
    assert family_warnings == ["--logit_mean applies to --weighting_scheme logit_normal; this run uses none"]


def test_train_warns_about_weighting_scheme_on_sd_and_a_long_validation_prompt(sd15, tmp_path, run_cli,
                                                                                family_warnings):
    result = run_cli("train", "--pretrained_model_name_or_path", sd15, "--instance_data_dir", sample_subject_dir(),
                     "--instance_prompt", "a photo of sks dog", "--output_dir", tmp_path / "o",
                     "--max_train_steps", 1, "--resolution", 32, "--weighting_scheme", "logit_normal",
                     "--validation_prompt", "the dog " * 40, "--num_validation_images", 1)
    assert result.code == 0, result.err
    lines = result.err.splitlines()
    assert "warning: --weighting_scheme applies to flow-matching models (SANA); SD trains with DDPM timesteps" in lines
    assert "warning: prompt 'the dog the dog the dog the dog the dog …' has 82 tokens; the text encoder reads " \
           "the first 77 (the rest is ignored)" in lines


# Long prompts -------------------------------------------------------------------------------------------

def test_long_sd_prompt_warns_once_and_is_embedded_as_diffusers_does(sd15, family_warnings):
    family = load_family(str(sd15))
    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None, requires_safety_checker=False)
    for _ in range(2):
        got = family.encode_prompts([SD_LONG, "a sks dog", SD_AT_LIMIT], CPU).tensors["encoder_hidden_states"]
    assert family_warnings == ["prompt 'a sks dog a sks dog a sks dog a sks dog …' has 92 tokens; "
                               "the text encoder reads the first 77 (the rest is ignored)"]
    expected, _ = pipe.encode_prompt([SD_LONG, "a sks dog", SD_AT_LIMIT], CPU, 1, False)
    assert got.shape[1] == 77 and torch.equal(got, expected)
    family.encode_prompts([SD_AT_LIMIT + "a"], CPU, negative=True)  # one word more: 78 tokens
    assert family_warnings[1:] == ["prompt 'a sks dog a sks dog a sks dog a sks dog …' has 78 tokens; "
                                   "the text encoder reads the first 77 (the rest is ignored)"]


def _sana_tokens_read(pipe: SanaPipeline, prompt: str, length: int, chi: list[str] | None) -> int:
    """How many of the prompt's own tokens SanaPipeline's embedding attends to (beyond those of the empty prompt)."""
    def attended(text: str) -> int:
        _, mask, _, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False, device=CPU,
                                           max_sequence_length=length, complex_human_instruction=chi)
        return int(mask.sum())

    return attended(prompt) - attended("")


@pytest.mark.parametrize("instruction", [True, False])
def test_long_sana_prompt_warns_once_with_the_users_tokens(sana, instruction, family_warnings):
    """The count and the limit are what the pipeline's own embedding shows: the prompt's tokens it attends to
    with room to spare, and with `--max_sequence_length 24`."""
    chi = list(DEFAULT_CHI) if instruction else None
    family = load_family(str(sana), options=FamilyOptions(max_sequence_length=24,
                                                          complex_human_instruction=instruction))
    long, short = "A sks dog in the snow " * 3, "a sks dog"
    pipe = SanaPipeline.from_pretrained(sana)
    count, limit = _sana_tokens_read(pipe, long, 1000, chi), _sana_tokens_read(pipe, long, 24, chi)
    assert count > limit == (22 if instruction else 23)
    for _ in range(2):
        got = family.encode_prompts([long, short], CPU).tensors
    assert family_warnings == [f"prompt 'A sks dog in the snow A sks dog in the …' has {count} tokens; "
                               f"the text encoder reads the first {limit} (the rest is ignored)"]
    embeds, mask, _, _ = pipe.encode_prompt([long, short], do_classifier_free_guidance=False, device=CPU,
                                            max_sequence_length=24, complex_human_instruction=chi)
    assert torch.equal(got["encoder_hidden_states"], embeds) and torch.equal(got["encoder_attention_mask"], mask)
    fits = "x" * limit  # the tiny Gemma tokenizer reads one character as one token
    assert _sana_tokens_read(pipe, fits, 1000, chi) == limit
    family_warnings.clear()
    family.encode_prompts([fits], CPU)
    assert family_warnings == []


def test_a_file_or_an_incomplete_folder_as_model_is_named_clearly(sd15, tmp_path):
    from boothkit.errors import BoothkitError

    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"\0" * 64)
    with pytest.raises(BoothkitError, match="is a file; give the folder"):
        load_family(str(checkpoint))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(sd15, incomplete, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(BoothkitError, match="lacks its 'unet' folder"):
        load_family(str(incomplete))
    assert load_family(str(sd15)).name == "sd"  # a complete folder without a safety checker still loads
