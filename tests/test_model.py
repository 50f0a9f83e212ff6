"""The model builder fixes the base checkpoint's config traps and freezes what the recipe asks."""

from __future__ import annotations

import torch
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertForCTC

from w2vbert_asr.cli import compose
from w2vbert_asr.model import build_model, count_parameters
from w2vbert_asr.text import Vocabulary, build_processor


def _tokenizer(tmp_path):
    return build_processor(Vocabulary.build(["habari ya leo watoto"]), tmp_path / "proc").tokenizer


def test_pretrained_checkpoint_traps_are_overridden(tmp_path):
    # A stand-in for facebook/w2v-bert-2.0's config: SpecAugment off, CTC "sum", no vocab, no adapter.
    tiny = compose(["model=tiny"]).model.architecture
    base = Wav2Vec2BertConfig(**tiny, mask_time_prob=0.0, ctc_loss_reduction="sum", vocab_size=None,
                              add_adapter=False, layerdrop=0.1)
    Wav2Vec2BertForCTC(base.__class__(**{**base.to_dict(), "vocab_size": 8})).save_pretrained(tmp_path / "base")
    tokenizer = _tokenizer(tmp_path)
    cfg = compose(["model=w2v_bert_2", f"model.name_or_path={tmp_path / 'base'}", "model.gradient_checkpointing=false"])
    model = build_model(cfg.model, tokenizer)
    c = model.config
    assert (c.ctc_loss_reduction, c.ctc_zero_infinity, c.add_adapter) == ("mean", True, True)
    assert c.apply_spec_augment and c.mask_time_prob > 0 and c.layerdrop == 0.0
    assert c.vocab_size == len(tokenizer) and c.pad_token_id == tokenizer.pad_token_id == 0
    assert model.lm_head.out_features == len(tokenizer)


def test_freezing_options(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    head_only = build_model(compose(["model=tiny", "model.train_head_only=true"]).model, tokenizer)
    trainable = {n.split(".")[0] if n.startswith("lm_head") else ".".join(n.split(".")[:2])
                 for n, p in head_only.named_parameters() if p.requires_grad}
    assert trainable == {"lm_head", "wav2vec2_bert.adapter"}
    frozen2 = build_model(compose(["model=tiny", "model.freeze_encoder_layers=2"]).model, tokenizer)
    layers = frozen2.wav2vec2_bert.encoder.layers
    assert not any(p.requires_grad for layer in layers[:2] for p in layer.parameters())
    assert all(p.requires_grad for layer in layers[2:] for p in layer.parameters())
    assert not any(p.requires_grad for p in frozen2.wav2vec2_bert.feature_projection.parameters())
    t, total = count_parameters(frozen2)
    assert 0 < t < total


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    overrides = ["model=tiny", "model.config_overrides.mask_time_prob=0.0"]
    torch.manual_seed(0)
    plain = build_model(compose(overrides).model, tokenizer)
    torch.manual_seed(0)
    ckpt = build_model(compose([*overrides, "model.gradient_checkpointing=true"]).model, tokenizer)
    assert ckpt.is_activation_checkpointing and not plain.is_activation_checkpointing
    feats, mask = torch.randn(2, 60, 160), torch.ones(2, 60, dtype=torch.long)
    labels = torch.tensor([[3, 4, 5], [6, 7, -100]])
    layer_calls = {}
    for name, m in (("plain", plain), ("ckpt", ckpt)):
        m.train()
        layer_calls[name] = 0
        m.wav2vec2_bert.encoder.layers[1].ffn1.register_forward_hook(  # inside the checkpointed forward
            lambda *_, name=name: layer_calls.__setitem__(name, layer_calls[name] + 1))
        torch.manual_seed(1)  # same dropout masks (the Conformer conv module has dropout 0.1)
        m(input_features=feats, attention_mask=mask, labels=labels).loss.backward()
    # Checkpointing really recomputes each Conformer layer (its feed-forward, here) in the backward ...
    assert layer_calls == {"plain": 1, "ckpt": 2}
    # ... and the recompute gives the gradients of every encoder layer (not only the head's).
    ckpt_grads = dict(ckpt.named_parameters())
    compared = 0
    for name, p in plain.named_parameters():
        if ".encoder.layers." in name and p.grad is not None:
            assert torch.allclose(p.grad, ckpt_grads[name].grad, atol=1e-5, rtol=1e-4), name
            compared += 1
    assert compared > 4 * 20  # every layer's weights, not a handful
    assert torch.allclose(plain.lm_head.weight.grad, ckpt.lm_head.weight.grad, atol=1e-5)
