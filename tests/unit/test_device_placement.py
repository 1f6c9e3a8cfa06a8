"""Tensors a forward or a load builds land on the model's device (found on CUDA: masks and adapters made on the
CPU). The `meta` device stands in for a GPU here: mixing it with CPU tensors fails the same way."""

import torch
from sieve.backbone import AttentionContext
from sieve.backbone.lora import merge_lora

from .helpers import random_ids, tiny_model


def test_attention_mask_is_built_on_the_given_device():
    ctx = AttentionContext(causal=True, q_len=3, q_offset=5, key_padding=None, device=torch.device("meta"))
    assert ctx.needs_mask and ctx.mask.device.type == "meta" and ctx.mask.shape == (1, 1, 3, 8)


def test_forward_with_a_cache_offset_builds_its_mask_on_the_model_device():
    model = tiny_model().to("meta")  # a multi-token forward after a cache fill needs an explicit causal mask
    model.setup_caches(1, 64)
    ids = random_ids(1, 20).to("meta")
    model(ids[:, :12], input_pos=0)
    out = model(ids[:, 12:], input_pos=12).logits
    assert out.device.type == "meta" and out.shape[:2] == (1, 8)


def test_merge_lora_moves_the_adapter_to_the_weights_device():
    model = tiny_model().to("meta")
    lin = model.layers[0].attention.wqkv
    n, k = lin.weight.shape
    adapter = {"layers.0.attention.wqkv.lora_A": torch.randn(4, k), "layers.0.attention.wqkv.lora_B": torch.randn(n, 4)}
    assert merge_lora(model, adapter, 2.0) == 1
    assert model.layers[0].attention.wqkv.weight.device.type == "meta"


def test_cuda_backbones_keep_cudnn_attention_out():
    from sieve.backbone.loader import use_shape_stable_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        use_shape_stable_attention()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
