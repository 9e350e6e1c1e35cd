"""Hugging Face Llama-family models into megatron-core and back (tools/convert_hf_to_megatron.py,
tools/convert_megatron_to_hf.py, the trainer's --lm-load), on tiny random models built here.

The converted GPT's logits equal the HF model's at TP=1, TP=2 and PP=2 (fp32; the two compute
the same sums in another order, so they agree to a few float32 ulps of the logits' scale);
HF -> Megatron -> HF gives the same tensors bit for bit; a converted CLIP tower loaded by
--vit-load gives HF's features, and so does a converted SigLIP tower; --lm-load puts the converted weights
into the trainer's language model, growing the vocabulary where the run's tokenizer needs it.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    Qwen2Config,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from megatron_prior.testing import run_on_ranks

pytestmark = pytest.mark.slow  # multi-rank: about 2.5 min of CPU time in all, spawned processes shared by tests

TOOLS = Path(__file__).resolve().parents[1] / "tools"
VOCAB, SEQ = 96, 12
# Llamas for --lm-load over the test corpus's 200-id tokenizer: 256 vocabulary rows (Megatron's
# padding of 200), and 160 (the run's vocabulary grows).
LM_LOAD = {"lm-full": 256, "lm-short": 160}
# name -> (config class, fields beyond the common ones). GQA untied, MHA tied, Qwen2's q/k/v biases.
MODELS = {
    "llama-gqa-untied": (LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False,
                                           rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama-tied": (LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "qwen2-bias": (Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=False,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama3-scaled": (LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=16384,
                                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192})),
}


def _perturbed(model):
    with torch.no_grad():  # HF zero-initialises biases and ones the norms: make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# A CLIP tower: 16 px images in 4 px patches, OpenAI CLIP's quick GELU.
CLIP_VISION = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=16,
                   patch_size=4, hidden_act="quick_gelu")


def _clip_models() -> dict:
    torch.manual_seed(5)
    full = CLIPConfig(vision_config=CLIP_VISION, text_config=dict(hidden_size=32, intermediate_size=64,
                                                                   num_hidden_layers=1, num_attention_heads=4))
    return {"clip-vision": _perturbed(CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION))),
            "clip-full": _perturbed(CLIPModel(full))}


CLIPS = ("clip-vision", "clip-full")


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _hf_model(name: str, dtype=torch.float32, vocab: int = VOCAB, seed: int = 0):
    cls, fields = MODELS[name]
    config = cls(**{**dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64), **fields})
    torch.manual_seed(seed)
    return _perturbed(AutoModelForCausalLM.from_config(config, dtype=dtype))


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


# Results cross process boundaries as numpy arrays: a torch tensor is passed as a shared-memory
# handle that dies with the spawned process, which may exit before the parent reads it.
def _logits(checkpoints: list) -> list:
    """Each checkpoint's full-vocabulary logits of ``_tokens()`` at this process's layout (on the
    last stage's TP rank 0, else None)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_prior.checkpoint import checkpoint_dir, load_state, model_state, read_model_config, restore_model
    from megatron_prior.models.builder import build_model

    tokens = _tokens()
    positions = torch.arange(SEQ).expand_as(tokens)
    out = []
    for load in checkpoints:
        ckpt = checkpoint_dir(load)
        cfg = read_model_config(ckpt)
        model = build_model(cfg, config_overrides=dict(perform_initialization=False))
        restore_model([model], load_state(ckpt, model_state([model])), ckpt)
        with torch.no_grad():
            if not parallel_state.is_pipeline_first_stage():  # PP: the previous stage's hidden states
                hidden = torch.empty(SEQ, tokens.shape[0], cfg.hidden_size)
                dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
            output = model.eval()(tokens, positions, None)
            if not parallel_state.is_pipeline_last_stage():
                dist.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
                output = None
        last = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        full = gather_from_tensor_model_parallel_region(output) if output is not None else None
        out.append(full.numpy() if last else None)
    return out


def _logits_at(tp: int, pp: int, checkpoints: list) -> list:
    from megatron_prior import parallel

    parallel.initialize(tensor_parallel=tp, pipeline_parallel=pp)
    return _logits(checkpoints)


def _convert_all(root: str) -> dict:
    """HF -> Megatron for every model (and a bf16 one), then Megatron -> HF: their model configs;
    and the refusals that come before any tensor is read, with their messages."""
    from megatron_prior import parallel
    from megatron_prior.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf

    parallel.initialize()
    configs, refusals = {}, {}
    for name in [*MODELS, "llama-bf16"]:
        cfg = convert_hf_to_megatron(Path(root) / name / "hf", Path(root) / name / "ckpt")
        convert_megatron_to_hf(Path(root) / name / "ckpt", Path(root) / name / "back")
        configs[name] = cfg.to_dict()
    for name in LM_LOAD:
        convert_hf_to_megatron(Path(root) / name / "hf", Path(root) / name / "ckpt")
    for name, layer in (("clip-vision", -1), ("clip-full", -2)):
        configs[name] = convert_hf_to_megatron(Path(root) / name / "hf", Path(root) / name / "ckpt",
                                               vision_feature_layer=layer).to_dict()
    for what, call in (
            ("hub id", lambda: convert_hf_to_megatron("meta-llama/Llama-3.2-3B", Path(root) / "x")),
            ("output taken", lambda: convert_hf_to_megatron(Path(root) / "llama-tied" / "hf",
                                                            Path(root) / "llama-tied" / "ckpt")),
            ("gelu", lambda: convert_hf_to_megatron(Path(root) / "gelu", Path(root) / "y")),
            ("export exists", lambda: convert_megatron_to_hf(Path(root) / "llama-tied" / "ckpt",
                                                             Path(root) / "llama-tied" / "back"))):
        try:
            call()
        except ConversionError as err:
            refusals[what] = str(err)
    return configs, refusals, _logits([str(Path(root) / n / "ckpt") for n in MODELS]), _hlvlm_export(root)


def _hlvlm_export(root: str) -> torch.Tensor:
    """A Llama-shaped H-LVLM with a quick-GELU CLIP tower (random, layout-independent weights),
    saved, exported as LLaVA: its logits on ``_images()`` and ``_hlvlm_tokens()``."""
    from megatron_prior.checkpoint import model_state, save
    from megatron_prior.convert import convert_megatron_to_hf
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.config import ModelConfig
    from megatron_prior.models.init import initialize_weights

    cfg = ModelConfig(arch="hlvlm", num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                      vocab_size=VOCAB, max_position_embeddings=None, seq_length=SEQ, normalization="RMSNorm",
                      swiglu=True, num_query_groups=2, add_bias_linear=False, rotary_base=500000.0,
                      share_embeddings_and_output_weights=False, image_size=16, patch_size=4,
                      image_token_id=VOCAB - 1, vit_num_layers=2, vit_hidden_size=32, vit_num_attention_heads=4,
                      vit_activation="quick_gelu", image_mean=[0.48145466, 0.4578275, 0.40821073],
                      image_std=[0.26862954, 0.26130258, 0.27577711])
    model = build_model(cfg)
    initialize_weights(model, seed=4, std=0.1)
    save(Path(root) / "hlvlm" / "ckpt", 0, model_state([model]), cfg)
    convert_megatron_to_hf(Path(root) / "hlvlm" / "ckpt", Path(root) / "hlvlm" / "back")
    with torch.no_grad():
        return model.eval()(_images(), _hlvlm_tokens(), None, None).numpy()


def _hlvlm_tokens() -> torch.Tensor:
    """Text rows for the H-LVLM: the ``<image>`` placeholder, then text."""
    tokens = torch.randint(0, VOCAB - 1, (2, SEQ), generator=torch.Generator().manual_seed(6))
    tokens[:, 0] = VOCAB - 1
    return tokens


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    models = {name: _hf_model(name) for name in MODELS}
    models["llama-bf16"] = _hf_model("llama-gqa-untied", dtype=torch.bfloat16)
    clips = _clip_models()
    for name, model in {**models, **clips}.items():
        model.save_pretrained(root / name / "hf")
    for name, vocab in LM_LOAD.items():
        _hf_model("llama-gqa-untied", vocab=vocab, seed=3).save_pretrained(root / name / "hf")
    gelu = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, hidden_act="gelu")
    AutoModelForCausalLM.from_config(gelu).save_pretrained(root / "gelu")
    ((configs, refusals, tp1_logits, hlvlm_logits),) = run_on_ranks(_convert_all, 1, str(root))
    with torch.no_grad():
        reference = {name: models[name](_tokens()).logits for name in MODELS}
        reference["clip-vision"] = clips["clip-vision"](_images()).last_hidden_state
        reference["clip-full"] = clips["clip-full"].vision_model(_images(), output_hidden_states=True).hidden_states[-2]
    return dict(root=root, models=models, configs=configs, refusals=refusals, reference=reference,
                tp1_logits=tp1_logits, hlvlm_logits=hlvlm_logits)


def _assert_logits(got: torch.Tensor, ref: torch.Tensor) -> None:
    # Same float32 arithmetic in another order (fused q/k/v and gate/up GEMMs, megatron-core's
    # attention): a few ulps of the largest logit.
    got = torch.as_tensor(got)
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)


def test_configs_carry_the_shape(converted):
    c = converted["configs"]
    assert c["llama-gqa-untied"]["num_query_groups"] == 2 and not c["llama-gqa-untied"][
        "share_embeddings_and_output_weights"]
    assert c["llama-gqa-untied"]["rotary_base"] == 500000.0 and c["llama-gqa-untied"]["vocab_size"] == VOCAB
    assert c["llama-tied"]["num_query_groups"] is None and c["llama-tied"]["norm_epsilon"] == 1e-6
    assert (c["qwen2-bias"]["add_bias_linear"], c["qwen2-bias"]["add_qkv_bias"]) == (False, True)
    assert (c["llama3-scaled"]["rope_scaling"], c["llama3-scaled"]["rope_scaling_factor"]) == (True, 32.0)
    assert all(c[n]["swiglu"] and c[n]["normalization"] == "RMSNorm" for n in MODELS)


def _tp2(root: str) -> tuple:
    """At TP=2: the converted LMs' logits, and the converted CLIP towers' features through --vit-load."""
    from megatron_prior import parallel

    parallel.initialize(tensor_parallel=2)
    return (_logits([str(Path(root) / n / "ckpt") for n in MODELS]),
            _vit_features([str(Path(root) / n / "ckpt") for n in CLIPS]))


@pytest.fixture(scope="module")
def tp2(converted):
    return run_on_ranks(_tp2, 2, str(converted["root"]))


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_logits_equal_hf(converted, tp2, layout):
    if layout == "tp1":
        last = converted["tp1_logits"]
    elif layout == "tp2":
        last = tp2[0][0]
    else:
        last = run_on_ranks(_logits_at, 2, 1, 2, [str(converted["root"] / n / "ckpt") for n in MODELS])[-1]
    for name, logits in zip(MODELS, last):
        assert logits.shape == (2, SEQ, VOCAB), name  # no padded vocabulary rows
        _assert_logits(logits, converted["reference"][name])


@pytest.mark.parametrize("name", [*MODELS, "llama-bf16"])
def test_round_trip_gives_identical_tensors(converted, name):
    back = AutoModelForCausalLM.from_pretrained(converted["root"] / name / "back")
    original, returned = converted["models"][name].state_dict(), back.state_dict()
    assert sorted(original) == sorted(returned)
    for key in original:
        assert original[key].dtype == returned[key].dtype, key
        assert torch.equal(original[key], returned[key]), key
    assert type(back).__name__ == type(converted["models"][name]).__name__


def _vit_features(checkpoints: list) -> list:
    """The H-LVLM's vision encoder from each converted CLIP (``--vit-load``): its features."""
    from megatron_prior.checkpoint import checkpoint_dir, read_model_config
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.vision_encoder import load_vision_encoder

    out = []
    for load in checkpoints:
        model = build_model(read_model_config(checkpoint_dir(load)))
        assert load_vision_encoder(model, load) > 0
        with torch.no_grad():
            out.append(model.vision_model.eval()(_images()).numpy())
    return out


def test_clip_tower_features_equal_hf_at_tp2(converted, tp2):
    c = converted["configs"]
    assert (c["clip-vision"]["vit_num_layers"], c["clip-full"]["vit_num_layers"]) == (3, 2)  # -2: all but the last
    assert c["clip-vision"]["vit_activation"] == "quick_gelu" and c["clip-vision"]["image_size"] == 16
    assert c["clip-vision"]["image_mean"] == [0.48145466, 0.4578275, 0.40821073]  # CLIP's pixel normalisation
    for _, rank in tp2:
        for name, features in zip(CLIPS, rank):
            _assert_logits(features, converted["reference"][name])


# A SigLIP tower of the same size: gelu_pytorch_tanh, LayerNorm eps 1e-6, an attention-pooling head.
SIGLIP_VISION = dict(CLIP_VISION, hidden_act="gelu_pytorch_tanh")


def _convert_siglips(root: str) -> tuple:
    """Each SigLIP converted (vision-only at -1, a full SiglipModel at -2) and its features through
    --vit-load at a world of one; the refusal of a feature layer the tower lacks."""
    from megatron_prior import parallel
    from megatron_prior.convert import ConversionError, convert_hf_to_megatron

    parallel.initialize()
    configs = {name: convert_hf_to_megatron(Path(root) / name / "hf", Path(root) / name / "ckpt",
                                            vision_feature_layer=layer).to_dict()
               for name, layer in (("siglip-vision", -1), ("siglip-full", -2))}
    with pytest.raises(ConversionError) as refused:
        convert_hf_to_megatron(Path(root) / "siglip-vision" / "hf", Path(root) / "z", vision_feature_layer=-4)
    return configs, _vit_features([str(Path(root) / n / "ckpt") for n in configs]), str(refused.value)


def test_siglip_tower_features_equal_hf(tmp_path):
    torch.manual_seed(6)
    vision = _perturbed(SiglipVisionModel(SiglipVisionConfig(**SIGLIP_VISION)))
    full = _perturbed(SiglipModel(SiglipConfig(vision_config=SIGLIP_VISION, text_config=dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))))
    vision.save_pretrained(tmp_path / "siglip-vision" / "hf")
    full.save_pretrained(tmp_path / "siglip-full" / "hf")
    ((configs, features, refused),) = run_on_ranks(_convert_siglips, 1, str(tmp_path))
    with torch.no_grad():
        # megatron-core's siglip encoder ends with the post-LayerNorm: HF's last_hidden_state, and at
        # -2 the post-LayerNorm of hidden_states[-2] (not the un-normed states HF LLaVA would read).
        reference = [vision(_images()).last_hidden_state,
                     full.vision_model.post_layernorm(
                         full.vision_model(_images(), output_hidden_states=True).hidden_states[-2])]
    c = configs["siglip-vision"]
    assert (c["vision_model_type"], c["vit_activation"], c["vit_norm_epsilon"]) == ("siglip", "gelu_tanh", 1e-6)
    assert c["image_mean"] == c["image_std"] == [0.5, 0.5, 0.5]  # SigLIP's pixel normalisation
    assert (c["vit_num_layers"], configs["siglip-full"]["vit_num_layers"]) == (3, 2)
    for got, ref in zip(features, reference):
        assert got.shape == ref.shape == (2, 16, 32)  # 16 patches, no class token
        _assert_logits(got, ref)
    assert "--vision-feature-layer -4 of 3 layers" in refused
    assert str(tmp_path / "siglip-vision" / "hf" / "config.json") in refused


def test_hlvlm_exports_as_llava_with_the_same_logits(converted):
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    back = converted["root"] / "hlvlm" / "back"
    llava = LlavaForConditionalGeneration.from_pretrained(back).eval()
    patches = (16 // 4) ** 2
    assert llava.config.image_seq_length == patches and llava.config.image_token_index == VOCAB - 1
    # HF LLaVA's processor writes one image token per patch where the H-LVLM's text has one.
    tokens = _hlvlm_tokens()
    input_ids = torch.cat([torch.full((2, patches), VOCAB - 1), tokens[:, 1:]], dim=1)
    with torch.no_grad():
        theirs = llava(input_ids=input_ids, pixel_values=_images()).logits
    ours = converted["hlvlm_logits"]
    assert ours.shape == theirs.shape == (2, patches + SEQ - 1, VOCAB)
    _assert_logits(ours, theirs)
    assert list(CLIPImageProcessor.from_pretrained(back).image_mean) == [0.48145466, 0.4578275, 0.40821073]


def _tool(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / script), *args], capture_output=True, text=True)


def test_bad_inputs_are_refused_by_name(converted):
    refusals, root = converted["refusals"], converted["root"]
    assert "download it first" in refusals["hub id"] and "meta-llama/Llama-3.2-3B" in refusals["hub id"]
    assert "already holds a checkpoint" in refusals["output taken"]
    assert "hidden_act 'gelu'" in refusals["gelu"] and str(root / "gelu" / "config.json") in refusals["gelu"]
    assert "exists" in refusals["export exists"] and str(root / "llama-tied" / "back") in refusals["export exists"]
    # The command line says it in one line and exits 1.
    cli = _tool("convert_hf_to_megatron.py", "--hf-dir", "meta-llama/Llama-3.2-3B", "--output", str(root / "z"))
    assert cli.returncode == 1 and cli.stderr.strip().splitlines()[-1].startswith("error: --hf-dir"), cli.stderr


def test_layernorm_gpt_is_not_a_llama():
    from megatron_prior.convert.llama import ConversionError, hf_config_from_gpt
    from megatron_prior.models.config import ModelConfig

    with pytest.raises(ConversionError, match="normalization 'LayerNorm'.*swiglu False"):
        hf_config_from_gpt(ModelConfig(vocab_size=VOCAB), torch.float32, Path("ckpt/model_config.json"))


# --- --lm-load ---------------------------------------------------------------------------------

def _lm_load_run(argv: list, with_hf: str) -> dict:
    """Build the trainer from ``argv``; the per-token CE of its first micro-batch, its model
    config, its language model's global tensors, and (``with_hf``) the HF model's CE there."""
    from megatron_prior import parallel
    from megatron_prior.models.arch import get_arch
    from megatron_prior.models.init import parameter_shards
    from megatron_prior.models.language_model import language_model_of
    from megatron_prior.training.arguments import parse_args
    from megatron_prior.training.loop import Trainer

    args = parse_args(argv)
    parallel.initialize(tensor_parallel=args.tensor_model_parallel_size)
    trainer = Trainer.build(args)
    model = trainer.model[0].module
    batch = next(iter(trainer.data.train_batches(0)))
    with torch.no_grad():
        ce = get_arch(args.model).forward_loss(model.eval(), batch)
    lm = language_model_of(model)
    shards = [(k, i, s, p.detach().double().numpy().copy()) for k, i, s, p in parameter_shards(lm)]
    out = dict(ce=ce.numpy(), config=trainer.model_config.to_dict(), shards=shards, hf_ce=None)
    if with_hf:
        hf = AutoModelForCausalLM.from_pretrained(with_hf).eval()
        with torch.no_grad():
            logits = hf(batch["tokens"]).logits
        out["hf_ce"] = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"],
                                                         reduction="none").numpy()
    return out


def _trainer_argv(corpus: dict, model: str, *extra: str) -> list:
    image = ["--seq-length", "24", "--patch-size", "4"] if model != "gpt" else ["--seq-length", "16"]
    return ["--model", model, *image, "--micro-batch-size", "2", "--train-iters", "1", "--lr", "1e-3",
            "--data-path", corpus["data"], "--tokenizer-model", corpus["tokenizer"], "--split", "90,10,0",
            "--eval-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0", "--transformer-impl", "local",
            *extra]


def _lm_load_runs(*runs: tuple) -> list:
    """``_lm_load_run`` for each ``(argv, with_hf)``, one after the other in this process."""
    from megatron_prior import parallel

    out = []
    for argv, with_hf in runs:
        out.append(_lm_load_run(argv, with_hf))
        parallel.destroy()
    return out


@pytest.fixture(scope="module")
def single_process_runs(tiny_corpus, converted):
    """In one process: the gpt trainer with --lm-load of the 256-row Llama, and a U-LVLM of the
    160-row Llama's shape without --lm-load (its initialisation)."""
    root = converted["root"]
    gpt = _trainer_argv(tiny_corpus, "gpt", "--lm-load", str(root / "lm-full" / "ckpt"))
    fresh = _trainer_argv(tiny_corpus, "ulvlm", *(f"--{k}" for k in ("swiglu", "disable-bias-linear",
                                                                      "untie-embeddings-and-output-weights")),
                          "--normalization", "RMSNorm", "--group-query-attention", "--num-query-groups", "2",
                          "--rotary-base", "500000", "--num-layers", "2", "--hidden-size", "32",
                          "--num-attention-heads", "4", "--ffn-hidden-size", "48", "--norm-epsilon", "1e-6")
    (runs,) = run_on_ranks(_lm_load_runs, 1, (gpt, str(root / "lm-full" / "hf")), (fresh, ""))
    return runs


def test_lm_load_gives_the_converted_models_loss(single_process_runs):
    run = single_process_runs[0]
    cfg = run["config"]
    shape = (cfg["vocab_size"], cfg["num_query_groups"], cfg["swiglu"], cfg["normalization"])
    assert shape == (256, 2, True, "RMSNorm")
    torch.testing.assert_close(torch.as_tensor(run["ce"]), torch.as_tensor(run["hf_ce"]), rtol=1e-5, atol=1e-5)


def test_lm_load_shape_flags_must_agree(tiny_corpus, converted):
    from megatron_prior.training.arguments import ArgumentError, build_parser, validate_args

    argv = _trainer_argv(tiny_corpus, "gpt", "--lm-load", str(converted["root"] / "lm-full" / "ckpt"), "--rotary-base",
                         "10000", "--swiglu")
    with pytest.raises(ArgumentError, match=r"--rotary-base 10000 \(checkpoint: 500000.0\)"):
        validate_args(build_parser().parse_args(argv), world_size=1)


def test_lm_load_grows_the_vocabulary_at_tp2(tiny_corpus, converted, single_process_runs):
    """U-LVLM at TP=2 from a 160-row LM: rows 0..159 are the checkpoint's on both vocabulary
    shards, the rest and the patch projection keep the run's initialisation."""
    from megatron_prior.testing import assemble_global

    ckpt = converted["root"] / "lm-short" / "ckpt"
    loaded = run_on_ranks(_lm_load_run, 2, _trainer_argv(tiny_corpus, "ulvlm", "--lm-load", str(ckpt),
                                                         "--tensor-model-parallel-size", "2"), "")
    got = assemble_global([s for r in loaded for s in r["shards"]])
    init = assemble_global(single_process_runs[1]["shards"])
    hf = AutoModelForCausalLM.from_pretrained(converted["root"] / "lm-short" / "hf")
    embed = hf.model.embed_tokens.weight.detach().double().numpy()
    assert got["embedding.word_embeddings.weight"].shape == (256, 32)
    np.testing.assert_array_equal(got["embedding.word_embeddings.weight"][:160], embed)
    np.testing.assert_array_equal(got["embedding.word_embeddings.weight"][160:],
                                  init["embedding.word_embeddings.weight"][160:])
    np.testing.assert_array_equal(got["output_layer.weight"][:160], hf.lm_head.weight.detach().double().numpy())
    np.testing.assert_array_equal(got["decoder.final_layernorm.weight"],
                                  hf.model.norm.weight.detach().double().numpy())
    assert json.dumps(loaded[0]["config"]["vocab_size"]) == "256"


# --- an H-LVLM from a converted Llama and a converted CLIP tower ------------------------------------

def _train(argv: list) -> None:
    from megatron_prior.train import main

    main(argv)


def _losses(out: Path) -> list:
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line)["weighted_ce"] for line in f if '"weighted_ce"' in line]


def test_hlvlm_from_converted_parts_trains_at_tp2_as_in_one_process(tiny_corpus, converted, tmp_path):
    """--lm-load (the 256-row Llama) and --vit-load (the 16 px quick-GELU CLIP tower) give an H-LVLM
    whose shape comes from the two checkpoints; 3 PRIOR iterations at TP=2 give the single
    process's losses (first iteration: the same sums in another order, 1e-5; later ones 1e-4)."""
    root = converted["root"]
    losses = []
    for world, flags in ((1, []), (2, ["--tensor-model-parallel-size", "2"])):
        out = tmp_path / f"tp{world}"
        argv = _trainer_argv(tiny_corpus, "hlvlm", "--lm-load", str(root / "lm-full" / "ckpt"), "--vit-load",
                             str(root / "clip-vision" / "ckpt"), "--loss", "prior", "--train-iters", "3",
                             "--global-batch-size", "4", "--log-interval", "1", "--log-dir", str(out),
                             "--data-cache-path", str(out / "cache"), *flags)
        run_on_ranks(_train, world, argv)
        losses.append(_losses(out))
    single, tp2 = np.array(losses[0]), np.array(losses[1])
    assert len(single) == len(tp2) == 3 and np.all(np.isfinite(single))
    rel = np.abs(tp2 - single) / np.abs(single)
    assert rel[0] <= 1e-5 and np.all(rel <= 1e-4), (single, tp2)
