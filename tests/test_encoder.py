"""CLIP encoder (tiny untrained architecture, no downloads) and the embedding cache."""

from __future__ import annotations

import hashlib
import logging

import open_clip
import pytest
import torch
from conftest import fake_hub_cache

from ml.prototypes.encoder import (
    TINY_MODEL,
    ClipEncoder,
    EmbeddingCache,
    EncoderSpec,
    _resolve_weights,
    embed,
    resolve_dtype,
)

TINY = EncoderSpec(TINY_MODEL, None)


def _images(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _hashes(images: torch.Tensor) -> list[str]:
    return [hashlib.sha256(im.numpy().tobytes()).hexdigest() for im in images]


@pytest.fixture(scope="module")
def tiny() -> ClipEncoder:
    return ClipEncoder(TINY, device="cpu", allow_untrained=True, dtype="fp32")


def test_untrained_needs_opt_in_and_warns(caplog):
    with pytest.raises(ValueError, match="allow_untrained=True"):
        ClipEncoder(TINY, device="cpu")
    with caplog.at_level(logging.WARNING, logger="ml.prototypes.encoder"):
        enc = ClipEncoder(TINY, device="cpu", allow_untrained=True, dtype="fp32")
    assert any(
        "UNTRAINED" in r.getMessage() for r in caplog.records if r.name == "ml.prototypes.encoder"
    )
    assert enc.identity == f"{TINY_MODEL}|untrained-seed0|gelu|float32"


def test_tiny_encoder_shape_norm_determinism(tiny):
    assert TINY_MODEL in open_clip.list_models()
    assert (tiny.dim, tiny.image_size) == (32, 64)
    x = _images(5)
    a = tiny.encode(x, batch_size=2)
    assert a.shape == (5, 32) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.equal(a, tiny.encode(x, batch_size=2))  # repeatable
    assert torch.allclose(a, tiny.encode(x, batch_size=5), atol=1e-5)  # batch size: BLAS noise only
    assert not torch.allclose(a[0], a[1])
    # a second untrained build is the same model (seeded init) and leaves the global RNG alone
    state = torch.random.get_rng_state()
    other = ClipEncoder(TINY, device="cpu", allow_untrained=True, dtype="fp32")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(other.encode(x, batch_size=2), a) and other.identity == tiny.identity
    with pytest.raises(ValueError, match="uint8"):
        tiny.encode(x.float())


def test_preprocess_matches_model_config(tiny):
    x = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    p = tiny.preprocess(x)
    assert p.shape == (1, 3, 64, 64)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    assert torch.allclose(p, ((1 - mean) / std).expand_as(p), atol=1e-6)  # clamped, no overshoot


def test_local_checkpoint_matches_source_model(tiny, tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)  # same seed the encoder uses for untrained init
        source = open_clip.create_model(TINY_MODEL, pretrained=None)
    ckpt = tmp_path / "tiny-clip.pt"
    torch.save(source.state_dict(), ckpt)
    enc = ClipEncoder(EncoderSpec(TINY_MODEL, str(ckpt)), device="cpu", dtype="fp32")
    assert enc.identity != tiny.identity and "tiny-clip.pt" in enc.identity
    assert not enc.quick_gelu
    x = _images(3)
    assert torch.equal(enc.encode(x), tiny.encode(x))
    # the identity depends on the content, not the path or mtime
    copy = tmp_path / "sub" / "tiny-clip.pt"
    copy.parent.mkdir()
    copy.write_bytes(ckpt.read_bytes())
    assert (
        _resolve_weights(EncoderSpec(TINY_MODEL, str(copy))).identity == enc.identity.split("|")[1]
    )
    # a checkpoint named as OpenAI's is built with QuickGELU (different activations)
    openai_ckpt = tmp_path / "openai-tiny.pt"
    openai_ckpt.write_bytes(ckpt.read_bytes())
    qg = ClipEncoder(EncoderSpec(TINY_MODEL, str(openai_ckpt)), device="cpu", dtype="fp32")
    assert qg.quick_gelu and "|quickgelu|" in qg.identity
    assert not torch.allclose(qg.encode(x), enc.encode(x))
    forced = EncoderSpec(TINY_MODEL, str(openai_ckpt), quick_gelu=False)
    assert _resolve_weights(forced).quick_gelu is False


def test_openai_tags_use_quick_gelu(tmp_path, monkeypatch):
    # resolved without building (no download): the tag's own config decides the activation
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    path = fake_hub_cache(
        tmp_path, "timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors"
    )
    laion = "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"
    fake_hub_cache(tmp_path, laion, "open_clip_pytorch_model.bin")  # the .bin when no safetensors
    found = _resolve_weights(EncoderSpec("ViT-L-14", "openai"))
    assert (found.kind, found.identity, found.quick_gelu, found.path) == (
        "tag",
        "openai",
        True,
        path,
    )
    found = _resolve_weights(EncoderSpec("ViT-L-14", "laion2b_s32b_b82k"))
    assert found.quick_gelu is False and found.path.name == "open_clip_pytorch_model.bin"


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-L-1'.*ViT-L-14"):
        ClipEncoder(EncoderSpec("ViT-L-1", None), allow_untrained=True)
    with pytest.raises(ValueError, match="checkpoint file not found"):
        ClipEncoder(EncoderSpec(TINY_MODEL, str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="neither a pretrained tag"):
        ClipEncoder(EncoderSpec("ViT-L-14", "no-such-tag"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ValueError, match=r"no local weights for ViT-L-14 'openai'.*--untrained"):
        ClipEncoder(EncoderSpec("ViT-L-14", "openai"))
    bad = tmp_path / "bad.pt"
    torch.save({"visual.proj": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match="does not load"):
        ClipEncoder(EncoderSpec(TINY_MODEL, str(bad)))
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_dtype_auto_and_bf16(tiny):
    cpu = torch.device("cpu")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # no bf16 kernels: emulated, slow
        assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("fp32", cpu) == torch.float32
    enc = ClipEncoder(TINY, device="cpu", allow_untrained=True, dtype="bf16")
    assert enc.identity.endswith("|bfloat16") and enc.identity != tiny.identity
    x = _images(2)
    out = enc.encode(x)
    assert out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out, tiny.encode(x)).min() > 0.95


def test_embed_with_cache(tiny, tmp_path):
    cache = EmbeddingCache(tmp_path / "emb.sqlite")
    x = _images(6)
    hashes = _hashes(x)
    calls: list[int] = []
    real = tiny.encode

    def counting(images, batch_size=32):
        calls.append(len(images))
        return real(images, batch_size=batch_size)

    tiny.encode = counting
    try:
        first = embed(tiny, x, hashes, cache, batch_size=4)
        assert calls == [6]
        second = embed(tiny, x, hashes, cache)
        assert calls == [6]  # nothing encoded the second time
        assert torch.equal(first, second) and second.dtype == torch.float32
        # mixed: two cached, one new, one duplicate; returned in input order
        y = torch.cat([x[3:4], _images(1, seed=9), x[0:1], _images(1, seed=9)])
        mixed = embed(tiny, y, _hashes(y), cache)
        assert calls == [6, 1]
        assert torch.equal(mixed[0], first[3]) and torch.equal(mixed[2], first[0])
        assert torch.equal(mixed[1], mixed[3])
        # without a cache everything is encoded; same values
        assert torch.equal(embed(tiny, x, hashes), first) and calls == [6, 1, 6]
    finally:
        del tiny.encode
    cache.close()
    # persisted on disk, separated by encoder identity
    with EmbeddingCache(tmp_path / "emb.sqlite") as again:
        got = again.get_many(tiny.identity, [*hashes, "absent"])
        assert set(got) == set(hashes) and torch.equal(torch.from_numpy(got[hashes[2]]), first[2])
        assert again.get_many("other-encoder", hashes) == {}
    with pytest.raises(ValueError, match="hashes"):
        embed(tiny, x, hashes[:2])


def test_cache_default_location(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOMED_CACHE_DIR", str(tmp_path / "c"))
    with EmbeddingCache() as cache:
        assert cache.path == tmp_path / "c" / "embeddings.sqlite" and cache.path.exists()
        cache.put_many("e", ["a"], torch.ones(1, 3))
        assert cache.get_many("e", ["a"])["a"].tolist() == [1.0, 1.0, 1.0]


def test_vit_l14_untrained_builds_and_encodes():
    enc = ClipEncoder(
        EncoderSpec("ViT-L-14", None), device="cpu", allow_untrained=True, dtype="fp32"
    )
    assert enc.dim == 768 and enc.image_size == 224
    out = enc.encode(_images(1, size=64))
    assert out.shape == (1, 768) and torch.allclose(out.norm(), torch.tensor(1.0), atol=1e-5)
