"""Checkpoints: round trip, atomic layout, and refusal of unsafe or mismatched ones."""

import os
import pickle
import shutil

import pytest
import torch

from megatron_prior.testing import run_on_ranks


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/megatron_prior_pwned",))


def _save_and_check(tmp: str):
    from megatron_prior import parallel
    from megatron_prior.checkpoint import CheckpointError
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.config import ModelConfig
    from megatron_prior.models.pretrained import load_inference_model
    from megatron_prior.training import checkpointing as ck

    parallel.initialize(seed=5)
    cfg = ModelConfig(arch="gpt", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128,
                      max_position_embeddings=16, tokenizer_fingerprint="tok-a")
    model = build_model(cfg)
    assert ck.load_checkpoint(tmp, [model], cfg) is None, "an empty directory holds no checkpoint"
    ck.save_checkpoint(tmp, 3, [model], cfg, extra={"consumed_samples": 24})
    ck.save_checkpoint(tmp, 7, [model], cfg, extra={"consumed_samples": 56})
    loaded, loaded_cfg = load_inference_model(tmp)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values())
               if isinstance(a, torch.Tensor))
    state = ck.load_checkpoint(tmp, [build_model(cfg)], cfg)
    errors = {}
    other = ModelConfig(**{**cfg.to_dict(), "hidden_size": 64})
    try:
        ck.load_checkpoint(tmp, [build_model(other)], other)
    except CheckpointError as err:
        errors["mismatch"] = str(err)
    other_tok = ModelConfig(**{**cfg.to_dict(), "tokenizer_fingerprint": "tok-b"})
    try:
        ck.load_checkpoint(tmp, [build_model(other_tok)], other_tok)
    except CheckpointError as err:
        errors["tokenizer"] = str(err)
    return same, loaded_cfg == cfg, state["iteration"], state["consumed_samples"], state["rng_restored"], errors


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ckpt"))
    (result,) = run_on_ranks(_save_and_check, 1, tmp)
    return tmp, result


def test_round_trip_and_layout(saved):
    tmp, (same, same_cfg, iteration, consumed, rng_restored, _) = saved
    assert same and same_cfg
    assert (iteration, consumed, rng_restored) == (7, 56, True)
    assert open(os.path.join(tmp, "latest_checkpointed_iteration.txt")).read() == "7"
    assert sorted(p for p in os.listdir(tmp)) == ["iter_0000003", "iter_0000007", "latest_checkpointed_iteration.txt"]
    assert not any(p.endswith(".tmp") for p in os.listdir(tmp))


def test_mismatched_model_and_tokenizer_refused(saved):
    errors = saved[1][5]
    assert "hidden_size: checkpoint 32 vs run 64" in errors["mismatch"]
    assert "another tokenizer" in errors["tokenizer"]


def _vision_encoder_round_trip(tmp: str) -> tuple:
    from megatron_prior import parallel
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.config import ModelConfig
    from megatron_prior.models.init import initialize_weights
    from megatron_prior.models.vision_encoder import load_vision_encoder
    from megatron_prior.training.checkpointing import save_checkpoint

    parallel.initialize(seed=5)
    cfg = ModelConfig(arch="hlvlm", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128,
                      max_position_embeddings=24, image_size=16, patch_size=8, image_token_id=5,
                      vit_hidden_size=32, vit_num_attention_heads=4)
    source, target = build_model(cfg), build_model(cfg)
    initialize_weights(source, seed=1, std=0.02, num_layers=cfg.num_layers)
    initialize_weights(target, seed=2, std=0.02, num_layers=cfg.num_layers)
    save_checkpoint(tmp, 1, [source], cfg)
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    count = load_vision_encoder(target, tmp)
    src, dst = source.state_dict(), target.state_dict()
    vision = [k for k in dst if k.startswith("vision_model.")]
    tensors = [k for k in vision if isinstance(dst[k], torch.Tensor)]
    rest = [k for k in before if not k.startswith("vision_model.") and not torch.equal(before[k], src[k])]
    return (count, len(vision), len(tensors) > 0 and all(torch.equal(dst[k], src[k]) for k in tensors),
            len(rest) > 0 and all(torch.equal(dst[k], before[k]) for k in rest))


def test_vision_encoder_loads_only_the_vit(tmp_path):
    """--vit-load through the safe loader: every vision_model tensor equals the source's, the
    projector and language model keep their own initialisation."""
    (result,) = run_on_ranks(_vision_encoder_round_trip, 1, str(tmp_path))
    count, n_vision, vision_equal, rest_untouched = result
    assert count == n_vision and vision_equal and rest_untouched, result


def _load_each(dirs: list) -> list:
    from megatron_prior import parallel
    from megatron_prior.checkpoint import CheckpointError
    from megatron_prior.models.pretrained import load_inference_model

    parallel.initialize()
    messages = []
    for d in dirs:
        try:
            load_inference_model(d)
            messages.append(None)
        except CheckpointError as err:
            messages.append(str(err))
    return messages


def _damage(ckpt: str, damage: str) -> None:
    it = os.path.join(ckpt, "iter_0000007")
    if damage == "pickle":
        with open(os.path.join(it, ".metadata"), "wb") as f:
            pickle.dump(_Evil(), f)
    elif damage == "tracker":
        open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w").write("seven")
    elif damage == "truncate":
        shard = next(os.path.join(it, f) for f in sorted(os.listdir(it)) if f.endswith(".distcp"))
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    elif damage == "config":
        os.remove(os.path.join(it, "model_config.json"))
    elif damage == "missing_iter":
        open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w").write("9")


DAMAGES = {
    "pickle": "refusing to unpickle posix.system",
    "tracker": "expected an iteration number",
    "truncate": "__0_0.distcp: truncated: entry ",
    "config": "missing model_config.json",
    "missing_iter": "has no directory iter_0000009",
}


@pytest.fixture(scope="module")
def damaged(saved, tmp_path_factory) -> dict:
    """Each kind of damage applied to a copy of the checkpoint, all loaded in one spawned rank."""
    root = tmp_path_factory.mktemp("damaged")
    dirs = []
    for damage in DAMAGES:
        dst = str(root / damage)
        shutil.copytree(saved[0], dst)
        _damage(dst, damage)
        dirs.append(dst)
    (messages,) = run_on_ranks(_load_each, 1, dirs)
    return dict(zip(DAMAGES, messages))


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_or_unsafe_checkpoints_refused(damaged, damage):
    message = damaged[damage]
    assert message is not None and DAMAGES[damage] in message, message
    if damage == "pickle":
        assert not os.path.exists("/tmp/megatron_prior_pwned"), "the malicious pickle must never run"
