"""CLIPScore with a tiny random-weight open_clip model saved in open_clip's local-dir format."""

import huggingface_hub.constants
import open_clip
import pytest
import torch
from PIL import Image

from altogether.clip_score import ClipScorer, ClipWeightsUnavailableError
from altogether.model import save_open_clip_dir

TINY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_open_clip(folder, with_weights=True):
    """open_clip `local-dir:` layout: open_clip_config.json {"model_cfg": ...} + safetensors weights."""
    torch.manual_seed(0)
    weights = open_clip.model.CLIP(**TINY_MODEL_CFG).state_dict() if with_weights else None
    return save_open_clip_dir(folder, weights, TINY_MODEL_CFG)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    folder = write_tiny_open_clip(tmp_path_factory.mktemp("tiny_clip"))
    return ClipScorer.from_open_clip(f"local-dir:{folder}")


IMAGES = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue", "green")]
# 80 BPE tokens of "cat" overflow the 77-token context (75 BPE tokens + start/end tokens).
LONG = "cat " * 80


def test_embeddings_are_unit_norm(scorer):
    images = scorer.embed_images(IMAGES)
    texts, truncated = scorer.embed_texts(["a red square", "a blue square", LONG])
    assert images.shape == (3, 16) and texts.shape == (3, 16)
    assert torch.allclose(images.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert truncated.tolist() == [False, False, True]


def test_score_is_clipped_scaled_cosine(scorer):
    texts = ["a red square", "a blue square", LONG]
    result = scorer.score(IMAGES, texts)
    # Independently: cosine of the raw model's embeddings, 100 * max(cos, 0).
    with torch.no_grad():
        pixels = torch.stack([scorer.preprocess(im) for im in IMAGES])
        tokens = open_clip.tokenize(texts, context_length=77)
        image_features = scorer.model.encode_image(pixels)
        text_features = scorer.model.encode_text(tokens)
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    assert torch.allclose(result.cosine, cosine, atol=1e-5)
    assert torch.allclose(result.clip_score, 100 * cosine.clamp(min=0), atol=1e-4)
    assert result.mean == pytest.approx(float(result.clip_score.mean()))
    assert result.truncation_rate == pytest.approx(1 / 3)
    assert result.summary() == {"CLIPScore": result.mean, "CLIP text truncated (%)": pytest.approx(100 / 3)}


def test_negative_cosine_scores_zero(scorer, monkeypatch):
    # Images embedded opposite to their texts (cosine -1) or orthogonal (0) must both score 0.
    texts = ["a red square", "a blue square"]
    text_embeddings, _ = scorer.embed_texts(texts)
    opposite = torch.stack([-text_embeddings[0], torch.linalg.svd(text_embeddings)[2][-1]])
    monkeypatch.setattr(scorer, "embed_images", lambda images: opposite)
    result = scorer.score(IMAGES[:2], texts)
    assert result.cosine[0] == pytest.approx(-1.0, abs=1e-5)
    assert result.cosine[1] == pytest.approx(0.0, abs=1e-5)
    assert result.clip_score.tolist() == [0.0, pytest.approx(0.0, abs=1e-3)]


def test_truncation_keeps_the_start(scorer):
    embeddings, truncated = scorer.embed_texts([LONG + "dog", LONG + "bird", "cat dog", "cat bird"])
    assert truncated.tolist() == [True, True, False, False]
    assert torch.allclose(embeddings[0], embeddings[1]), "only the dropped tail differs"
    assert not torch.allclose(embeddings[2], embeddings[3])


def test_exactly_full_context_is_not_truncated(scorer):
    # 75 BPE tokens + start + end = 77 tokens: fits; one more token does not.
    _, truncated = scorer.embed_texts(["cat " * 75, "cat " * 76])
    assert truncated.tolist() == [False, True]


def test_batching_does_not_change_results(scorer):
    texts = ["a red square", "a blue square", LONG]
    full = scorer.score(IMAGES, texts)
    scorer.batch_size = 1
    try:
        batched = scorer.score(IMAGES, texts)
    finally:
        scorer.batch_size = 64
    assert torch.allclose(full.cosine, batched.cosine, atol=1e-5)


def test_bad_inputs(scorer):
    with pytest.raises(ValueError, match="differ in length"):
        scorer.score(IMAGES, ["one"])
    with pytest.raises(ValueError, match="texts is empty"):
        scorer.embed_texts([])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        scorer.embed_images(["not an image"])


def test_local_dir_without_weights_is_refused(tmp_path):
    folder = write_tiny_open_clip(tmp_path / "no_weights", with_weights=False)
    with pytest.raises(ClipWeightsUnavailableError, match="local-dir:") as info:
        ClipScorer.from_open_clip(f"local-dir:{folder}")
    assert str(folder) in str(info.value)


def test_offline_tag_fails_fast_naming_the_source(monkeypatch, tmp_path):
    # Offline, with an empty cache: the download must fail and the message must say where from.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ClipWeightsUnavailableError) as info:
        ClipScorer.from_open_clip("ViT-B-32", pretrained="openai")
    message = str(info.value)
    assert "timm/vit_base_patch32_clip_224.openai" in message
    assert "`pretrained`" in message and "local-dir:" in message


def test_missing_checkpoint_file_is_named(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(ClipWeightsUnavailableError, match="absent.safetensors"):
        ClipScorer.from_open_clip("ViT-B-32", pretrained=str(missing))
