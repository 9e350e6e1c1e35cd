"""An architecture is one ``Arch`` in the registry: a throwaway one registered here reaches the
trainer's ``--model`` choices, the model config's validation, the builder, the training
forward step and the evaluation scorer, with no other file knowing its name."""

from types import SimpleNamespace

import pytest
import torch

from megatron_prior.testing import run_on_ranks

TEXT, BATCH = 10, 3


def _toy_arch(calls: list):
    """An encoder-free VLM built like the U-LVLM whose forward_loss records each call."""
    from megatron_prior.models import ulvlm
    from megatron_prior.models.arch import Arch

    def forward_loss(model, batch):
        calls.append(sorted(batch))
        return ulvlm.forward_loss(model, batch)

    return Arch(name="toyvlm", display_name="Toy-VLM", description="a throwaway test architecture",
                needs_images=True, build=ulvlm.build, forward_loss=forward_loss,
                validate_config=ulvlm.validate_config, image_sequence_length=ulvlm.image_sequence_length)


def _work() -> dict:
    from megatron_prior import parallel
    from megatron_prior.eval.lvlm_scoring import LVLMScorer
    from megatron_prior.models.arch import ARCHS, register
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.config import ModelConfig
    from megatron_prior.models.init import initialize_weights
    from megatron_prior.training.arguments import build_parser
    from megatron_prior.training.steps import make_forward_step

    out: dict = {}
    calls: list = []
    register(_toy_arch(calls))
    parallel.initialize(seed=5)
    try:
        parser = build_parser()
        (model_action,) = [a for a in parser._actions if a.dest == "model"]
        out["choices"] = list(model_action.choices)
        out["help_names_it"] = "toyvlm: a throwaway test architecture" in model_action.help
        out["parsed"] = parser.parse_args(["--model", "toyvlm"]).model

        image = dict(image_size=8, patch_size=4, image_token_id=5, image_start_id=6, image_row_id=7, image_end_id=8)
        cfg = ModelConfig(arch="toyvlm", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128,
                          max_position_embeddings=None, seq_length=TEXT, **image)
        out["offset"], out["combined"] = cfg.image_offset, cfg.combined_seq_length
        try:
            ModelConfig(arch="toyvlm", vocab_size=128, max_position_embeddings=64, image_size=8, patch_size=4)
        except ValueError as err:
            out["validation"] = str(err)
        model = build_model(cfg)
        initialize_weights(model, seed=3, std=0.05, num_layers=cfg.num_layers)

        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(9, 128, (BATCH, TEXT + 1), generator=g)
        tokens[:, 0] = 5
        mask = (torch.rand(BATCH, TEXT, generator=g) > 0.3).float()
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
                 "position_ids": torch.arange(TEXT).expand(BATCH, TEXT), "images": torch.randn(BATCH, 3, 8, 8)}
        output, loss_func = make_forward_step(cfg, "ntp")(iter([batch]), model)
        loss_sum, count, logs = loss_func(output)
        out["step_calls"] = list(calls)
        out["output_shape"] = tuple(output.shape)
        # The loss reads the caption's CE where the combined sequence holds it.
        out["loss_matches"] = bool(torch.allclose(loss_sum, (output[:, cfg.image_offset:] * mask).sum()))
        out["count"] = int(count)

        calls.clear()
        tokenizer = SimpleNamespace(fingerprint=None, pad=1, image_token_id=5, eod=2)
        scorer = LVLMScorer(model.eval(), cfg, tokenizer, batch_size=BATCH)
        text = scorer.text_batch([list(range(20, 20 + n)) + [2] for n in (3, 5, 12)])
        ce = scorer.per_token_ce(torch.randn(BATCH, 3, 8, 8), text)
        out["scorer_calls"] = list(calls)
        out["scorer_shape"] = tuple(ce.shape)
    finally:
        parallel.destroy()
        del ARCHS["toyvlm"]
    out["after_unregister"] = list(ARCHS)
    try:
        ModelConfig(arch="toyvlm")
    except ValueError as err:
        out["unknown"] = str(err)
    return out


@pytest.fixture(scope="module")
def toy():
    (result,) = run_on_ranks(_work, 1)
    return result


def test_trainer_offers_a_registered_architecture(toy):
    assert toy["choices"] == ["gpt", "hlvlm", "ulvlm", "toyvlm"]
    assert toy["help_names_it"] and toy["parsed"] == "toyvlm"


def test_model_config_validates_through_the_architecture(toy):
    # 8x8 images in 4x4 patches: <img_start> + 2 rows of (2 patches + a break) = 7 positions.
    assert (toy["offset"], toy["combined"]) == (6, 6 + TEXT)
    assert toy["validation"] == ("invalid model config: arch toyvlm needs image_token_id (the tokenizer's <image> "
                                 "id); arch toyvlm needs image_start_id, image_row_id and image_end_id")


def test_forward_step_calls_the_architecture(toy):
    assert toy["step_calls"] == [["images", "labels", "loss_mask", "position_ids", "tokens"]]
    assert toy["output_shape"] == (BATCH, 6 + TEXT)
    assert toy["loss_matches"]
    assert toy["count"] > 0


def test_eval_scorer_calls_the_architecture(toy):
    assert toy["scorer_calls"] == [["images", "labels", "loss_mask", "position_ids", "tokens"]]
    assert toy["scorer_shape"] == (BATCH, TEXT)  # the longest caption (12 tokens + <eod>) cut at seq_length


def test_unregistered_architecture_is_refused_by_name(toy):
    assert toy["after_unregister"] == ["gpt", "hlvlm", "ulvlm"]
    assert toy["unknown"] == "unknown architecture 'toyvlm'; known: gpt, hlvlm, ulvlm"


def test_names_are_unique():
    from megatron_prior.models.arch import ARCHS, register

    with pytest.raises(ValueError, match="architecture 'gpt' is already registered"):
        register(ARCHS["gpt"])


def test_seq_length_is_stored_or_derived_for_old_configs():
    from megatron_prior.models.config import ModelConfig

    image = dict(image_size=16, patch_size=4, image_token_id=5, image_start_id=6, image_row_id=7, image_end_id=8)
    # A new config: the text length given, the position embedding sized to text + image (20 added).
    new = ModelConfig(arch="ulvlm", max_position_embeddings=None, seq_length=24, **image)
    assert (new.seq_length, new.image_offset, new.combined_seq_length, new.max_position_embeddings) == (24, 20, 44, 44)
    # A model_config.json written before seq_length: what evaluation and scoring read as the
    # text length then (max_position_embeddings less the image's positions).
    old = {k: v for k, v in new.to_dict().items() if k != "seq_length"}
    assert ModelConfig.from_dict(old).seq_length == 24
    assert ModelConfig.from_dict({**old, "arch": "gpt", "max_position_embeddings": 64}).seq_length == 64
    with pytest.raises(ValueError, match=r"44 positions per sample \(seq_length 24 \+ 20 added by the image\) exceed "
                                         r"max_position_embeddings 40"):
        ModelConfig(arch="ulvlm", max_position_embeddings=40, seq_length=24, **image)
    with pytest.raises(ValueError, match="give seq_length, max_position_embeddings or both"):
        ModelConfig(arch="gpt", max_position_embeddings=None)


TOY_FILE = '''"""A fourth architecture in a file of its own: the U-LVLM's parts under another name."""

from megatron_prior.models import ulvlm
from megatron_prior.models.arch import Arch, register

ARCH = register(Arch(name="toyvlm", display_name="Toy-VLM", description="an architecture added as one new file",
                     needs_images=True, build=ulvlm.build, forward_loss=ulvlm.forward_loss,
                     validate_config=ulvlm.validate_config, image_sequence_length=ulvlm.image_sequence_length))
'''


def test_a_new_architecture_is_one_new_file(tmp_path):
    """A copy of the package with one file added to models/ and nothing else edited: the trainer
    offers the new architecture and builds it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "megatron_prior"
    shutil.copytree(source, tmp_path / "megatron_prior", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "megatron_prior" / "models" / "toyvlm.py").write_text(TOY_FILE)
    probe = ("from megatron_prior.models import ARCHS\n"
             "from megatron_prior.training.arguments import build_parser\n"
             "(action,) = [a for a in build_parser()._actions if a.dest == 'model']\n"
             "print(list(ARCHS), list(action.choices), ARCHS['toyvlm'].display_name)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    # Registered in import order: the new file imports ulvlm, so it comes last.
    names = "['gpt', 'hlvlm', 'ulvlm', 'toyvlm']"
    assert done.stdout.strip().splitlines()[-1] == f"{names} {names} Toy-VLM"
