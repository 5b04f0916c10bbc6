
import pytest
import torch
import torch.nn.functional as F

from altogether.config import DecoderConfig, EncoderConfig, MapperConfig
from altogether.layout import IGNORE_INDEX, collate, tokenize_sample
from altogether.model import (AltogetherModel, ImageEncoder, Mapper, WeightsUnavailableError, build_decoder,
                              choose_attn_implementation)
from altogether.training import CaptionerModule

from .conftest import draw


def _batch(tok, transform, items, budget=32, padding_side="right"):
    samples = [tokenize_sample(tok, p, c, max_alt_tokens=16, max_caption_tokens=budget) for p, c, _ in items]
    batch = collate(samples, num_visual_tokens=4, pad_id=tok.pad_token_id, padding_side=padding_side)
    batch["pixel_values"] = torch.stack([transform(draw(*img)) for _, _, img in items])
    return batch


ITEMS = [("zorbit K-1 for sale", "a photo of zorbit K-1: a red square", ("red", "square")),
         ("", "a blue circle on a white background", ("blue", "circle")),
         ("IMG_2231.jpg", "a green square", ("green", "square"))]


def test_loss_is_mean_cross_entropy_over_caption_and_eos_only(tiny_parts):
    model, tok, transform = tiny_parts
    batch = _batch(tok, transform, ITEMS)
    out = model(batch)
    logits = model.logits(batch)
    expected, count = 0.0, 0
    for row in range(len(ITEMS)):
        for t in range(batch["labels"].shape[1] - 1):
            label = int(batch["labels"][row, t + 1])
            if label != IGNORE_INDEX:
                expected += float(-F.log_softmax(logits[row, t], -1)[label])
                count += 1
    caption_tokens = sum(len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for _, c, _ in ITEMS)
    assert count == caption_tokens == int(out.num_tokens)
    assert out.loss.item() == pytest.approx(expected / count, rel=1e-5)


def test_alt_text_changes_logits_but_not_which_positions_are_trained(tiny_parts):
    model, tok, transform = tiny_parts
    caption, img = "a red square", ("red", "square")
    with_alt = _batch(tok, transform, [("zorbit K-1 for sale", caption, img)])
    other_alt = _batch(tok, transform, [("IMG_2231.jpg shop", caption, img)])
    lab_a, lab_b = with_alt["labels"], other_alt["labels"]
    assert lab_a[lab_a != IGNORE_INDEX].tolist() == lab_b[lab_b != IGNORE_INDEX].tolist()
    n = (lab_a != IGNORE_INDEX).sum()
    last_a = model.logits(with_alt)[0, -int(n) - 1:]
    last_b = model.logits(other_alt)[0, -int(n) - 1:]
    assert not torch.allclose(last_a, last_b, atol=1e-4)
    assert int(model(with_alt).num_tokens) == int(model(other_alt).num_tokens) == int(n)


def test_padded_batch_gives_the_same_logits_as_each_sample_alone(tiny_parts):
    model, tok, transform = tiny_parts
    for side in ("right", "left"):
        batch = _batch(tok, transform, ITEMS, padding_side=side)
        logits = model.logits(batch)
        for row, item in enumerate(ITEMS):
            alone = _batch(tok, transform, [item], padding_side=side)
            mask = batch["attention_mask"][row].bool()
            torch.testing.assert_close(logits[row][mask], model.logits(alone)[0], atol=2e-5, rtol=1e-4)


def test_teacher_forced_logits_equal_incremental_decoding_with_kv_cache(tiny_parts):
    model, tok, transform = tiny_parts
    items = [(p, None, img) for p, _, img in ITEMS]
    batch = _batch(tok, transform, items, padding_side="left")
    embeds = model.embed_images(batch["pixel_values"])
    alt_ids = [tokenize_sample(tok, p, None, max_alt_tokens=16, max_caption_tokens=32).alt_ids for p, _, _ in items]
    out = model.decoder.generate(
        inputs_embeds=model.input_embeddings(batch, embeds), attention_mask=batch["attention_mask"],
        max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
    steps = torch.stack(out.logits, dim=1)  # (batch, 6, vocab), computed step by step from the KV cache
    for row in range(len(items)):
        generated = out.sequences[row].tolist()
        from altogether.layout import SampleTokens
        full = collate([SampleTokens(alt_ids[row], generated)], num_visual_tokens=4, pad_id=tok.pad_token_id)
        full["pixel_values"] = batch["pixel_values"][row:row + 1]
        forced = model.logits(full)[0, -7:-1]  # positions that predict the 6 generated tokens
        torch.testing.assert_close(steps[row], forced, atol=2e-4, rtol=1e-4)


def test_long_caption_is_truncated_but_still_trained(tiny_parts):
    model, tok, transform = tiny_parts
    long_caption = " ".join(["a red square on a white background"] * 10)
    batch = _batch(tok, transform, [("", long_caption, ("red", "square"))], budget=12)
    out = model(batch)
    assert int(out.num_tokens) == 12 and out.loss.item() > 0
    out.loss.backward()
    assert model.mapper.project.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_encoder_gets_no_gradients_and_is_not_optimized(tiny_parts, make_recipe):
    model, tok, transform = tiny_parts
    batch = _batch(tok, transform, ITEMS)
    model.train()
    try:
        assert not model.encoder.visual.training  # stays in eval mode when the module trains
        model(batch).loss.backward()
        assert all(p.grad is None for p in model.encoder.parameters())
        assert all(not p.requires_grad for p in model.encoder.parameters())
        optimizer = CaptionerModule(model, make_recipe()).configure_optimizers()["optimizer"]
        optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert not optimized & {id(p) for p in model.encoder.parameters()}
        assert {id(p) for p in model.mapper.parameters()} <= optimized
        decay = {id(p) for p in optimizer.param_groups[0]["params"]}
        assert all(p.ndim >= 2 for p in model.parameters() if id(p) in decay)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_mapper_shapes_and_last_tokens_are_the_output():
    cfg = MapperConfig(num_visual_tokens=5, num_layers=2, num_heads=2, mlp_ratio=2.0)
    mapper = Mapper(embed_dim=8, width=16, cfg=cfg)
    assert mapper(torch.randn(3, 8)).shape == (3, 5, 16)
    layer = mapper.layers[0]
    assert isinstance(layer.norm1, torch.nn.LayerNorm) and layer.fc1.out_features == 32


def test_mapper_is_clipcaps_transformer_mapper():
    """Pre-norm layers (a norm before attention and before the MLP, none at the end), ReLU MLP, q/k/v without
    bias, constants drawn N(0, 1); the output is the transformer's last ``num_visual_tokens`` positions."""
    torch.manual_seed(0)
    cfg = MapperConfig(num_visual_tokens=40, num_layers=2, num_heads=8, mlp_ratio=2.0)
    mapper = Mapper(embed_dim=32, width=256, cfg=cfg)
    attn = mapper.layers[0].attn
    assert attn.query.bias is None and attn.key_value.bias is None and attn.out.bias is not None
    assert mapper.layers[0].fc1.bias is not None and mapper.layers[0].fc2.bias is not None
    assert 0.95 < mapper.constant.std().item() < 1.05 and abs(mapper.constant.mean().item()) < 0.05
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in mapper.children())  # no final norm

    # The same computation written out from ClipCap's definition, step by step.
    embeds = torch.randn(3, 32)
    x = torch.cat([mapper.project(embeds).view(3, 40, 256), mapper.constant.expand(3, -1, -1)], dim=1)
    for layer in mapper.layers:
        h = layer.norm1(x)
        q = h @ layer.attn.query.weight.T
        k, v = (h @ layer.attn.key_value.weight.T).view(3, 80, 2, 8, 32).unbind(2)
        scores = torch.einsum("bnhd,bmhd->bnmh", q.view(3, 80, 8, 32), k) * 32**-0.5
        x = x + layer.attn.out(torch.einsum("bnmh,bmhd->bnhd", scores.softmax(dim=2), v).reshape(3, 80, 256))
        x = x + layer.fc2(torch.relu(layer.fc1(layer.norm2(x))))
    torch.testing.assert_close(mapper(embeds), x[:, 40:], atol=1e-5, rtol=1e-5)


def test_full_size_parameter_counts_on_meta_device():
    """The paper's model from its real configs, without weights: mapper, OPT-1.3B and what trains."""
    import open_clip

    from altogether.training import set_decoder_trainable
    from transformers import OPTConfig, OPTForCausalLM

    from altogether.tiny import OPT_1_3B_CONFIG, architecture

    with torch.device("meta"):
        clip = open_clip.create_model("ViT-H-14-quickgelu", pretrained=None, device="meta")
        opt = OPTForCausalLM(OPTConfig(**architecture(OPT_1_3B_CONFIG)))  # facebook/opt-1.3b's config.json
        mapper = Mapper(1024, 2048, MapperConfig())
    encoder = ImageEncoder(clip.visual, clip.visual.output_dim)
    model = set_decoder_trainable(AltogetherModel(encoder, mapper, opt, pad_id=1, eos_id=2), "full")
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert clip.visual.output_dim == 1024 and opt.config.vocab_size == 50272
    assert 630e6 < count(encoder) < 635e6  # ViT-H/14 image tower: ~632M
    assert count(opt) == 1_315_758_080  # OPT-1.3B (lm_head is tied to the token embedding)
    assert count(mapper.project) == 83_968_000  # 1024 -> 40 x 2048, with bias
    assert [count(layer) for layer in mapper.layers] == [33_570_816] * 8
    assert mapper.constant.numel() == 81_920  # 40 x 2048
    assert count(mapper) == 352_616_448
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 352_616_448 + 1_315_758_080 == 1_668_374_528  # mapper + decoder; the encoder is frozen


def test_offline_loading_fails_fast_naming_the_source(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match=r"(?s)facebook/opt-125m.*name_or_path=DIR"):
        build_decoder(DecoderConfig(name_or_path="facebook/opt-125m"))
    with pytest.raises(WeightsUnavailableError, match=r"(?s)metaclip_fullcc.*local-dir:"):
        ImageEncoder.from_config(EncoderConfig(name="ViT-B-32-quickgelu", pretrained="metaclip_fullcc"))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_later_token_never_changes_an_earlier_position(attn, tiny_parts, tiny_model_cfg):
    """Causal and block-diagonal under every attention implementation, padded and packed batches alike."""
    import dataclasses

    from altogether.layout import collate_packed

    trained, tok, transform = tiny_parts
    cfg = dataclasses.replace(tiny_model_cfg, decoder=dataclasses.replace(tiny_model_cfg.decoder, attn_implementation=attn))
    model, _ = AltogetherModel.from_config(cfg, tok)
    model.load_state_dict(trained.state_dict())
    model.eval()
    assert model.decoder.config._attn_implementation == attn
    samples = [tokenize_sample(tok, p, c, max_alt_tokens=16, max_caption_tokens=32) for p, c, _ in ITEMS * 2]
    pixels = torch.stack([transform(draw(*img)) for _, _, img in ITEMS * 2])
    padded = collate(samples, num_visual_tokens=4, pad_id=tok.pad_token_id)
    padded["pixel_values"] = pixels
    packed = collate_packed(samples, num_visual_tokens=4, pad_id=tok.pad_token_id, max_tokens=64)
    packed["pixel_values"] = pixels[packed.pop("order")]
    assert (packed["segment_ids"].amax(dim=1) > 1).any()  # a row holds several samples
    for batch in (padded, packed):
        with torch.no_grad():
            before = model.logits(batch)
            row = int(packed["segment_ids"].amax(dim=1).argmax()) if batch is packed else 0
            # The last caption token of the row's first sample (the position before its EOS label).
            first = batch["segment_ids"][row] == 1 if batch is packed else batch["attention_mask"][row].bool()
            t = int(first.nonzero().max()) - 1
            changed = {k: v.clone() for k, v in batch.items()}
            changed["input_ids"][row, t] = (changed["input_ids"][row, t] + 1) % len(tok)
            after = model.logits(changed)
        torch.testing.assert_close(after[row, :t], before[row, :t], atol=1e-6, rtol=0)
        assert (after[row, t] - before[row, t]).abs().max() > 1e-3  # the change is seen where it is
        if batch is packed:  # the next sample in the row never sees it
            later = packed["segment_ids"][row] > 1
            torch.testing.assert_close(after[row][later], before[row][later], atol=1e-6, rtol=0)


def test_attention_implementation_choice():
    assert choose_attn_implementation("auto", "cpu") == "sdpa"
    assert choose_attn_implementation("eager", "cpu") == "eager"


def test_packed_batch_gives_each_sample_its_unpacked_loss(tiny_parts):
    from altogether.layout import collate_packed

    model, tok, transform = tiny_parts
    items = ITEMS * 3
    samples = [tokenize_sample(tok, p, c, max_alt_tokens=16, max_caption_tokens=32) for p, c, _ in items]
    pixels = torch.stack([transform(draw(*img)) for _, _, img in items])
    packed = collate_packed(samples, num_visual_tokens=4, pad_id=tok.pad_token_id, max_tokens=64)
    order = packed.pop("order")
    packed["pixel_values"] = pixels[order]
    padded = collate(samples, num_visual_tokens=4, pad_id=tok.pad_token_id)
    padded["pixel_values"] = pixels
    assert packed["input_ids"].shape[0] < len(items)  # several samples share a row
    assert packed["attention_mask"].float().mean() > padded["attention_mask"].float().mean()  # less padding
    losses, where = model.token_losses(packed)
    seg = packed["segment_ids"]
    slots = [(r, int(k)) for r in range(seg.shape[0]) for k in seg[r].unique() if k]  # row-major = `order`
    token_slot = list(zip(where[:, 0].tolist(), seg[where[:, 0], where[:, 1] + 1].tolist()))
    for (row, segment), i in zip(slots, order.tolist()):
        expected, _ = model.token_losses(_batch(tok, transform, [items[i]]))
        mine = losses[[k for k, slot in enumerate(token_slot) if slot == (row, segment)]]
        torch.testing.assert_close(mine, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(model(packed).loss, model(padded).loss, atol=2e-5, rtol=1e-4)
